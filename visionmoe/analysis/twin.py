"""The dense twin of an MoE model: the same network with every MoE layer replaced by a dense FFN.

An MoE result means little without the dense model it is compared to. Matching FLOPs asks "is
routing a better use of the same compute?"; matching parameters asks "is routing a better use of
the same weights?". Both twins are deep copies, so every shared (non-MoE) weight starts from the
same initialisation as the MoE model's.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from visionmoe.analysis.modes import eval_mode
from visionmoe.layers.moe import MoE, moe_layers
from visionmoe.layers.routers import DenseRouter, SoftRouter
from visionmoe.routing.capacity import expert_capacity

MATCHES = ("flops", "params")


def dense_twin(
    model: nn.Module,
    *,
    match: str = "flops",
    example_input: Tensor | Sequence[Tensor] | None = None,
) -> nn.Module:
    """A deep copy of ``model`` whose MoE layers are dense FFNs with the same interface.

    Each :class:`MoE` layer becomes ``MoE(dim, 1, width, router="dense", activation=..., bias=...)``
    with the experts' activation and bias, on their device and dtype: one FFN of width ``width``.

    ``match="flops"``: ``width`` is the MoE's *active* width, the hidden units an average token
    goes through, rounded to the nearest integer >= 1:

    - token choice (routers with ``k``: topk, sinkhorn_topk): k·H (dropped assignments ignored);
    - expert choice (routers with ``capacity_factor`` and no ``k``): capacity_factor·H, since
      C·E/S = capacity_factor experts per token on average (the training factor; when the router
      has a fixed ``capacity`` instead, min(C, S)·E/S·H, with S from ``example_input``);
    - Soft MoE: (E·P/S)·H with P slots per expert and S tokens per group, read from a forward pass
      of ``example_input`` (required for Soft MoE);
    - the dense router: E·H.

    The twin skips the router (and Soft MoE's dispatch/combine), so its FLOPs are the MoE model's
    minus those. ``match="params"``: ``width`` = E·H, the same expert weights; with biases the
    twin has (E - 1)·D fewer output biases per layer, and no router parameters.

    Args:
        model: the MoE model; it is not modified (the forward for Soft MoE runs on the copy).
        match: ``"flops"`` or ``"params"``.
        example_input: a batch (or sequence of positional inputs) for layers whose active width
            depends on the tokens per group.

    Example:
        >>> twin = dense_twin(moe_vit, match="flops", example_input=torch.randn(2, 3, 32, 32))
    """
    if match not in MATCHES:
        raise ValueError(f"match must be one of {', '.join(repr(m) for m in MATCHES)}, got match={match!r}")
    twin = copy.deepcopy(model)
    layers = moe_layers(twin)
    tokens = _tokens_per_group(twin, layers, example_input) if match == "flops" else {}
    for name, moe in layers:
        experts = moe.num_experts if match == "params" else _experts_per_token(name, moe, tokens)
        dense = _dense_ffn(moe, max(1, round(experts * moe.hidden_dim)))
        if name == "":
            return dense
        parent_name, _, attr = name.rpartition(".")
        setattr(twin.get_submodule(parent_name), attr, dense)
    return twin


def _dense_ffn(moe: MoE, width: int) -> MoE:
    experts = moe.experts
    act = experts.act
    activation = copy.deepcopy(act) if isinstance(act, nn.Module) else act  # keeps its settings (GELU tanh)
    w = experts.w1
    return MoE(
        moe.dim,
        1,
        width,
        router="dense",
        activation=activation,
        bias=experts.b1 is not None,
        device=w.device,
        dtype=w.dtype,
    )


def _needs_tokens(moe: MoE) -> bool:
    router = moe.router
    if isinstance(router, SoftRouter):
        return True
    return not hasattr(router, "k") and getattr(router, "capacity", None) is not None


def _is_expert_choice(moe: MoE) -> bool:
    return hasattr(moe.router, "capacity_factor") and not hasattr(moe.router, "k")


def _experts_per_token(name: str, moe: MoE, tokens: dict[str, int]) -> float:
    """Average experts an average token goes through: the active width over H."""
    router, E = moe.router, moe.num_experts
    if isinstance(router, DenseRouter):
        return float(E)
    if isinstance(router, SoftRouter):
        return E * router.slots_per_expert / tokens[name]
    if hasattr(router, "k"):
        return float(router.k)
    if hasattr(router, "capacity_factor"):
        if name in tokens:  # exact: C·E/S with C = ceil(S·cf/E) as routed (rounded, capped at S)
            S = tokens[name]
            C = expert_capacity(
                S,
                E,
                capacity_factor=router.capacity_factor,
                capacity=router.capacity,
                multiple=router.capacity_multiple,
            )
            return min(C, S) * E / S
        return float(router.capacity_factor)  # nominal, when no example input tells S
    raise ValueError(
        f"cannot match the FLOPs of MoE layer {name!r}: router {type(router).__name__} has neither k "
        "nor capacity_factor and is not soft or dense"
    )


def _tokens_per_group(
    twin: nn.Module, layers: list[tuple[str, MoE]], example_input: Tensor | Sequence[Tensor] | None
) -> dict[str, int]:
    """S of every layer that needs it, from one eval-mode forward of the (still MoE) copy."""
    needed = [(name, moe) for name, moe in layers if _needs_tokens(moe)]
    if example_input is not None:  # expert-choice widths are exact when S is known
        needed = [(name, moe) for name, moe in layers if _needs_tokens(moe) or _is_expert_choice(moe)]
    if not needed:
        return {}
    if example_input is None:
        names = ", ".join(repr(name) for name, _ in needed)
        raise ValueError(
            f"dense_twin(match='flops') needs example_input: the active width of MoE layer(s) {names} "
            "depends on the tokens per group"
        )
    inputs = (example_input,) if isinstance(example_input, Tensor) else tuple(example_input)
    tokens: dict[str, int] = {}

    def record(name: str) -> Any:
        def hook(router: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            tokens[name] = args[0].shape[1]  # router input: (G, S, D)

        return hook

    handles = [moe.router.register_forward_hook(record(name)) for name, moe in needed]
    try:
        with eval_mode(twin), torch.no_grad():
            twin(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    if missing := [name for name, _ in needed if name not in tokens]:
        raise ValueError(f"MoE layer(s) {missing} did not run in the forward pass of example_input")
    return tokens
