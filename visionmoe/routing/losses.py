"""Auxiliary routing losses, as pure functions of router outputs.

Each takes (G, S, E) tensors and returns the loss averaged over the G leading groups. The routers
pass the whole batch as one group (G = 1, S = all tokens): balance is a batch statistic, whatever
groups the routing itself uses.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _cv_squared(x: Tensor) -> Tensor:
    """Squared coefficient of variation over the last axis (population std), averaged over the rest."""
    return (x.var(dim=-1, unbiased=False) / x.mean(dim=-1).square().clamp_min(1e-20)).mean()


def importance_loss(gates: Tensor) -> Tensor:
    """Importance loss (Shazeer et al. 2017, eq. 6; V-MoE, Riquelme et al. 2021, eq. 3).

    Imp_e = Σ_s gate_{s,e} (the gates before top-k), loss = CV(Imp)² = (std(Imp) / mean(Imp))².
    gates: (G, S, E).
    """
    return _cv_squared(gates.sum(dim=1))


def load_loss(logits: Tensor, noisy_logits: Tensor, noise_std: float, k: int) -> Tensor:
    """Load loss (V-MoE, Riquelme et al. 2021, Appendix A, eqs. 4-6; after Shazeer et al. 2017).

    The probability that expert e stays among a token's top-k if only its own noise were redrawn:
    p_{s,e} = 1 - Φ((threshold_s - logit_{s,e}) / σ), with threshold_s the k-th largest *noisy*
    logit of token s. Load_e = Σ_s p_{s,e}; loss = CV(Load)². A smooth estimate of the expert
    loads, differentiable where counts are not. logits, noisy_logits: (G, S, E); needs σ > 0.
    """
    if not noise_std > 0:
        raise ValueError(f"load_loss needs router noise, got noise_std={noise_std}")
    threshold = noisy_logits.detach().topk(k, dim=-1).values[..., -1:]  # (G, S, 1)
    z = (threshold - logits) / noise_std
    p = 0.5 * torch.erfc(z / math.sqrt(2.0))  # 1 - Φ(z), accurate in the tail
    return _cv_squared(p.sum(dim=1))


def switch_loss(gates: Tensor, first_choice: Tensor) -> Tensor:
    """Switch Transformer balance loss (Fedus et al. 2022, eq. 4): E · Σ_e f_e · P_e.

    f_e: fraction of the group's tokens whose first choice is e (not differentiable);
    P_e: mean gate of expert e. Equals 1 at perfect balance. gates: (G, S, E); first_choice: (G, S).
    """
    E = gates.shape[-1]
    f = torch.zeros_like(gates[:, 0, :]).scatter_add_(1, first_choice, torch.ones_like(first_choice, dtype=gates.dtype))
    f = f / gates.shape[1]  # (G, E)
    return (E * (f * gates.mean(dim=1)).sum(dim=-1)).mean()


def z_loss(logits: Tensor) -> Tensor:
    """Router z-loss (ST-MoE, Zoph et al. 2022, eq. 5): mean over tokens of logsumexp(logits)²."""
    return torch.logsumexp(logits.float(), dim=-1).square().mean()


def balance_kl_loss(gates: Tensor) -> Tensor:
    """KL divergence of the mean routing distribution from uniform (Rokah et al. 2026).

    p̄_e = mean_s gate_{s,e}; loss = KL(p̄ ‖ U) = Σ_e p̄_e log(E p̄_e). Zero exactly when the
    average token spreads its gate evenly over the experts. gates: (G, S, E), rows sum to 1.
    """
    E = gates.shape[-1]
    mean = gates.mean(dim=1)  # (G, E)
    return torch.xlogy(mean, mean * E).sum(dim=-1).mean()


AUX_LOSSES = ("importance", "load", "switch", "z", "balance_kl")
"""Names accepted in ``aux_loss_weights``; which ones a router supports is listed on the router."""
