"""Token choice: each token picks its top-K experts; experts keep what fits their capacity.

V-MoE (Riquelme et al. 2021, Sec. 2.1-2.2, eq. 1): gates g(x) = TOP_K(softmax(W x + ε)),
ε ~ N(0, σ²) in training with σ = 1/E. Each expert has C slots per group; every token's first
choice is placed before any token's second choice, so a full expert drops second choices first.
Batch Prioritized Routing (Sec. 4.1) orders tokens by their top gate value instead of by position,
so that when an expert fills up it is the least confident tokens that are dropped.

Sinkhorn token choice (Liu et al. TMLR 2024, Sec. 3.2) selects the top-K experts on the balanced
transport plan instead of the softmax, and combines with the softmax gates.
"""

from __future__ import annotations

import torch
from torch import Tensor

from visionmoe.routing.plan import Routing, positions_in_expert, stable_topk


def token_choice(
    gates: Tensor,
    k: int,
    capacity: int | None,
    *,
    select: Tensor | None = None,
    batch_priority: bool = False,
    renormalize: bool = False,
) -> Routing:
    """Route each token to its top-``k`` experts with a hard per-expert capacity.

    Args:
        gates: (G, S, E) gate values (softmax over experts); the combine weights come from here.
        k: experts per token K.
        capacity: slots per expert and group C; None routes dropless (C = the largest load).
        select: (G, S, E) scores the top-k is taken on (default: ``gates``); the Sinkhorn plan
            for Sinkhorn token choice. Ties go to the lower expert index.
        batch_priority: order tokens by their top gate value (Batch Prioritized Routing).
        renormalize: divide each token's kept gate values by their sum (kept choices sum to 1).

    Returns:
        A :class:`Routing` with A = K·S assignments per group, ordered choice-major: all first
        choices (in priority order), then all second choices, ...
    """
    G, S, E = gates.shape
    _, expert = stable_topk(gates if select is None else select, k, dim=-1)  # (G, S, K)
    if batch_priority:
        # Most confident token first: sort by the top gate value, ties by position.
        top_gate = gates.detach().max(dim=-1).values  # (G, S)
        order = torch.argsort(-top_gate, dim=1, stable=True)  # (G, S)
    else:
        order = torch.arange(S, device=gates.device).expand(G, S)
    token = order[:, None, :].expand(G, k, S)  # (G, K, S): choice-major priority
    expert = expert.gather(1, order[:, :, None].expand(G, S, k)).transpose(1, 2)  # (G, K, S)
    token, expert = token.reshape(G, k * S), expert.reshape(G, k * S)  # (G, A)
    position = positions_in_expert(expert, E)  # (G, A)
    if capacity is None:
        capacity = int(position.max()) + 1 if position.numel() else 1
    kept = position < capacity
    weight = gate_weights(gates, token, expert, kept)  # (G, A): gate of (s, e)
    if renormalize:
        weight = renormalized(weight, token, S)
    return Routing(token, expert, position, weight, kept, S, E, capacity, choices=k, token_order=not batch_priority)


def gate_weights(gates: Tensor, token: Tensor, expert: Tensor, kept: Tensor) -> Tensor:
    """(G, A) combine weights: the gate of each assignment's (token, expert) in (G, S, E) ``gates``, 0 where
    not ``kept``."""
    G, S, E = gates.shape
    return gates.reshape(G, S * E).gather(1, token * E + expert) * kept


def renormalized(weight: Tensor, token: Tensor, num_tokens: int) -> Tensor:
    """(G, A) kept gate weights divided by their sum per token (tokens with none keep 0)."""
    total = weight.new_zeros(weight.shape[0], num_tokens).scatter_add(1, token, weight)  # (G, S)
    return weight / total.gather(1, token).clamp_min(torch.finfo(weight.dtype).tiny)
