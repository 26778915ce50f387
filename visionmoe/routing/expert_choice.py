"""Expert choice: each expert picks its top-C tokens (Zhou et al. 2022, eq. 1).

    S = softmax(X · W_g)        (G, S, E) token-to-expert affinities
    G, I = TopK(Sᵀ, C)          per expert, the C best tokens and their gates

Every expert is full by construction (perfect balance, no aux loss needed); a token may be
taken by 0..E experts. Sinkhorn expert choice (Liu et al. TMLR 2024, Sec. 3.2) and
sparsity-constrained expert choice take the top-C on a transport plan instead, and combine with
the softmax gates.
"""

from __future__ import annotations

import torch
from torch import Tensor

from visionmoe.routing.plan import Routing, stable_topk


def expert_choice(gates: Tensor, capacity: int, *, select: Tensor | None = None) -> Routing:
    """Each expert takes its top-``capacity`` tokens of the group.

    Args:
        gates: (G, S, E) gate values; the combine weight of a chosen (token, expert) pair.
        capacity: tokens per expert C; clamped to S (an expert cannot take a token twice).
        select: (G, S, E) scores the top-C is taken on (default ``gates``). Entries that are
            exactly 0 in ``select`` are never chosen (a sparse plan may offer fewer than C).
            Ties go to the lower token index.

    Returns:
        A :class:`Routing` with A = E·C assignments per group, expert-major; slot c of expert e
        holds its c-th best token.
    """
    G, S, E = gates.shape
    C = min(capacity, S)
    scores = gates if select is None else select
    top, token = stable_topk(scores.transpose(1, 2), C, dim=-1)  # (G, E, C): best tokens per expert
    expert = torch.arange(E, device=gates.device)[None, :, None].expand(G, E, C)
    position = torch.arange(C, device=gates.device)[None, None, :].expand(G, E, C)
    kept = top > 0 if select is not None else torch.ones_like(token, dtype=torch.bool)
    token, expert, position, kept = (t.reshape(G, E * C) for t in (token, expert, position, kept))
    weight = gates.reshape(G, S * E).gather(1, token * E + expert) * kept  # (G, A)
    return Routing(token, expert, position, weight, kept, S, E, C)
