"""Router modules: the learned part of routing (gate weights, Soft MoE slots) and the registry.

A router maps grouped tokens (G, S, D) to a :class:`RouterOutput`: a routing plan, the weighted
auxiliary loss, and the gates used for statistics. The maths lives in :mod:`visionmoe.routing`.
Adding a router means one class here (or in its own file) and one line in :data:`ROUTERS`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from visionmoe.routing import (
    AUX_LOSSES,
    DenseRouting,
    Plan,
    balance_kl_loss,
    expert_capacity,
    expert_choice,
    importance_loss,
    load_loss,
    sinkhorn,
    soft_per_sample_routing,
    soft_routing,
    sparse_ot_plan,
    switch_loss,
    token_choice,
    z_loss,
)
from visionmoe.routing.capacity import check_capacity_factor

SAME = "same"
"""``eval_capacity_factor=SAME`` evaluates with the training capacity factor."""


@dataclass(frozen=True)
class RouterOutput:
    plan: Plan
    aux_loss: Tensor  # scalar: Σ weight · loss over the router's enabled aux losses
    aux_losses: dict[str, Tensor]  # each enabled loss, unweighted and detached, for logging
    gates: Tensor | None  # (G, S, E) routing distribution per token (for entropy), or None


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
        reduce = None
        if self.aux_group is not None and self.training:  # the global batch's losses (set_aux_loss_group)
            from torch.distributed.nn.functional import all_reduce  # differentiable: its backward sums too

            group = self.aux_group
            reduce = lambda t: all_reduce(t, group=group)  # noqa: E731
        total = x.new_zeros((), dtype=torch.float32)
        logged = {}
        for name, weight in self.aux_loss_weights.items():
            value = self._aux_loss(name, reduce=reduce, **pooled)
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


def _check_finite(logits: Tensor, router: str) -> None:
    # On the CPU the check is free and names the problem before it spreads. On an accelerator it
    # would be a host sync per MoE layer per step, so it runs only under torch.autograd's anomaly
    # mode (torch.autograd.set_detect_anomaly(True)), PyTorch's own switch for hunting NaNs; there
    # the Trainer still catches the non-finite loss that follows, at its next log point. Skipped
    # while torch.compile traces, where a data-dependent branch would break the graph.
    if torch.compiler.is_compiling() or (logits.device.type != "cpu" and not torch.is_anomaly_enabled()):
        return
    if not bool(torch.isfinite(logits).all()):
        nan, inf = int(torch.isnan(logits).sum()), int(torch.isinf(logits).sum())
        raise FloatingPointError(
            f"{router} router logits are not finite: {nan} NaN and {inf} inf of {logits.numel()} values"
        )


class _LinearRouter(Router):
    """Routers whose logits are a bias-free linear map of the token, computed in fp32.

    ``mlp_hidden_dim`` (an int) makes the map an MLP instead: Linear(D, M) → GELU → Linear(M, E),
    the "MLP router" Videau et al. (2025) compare with the plain linear one (which they find best).
    The output layer keeps the name ``weight`` (E, M), so code that reads a router's gate finds it.
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

    def logits(self, x: Tensor) -> Tensor:
        x = x.float()
        if self.hidden is not None:  # (G, S, D) -> (G, S, M)
            x = F.gelu(F.linear(x, self.hidden.weight.float(), self.hidden.bias.float()))
        logits = F.linear(x, self.weight.float())  # (G, S, E), fp32 as V-MoE
        _check_finite(logits, self.name)
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


class _Capacity:
    """Train and eval capacity settings shared by the sparse routers."""

    def _init_capacity(self, capacity_factor, eval_capacity_factor, capacity, capacity_multiple, dropless_ok):
        check_capacity_factor(capacity_factor)
        if eval_capacity_factor != SAME:
            check_capacity_factor(eval_capacity_factor, "eval_capacity_factor")
        if not dropless_ok and capacity is None and (capacity_factor is None or eval_capacity_factor is None):
            raise ValueError(f"router {self.name!r} needs a capacity_factor or a capacity, got None (dropless)")
        expert_capacity(1, 1, capacity=capacity, multiple=capacity_multiple)  # validates both
        self.capacity_factor, self.eval_capacity_factor = capacity_factor, eval_capacity_factor
        self.capacity, self.capacity_multiple = capacity, capacity_multiple

    def expert_capacity(self, num_tokens: int, k: int = 1) -> int | None:
        """C for a group of ``num_tokens``, with the train or eval capacity factor by ``self.training``."""
        factor = self.capacity_factor
        if not self.training and self.eval_capacity_factor != SAME:
            factor = self.eval_capacity_factor
        return expert_capacity(
            num_tokens,
            self.num_experts,
            k=k,
            capacity_factor=factor,
            capacity=self.capacity,
            multiple=self.capacity_multiple,
        )


class TopKRouter(_Capacity, _LinearRouter):
    """Softmax token choice (V-MoE, Riquelme et al. 2021): top-k experts per token, hard capacity.

    Args:
        k: experts per token.
        capacity_factor: C = ceil(k·S·capacity_factor/E); None routes dropless.
        eval_capacity_factor: the factor used in eval mode (``"same"``: the training one).
        capacity: C given directly (overrides the factor); capacity_multiple: round C up to this.
        noise_std: std of the Gaussian noise added to the logits in training; None means 1/E
            (V-MoE), 0 disables it. Never applied in eval mode.
        batch_priority: Batch Prioritized Routing (drop the least confident tokens first).
        renormalize: renormalise each token's kept gates to sum to 1.
        aux_loss_weights: by default importance 0.005 and load 0.005 (load only with noise).
        mlp_hidden_dim: None for the linear gate; an int M for an MLP gate D → M → E.
    """

    name = "topk"
    supported_aux_losses = ("importance", "load", "switch", "z", "balance_kl")

    def __init__(
        self,
        dim: int,
        num_experts: int,
        *,
        k: int = 1,
        capacity_factor: float | None = 1.25,
        eval_capacity_factor: float | str | None = SAME,
        capacity: int | None = None,
        capacity_multiple: int = 1,
        noise_std: float | None = None,
        batch_priority: bool = False,
        renormalize: bool = False,
        aux_loss_weights: Mapping[str, float] | None = None,
        mlp_hidden_dim: int | None = None,
        device=None,
        dtype=None,
    ) -> None:
        if not (isinstance(k, int) and 1 <= k <= num_experts):
            raise ValueError(f"need 1 <= k <= num_experts, got k={k!r}, num_experts={num_experts}")
        self.k = k
        self.noise_std = 1.0 / num_experts if noise_std is None else float(noise_std)
        if self.noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got noise_std={noise_std}")
        super().__init__(
            dim,
            num_experts,
            aux_loss_weights=aux_loss_weights,
            mlp_hidden_dim=mlp_hidden_dim,
            device=device,
            dtype=dtype,
        )
        if "load" in self.aux_loss_weights and self.noise_std == 0:
            raise ValueError("the load aux loss needs router noise, got noise_std=0")
        self._init_capacity(capacity_factor, eval_capacity_factor, capacity, capacity_multiple, dropless_ok=True)
        self.batch_priority, self.renormalize = batch_priority, renormalize

    def default_aux_loss_weights(self) -> dict[str, float]:
        return {"importance": 0.005, "load": 0.005} if self.noise_std > 0 else {"importance": 0.01}

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_experts={self.num_experts}, k={self.k}, capacity_factor={self.capacity_factor}, "
            f"noise_std={self.noise_std:g}, batch_priority={self.batch_priority}, renormalize={self.renormalize}"
        )

    def select(self, logits: Tensor) -> Tensor | None:
        """Scores the top-k is taken on; None means the gates themselves."""
        return None

    def forward(self, x: Tensor) -> RouterOutput:
        logits = self.logits(x)  # (G, S, E)
        noisy = logits
        if self.training and self.noise_std > 0:
            noisy = logits + self.noise_std * torch.randn_like(logits)
        gates = noisy.softmax(dim=-1)  # (G, S, E)
        plan = token_choice(
            gates,
            self.k,
            self.expert_capacity(x.shape[1], self.k),
            select=self.select(logits),
            batch_priority=self.batch_priority,
            renormalize=self.renormalize,
        )
        first = plan.expert[:, : x.shape[1]]  # first choices, in priority order
        first = torch.empty_like(first).scatter_(1, plan.token[:, : x.shape[1]], first)  # back to token order
        aux, logged = self._aux(
            x, logits=logits, gates=gates, noisy_logits=noisy, expert=first, k=self.k, noise_std=self.noise_std
        )
        return RouterOutput(plan, aux, logged, gates)


class SinkhornTopKRouter(TopKRouter):
    """Sinkhorn token choice (Liu et al. TMLR 2024): top-k on the balanced transport plan.

    The plan (cost -logits, ε, ``num_iters`` iterations, tokens sum to 1, experts to S/E)
    selects the experts; the softmax gates are the combine weights. No noise, no aux loss by
    default: the transport plan balances the experts.
    """

    name = "sinkhorn_topk"
    supported_aux_losses = ("importance", "switch", "z", "balance_kl")

    def __init__(self, dim, num_experts, *, num_iters: int = 20, epsilon: float = 1.0, **kwargs) -> None:
        if "noise_std" in kwargs:
            raise TypeError("sinkhorn_topk takes no noise_std: the transport plan does the balancing")
        super().__init__(dim, num_experts, noise_std=0.0, **kwargs)
        sinkhorn(torch.zeros(1, 1, 1), num_iters, epsilon)  # validates both
        self.num_iters, self.epsilon = num_iters, epsilon

    def default_aux_loss_weights(self) -> dict[str, float]:
        return {}

    def select(self, logits: Tensor) -> Tensor:
        return sinkhorn(logits, self.num_iters, self.epsilon)


class ExpertChoiceRouter(_Capacity, _LinearRouter):
    """Softmax expert choice (Zhou et al. 2022): each expert takes its top-C tokens.

    Args:
        capacity_factor: C = ceil(S·capacity_factor/E), the average number of experts per token.
        eval_capacity_factor, capacity, capacity_multiple, mlp_hidden_dim: as for :class:`TopKRouter`.
    """

    name = "expert_choice"

    def __init__(
        self,
        dim: int,
        num_experts: int,
        *,
        capacity_factor: float = 1.0,
        eval_capacity_factor: float | str = SAME,
        capacity: int | None = None,
        capacity_multiple: int = 1,
        aux_loss_weights: Mapping[str, float] | None = None,
        mlp_hidden_dim: int | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(
            dim,
            num_experts,
            aux_loss_weights=aux_loss_weights,
            mlp_hidden_dim=mlp_hidden_dim,
            device=device,
            dtype=dtype,
        )
        self._init_capacity(capacity_factor, eval_capacity_factor, capacity, capacity_multiple, dropless_ok=False)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_experts={self.num_experts}, capacity_factor={self.capacity_factor}"

    def select(self, logits: Tensor, capacity: int) -> Tensor | None:
        return None

    def forward(self, x: Tensor) -> RouterOutput:
        logits = self.logits(x)  # (G, S, E)
        gates = logits.softmax(dim=-1)
        capacity = min(self.expert_capacity(x.shape[1]), x.shape[1])
        plan = expert_choice(gates, capacity, select=self.select(logits, capacity))
        aux, logged = self._aux(x, logits=logits, gates=gates)
        return RouterOutput(plan, aux, logged, gates)


class SinkhornExpertChoiceRouter(ExpertChoiceRouter):
    """Sinkhorn expert choice (Liu et al. TMLR 2024): top-C tokens per expert on the Sinkhorn plan."""

    name = "sinkhorn_expert_choice"

    def __init__(self, dim, num_experts, *, num_iters: int = 20, epsilon: float = 1.0, **kwargs) -> None:
        super().__init__(dim, num_experts, **kwargs)
        sinkhorn(torch.zeros(1, 1, 1), num_iters, epsilon)  # validates both
        self.num_iters, self.epsilon = num_iters, epsilon

    def select(self, logits: Tensor, capacity: int) -> Tensor:
        return sinkhorn(logits, self.num_iters, self.epsilon)


class SparseExpertChoiceRouter(ExpertChoiceRouter):
    """Sparsity-constrained expert choice (Liu et al. TMLR 2024; Liu, Puigcerver, Blondel 2023).

    Each expert's tokens are the support of its column in the squared-L2-regularised transport
    plan whose columns are C-sparse (see :mod:`visionmoe.routing.sparse_ot`); an expert may take
    fewer than C tokens. Combine weights are the softmax gates.

    Args:
        gamma: the quadratic regularisation γ.
        num_iters: dual-ascent steps.
    """

    name = "sparse_expert_choice"

    def __init__(self, dim, num_experts, *, gamma: float = 1.0, num_iters: int = 50, **kwargs) -> None:
        super().__init__(dim, num_experts, **kwargs)
        sparse_ot_plan(torch.zeros(1, 1, 1), 1, gamma=gamma, num_iters=num_iters)  # validates both
        self.gamma, self.num_iters = gamma, num_iters

    def select(self, logits: Tensor, capacity: int) -> Tensor:
        return sparse_ot_plan(logits, capacity, gamma=self.gamma, num_iters=self.num_iters)


class SoftRouter(Router):
    """Soft MoE router (Puigcerver et al. 2023, Sec. 2.1 and 2.3).

    Logits are ``scale · normalize(x) · normalize(Φ)`` with Φ (D, E, P) and a learnable scalar
    scale (normalising both stabilises training at large D, Sec. 2.3). Dispatch is a softmax over
    the tokens of a group, combine a softmax over all E·P slots.

    Args:
        slots_per_expert: P, the expert's "capacity" in the D/C form.
    """

    name = "soft"
    supported_aux_losses = ()

    def __init__(
        self,
        dim: int,
        num_experts: int,
        *,
        slots_per_expert: int = 1,
        aux_loss_weights: Mapping[str, float] | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(dim, num_experts, aux_loss_weights=aux_loss_weights)
        if not (isinstance(slots_per_expert, int) and slots_per_expert >= 1):
            raise ValueError(f"slots_per_expert must be an int >= 1, got slots_per_expert={slots_per_expert!r}")
        self.slots_per_expert = slots_per_expert
        self.phi = nn.Parameter(torch.empty(dim, num_experts, slots_per_expert, device=device, dtype=dtype))
        self.scale = nn.Parameter(torch.ones((), device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.phi, std=self.dim**-0.5)  # LeCun normal
        nn.init.ones_(self.scale)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_experts={self.num_experts}, slots_per_expert={self.slots_per_expert}"

    def route(self, logits: Tensor):
        return soft_routing(logits)

    def forward(self, x: Tensor) -> RouterOutput:
        xn = F.normalize(x.float(), dim=-1)  # (G, S, D)
        phi = F.normalize(self.phi.float(), dim=0)  # (D, E, P)
        logits = self.scale.float() * torch.einsum("gsd,dep->gsep", xn, phi)  # (G, S, E, P)
        _check_finite(logits, self.name)
        plan = self.route(logits)
        aux, logged = self._aux(x)
        return RouterOutput(plan, aux, logged, plan.combine.sum(dim=-1))


class SoftPerSampleRouter(SoftRouter):
    """Per-sample Soft MoE (Sun et al. 2026): dispatch softmax over experts/slots, per token.

    The layer refuses groups that span samples with this router, so no sample's output can
    depend on another sample in the batch.
    """

    name = "soft_per_sample"
    per_sample = True

    def route(self, logits: Tensor):
        return soft_per_sample_routing(logits)


class DenseRouter(Router):
    """The dense baseline: every token through every expert, weight 1 (one FFN of width E·H)."""

    name = "dense"

    def __init__(self, dim: int, num_experts: int, *, aux_loss_weights=None, device=None, dtype=None) -> None:
        super().__init__(dim, num_experts, aux_loss_weights=aux_loss_weights)

    def forward(self, x: Tensor) -> RouterOutput:
        G, S, _ = x.shape
        aux, logged = self._aux(x)
        return RouterOutput(DenseRouting(G, S, self.num_experts, x), aux, logged, None)


ROUTERS: dict[str, type[Router]] = {
    "topk": TopKRouter,
    "sinkhorn_topk": SinkhornTopKRouter,
    "expert_choice": ExpertChoiceRouter,
    "sinkhorn_expert_choice": SinkhornExpertChoiceRouter,
    "sparse_expert_choice": SparseExpertChoiceRouter,
    "soft": SoftRouter,
    "soft_per_sample": SoftPerSampleRouter,
    "dense": DenseRouter,
}
"""Every router by name. A router class may also be passed to :class:`visionmoe.MoE` directly."""


def router_class(router: str | type[Router]) -> type[Router]:
    if isinstance(router, type) and issubclass(router, Router):
        return router
    if router not in ROUTERS:
        raise ValueError(f"unknown router {router!r}; choose one of: {', '.join(ROUTERS)}")
    return ROUTERS[router]
