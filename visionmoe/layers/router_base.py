"""The router base: what every router shares — its output, its aux losses (per batch, or over the
global batch of several processes), the linear gate of the token- and expert-choice routers and their
capacity settings. The routers themselves and their registry are in :mod:`visionmoe.layers.routers`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from visionmoe import checks, native
from visionmoe.routing import (
    AUX_LOSSES,
    Plan,
    balance_kl_loss,
    expert_capacity,
    importance_loss,
    load_loss,
    switch_loss,
    z_loss,
)
from visionmoe.routing.capacity import check_capacity_factor
from visionmoe.routing.noise import counter_normal, draw_key

SAME = "same"
"""``eval_capacity_factor=SAME`` evaluates with the training capacity factor."""


def router_noise(like: Tensor, shape: Sequence[int] | None = None) -> Tensor:
    """Standard normal noise shaped like ``like`` (a router's logits), or of ``shape`` on ``like``'s device
    and dtype (logits not yet computed). On the CPU, the counter-based stream of :mod:`visionmoe.routing.noise`
    under a key drawn from the default generator: by the native kernel where ``like`` can take it, else by
    torch ops (the same draws to the rounding of log, sin and cos). Elsewhere ``torch.randn`` (one kernel on a
    GPU, cheaper than the torch ops' launches)."""
    shape = tuple(like.shape if shape is None else shape)
    if like.device.type != "cpu":
        return torch.randn(shape, device=like.device, dtype=like.dtype)
    key = draw_key()
    if native.usable(like):
        return native.standard_normal(shape, key.tolist())
    return counter_normal(shape, key).to(like.dtype)


@dataclass(frozen=True)
class RouterOutput:
    plan: Plan
    aux_loss: Tensor  # scalar: Σ weight · loss over the router's enabled aux losses
    aux_losses: dict[str, Tensor]  # each enabled loss, unweighted and detached, for logging
    gates: Tensor | None  # (G, S, E) routing distribution per token (for entropy), or None
    entropy_sum: Tensor | None = None  # Σ over tokens of the gates' entropy, where the router has it already
    counts: tuple[Tensor, Tensor] | None = None  # the plan's (G, E) kept and (G,) unrouted counts, where it has them


class Router(nn.Module):
    """Base class. Subclasses set ``name``, the aux losses they support and their defaults."""

    name: ClassVar[str]
    supported_aux_losses: ClassVar[tuple[str, ...]] = ()
    per_sample: ClassVar[bool] = False  # True: must never route across samples (the layer checks)

    def __init__(self, dim: int, num_experts: int, *, aux_loss_weights: Mapping[str, float] | None = None) -> None:
        super().__init__()
        self.dim, self.num_experts = dim, num_experts
        weights = dict(self.default_aux_loss_weights() if aux_loss_weights is None else aux_loss_weights)
        for key, value in weights.items():
            if key not in self.supported_aux_losses:
                known = ", ".join(self.supported_aux_losses) or "none"
                raise ValueError(
                    f"router {self.name!r} does not support aux loss {key!r}; supported: {known} (all: {AUX_LOSSES})"
                )
            if not value >= 0:
                raise ValueError(f"aux loss weight must be >= 0, got {key}={value}")
        self.aux_loss_weights = weights
        self.aux_group: dist.ProcessGroup | None = None  # set_aux_loss_group: losses over these ranks' batches

    def default_aux_loss_weights(self) -> dict[str, float]:
        return {}

    # ---- what the router knows about its own routing: asked by models, twins and profiles ----

    routed: ClassVar[bool] = True
    """Whether tokens are routed at all; False for the dense router, whose layer counts as a plain FFN (not in ρ)."""

    depends_on_group_size: ClassVar[bool] = False
    """Whether :meth:`experts_per_token` depends on S, the tokens per group (then pass ``tokens``)."""

    def fused_layer(self, x: Tensor, experts: nn.Module, backend: str) -> tuple[Tensor, RouterOutput] | None:
        """The whole MoE layer on (G, S, D) tokens, this router and ``experts`` in one native pass each way,
        where the router has one and it gives what its forward and ``backend`` give one after the other:
        the layer's output (G, S, D) and this router's output. None (the default): no such path here."""
        return None

    def hooked(self) -> bool:
        """Whether a hook would see this router's call (its own, or every module's): then the layer calls it."""
        module = nn.modules.module
        return bool(
            self._forward_hooks
            or self._forward_pre_hooks
            or self._backward_hooks
            or self._backward_pre_hooks
            or module._global_forward_hooks
            or module._global_forward_pre_hooks
            or module._global_backward_hooks
            or module._global_backward_pre_hooks
        )

    def experts_per_token(self, tokens: int | None = None) -> float:
        """Experts an average token is sent through, with the training settings: the layer's active
        expert width over one expert's width, what a dense FFN of equal active FLOPs needs.

        ``tokens``: S, the tokens per group. A router whose answer depends on S
        (:attr:`depends_on_group_size`) gives its nominal answer without it where it has one, else
        raises ValueError. Assignments dropped for capacity are not subtracted (that depends on the
        data). Every router class defines it.
        """
        raise NotImplementedError(f"router {self.name!r} does not define experts_per_token")

    def group_capacity(self, tokens: int) -> int | None:
        """C, the slots per expert that a plan for a group of ``tokens`` tokens is padded to, in the
        current mode (train or eval); None when the plan has no fixed buffer (dropless token choice,
        Soft MoE, the dense router), whose C is then the largest load read from the data."""
        return None

    def _aux(self, x: Tensor, **losses_inputs: Any) -> tuple[Tensor, dict[str, Tensor]]:
        """Weighted sum of the enabled aux losses, over all tokens of the batch.

        Balance is a property of the batch, not of a routing group: with one group per sample of
        a (B, D) head (S = 1), per-group losses would push every sample's gates towards uniform
        instead of spreading the batch over the experts. So (G, S, E) inputs are pooled into one
        (1, G·S, E) group before the losses see them.
        """
        if not self.aux_loss_weights:
            return x.new_zeros((), dtype=torch.float32), {}
        pooled = {k: _pool_groups(v) for k, v in losses_inputs.items()}
        return self._weighted_aux(x, lambda name, reduce: self._aux_loss(name, reduce=reduce, **pooled))

    def _weighted_aux(
        self, x: Tensor, loss_of: Callable[[str, Callable[[Tensor], Tensor] | None], Tensor]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Σ weight · ``loss_of(name, reduce)`` over the enabled aux losses, and each loss detached;
        ``reduce`` sums a per-expert statistic over the ranks of :func:`set_aux_loss_group` (or is None)."""
        reduce = None
        if self.aux_group is not None and self.training:  # the global batch's losses (set_aux_loss_group)
            from torch.distributed.nn.functional import all_reduce  # differentiable: its backward sums too

            group = self.aux_group
            reduce = lambda t: all_reduce(t, group=group)  # noqa: E731
        total = x.new_zeros((), dtype=torch.float32)
        logged = {}
        for name, weight in self.aux_loss_weights.items():
            value = loss_of(name, reduce)
            total = total + weight * value
            logged[name] = value.detach()
        return total, logged

    def _aux_loss(self, name: str, *, reduce, **inputs: Tensor | None) -> Tensor:
        raise NotImplementedError(name)


def set_aux_loss_group(model: nn.Module, group: dist.ProcessGroup | None) -> int:
    """Make every router of ``model`` compute its aux losses on the batch of all ranks of ``group``.

    In training mode each router then sums its per-expert statistics over ``group`` (one small
    differentiable all-reduce per router and step; every rank must run the same forwards) before
    forming its losses, so data-parallel ranks optimise the global batch's balance — what one
    process on that batch would — instead of each its own share. ``None`` restores per-batch losses.
    Evaluation never communicates. Returns the number of routers set.
    """
    routers = [m for m in model.modules() if isinstance(m, Router)]
    for router in routers:
        router.aux_group = group
    return len(routers)


def _pool_groups(value: Any) -> Any:
    """(G, S, ...) -> (1, G·S, ...) for tensors; other values pass through."""
    if isinstance(value, Tensor) and value.dim() >= 2:
        return value.reshape(1, -1, *value.shape[2:])
    return value


def is_exporting() -> bool:
    """Whether ``torch.export`` is tracing (torch < 2.5 has no such flag: never)."""
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return bool(is_exporting is not None and is_exporting())


def check_finite(logits: Tensor, router: str) -> None:
    # On the CPU the check is free and names the problem before it spreads. On an accelerator it
    # would be a host sync per MoE layer per step, so it runs only under torch.autograd's anomaly
    # mode (torch.autograd.set_detect_anomaly(True)), PyTorch's own switch for hunting NaNs; there
    # the Trainer still catches the non-finite loss that follows, at its next log point. Skipped
    # while torch.compile traces, where a data-dependent branch would break the graph.
    if torch.compiler.is_compiling() or (logits.device.type != "cpu" and not torch.is_anomaly_enabled()):
        return
    checks.check_finite(logits, f"the {router} router's logit tensor")


class LinearRouter(Router):
    """Routers whose logits are a bias-free linear map of the token, computed in fp32.

    ``mlp_hidden_dim`` (an int) makes the map an MLP instead: Linear(D, M) → GELU → Linear(M, E),
    the "MLP router" Videau et al. (2025) compare with the plain linear one (which they find best).
    The output layer keeps the name ``weight`` (E, M), so code that reads a router's gate finds it.
    On the CPU in float32 with D ≤ 32 and D, E multiples of 8, the plain linear map runs in C
    (:func:`visionmoe.native.router_logits`; equal to ``F.linear`` to float rounding).
    """

    supported_aux_losses = ("importance", "switch", "z", "balance_kl")

    def __init__(
        self,
        dim: int,
        num_experts: int,
        *,
        aux_loss_weights=None,
        mlp_hidden_dim: int | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(dim, num_experts, aux_loss_weights=aux_loss_weights)
        if mlp_hidden_dim is not None and not (isinstance(mlp_hidden_dim, int) and mlp_hidden_dim >= 1):
            raise ValueError(f"mlp_hidden_dim must be a positive int or None, got mlp_hidden_dim={mlp_hidden_dim!r}")
        self.mlp_hidden_dim = mlp_hidden_dim
        self.hidden = None if mlp_hidden_dim is None else nn.Linear(dim, mlp_hidden_dim, device=device, dtype=dtype)
        gate_in = dim if mlp_hidden_dim is None else mlp_hidden_dim
        self.weight = nn.Parameter(torch.empty(num_experts, gate_in, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)  # nn.Linear's default
        if self.hidden is not None:
            self.hidden.reset_parameters()

    def logits(self, x: Tensor, check: bool = True) -> Tensor:
        """(G, S, D) tokens -> (G, S, E) fp32 logits, checked finite unless ``check`` is False (for a caller
        that checks them itself: the fused router, whose kernel notes non-finite logits as it reads them)."""
        x = x.float()
        if self.hidden is not None:  # (G, S, D) -> (G, S, M)
            x = F.gelu(F.linear(x, self.hidden.weight.float(), self.hidden.bias.float()))
        weight = self.weight.float()
        if self.hidden is None and native.logits_supported(x, weight):  # CNN maps: one C pass, not a BLAS call
            logits = native.router_logits(x, weight)
        else:
            logits = F.linear(x, weight)  # (G, S, E), fp32 as V-MoE
        if check:
            check_finite(logits, self.name)
        return logits

    def _aux_loss(self, name, *, reduce, logits, gates, noisy_logits=None, expert=None, k=1, noise_std=0.0):
        if name == "importance":
            return importance_loss(gates, reduce)
        if name == "load":
            return load_loss(logits, noisy_logits, noise_std, k, reduce)
        if name == "switch":
            first = expert if expert is not None else gates.argmax(dim=-1)
            return switch_loss(gates, first, reduce)
        if name == "z":
            return z_loss(logits, reduce)
        return balance_kl_loss(gates, reduce)


class Capacity:
    """Train and eval capacity settings shared by the sparse routers.

    ``static_shapes`` (set by :func:`visionmoe.export.static_shapes`, and in effect while
    ``torch.export`` traces): dropless routing takes C = S, the most a group can send one expert
    (a token picks an expert at most once), instead of the largest load read from the data. Every
    assignment is still kept, so the plan's tokens, experts and weights are the same; only the
    padded buffers are larger, and no shape depends on the data.
    """

    static_shapes: bool = False

    def _init_capacity(self, capacity_factor, eval_capacity_factor, capacity, capacity_multiple, dropless_ok):
        check_capacity_factor(capacity_factor)
        if eval_capacity_factor != SAME:
            check_capacity_factor(eval_capacity_factor, "eval_capacity_factor")
        if not dropless_ok and capacity is None and (capacity_factor is None or eval_capacity_factor is None):
            raise ValueError(f"router {self.name!r} needs a capacity_factor or a capacity, got None (dropless)")
        expert_capacity(1, 1, capacity=capacity, multiple=capacity_multiple)  # validates both
        self.capacity_factor, self.eval_capacity_factor = capacity_factor, eval_capacity_factor
        self.capacity, self.capacity_multiple = capacity, capacity_multiple

    def active_capacity_factor(self) -> float | None:
        """The capacity factor in effect: the eval one in eval mode (unless "same"), else the training one."""
        if not self.training and self.eval_capacity_factor != SAME:
            return self.eval_capacity_factor
        return self.capacity_factor

    def expert_capacity(self, num_tokens: int, k: int = 1) -> int | None:
        """C for a group of ``num_tokens``, with the train or eval capacity factor by ``self.training``."""
        capacity = expert_capacity(
            num_tokens,
            self.num_experts,
            k=k,
            capacity_factor=self.active_capacity_factor(),
            capacity=self.capacity,
            multiple=self.capacity_multiple,
        )
        if capacity is None and (self.static_shapes or is_exporting()):
            return num_tokens  # dropless, bounded by the group's size instead of read from the data
        return capacity
