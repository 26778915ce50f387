"""Router modules: the learned part of routing (gate weights, Soft MoE slots) and the registry.

A router maps grouped tokens (G, S, D) to a :class:`RouterOutput`: a routing plan, the weighted
auxiliary loss, and the gates used for statistics. The maths lives in :mod:`visionmoe.routing`; what
the routers share (the base class, aux losses, the linear gate, capacity) in
:mod:`visionmoe.layers.router_base`. Adding a router means one class here (or in its own file) and one
line in :data:`ROUTERS`; the class also answers for itself what models, dense twins and profiles ask
of it (:meth:`Router.experts_per_token`, :meth:`Router.group_capacity`, :attr:`Router.routed`).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visionmoe import native
from visionmoe.layers.dispatch import auto_fuses
from visionmoe.layers.router_base import (
    SAME,
    Capacity,
    LinearRouter,
    Router,
    RouterOutput,
    check_finite,
    router_noise,
    set_aux_loss_group,
)
from visionmoe.routing import (
    DenseRouting,
    expert_capacity,
    expert_choice,
    sinkhorn,
    soft_per_sample_routing,
    soft_routing,
    softmax_experts,
    sparse_ot_plan,
    token_choice,
)
from visionmoe.routing.losses import cv_squared_loss
from visionmoe.routing.plan import Routing
from visionmoe.routing.token_choice import renormalized


class TopKRouter(Capacity, LinearRouter):
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

    On the CPU the routing after the logits (noise, softmax, top-k, capacity positions, gate weights,
    importance and load sums) runs as one native pass forward and one backward where it applies
    (:meth:`fused`, :mod:`visionmoe.native`): the same plan and, to float rounding, the same gates,
    losses and gradients as the ATen operators, which run everywhere else; with the ``fused`` experts
    after it, the whole layer is one native node (:meth:`fused_layer`).
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

    def experts_per_token(self, tokens: int | None = None) -> float:
        """k: each token is offered to k experts, whatever the group size."""
        return float(self.k)

    def group_capacity(self, tokens: int) -> int | None:
        """ceil(k·S·capacity_factor/E) (or the fixed ``capacity``); None when dropless."""
        return self.expert_capacity(tokens, self.k)

    def select(self, logits: Tensor) -> Tensor | None:
        """Scores the top-k is taken on; None means the gates themselves."""
        return None

    FUSED_AUX_LOSSES = frozenset({"importance", "load"})

    def fused(self, logits: Tensor) -> bool:
        """Whether :meth:`forward` takes the fused native router (:func:`visionmoe.native.topk_router`):
        plain softmax top-k (not a subclass's selection), no Batch Prioritized Routing, aux losses among
        importance and load (the defaults), E a multiple of 8, k <= 64, and float32 CPU logits with the
        kernel built."""
        return (
            type(self).select is TopKRouter.select
            and self.num_experts % native.LANES == 0
            and not self.batch_priority
            and set(self.aux_loss_weights) <= self.FUSED_AUX_LOSSES
            and self.k <= native.MAX_K
            and native.usable(logits)
        )

    def fused_layer(self, x: Tensor, experts: nn.Module, backend: str) -> tuple[Tensor, RouterOutput] | None:
        """The layer in one autograd node (:func:`visionmoe.native.topk_moe`: the native logits, router and
        experts' kernels back to back) where the router takes its fused path with native logits, the local
        losses and no renormalisation, the experts take ``fused`` (``backend``, or ``auto``'s choice:
        :func:`~visionmoe.layers.dispatch.auto_fuses`), and no hook watches the router's call: the same
        output, losses, plan and gradients, bit for bit, as :meth:`forward` then the ``fused`` backend."""
        experts_fuse = (
            auto_fuses(x, experts) if backend == "auto" else backend == "fused" and native.ffn_supported(experts)
        )
        local = self.aux_group is None or not self.training
        if not (experts_fuse and local and self.hidden is None and not self.renormalize and x.numel()):
            return None
        if not (self.fused(x) and native.logits_supported(x, self.weight)) or self.hooked():
            return None
        G, S, D = x.shape
        noise = router_noise(x, (G, S, self.num_experts)) if self.training and self.noise_std > 0 else None
        capacity = self.group_capacity(S)
        aux_weights = tuple(self.aux_loss_weights.items())
        args = (self.weight, experts, noise, self.noise_std, self.k, capacity, aux_weights, self._logits_name)
        y, aux, gates, weight, expert, position, kept, entropy, values, *counts = native.topk_moe(
            x.reshape(G * S, D), S, *args
        )
        plan = self._choice_plan(expert, position, weight, kept, S, capacity)
        logged = dict(zip(self.aux_loss_weights, values.unbind(), strict=True))
        return y.view(G, S, D), RouterOutput(plan, aux, logged, gates, entropy_sum=entropy, counts=tuple(counts))

    @property
    def _logits_name(self) -> str:
        """What the non-finite-logits error calls the tensor."""
        return f"the {self.name} router's logit tensor"

    def _choice_plan(self, expert, position, weight, kept, tokens: int, capacity: int | None) -> Routing:
        """The plan of the fused kernel's choice-major outputs (dropless: capacity the largest position + 1)."""
        if capacity is None:
            capacity = int(position.max()) + 1 if position.numel() else 1
        token = _choice_tokens(tokens, self.k).expand(expert.shape[0], -1)  # token s for every choice j (a view)
        if self.renormalize:
            weight = renormalized(weight, token, tokens)
        E = self.num_experts
        return Routing(token, expert, position, weight, kept, tokens, E, capacity, choices=self.k, token_order=True)

    def forward(self, x: Tensor) -> RouterOutput:
        logits = self.logits(x, check=False)  # (G, S, E)
        if self.fused(logits):
            return self._forward_fused(logits)  # checks the logits as it reads them
        check_finite(logits, self.name)
        noisy = logits
        if self.training and self.noise_std > 0:
            noisy = logits + self.noise_std * router_noise(logits)
        gates = softmax_experts(noisy)  # (G, S, E)
        plan = token_choice(
            gates,
            self.k,
            self.group_capacity(x.shape[1]),
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

    def _forward_fused(self, logits: Tensor) -> RouterOutput:
        """:meth:`forward` in one native pass each way; the same plan, losses and gates to float rounding."""
        S = logits.shape[1]
        noise = router_noise(logits) if self.training and self.noise_std > 0 else None  # the same draws
        capacity = self.group_capacity(S)
        load = "load" in self.aux_loss_weights
        # the losses within the router's node unless they are formed over several processes' batches
        local = self.aux_group is None or not self.training
        aux_weights = tuple(self.aux_loss_weights.items()) if local else None
        args = (self.noise_std, self.k, capacity, load, self._logits_name, aux_weights)
        outputs = native.topk_router(logits, noise, *args)
        gates, weight, importance, load_sums, expert, position, kept, entropy = outputs[:8]
        plan = self._choice_plan(expert, position, weight, kept, S, capacity)
        if local:
            aux, values = outputs[8:]
            logged = dict(zip(self.aux_loss_weights, values.unbind(), strict=True))
        else:
            sums = {"importance": importance, "load": load_sums}
            aux, logged = self._weighted_aux(logits, lambda name, reduce: cv_squared_loss(sums[name], reduce))
        return RouterOutput(plan, aux, logged, gates, entropy_sum=entropy)


@functools.lru_cache(maxsize=64)
def _choice_tokens(tokens: int, k: int) -> Tensor:
    """(K·S,) int64: the token of each assignment of a choice-major plan in token order (0 .. S-1, K times),
    made once per shape (the plans hold expanded views of it, which nothing writes to)."""
    return torch.arange(tokens, device="cpu").repeat(k)


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


class ExpertChoiceRouter(Capacity, LinearRouter):
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

    depends_on_group_size = True

    def experts_per_token(self, tokens: int | None = None) -> float:
        """C·E/S with the training C = ceil(S·capacity_factor/E) capped at S (each expert takes C of
        the S tokens); without ``tokens``, the nominal capacity_factor (refused for a fixed ``capacity``)."""
        if tokens is None:
            if self.capacity is not None:
                raise ValueError(f"router {self.name!r} with capacity={self.capacity} needs the tokens per group")
            return float(self.capacity_factor)
        capacity = expert_capacity(
            tokens,
            self.num_experts,
            capacity_factor=self.capacity_factor,
            capacity=self.capacity,
            multiple=self.capacity_multiple,
        )
        return min(capacity, tokens) * self.num_experts / tokens

    def group_capacity(self, tokens: int) -> int:
        """ceil(S·capacity_factor/E) (or the fixed ``capacity``), at most S: an expert takes a token once."""
        return min(self.expert_capacity(tokens), tokens)

    def select(self, logits: Tensor, capacity: int) -> Tensor | None:
        return None

    def forward(self, x: Tensor) -> RouterOutput:
        logits = self.logits(x)  # (G, S, E)
        gates = softmax_experts(logits)
        capacity = self.group_capacity(x.shape[1])
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

    depends_on_group_size = True

    def experts_per_token(self, tokens: int | None = None) -> float:
        """E·P/S: the group's S tokens share E·P slots, each of one expert's width."""
        if tokens is None:
            raise ValueError(f"router {self.name!r} needs the tokens per group (its E·P slots are shared by them)")
        return self.num_experts * self.slots_per_expert / tokens

    def route(self, logits: Tensor):
        return soft_routing(logits)

    def forward(self, x: Tensor) -> RouterOutput:
        xn = F.normalize(x.float(), dim=-1)  # (G, S, D)
        phi = F.normalize(self.phi.float(), dim=0)  # (D, E, P)
        logits = self.scale.float() * torch.einsum("gsd,dep->gsep", xn, phi)  # (G, S, E, P)
        check_finite(logits, self.name)
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
    routed = False

    def __init__(self, dim: int, num_experts: int, *, aux_loss_weights=None, device=None, dtype=None) -> None:
        super().__init__(dim, num_experts, aux_loss_weights=aux_loss_weights)

    def experts_per_token(self, tokens: int | None = None) -> float:
        """E: every token goes through every expert."""
        return float(self.num_experts)

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


__all__ = [
    "ROUTERS",
    "SAME",
    "Capacity",
    "DenseRouter",
    "ExpertChoiceRouter",
    "LinearRouter",
    "Router",
    "RouterOutput",
    "SinkhornExpertChoiceRouter",
    "SinkhornTopKRouter",
    "SoftPerSampleRouter",
    "SoftRouter",
    "SparseExpertChoiceRouter",
    "TopKRouter",
    "router_class",
    "set_aux_loss_group",
]
