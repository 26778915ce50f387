"""Curvature of the loss of an MoE model: Hessian-vector products, top eigenvalues, trace and spectral density.

Everything works on one operator, :class:`HessianOperator`: v ↦ H v for the Hessian H of the
training loss over a chosen set of n parameters (a parameter group or a list of names), on a fixed
data subset, computed by double backward (Pearlmutter 1994) without ever forming H. On it:

- :func:`top_eigenvalues`: the k largest *algebraic* eigenvalues by Lanczos (ARPACK's ``eigsh``,
  ``which="LA"``), with their eigenvectors.
- :func:`power_iteration`: λmax by power iteration, with a shift when the dominant eigenvalue is
  negative, so it also returns the largest algebraic eigenvalue.
- :func:`hutchinson_trace`: tr(H) ≈ mean of zᵀHz over Rademacher probes z, with its standard error.
- :func:`spectral_density`: the eigenvalue density by stochastic Lanczos quadrature (Lin et al. 2016;
  Ghorbani et al. 2019).
- :func:`hessian_summary`: λmax, top-k, trace ± stderr of a model on a few batches, as a JSON-ready dict.

For the "head" group of a timm-style classifier the backbone's features are computed once and every
HVP runs through the head alone (``cache_features``), which turns minutes into milliseconds.

Why not PyHessian: its power iteration returns the eigenvalue of largest *magnitude* (−2.50 where
λmax was 1.54), its trace loop stops at the first negative probe and calls the removed ``torch.eig``,
and it crashes when an expert receives no token (its gradient is None). Here a parameter the loss does
not reach gets a zero gradient and a zero block of H v.

The loss is the mean cross-entropy of the model's logits over every sample of the subset (batches
weighted by their size), optionally plus the MoE aux losses. It is evaluated in eval mode, so routers
add no noise and routing is a deterministic function of the parameters; the modules' training flags
are restored afterwards. Attention runs on the math SDPA kernel, because the fused kernels have no
double backward. The model itself is never modified: parameters are swapped in by
:func:`torch.func.functional_call`, so values, ``requires_grad`` and ``.grad`` stay as they were.

Vectors are flat: n entries, parameters in ``named_parameters()`` order (see
:meth:`HessianOperator.unflatten`); they are kept in ``dtype`` (float64 by default), in which the
per-batch products are summed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from visionmoe.analysis.batches import Batches, device_batches
from visionmoe.analysis.modes import eval_mode
from visionmoe.checks import check_finite
from visionmoe.layers.moe import collect_aux_loss, moe_layers

if TYPE_CHECKING:
    from scipy.sparse.linalg import LinearOperator

PARAM_GROUPS = ("all", "router", "experts", "backbone", "head")
"""Named parameter sets: everything; the routers of MoE layers; their experts; all outside MoE layers;
the classifier head (every parameter that ``forward_features`` does not reach)."""


class _Method(nn.Module):
    """``module.<method>`` as a module's forward, so :func:`functional_call` can run it (names get ``inner.``)."""

    def __init__(self, module: nn.Module, method: str) -> None:
        super().__init__()
        self.inner, self.method = module, method

    def forward(self, *args: Any) -> Tensor:
        return getattr(self.inner, self.method)(*args)


def _has_head_split(model: nn.Module) -> bool:
    return callable(getattr(model, "forward_features", None)) and callable(getattr(model, "forward_head", None))


def head_params(model: nn.Module, example: Tensor) -> list[str]:
    """The parameters ``forward_head`` uses and ``forward_features`` does not (timm's split of a classifier).

    Found, not guessed: ``forward_features(example)`` runs in eval mode with every parameter a fresh
    leaf, and the parameters its output does not depend on are the head's. Only the structure
    matters, so two images are plenty.
    """
    if not _has_head_split(model):
        raise ValueError(
            f"params='head' needs forward_features / forward_head (timm's convention), "
            f"and {type(model).__name__} lacks them"
        )
    reached = _feature_params(model, example)
    head = [name for name, _ in model.named_parameters() if name not in reached]
    if not head:
        raise ValueError(f"forward_features of {type(model).__name__} reaches every parameter: no head to select")
    return head


def _feature_params(model: nn.Module, example: Tensor) -> set[str]:
    """The names of the parameters that ``forward_features(example[:2])`` depends on (eval mode)."""
    names = [name for name, _ in model.named_parameters()]
    leaves = {name: p.detach().requires_grad_(True) for name, p in model.named_parameters()}
    with eval_mode(model), torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):  # callers may run under no_grad
        features = functional_call(_Method(model, "forward_features"), _prefixed(leaves), (example[:2],))
        if not features.requires_grad:
            return set()
        grads = torch.autograd.grad(features.float().sum(), list(leaves.values()), allow_unused=True)
    return {name for name, g in zip(names, grads, strict=True) if g is not None}


def _prefixed(leaves: dict[str, Tensor]) -> dict[str, Tensor]:
    return {f"inner.{name}": t for name, t in leaves.items()}


def hessian_params(
    model: nn.Module, params: str | Sequence[str] = "all", *, example: Tensor | None = None
) -> list[str]:
    """The names of the parameters that ``params`` selects, in ``named_parameters()`` order.

    ``params`` is a group of :data:`PARAM_GROUPS` or a list of parameter names. Parameters are
    selected whether or not they require grad. The "head" group needs an ``example`` input (see
    :func:`head_params`).
    """
    names = [name for name, _ in model.named_parameters()]
    if not isinstance(params, str):
        chosen = set(params)
        if unknown := sorted(chosen - set(names)):
            raise ValueError(f"unknown parameter names {unknown}; the model has e.g. {names[:5]} ({len(names)} in all)")
        if not chosen:
            raise ValueError("params is an empty list of parameter names")
        return [name for name in names if name in chosen]
    if params not in PARAM_GROUPS:
        raise ValueError(
            f"unknown parameter group {params!r}; choose one of: {', '.join(PARAM_GROUPS)}, or a list of names"
        )
    layers = [f"{name}." if name else "" for name, _ in moe_layers(model)]  # prefixes; "" if the model is an MoE
    if params == "head":
        if example is None:
            raise ValueError("params='head' needs an example input to find which parameters forward_features uses")
        return head_params(model, example)
    if params in ("router", "experts") and not layers:
        raise ValueError(f"params={params!r} needs MoE layers, and {type(model).__name__} has none")
    inside = {
        "router": lambda name: any(name.startswith(f"{p}router.") for p in layers),
        "experts": lambda name: any(name.startswith(f"{p}experts.") for p in layers),
        "backbone": lambda name: not any(name.startswith(p) for p in layers),
        "all": lambda name: True,
    }[params]
    selected = [name for name in names if inside(name)]
    if not selected:
        raise ValueError(f"params={params!r} selects no parameter of {type(model).__name__}")
    return selected


class HessianOperator:
    """v ↦ H v for the Hessian of the loss of ``model`` on ``batches`` over the parameters ``params``.

    Args:
        model: any module returning (B, classes) logits; MoE layers are found by :func:`moe_layers`.
        batches: (x, y) pairs (a list, a DataLoader read once, or one pair). They are moved to the
            parameters' device once, here.
        params: a group of :data:`PARAM_GROUPS` or a list of parameter names.
        aux_loss: add :func:`collect_aux_loss` (the routers' weighted aux losses) to the loss.
        dtype: of the flat vectors, and of the sum of the per-batch products.
        cache_features: when no selected parameter reaches ``forward_features`` (the "head" group of
            a timm-style classifier), run the backbone once here and every HVP on the head alone.
            Exact, since the backbone is a fixed function in eval mode; checked on the first batch
            against the full forward. ``None`` (default) caches whenever possible.
        on_matvec: called with the HVP count after every product (progress bars).

    Attributes:
        names, shapes, n (parameters selected, the size of every vector), num_samples, matvecs (HVPs so
        far), cached (whether the HVPs run on cached features).

    Example:
        >>> op = HessianOperator(model, [(x, y)], params="experts")
        >>> hv = op.hvp(torch.randn(op.n, dtype=torch.float64))   # (n,)
        >>> blocks = op.unflatten(hv)                              # {name: tensor shaped like the parameter}
    """

    def __init__(
        self,
        model: nn.Module,
        batches: Batches,
        params: str | Sequence[str] = "all",
        *,
        aux_loss: bool = False,
        dtype: torch.dtype = torch.float64,
        cache_features: bool | None = None,
        on_matvec: Callable[[int], None] | None = None,
    ) -> None:
        self.model, self.aux_loss, self.dtype, self.on_matvec = model, aux_loss, dtype, on_matvec
        all_params = dict(model.named_parameters())
        device = next(iter(all_params.values())).device
        self.batches = device_batches(batches, device, "HessianOperator")
        self.names = hessian_params(model, params, example=self.batches[0][0])
        self.shapes = [all_params[name].shape for name in self.names]
        self.sizes = [all_params[name].numel() for name in self.names]
        self.n = sum(self.sizes)
        self.device = all_params[self.names[0]].device
        self.num_samples = sum(len(y) for _, y in self.batches)
        self.matvecs = 0
        self.cached = False
        if cache_features is not False:
            self._cache_features(required=bool(cache_features), head=params == "head")

    def __repr__(self) -> str:
        return f"HessianOperator(n={self.n}, tensors={len(self.names)}, samples={self.num_samples}, dtype={self.dtype})"

    def unflatten(self, v: Tensor) -> dict[str, Tensor]:
        """A flat (n,) vector as {parameter name: block shaped like the parameter} (views of ``v``)."""
        return {
            name: block.view(shape)
            for name, block, shape in zip(self.names, v.split(self.sizes), self.shapes, strict=True)
        }

    def _cache_features(self, required: bool, head: bool) -> None:
        """Swap each batch's x for ``forward_features(x)`` when no selected parameter reaches it.

        ``head``: the selection is the "head" group, which reaches no feature by construction.
        """
        why = None
        if not _has_head_split(self.model):
            why = f"{type(self.model).__name__} has no forward_features / forward_head"
        elif not head and set(self.names) & _feature_params(self.model, self.batches[0][0]):
            why = "some selected parameters are used by forward_features"
        if why is None:
            with eval_mode(self.model), torch.no_grad():
                features = [self.model.forward_features(x) for x, _ in self.batches]
                x0 = self.batches[0][0]
                same = torch.allclose(self.model(x0), self.model.forward_head(features[0]), rtol=1e-4, atol=1e-5)
            if same:
                self.batches = [(f, y) for f, (_, y) in zip(features, self.batches, strict=True)]
                self.cached = True
            else:
                why = "forward_head(forward_features(x)) differs from forward(x)"
        if why is not None and required:
            raise ValueError(f"cache_features=True is impossible here: {why}")

    def _loss(self, leaves: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        """Size-weighted batch loss: the batch mean × B / (all samples), so the batches sum to the mean."""
        if self.cached:  # x holds the backbone's features; only the head runs
            logits = functional_call(_Method(self.model, "forward_head"), _prefixed(leaves), (x,))
        else:
            logits = functional_call(self.model, leaves, (x,))
        loss = F.cross_entropy(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits, y)
        if self.aux_loss:
            loss = loss + collect_aux_loss(self.model).to(loss.dtype)
        check_finite(loss.detach(), f"the loss on a batch of {len(y)} samples")
        return loss * (len(y) / self.num_samples)

    def _run(self, fn: Callable[[dict[str, Tensor], Tensor, Tensor], Tensor]) -> Tensor:
        """Eval mode, math attention, fresh leaves for the selected parameters; restores the training flags."""
        params = dict(self.model.named_parameters())
        with eval_mode(self.model), torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
            leaves = {name: p.detach() for name, p in params.items()}  # new tensors, same storage
            for name in self.names:  # only the selected ones build a graph
                leaves[name].requires_grad_(True)
            total = None
            for x, y in self.batches:
                out = fn(leaves, x, y)
                total = out if total is None else total + out
            return total

    def loss(self) -> float:
        """The loss on the whole subset (eval mode)."""
        return float(self._run(lambda leaves, x, y: self._loss(leaves, x, y).detach().to(self.dtype)))

    def hvp(self, v: Tensor) -> Tensor:
        """H v for a flat (n,) vector ``v``; returns (n,) in ``dtype`` on the parameters' device."""
        if v.shape != (self.n,):
            raise ValueError(f"hvp needs a vector of shape ({self.n},), got {tuple(v.shape)}")
        check_finite(v, "the vector given to hvp")
        v = v.to(self.device, self.dtype)

        def batch_hvp(leaves: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
            inputs = [leaves[name] for name in self.names]
            grads = torch.autograd.grad(self._loss(leaves, x, y), inputs, create_graph=True, allow_unused=True)
            # Unused parameters (an expert with no token under some backends, a module the loss never
            # reaches) have no gradient, hence no curvature: their block of H v is zero.
            dot = sum(
                (g * vi.view_as(g).to(g.dtype)).sum()
                for g, vi in zip(grads, self.unflatten(v).values(), strict=True)
                if g is not None and g.requires_grad
            )
            if not isinstance(dot, Tensor):  # the gradient does not depend on the parameters: H = 0 here
                return torch.zeros(self.n, dtype=self.dtype, device=self.device)
            hv = torch.autograd.grad(dot, inputs, allow_unused=True)
            return torch.cat(
                [
                    (h if h is not None else torch.zeros_like(p)).reshape(-1).to(self.dtype)
                    for h, p in zip(hv, inputs, strict=True)
                ]
            )

        out = self._run(batch_hvp)
        self.matvecs += 1
        if self.on_matvec is not None:
            self.on_matvec(self.matvecs)
        if not bool(torch.isfinite(out).all()):
            bad = [name for name, block in self.unflatten(out).items() if not bool(torch.isfinite(block).all())]
            check_finite(out, f"the Hessian-vector product (in {', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})")
        return out

    def to_dense(self) -> Tensor:
        """The full (n, n) Hessian, column by column from n HVPs: for small n and for checks."""
        eye = torch.eye(self.n, dtype=self.dtype, device=self.device)
        return torch.stack([self.hvp(e) for e in eye], dim=1)

    def linear_operator(self) -> LinearOperator:
        """A float64 :class:`scipy.sparse.linalg.LinearOperator` (symmetric: rmatvec = matvec)."""
        from scipy.sparse.linalg import LinearOperator  # scipy loads only when the analysis runs

        def matvec(v: np.ndarray) -> np.ndarray:
            hv = self.hvp(torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64).reshape(-1)))
            return hv.detach().to("cpu", torch.float64).numpy()

        return LinearOperator((self.n, self.n), matvec=matvec, rmatvec=matvec, dtype=np.float64)

    def _random(self, generator: torch.Generator, kind: str = "gaussian") -> Tensor:
        """A probe of size n on the CPU generator: Gaussian, or Rademacher (±1 with probability ½ each)."""
        if kind == "rademacher":
            z = torch.randint(0, 2, (self.n,), generator=generator, dtype=torch.int64).to(self.dtype) * 2 - 1
        else:
            z = torch.randn(self.n, generator=generator, dtype=torch.float64).to(self.dtype)
        return z.to(self.device)


@dataclass(frozen=True)
class Eigenpairs:
    """Eigenvalues, largest first, and their unit eigenvectors as rows of a (k, n) tensor."""

    values: list[float]
    vectors: Tensor
    method: str  # "lanczos", "dense" (k >= n - 1: n HVPs and an exact eigh) or "power"
    matvecs: int
    shift: float = 0.0  # power iteration: σ of the run on H + σI (0: none needed)


def top_eigenvalues(
    op: HessianOperator, k: int = 1, *, tol: float = 0.0, maxiter: int | None = None, seed: int = 0
) -> Eigenpairs:
    """The k largest algebraic eigenvalues of H and their eigenvectors, by Lanczos (ARPACK ``eigsh``, ``which="LA"``).

    ``tol`` is ARPACK's relative accuracy of the Ritz values (0: machine precision); the start vector
    comes from ``seed``. When k >= n − 1, which ARPACK cannot do, H is formed by n HVPs and
    diagonalised exactly.
    """
    if not 1 <= k <= op.n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={op.n}")
    from scipy.sparse.linalg import ArpackNoConvergence, eigsh

    start = op.matvecs
    if k >= op.n - 1:
        values, vectors = torch.linalg.eigh(op.to_dense().double().cpu())  # ascending
        values, vectors = values.flip(0)[:k], vectors.flip(1)[:, :k]
        method = "dense"
    else:
        v0 = op._random(torch.Generator().manual_seed(seed)).double().cpu().numpy()
        try:
            values, vectors = eigsh(op.linear_operator(), k=k, which="LA", tol=tol, maxiter=maxiter, v0=v0)
        except ArpackNoConvergence as err:
            found = len(err.eigenvalues)
            raise RuntimeError(f"Lanczos found {found} of k={k} eigenvalues; raise maxiter or tol") from None
        order = np.argsort(values)[::-1].copy()
        values, vectors = torch.from_numpy(values[order]), torch.from_numpy(vectors[:, order].copy())
        method = "lanczos"
    return Eigenpairs(
        values=[float(x) for x in values],
        vectors=vectors.T.contiguous().to(op.device, op.dtype),  # (k, n)
        method=method,
        matvecs=op.matvecs - start,
    )


def _power(matvec: Callable[[Tensor], Tensor], v: Tensor, max_iter: int, tol: float) -> tuple[float, Tensor, float]:
    """Power iteration until the Rayleigh quotient changes by <= tol (relative): (λ, v, ‖Hv‖) of the last step."""
    v = v / v.norm()
    lam = None
    for _ in range(max_iter):
        w = matvec(v)
        new, norm = float(v @ w), float(w.norm())
        v = w / norm if norm > 0 else v
        if lam is not None and abs(new - lam) <= tol * max(abs(new), 1e-30):
            return new, v, norm
        lam = new
    return lam, v, norm


def power_iteration(op: HessianOperator, *, max_iter: int = 200, tol: float = 1e-6, seed: int = 0) -> Eigenpairs:
    """λmax, the largest *algebraic* eigenvalue of H, and its eigenvector, by power iteration.

    Power iteration on H converges to the eigenvalue of largest magnitude, which is negative when
    |λmin| > λmax (PyHessian then reports λmin as λmax). So it runs in two stages:

    1. On H, until the Rayleigh quotient λ = vᵀHv changes by <= ``tol`` (relative); ρ = ‖Hv‖ then
       estimates the spectral radius max |λᵢ|. If λ > 0 and v is an eigenvector (‖Hv − λv‖ <=
       √tol · ρ, so λ ≈ ρ), λ is λmax: no eigenvalue exceeds ρ.
    2. Otherwise (λ < 0, or v still mixes +ρ and −ρ directions), on H + ρI, whose eigenvalues
       λᵢ + ρ are >= 0 with the largest at λmax: λmax = μ − ρ for its dominant eigenvalue μ.
       ``shift`` in the result is this ρ. Stage 2 converges at the rate (λ₂ + ρ) / (λmax + ρ).
    """
    generator = torch.Generator().manual_seed(seed)
    start = op.matvecs
    lam, v, rho = _power(op.hvp, op._random(generator), max_iter, tol)
    residual = math.sqrt(max(rho**2 - lam**2, 0.0))  # ‖Hv − λv‖ for unit v and λ = vᵀHv
    shift = 0.0
    if not (lam > 0 and residual <= math.sqrt(tol) * rho):
        shift = rho
        mu, v, _ = _power(lambda u: op.hvp(u) + shift * u, op._random(generator), max_iter, tol)
        lam = mu - shift
    return Eigenpairs(values=[lam], vectors=v[None], method="power", matvecs=op.matvecs - start, shift=shift)


@dataclass(frozen=True)
class TraceEstimate:
    """Hutchinson's tr(H) ≈ mean of zᵀHz over Rademacher probes z; stderr = std / √probes."""

    mean: float
    stderr: float
    probes: int
    samples: list[float]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def hutchinson_trace(op: HessianOperator, probes: int = 100, *, seed: int = 0) -> TraceEstimate:
    """tr(H) by Hutchinson's estimator with ``probes`` Rademacher vectors drawn from ``seed``.

    E[zᵀHz] = tr(H) for any z with E[zzᵀ] = I; Rademacher z gives the smallest variance,
    2 Σ_{i≠j} H_ij². Every probe counts, negative ones included (a negative zᵀHz is a legitimate
    sample of an indefinite Hessian, not a sign to stop).
    """
    if probes < 2:
        raise ValueError(f"need probes >= 2 for a standard error, got probes={probes}")
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(probes):
        z = op._random(generator, "rademacher")
        samples.append(float(z @ op.hvp(z)))
    values = torch.tensor(samples, dtype=torch.float64)
    return TraceEstimate(float(values.mean()), float(values.std() / math.sqrt(probes)), probes, samples)


@dataclass(frozen=True)
class SpectralDensity:
    """Stochastic Lanczos quadrature: per probe p, nodes θ_pj (Ritz values) and weights τ_pj (sum 1).

    The spectral measure (1/n) Σᵢ δ(t − λᵢ) is approximated by (1/P) Σ_p Σ_j τ_pj δ(t − θ_pj).
    ``nodes`` and ``weights`` are (P, m) float64 tensors; a probe whose Lanczos run stopped early
    (an invariant subspace) pads with weight 0.
    """

    nodes: Tensor
    weights: Tensor
    n: int

    def density(
        self, grid: Tensor | None = None, sigma: float | None = None, points: int = 1000
    ) -> tuple[Tensor, Tensor]:
        """(grid, φ(grid)): the measure smoothed by a Gaussian of std ``sigma``, integrating to 1.

        φ(t) = (1/P) Σ_p Σ_j τ_pj N(t; θ_pj, σ²). By default σ is 1% of the node range, and the grid
        spans the nodes ± 5σ in ``points`` steps.
        """
        lo, hi = float(self.nodes.min()), float(self.nodes.max())
        sigma = sigma if sigma is not None else max(0.01 * (hi - lo), 1e-12)
        if grid is None:
            grid = torch.linspace(lo - 5 * sigma, hi + 5 * sigma, points, dtype=torch.float64)
        t = grid.double()[:, None, None]  # (T, 1, 1)
        gauss = torch.exp(-0.5 * ((t - self.nodes) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))  # (T, P, m)
        return grid, (gauss * self.weights).sum(-1).mean(-1)

    def trace(self) -> float:
        """The quadrature's tr(H) = n · (1/P) Σ_p Σ_j τ_pj θ_pj."""
        return float(self.n * (self.weights * self.nodes).sum(-1).mean())


def _lanczos(op: HessianOperator, v: Tensor, steps: int) -> tuple[Tensor, Tensor]:
    """m Lanczos steps with full reorthogonalisation: the (m,) diagonal α and (m−1,) off-diagonal β of T."""
    basis = torch.zeros(steps, op.n, dtype=op.dtype, device=op.device)  # (m, n) Lanczos vectors
    alpha, beta = [], []
    v = v / v.norm()
    for j in range(steps):
        basis[j] = v
        w = op.hvp(v)
        alpha.append(float(v @ w))
        for _ in range(2):  # Gram–Schmidt against every earlier vector, twice ("twice is enough")
            w = w - basis[: j + 1].T @ (basis[: j + 1] @ w)
        b = float(w.norm())
        if j == steps - 1 or b <= 1e-10 * max(abs(a) for a in alpha):  # invariant subspace: T is exact
            break
        beta.append(b)
        v = w / b
    return torch.tensor(alpha, dtype=torch.float64), torch.tensor(beta, dtype=torch.float64)


def spectral_density(op: HessianOperator, probes: int = 1, steps: int = 80, *, seed: int = 0) -> SpectralDensity:
    """The eigenvalue density of H by stochastic Lanczos quadrature (Ghorbani et al. 2019, Alg. 1).

    For each of ``probes`` Rademacher start vectors, ``steps`` (at most n) Lanczos steps give a
    tridiagonal T = U diag(θ) Uᵀ; the quadrature nodes are the Ritz values θ and the weights the
    squared first components U₀ⱼ² (they sum to 1). Cost: probes · steps HVPs, and a (steps, n)
    basis in memory.
    """
    steps = min(steps, op.n)
    generator = torch.Generator().manual_seed(seed)
    nodes = torch.zeros(probes, steps, dtype=torch.float64)
    weights = torch.zeros(probes, steps, dtype=torch.float64)
    for p in range(probes):
        alpha, beta = _lanczos(op, op._random(generator, "rademacher"), steps)
        theta, u = torch.linalg.eigh(torch.diag(alpha) + torch.diag(beta, 1) + torch.diag(beta, -1))
        m = len(alpha)
        nodes[p, :m], nodes[p, m:] = theta, theta[-1]  # padding: weight 0 at an existing node
        weights[p, :m] = u[0] ** 2
    return SpectralDensity(nodes, weights, op.n)


def plot_spectral_density(
    density: SpectralDensity, path: str | Path, *, title: str | None = None, dpi: int = 120
) -> Path:
    """A PNG of the smoothed eigenvalue density on a log scale, with the quadrature nodes marked.

    Needs matplotlib (imported here only). Returns the path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid, phi = density.density()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ax.semilogy(grid.numpy(), phi.clamp_min(1e-12).numpy())
    nodes = density.nodes[density.weights > 0]
    ax.plot(nodes.numpy(), [phi.max().item()] * len(nodes), "|", color="tab:red", markersize=8, label="Ritz values")
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    ax.set_ylim(bottom=max(1e-8, float(phi.max()) * 1e-8))
    ax.legend(fontsize=8)
    ax.set_title(f"Hessian spectral density (SLQ){': ' + title if title else ''}")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


@dataclass(frozen=True)
class HessianSummary:
    """What :func:`hessian_summary` reports (``to_dict`` gives plain JSON values)."""

    params: str | list[str]
    num_params: int
    num_samples: int
    loss: float
    lambda_max: float
    top_eigenvalues: list[float]
    trace: float
    trace_stderr: float
    trace_probes: int
    matvecs: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_parts(
        cls, op: HessianOperator, params: str | Sequence[str], eig: Eigenpairs, trace: TraceEstimate
    ) -> HessianSummary:
        """The summary of the eigenpairs and the trace estimate computed on ``op``."""
        return cls(
            params=params if isinstance(params, str) else list(params),
            num_params=op.n,
            num_samples=op.num_samples,
            loss=op.loss(),
            lambda_max=eig.values[0],
            top_eigenvalues=eig.values,
            trace=trace.mean,
            trace_stderr=trace.stderr,
            trace_probes=trace.probes,
            matvecs=op.matvecs,
        )


def hessian_summary(
    model: nn.Module,
    batches: Batches,
    params: str | Sequence[str] = "all",
    top_k: int = 1,
    trace_probes: int = 100,
    seed: int = 0,
    *,
    aux_loss: bool = False,
    tol: float = 0.0,
) -> dict[str, Any]:
    """λmax and the top-k eigenvalues (Lanczos), and tr(H) ± stderr (Hutchinson), as a JSON-ready dict.

    Keys are the fields of :class:`HessianSummary`. ``tol``: Lanczos' relative accuracy (0: machine
    precision; 1e-3 needs far fewer HVPs and is plenty for a sharpness table). Cost: about 2·top_k + 20 HVPs per Lanczos
    restart plus ``trace_probes`` HVPs, each a forward and two backward passes over ``batches``.
    """
    op = HessianOperator(model, batches, params, aux_loss=aux_loss)
    eig = top_eigenvalues(op, top_k, tol=tol, seed=seed)
    trace = hutchinson_trace(op, trace_probes, seed=seed)
    return HessianSummary.from_parts(op, params, eig, trace).to_dict()
