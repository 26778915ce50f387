"""Routing statistics of an MoE layer: loads, drops, entropy; summable across batches."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from visionmoe import native
from visionmoe.routing.plan import Plan, Routing


@dataclass(frozen=True)
class RoutingStats:
    """Counts behind the routing statistics. Add two to accumulate; read the properties.

    All fields are detached tensors on the layer's device; properties convert to Python floats,
    so reading them (not computing them) is what synchronises with an accelerator.

    Attributes:
        tokens_per_expert: (E,) assignments processed by each expert (Soft MoE: combine mass).
        tokens: tokens routed.
        unrouted: tokens processed by no expert (dropped by every choice, or chosen by none).
        assignments: token-expert assignments offered (K·S per group for token choice, E·C slots for
            expert choice).
        dropped: offered assignments not processed: a token-choice assignment past its expert's
            capacity, or an expert-choice slot the sparse transport plan left empty.
        entropy_sum: Σ over tokens of the entropy (nats) of the token's routing distribution.
    """

    tokens_per_expert: Tensor
    tokens: Tensor
    unrouted: Tensor
    assignments: Tensor
    dropped: Tensor
    entropy_sum: Tensor

    def __add__(self, other: RoutingStats) -> RoutingStats:
        return RoutingStats(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    @property
    def dropped_fraction(self) -> float:
        """Fraction of requested token-expert assignments that were dropped."""
        return float(self.dropped / self.assignments.clamp_min(1))

    @property
    def unrouted_fraction(self) -> float:
        """Fraction of tokens that no expert processed (their MoE output is 0)."""
        return float(self.unrouted / self.tokens.clamp_min(1))

    @property
    def load_cv(self) -> float:
        """Coefficient of variation (std / mean) of the per-expert load; 0 is perfect balance."""
        load = self.tokens_per_expert.double()
        return float(load.std(unbiased=False) / load.mean().clamp_min(1e-12))

    @property
    def load_max_over_mean(self) -> float:
        load = self.tokens_per_expert.double()
        return float(load.max() / load.mean().clamp_min(1e-12))

    @property
    def router_entropy(self) -> float:
        """Mean per-token routing entropy in nats (log E for uniform gates; NaN for dense)."""
        return float(self.entropy_sum / self.tokens.clamp_min(1))

    def as_dict(self) -> dict[str, float | list[float]]:
        return {
            "tokens_per_expert": self.tokens_per_expert.tolist(),
            "dropped_fraction": self.dropped_fraction,
            "unrouted_fraction": self.unrouted_fraction,
            "load_cv": self.load_cv,
            "load_max_over_mean": self.load_max_over_mean,
            "router_entropy": self.router_entropy,
        }


@torch.no_grad()
def routing_stats(
    plan: Plan,
    gates: Tensor | None,
    num_groups: int,
    num_tokens: int,
    entropy_sum: Tensor | None = None,
    counts: tuple[Tensor, Tensor] | None = None,
) -> RoutingStats:
    """Statistics of one forward pass. gates: (G, S, E) routing distribution, or None (dense);
    ``entropy_sum``: their entropy summed over the tokens, where the router computed it (the fused
    top-k router), instead of computing it here from ``gates``; ``counts``: a token-choice plan's (G, E)
    kept assignments and (G,) tokens with none kept, where the router counted them (the whole-layer node),
    as :func:`visionmoe.native.plan_counts` would."""
    if isinstance(plan, Routing):
        device = plan.kept.device
        assignments = torch.tensor(float(plan.kept.numel()), dtype=torch.float64, device=device)
        if counts is None and plan.choices and native.usable(plan.weight):  # one C pass over the choice-major plan
            counts = native.plan_counts(plan.expert, plan.kept, plan.choices, plan.num_experts)
        if counts is not None:
            per_group, unrouted_per_group = counts
            load = per_group.sum(0).double()
            unrouted = unrouted_per_group.sum().double()
            dropped = assignments - load.sum()
        else:
            load = plan.tokens_per_expert().double()
            routed = torch.zeros(num_groups, num_tokens, dtype=torch.long, device=device)
            routed.scatter_add_(1, plan.token, plan.kept.long())  # kept assignments per token
            unrouted = (routed == 0).sum().double()
            dropped = (~plan.kept).sum().double()
    else:
        load = plan.tokens_per_expert().double()
        device = load.device
        unrouted, assignments, dropped = (torch.zeros((), dtype=torch.float64, device=device) for _ in range(3))
    tokens = torch.tensor(float(num_groups * num_tokens), dtype=torch.float64, device=device)
    if entropy_sum is not None:
        entropy = entropy_sum.detach().double()
    elif gates is None:
        entropy = torch.full((), math.nan, dtype=torch.float64, device=device)
    else:
        entropy = -torch.xlogy(gates, gates).sum().double()
    return RoutingStats(load, tokens, unrouted, assignments, dropped, entropy)


class RoutingStatsAccumulator:
    """Sums :class:`RoutingStats` across batches (for an epoch's or a test set's statistics)."""

    def __init__(self) -> None:
        self.total: RoutingStats | None = None

    def update(self, stats: RoutingStats | None) -> None:
        if stats is not None:
            self.total = stats if self.total is None else self.total + stats

    def compute(self) -> RoutingStats:
        if self.total is None:
            raise RuntimeError("RoutingStatsAccumulator.compute() called before any update()")
        return self.total

    def reset(self) -> None:
        self.total = None
