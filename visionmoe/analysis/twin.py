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
    goes through, rounded to the nearest integer >= 1: H times the router's
    :meth:`~visionmoe.layers.routers.Router.experts_per_token` (with the training settings):

    - token choice (topk, sinkhorn_topk): k·H (dropped assignments ignored);
    - expert choice: C·E/S·H with C = ceil(S·capacity_factor/E) capped at S, S from
      ``example_input``; without it the nominal capacity_factor·H (a fixed ``capacity`` needs S);
    - Soft MoE: (E·P/S)·H with P slots per expert, S read from a forward pass of ``example_input``
      (required for Soft MoE);
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


def _experts_per_token(name: str, moe: MoE, tokens: dict[str, int]) -> float:
    """The router's answer, with S where it was measured."""
    return moe.router.experts_per_token(tokens.get(name))


def _needs_example(moe: MoE) -> bool:
    """Whether the router cannot answer without S (Soft MoE; expert choice with a fixed capacity)."""
    try:
        moe.router.experts_per_token()
    except ValueError:
        return True
    return False


def _tokens_per_group(
    twin: nn.Module, layers: list[tuple[str, MoE]], example_input: Tensor | Sequence[Tensor] | None
) -> dict[str, int]:
    """S of every layer that needs it, from one eval-mode forward of the (still MoE) copy."""
    needed = [(name, moe) for name, moe in layers if _needs_example(moe)]
    if example_input is not None:  # widths that depend on S are exact when S is known
        needed = [(name, moe) for name, moe in layers if moe.router.depends_on_group_size]
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
