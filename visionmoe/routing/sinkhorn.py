"""Entropic optimal transport between the tokens of a group and the experts (Sinkhorn 1967).

Used by the Sinkhorn routers of Liu et al. (TMLR 2024, Sec. 3; after BASE layers and
Clark et al. 2022): the transport plan with cost -logits and entropic regularisation ε,

    π = argmin_{π ≥ 0, π 1 = a, πᵀ 1 = b} <π, -logits> - ε H(π),   a_s = 1,  b_e = S / E,

so every token carries mass 1 and every expert receives the same mass S / E. The plan is used
only to *select* experts or tokens; it carries no gradient.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


@torch.no_grad()
def sinkhorn(logits: Tensor, num_iters: int = 20, epsilon: float = 1.0) -> Tensor:
    """Balanced transport plan for router logits, in the log domain (stable for any logit scale).

    logits: (G, S, E). Returns π of shape (G, S, E) in fp32 with column sums exactly S / E and
    row sums close to 1 (exact in the limit of iterations; ``num_iters`` is fixed, default 20).
    """
    if num_iters < 1:
        raise ValueError(f"sinkhorn needs num_iters >= 1, got num_iters={num_iters}")
    if not epsilon > 0:
        raise ValueError(f"sinkhorn needs epsilon > 0, got epsilon={epsilon}")
    log_k = logits.float() / epsilon  # (G, S, E): log of the Gibbs kernel exp(-cost / ε)
    _, S, E = log_k.shape
    if S == 0:  # no tokens: nothing to transport (and log(S / E) is undefined)
        return torch.zeros_like(log_k)
    log_a = 0.0  # log of the row marginal, 1 per token
    log_b = math.log(S / E)  # log of the column marginal, S/E per expert
    log_u = torch.zeros_like(log_k[:, :, 0])  # (G, S)
    log_v = torch.zeros_like(log_k[:, 0, :])  # (G, E)
    for _ in range(num_iters):  # alternate row and column scaling; a loop over iterations, not tokens
        log_u = log_a - torch.logsumexp(log_k + log_v[:, None, :], dim=2)
        log_v = log_b - torch.logsumexp(log_k + log_u[:, :, None], dim=1)
    return torch.exp(log_k + log_u[:, :, None] + log_v[:, None, :])
