"""Running experts on a routing plan: the fast paths, and the D/C einsum reference.

Fast paths (the layer uses these):
    sparse  — sort-based: stable argsort of the kept assignments by expert, gather the token rows,
              per-expert matmul on the stacked weights, weighted scatter-add (index_add) back.
              Work is proportional to the assignments actually processed; no (G, S, E, C) tensor.
    soft    — Soft MoE: three batched matmuls (slot inputs, experts, combine); no per-expert loop.
    dense   — every expert on every token, as one FFN of width E·H.

Reference (tests, benchmarks, analysis — never the fast path):
    einsum_moe — builds the dense dispatch and combine tensors (G, S, E, C) and applies
    y = einsum(C, experts(einsum(D, x))), the unified form of Liu et al. (TMLR 2024).
"""

from __future__ import annotations

import torch
from torch import Tensor

from visionmoe.layers.experts import Experts
from visionmoe.routing.plan import DenseRouting, Plan, Routing, SoftRouting


def sparse_moe(x: Tensor, plan: Routing, experts: Experts) -> Tensor:
    """(G, S, D) tokens -> (G, S, D) through a sparse plan, sort-based."""
    G, S, D = x.shape
    E = plan.num_experts
    token = (plan.token + S * torch.arange(G, device=x.device)[:, None]).reshape(-1)  # (G·A,) flat row
    key = torch.where(plan.kept, plan.expert, E).reshape(-1)  # dropped assignments sort last (key E)
    order = torch.argsort(key, stable=True)  # (G·A,): kept assignments grouped by expert
    counts = torch.bincount(key, minlength=E + 1)[:E].tolist()  # rows per expert (one host sync)
    order = order[: sum(counts)]
    rows = token[order]  # (N,) source row of each processed assignment
    y = experts.forward_sorted(x.reshape(G * S, D)[rows], counts)  # (N, D)
    y = y * plan.weight.reshape(-1)[order, None].to(y.dtype)
    out = torch.zeros(G * S, D, dtype=y.dtype, device=x.device).index_add_(0, rows, y)  # weighted scatter-add
    return out.reshape(G, S, D)


def soft_moe(x: Tensor, plan: SoftRouting, experts: Experts) -> Tensor:
    """(G, S, D) tokens -> (G, S, D) through Soft MoE weights, by batched matmuls."""
    G, S, D = x.shape
    _, _, E, P = plan.dispatch.shape
    dispatch = plan.dispatch.to(x.dtype).reshape(G, S, E * P)
    slots = torch.bmm(dispatch.transpose(1, 2), x)  # (G, E·P, D): slot inputs X̃ = Dᵀ X
    slots = slots.reshape(G, E, P, D).transpose(0, 1).reshape(E, G * P, D)  # (E, G·P, D)
    y = experts.forward_batched(slots)  # (E, G·P, D)
    y = y.reshape(E, G, P, D).transpose(0, 1).reshape(G, E * P, D)  # (G, E·P, D)
    return torch.bmm(plan.combine.to(y.dtype).reshape(G, S, E * P), y)  # (G, S, D): Y = C Ỹ


def dense_moe(x: Tensor, plan: DenseRouting, experts: Experts) -> Tensor:
    """(G, S, D) -> (G, S, D): all experts on all tokens, summed (one FFN of width E·H)."""
    G, S, D = x.shape
    return experts.forward_all(x.reshape(G * S, D)).reshape(G, S, D)


def apply_plan(x: Tensor, plan: Plan, experts: Experts) -> Tensor:
    """The fast path for any plan type."""
    if isinstance(plan, Routing):
        return sparse_moe(x, plan, experts)
    if isinstance(plan, SoftRouting):
        return soft_moe(x, plan, experts)
    return dense_moe(x, plan, experts)


def einsum_moe(x: Tensor, plan: Plan, experts: Experts) -> Tensor:
    """Reference: the layer written with the dense (G, S, E, C) dispatch and combine tensors."""
    dispatch = plan.dispatch_tensor().to(x.dtype)  # (G, S, E, C)
    combine = plan.combine_tensor().to(x.dtype)  # (G, S, E, C)
    G, _, E, C = dispatch.shape
    slots = torch.einsum("gsec,gsd->egcd", dispatch, x)  # (E, G, C, D): each expert's buffer
    y = experts.forward_batched(slots.reshape(E, G * C, -1)).reshape(E, G, C, -1)
    return torch.einsum("gsec,egcd->gsd", combine, y)
