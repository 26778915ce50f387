"""Auxiliary routing losses, as pure functions of router outputs.

Each takes (G, S, E) tensors and returns the loss averaged over the G leading groups. The routers
pass the whole batch as one group (G = 1, S = all tokens): balance is a batch statistic, whatever
groups the routing itself uses.

Each loss is a function of per-expert sums over the tokens (and of their count), so it can see a
batch spread over processes: ``reduce`` (a differentiable all-reduce, sum) adds up those sums
across processes before the loss is formed, and every process then computes the loss of the global
batch — the value one process would compute on it, with the gradient that, averaged over processes
like any data-parallel gradient, is that process's (:mod:`visionmoe.distributed`). Without
``reduce`` the loss is the batch's own.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

Reduce = Callable[[Tensor], Tensor]


def _token_sums(x: Tensor, reduce: Reduce | None) -> tuple[Tensor, Tensor]:
    """(G, S, E) -> Σ_s x (G, E) and the token count (G, 1), both summed over processes by ``reduce``."""
    total = x.sum(dim=1)
    count = torch.full_like(total[..., :1], x.shape[1])
    if reduce is not None:  # one collective for both
        both = reduce(torch.cat([total, count], dim=-1))
        total, count = both[..., :-1], both[..., -1:]
    return total, count


def _cv_squared_aten(x: Tensor) -> Tensor:
    return (x.var(dim=-1, unbiased=False) / x.mean(dim=-1).square().clamp_min(1e-20)).mean()


SMALL_CV_VALUES = 1024
"""CPU inputs of at most this many values take :class:`_SmallCVSquared` (per-expert sums: E values)."""


def cv_squared_of_floats(row: list[float]) -> tuple[float, list[float]]:
    """CV² of one row of Python floats (population variance over the squared mean, the mean's square kept
    above 1e-20) and its gradient, in float64: :func:`_cv_squared` of a row, value and gradient in one pass."""
    n = len(row)
    mean = sum(row) / n
    var = sum((v - mean) ** 2 for v in row) / n
    square = mean * mean
    denom = max(square, 1e-20)
    d_denom = 2 * mean / n if square > 1e-20 else 0.0  # ∂ max(m², ε) / ∂x_e
    return var / denom, [2 * (v - mean) / n / denom - var * d_denom / (denom * denom) for v in row]


class _SmallCVSquared(torch.autograd.Function):
    """:func:`_cv_squared` of a small CPU tensor in Python floats (float64), value and gradient in one
    pass: a few microseconds where the ATen formula's dozen calls forward and two dozen backward cost
    tens each (every router's losses, every layer and step: BENCHMARKS.md, eleventh pass). The same
    value to float rounding. A gradient of the gradient (the Hessian analysis) takes the ATen formula."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        rows = x.detach().reshape(-1, x.shape[-1]).tolist()  # Python floats: exact for float32 and float64
        total, grads = 0.0, []
        for row in rows:
            value, grad = cv_squared_of_floats(row)
            total += value
            grads.append(grad)
        ctx.save_for_backward(x, torch.tensor(grads, dtype=x.dtype).reshape(x.shape) / len(rows))
        return x.new_tensor(total / len(rows))

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        x, d_x = ctx.saved_tensors
        if torch.is_grad_enabled():  # a graph of the gradient is wanted: the ATen formula's
            with torch.enable_grad():
                return torch.autograd.grad(_cv_squared_aten(x), x, grad, create_graph=True)[0]
        return grad * d_x


def _cv_squared(x: Tensor) -> Tensor:
    """Squared coefficient of variation over the last axis (population std), averaged over the rest."""
    small = x.device.type == "cpu" and x.dim() >= 1 and 0 < x.numel() <= SMALL_CV_VALUES
    if small and x.is_floating_point() and not torch.compiler.is_compiling():
        return _SmallCVSquared.apply(x)
    return _cv_squared_aten(x)


def importance_loss(gates: Tensor, reduce: Reduce | None = None) -> Tensor:
    """Importance loss (Shazeer et al. 2017, eq. 6; V-MoE, Riquelme et al. 2021, eq. 3).

    Imp_e = Σ_s gate_{s,e} (the gates before top-k), loss = CV(Imp)² = (std(Imp) / mean(Imp))².
    gates: (G, S, E).
    """
    return cv_squared_loss(gates.sum(dim=1), reduce)


def load_loss(logits: Tensor, noisy_logits: Tensor, noise_std: float, k: int, reduce: Reduce | None = None) -> Tensor:
    """Load loss (V-MoE, Riquelme et al. 2021, Appendix A, eqs. 4-6; after Shazeer et al. 2017).

    The probability that expert e stays among a token's top-k if only its own noise were redrawn:
    p_{s,e} = 1 - Φ((threshold_s - logit_{s,e}) / σ), with threshold_s the k-th largest *noisy*
    logit of token s. Load_e = Σ_s p_{s,e}; loss = CV(Load)². A smooth estimate of the expert
    loads, differentiable where counts are not. logits, noisy_logits: (G, S, E); needs σ > 0.
    """
    if not noise_std > 0:
        raise ValueError(f"load_loss needs router noise, got noise_std={noise_std}")
    threshold = _kth_largest(noisy_logits.detach(), k)  # (G, S, 1)
    return cv_squared_loss(stay_probability(logits, threshold, noise_std).sum(dim=1), reduce)


def stay_probability(logits: Tensor, threshold: Tensor, noise_std: float) -> Tensor:
    """p = 1 - Φ((threshold - logits) / σ): the load loss's chance that each expert stays among a token's
    top-k if only its own noise were redrawn (``threshold``: the k-th largest noisy logit, (..., 1))."""
    z = (threshold - logits) / noise_std
    return 0.5 * torch.erfc(z / math.sqrt(2.0))  # accurate in the tail


def cv_squared_loss(per_expert: Tensor, reduce: Reduce | None = None) -> Tensor:
    """CV² of (G, E) per-expert sums over tokens, averaged over G, the sums first added up over processes
    by ``reduce``: the importance loss given Σ_s gate (:func:`importance_loss`), the load loss given Σ_s p
    (:func:`load_loss`), for a router that forms those sums itself (the fused top-k router)."""
    return _cv_squared(per_expert if reduce is None else reduce(per_expert))


def _kth_largest(x: Tensor, k: int) -> Tensor:
    """(..., E) -> (..., 1): the k-th largest value of each row (a repeated value counts each time)."""
    if k == 1:
        return x.amax(dim=-1, keepdim=True)
    if k == 2:  # the largest of the rest once one maximum is out: beats topk on rows of 8 (benchmarks/routing_micro.py)
        return x.scatter(-1, x.max(dim=-1, keepdim=True).indices, float("-inf")).amax(dim=-1, keepdim=True)
    return x.topk(k, dim=-1).values[..., -1:]


def switch_loss(gates: Tensor, first_choice: Tensor, reduce: Reduce | None = None) -> Tensor:
    """Switch Transformer balance loss (Fedus et al. 2022, eq. 4): E · Σ_e f_e · P_e.

    f_e: fraction of the group's tokens whose first choice is e (not differentiable);
    P_e: mean gate of expert e. Equals 1 at perfect balance. gates: (G, S, E); first_choice: (G, S).
    """
    E = gates.shape[-1]
    chosen = F.one_hot(first_choice, E).to(gates.dtype)  # (G, S, E)
    total, count = _token_sums(torch.cat([chosen, gates], dim=-1), reduce)
    f, p = (total / count).split(E, dim=-1)  # (G, E) each
    return (E * (f * p).sum(dim=-1)).mean()


def z_loss(logits: Tensor, reduce: Reduce | None = None) -> Tensor:
    """Router z-loss (ST-MoE, Zoph et al. 2022, eq. 5): mean over tokens of logsumexp(logits)²."""
    squares = torch.logsumexp(logits.float(), dim=-1).square()  # (G, S)
    if reduce is None:
        return squares.mean()
    total, count = _token_sums(squares.reshape(1, -1, 1), reduce)
    return (total / count).squeeze()


def balance_kl_loss(gates: Tensor, reduce: Reduce | None = None) -> Tensor:
    """KL divergence of the mean routing distribution from uniform (Rokah et al. 2026).

    p̄_e = mean_s gate_{s,e}; loss = KL(p̄ ‖ U) = Σ_e p̄_e log(E p̄_e). Zero exactly when the
    average token spreads its gate evenly over the experts. gates: (G, S, E), rows sum to 1.
    """
    E = gates.shape[-1]
    total, count = _token_sums(gates, reduce)
    mean = total / count  # (G, E)
    return torch.xlogy(mean, mean * E).sum(dim=-1).mean()


AUX_LOSSES = ("importance", "load", "switch", "z", "balance_kl")
"""Names accepted in ``aux_loss_weights``; which ones a router supports is listed on the router."""
