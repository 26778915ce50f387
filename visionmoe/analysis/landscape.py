"""The loss surface of an MoE model around its weights: 1D lines and 2D planes, with routing flips.

The model's parameters θ₀ are moved along directions in parameter space, θ = θ₀ + α d₁ (+ β d₂),
and at each point the loss, the accuracy and the *routing-flip rate* are measured on a fixed data
subset. Directions are {parameter name: tensor shaped like the parameter} dicts over a parameter
group (:func:`visionmoe.analysis.hessian_params`: "all", "router", "experts", "backbone" or a list
of names); parameters outside the dict do not move. Two kinds are built here:

- :func:`random_direction`: a Gaussian direction, filter-normalised (Li et al. 2018, "Visualizing
  the loss landscape of neural nets", Sec. 4): each filter of d is rescaled to the norm of the same
  filter of θ₀, so that α means "a fraction of each filter's own size" in every layer alike.
- :func:`hessian_direction`: a unit eigenvector of the Hessian (Lanczos, :func:`top_eigenvalues`),
  the direction of sharpest curvature.

Any other dict works too (for example θ_final − θ_init, to interpolate between checkpoints).

Filters: the rows (dim 0) of conv (out, in, kh, kw) and Linear (out, in) weights, as in Li et al.;
for stacked expert weights one filter per expert and output unit — w1 (E, D, H): the D inputs of
hidden unit h of expert e; w2 (E, H, D): the H inputs of output d of expert e; for the Soft MoE
slot parameters Φ (D, E, P) one filter per slot (e, p). Biases and norm parameters (ndim <= 1,
and the experts' 2-D biases b1 (E, H), b2 (E, D)) get a zero direction by default (Li et al.'s
"ignore biasbn"); with ``include_bias_norm=True`` they get d = θ₀, as in Li et al.'s code.

Routing-flip rate: a token *flips* at a point when its set of kept experts (the experts whose
output it receives; an assignment dropped for capacity is not kept) differs, in some MoE layer,
from its set at the base point θ₀ on the same batch. The rate is Σ flipped / Σ tokens over every
sparse MoE layer (token choice and expert choice alike) and every batch, so layers weigh by their
tokens. Soft MoE and dense layers make no discrete choice and are left out; a model with no sparse
layer reports NaN. Per-layer rates are kept too.

Evaluation follows :class:`visionmoe.analysis.HessianOperator`: eval mode (routers add no noise),
the math SDPA kernel (the surface is the very function whose curvature the operator measures), no
grad; the loss is the mean cross-entropy over every sample of the subset, optionally plus the aux
losses. Unlike the operator, the scan moves the model's own parameters in place (so a callback
sees the perturbed model); they are restored bit for bit in a ``finally``, as are the training
flags, whatever happens. Do not scan between a forward and its backward: the in-place writes bump
the parameters' version counters.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from visionmoe.analysis.batches import Batches, device_batches
from visionmoe.analysis.hessian import Eigenpairs, HessianOperator, hessian_params, top_eigenvalues
from visionmoe.analysis.modes import eval_mode
from visionmoe.layers.experts import Experts
from visionmoe.layers.moe import collect_aux_loss, moe_layers
from visionmoe.layers.routers import SoftRouter
from visionmoe.routing.plan import Routing

Direction = dict[str, Tensor]
"""{parameter name: tensor shaped like the parameter}; parameters left out do not move."""


def _filter_dims(model: nn.Module) -> dict[str, tuple[int, ...] | None]:
    """For each parameter: the dims one filter spans (its norm is taken over them); None for biases and norms."""
    dims: dict[str, tuple[int, ...] | None] = {}
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(prefix=module_name, recurse=False):
            if isinstance(module, Experts) and name.rsplit(".", 1)[-1] in ("w1", "w2"):
                rule = (1,)  # w1 (E, D, H): filter (e, h) spans D; w2 (E, H, D): filter (e, d) spans H
            elif isinstance(module, SoftRouter) and name.endswith("phi"):
                rule = (0,)  # Φ (D, E, P): filter (e, p), one slot, spans D
            elif p.dim() <= 1 or isinstance(module, Experts):
                rule = None  # biases (the experts' b1 (E, H), b2 (E, D) included) and norm parameters
            else:
                rule = tuple(range(1, p.dim()))  # conv / Linear: filter = a row along dim 0
            dims.setdefault(name, rule)  # a shared parameter keeps its first name, as named_parameters
    return dims


@torch.no_grad()
def random_direction(
    model: nn.Module,
    params: str | Sequence[str] = "all",
    *,
    seed: int | torch.Generator = 0,
    include_bias_norm: bool = False,
    example: Tensor | None = None,
) -> Direction:
    """A filter-normalised Gaussian direction over a parameter group (Li et al. 2018, eq. 1).

    d ~ N(0, I), then each filter is rescaled: d_f ← d_f / ‖d_f‖ · ‖θ_f‖ (a zero filter of θ gets a
    zero filter of d). Biases and norm parameters get zero, or θ itself with ``include_bias_norm``
    (see the module docstring for what a filter is).

    The draw: one ``randn`` of each parameter's shape, float32 (float64 for float64 parameters), in
    ``named_parameters()`` order from a CPU generator seeded with ``seed`` (or ``seed`` itself when it
    is a :class:`torch.Generator`, to draw several directions in a row). Every parameter is drawn,
    selected or not, so a group's direction is the same block of the "all" direction for one seed.

    Returns {name: tensor} for every parameter of the group (zeros included), in the parameters'
    dtype and device. The "head" group needs an ``example`` input (see :func:`hessian_params`).
    """
    generator = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
    chosen = set(hessian_params(model, params, example=example))
    dims = _filter_dims(model)
    direction: Direction = {}
    for name, p in model.named_parameters():
        dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
        d = torch.randn(p.shape, generator=generator, dtype=dtype)
        if name not in chosen:
            continue
        d, w = d.to(p.device), p.detach().to(d.dtype)
        if dims[name] is None:
            d = w.clone() if include_bias_norm else torch.zeros_like(w)
        else:
            d_norm, w_norm = (torch.linalg.vector_norm(t, dim=dims[name], keepdim=True) for t in (d, w))
            d = d * (w_norm / (d_norm + 1e-10))  # Li et al.'s 1e-10 guard
        direction[name] = d.to(p.dtype)
    return direction


def hessian_direction(
    op: HessianOperator, eig: Eigenpairs | None = None, *, index: int = 0, seed: int = 0
) -> Direction:
    """The unit eigenvector of the ``index``-th largest Hessian eigenvalue, as a direction over ``op``'s group.

    ``eig`` defaults to :func:`top_eigenvalues` (``k = index + 1``, start vector from ``seed``). An
    eigenvector's sign is arbitrary; it is fixed so that its largest-magnitude entry is positive, so a
    plot does not flip between runs. Unit norm over the group (in float64; cast to the parameters' dtype).
    """
    if eig is None:
        eig = top_eigenvalues(op, index + 1, seed=seed)
    if not 0 <= index < len(eig.values):
        raise ValueError(f"need 0 <= index < {len(eig.values)} (eigenpairs given), got index={index}")
    v = eig.vectors[index]
    if v.shape != (op.n,):
        raise ValueError(f"the eigenvectors have {v.shape[-1]} entries but the operator has n={op.n} parameters")
    v = -v if v[v.abs().argmax()] < 0 else v
    params = dict(op.model.named_parameters())
    return {name: block.to(params[name].dtype).clone() for name, block in op.unflatten(v).items()}


@dataclass(frozen=True)
class LossLandscape:
    """What :func:`loss_line` and :func:`loss_plane` measure.

    Grids are float64 tensors of shape (A,) for a line and (A, B) for a plane, entry [i, j] at
    (alphas[i], betas[j]). ``flip_rate`` is NaN everywhere when no layer routes sparsely;
    ``layer_flip_rate`` holds the same grid per sparse MoE layer. A point whose forward overflowed
    (a FloatingPointError, e.g. non-finite router logits) is NaN in every grid.
    """

    alphas: list[float]
    betas: list[float] | None
    loss: Tensor
    accuracy: Tensor
    flip_rate: Tensor
    layer_flip_rate: dict[str, Tensor]
    base_loss: float
    base_accuracy: float
    params: list[str]  # the parameters the directions move
    num_samples: int

    @property
    def ndim(self) -> int:
        return 1 if self.betas is None else 2

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values; non-finite numbers (no sparse layer, a diverged point) become None."""

        def plain(t: Tensor) -> list[Any]:
            return [plain(row) for row in t] if t.dim() > 1 else [_finite_or_none(x) for x in t.tolist()]

        return {
            "ndim": self.ndim,
            "alphas": self.alphas,
            "betas": self.betas,
            "loss": plain(self.loss),
            "accuracy": plain(self.accuracy),
            "flip_rate": plain(self.flip_rate),
            "layer_flip_rate": {name: plain(t) for name, t in self.layer_flip_rate.items()},
            "base_loss": self.base_loss,
            "base_accuracy": self.base_accuracy,
            "params": self.params,
            "num_samples": self.num_samples,
        }


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def loss_line(
    model: nn.Module,
    batches: Batches,
    direction: Mapping[str, Tensor],
    alphas: Sequence[float] | Tensor,
    *,
    aux_loss: bool = False,
    callback: Callable[[nn.Module, dict[str, float]], None] | None = None,
) -> LossLandscape:
    """Loss, accuracy and routing-flip rate at θ₀ + α d for each α of ``alphas``.

    ``batches``: (x, y) pairs (or one pair), moved once to the parameters' device. ``callback(model,
    point)`` runs after each point with the model still at the perturbed weights; ``point`` holds
    alpha, loss, accuracy and flip_rate. Cost: (len(alphas) + 1) forward passes over ``batches``.
    """
    alphas = _grid(alphas, "alphas")
    values, base = _scan(model, batches, [direction], [(a,) for a in alphas], aux_loss, callback)
    return _result(values, base, alphas, None, [direction])


def loss_plane(
    model: nn.Module,
    batches: Batches,
    directions: tuple[Mapping[str, Tensor], Mapping[str, Tensor]],
    alphas: Sequence[float] | Tensor,
    betas: Sequence[float] | Tensor,
    *,
    aux_loss: bool = False,
    callback: Callable[[nn.Module, dict[str, float]], None] | None = None,
) -> LossLandscape:
    """Loss, accuracy and routing-flip rate at θ₀ + α d₁ + β d₂ on the (alphas × betas) grid.

    Grids come back (A, B), entry [i, j] at (alphas[i], betas[j]). As :func:`loss_line` otherwise;
    cost: (A·B + 1) forward passes over ``batches``.
    """
    if len(directions) != 2:
        raise ValueError(f"a plane needs 2 directions (d1, d2), got {len(directions)}")
    alphas, betas = _grid(alphas, "alphas"), _grid(betas, "betas")
    coords = [(a, b) for a in alphas for b in betas]
    values, base = _scan(model, batches, list(directions), coords, aux_loss, callback)
    return _result(values, base, alphas, betas, list(directions))


def _grid(values: Sequence[float] | Tensor, what: str) -> list[float]:
    grid = [float(v) for v in (values.tolist() if isinstance(values, Tensor) else values)]
    if not grid or not all(math.isfinite(v) for v in grid):
        raise ValueError(f"{what} must be a non-empty sequence of finite numbers, got {grid}")
    return grid


def _result(
    values: list[dict[str, Any]],
    base: dict[str, Any],
    alphas: list[float],
    betas: list[float] | None,
    directions: list[Mapping[str, Tensor]],
) -> LossLandscape:
    shape = (len(alphas),) if betas is None else (len(alphas), len(betas))

    def grid(key: str) -> Tensor:
        return torch.tensor([v[key] for v in values], dtype=torch.float64).reshape(shape)

    layers = list(base["layers"])
    layer_flips = {
        name: torch.tensor([v["layers"].get(name, math.nan) for v in values], dtype=torch.float64).reshape(shape)
        for name in layers
    }
    moved = {name for d in directions for name in d}
    return LossLandscape(
        alphas=alphas,
        betas=betas,
        loss=grid("loss"),
        accuracy=grid("accuracy"),
        flip_rate=grid("flip_rate"),
        layer_flip_rate=layer_flips,
        base_loss=base["loss"],
        base_accuracy=base["accuracy"],
        params=[name for name in base["names"] if name in moved],
        num_samples=base["num_samples"],
    )


def _check_direction(direction: Mapping[str, Tensor], params: dict[str, nn.Parameter], which: int) -> Direction:
    if not direction:
        raise ValueError(f"direction {which} is empty")
    if unknown := sorted(set(direction) - set(params)):
        raise ValueError(f"direction {which} names {unknown}, which are not parameters of the model")
    checked = {}
    for name, d in direction.items():
        if d.shape != params[name].shape:
            raise ValueError(
                f"direction {which} has shape {tuple(d.shape)} for {name}, whose shape is {tuple(params[name].shape)}"
            )
        if not bool(torch.isfinite(d).all()):
            raise ValueError(f"direction {which} is not finite in {name}")
        checked[name] = d.detach().to(params[name].device)
    return checked


def _scan(
    model: nn.Module,
    batches: Batches,
    directions: list[Mapping[str, Tensor]],
    coords: list[tuple[float, ...]],
    aux_loss: bool,
    callback: Callable[[nn.Module, dict[str, float]], None] | None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Evaluates the base point, then every point of ``coords``; restores weights and training flags."""
    params = dict(model.named_parameters())
    dirs = [_check_direction(d, params, i + 1) for i, d in enumerate(directions)]
    device = next(iter(params.values())).device
    batches = device_batches(batches, device, "the loss surface")
    names = [name for name in params if any(name in d for d in dirs)]
    saved = {name: params[name].detach().clone() for name in names}
    plans: list[tuple[str, Any]] = []  # (MoE layer name, plan) of each router call of the current batch
    hooks = [
        moe.router.register_forward_hook(lambda mod, args, out, name=name: plans.append((name, out.plan)))
        for name, moe in moe_layers(model)
    ]
    try:
        with eval_mode(model), torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            base_masks: list[dict[tuple[str, int], Tensor]] = []
            base = _evaluate(model, batches, plans, aux_loss, base_masks, None)
            if not math.isfinite(base["loss"]):
                raise FloatingPointError(f"the loss at the base point θ₀ is {base['loss']}; its surface means nothing")
            values = []
            for coord in coords:
                for name in names:  # θ = θ₀ + Σ cᵢ dᵢ, summed in fp32 at least
                    acc = torch.promote_types(saved[name].dtype, torch.float32)
                    theta = saved[name].to(acc)
                    for c, d in zip(coord, dirs, strict=True):
                        if name in d:
                            theta = theta + c * d[name].to(acc)
                    params[name].copy_(theta)
                try:
                    point = _evaluate(model, batches, plans, aux_loss, None, base_masks)
                except FloatingPointError:  # overflowed far from θ₀ (router logits): a NaN point
                    point = {"loss": math.nan, "accuracy": math.nan, "flip_rate": math.nan, "layers": {}}
                values.append(point)
                if callback is not None:
                    labels = dict(zip(("alpha", "beta"), coord, strict=False))
                    callback(model, {**labels, **{k: point[k] for k in ("loss", "accuracy", "flip_rate")}})
    finally:
        for hook in hooks:
            hook.remove()
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)
    base["names"] = names
    return values, base


def _kept_experts(plan: Routing) -> Tensor:
    """(G, S, E) bool: whether token s of group g is processed by expert e (kept assignments only)."""
    G, S, E = plan.num_groups, plan.num_tokens, plan.num_experts
    group = torch.arange(G, device=plan.token.device)[:, None]  # (G, 1)
    flat = ((group * S + plan.token) * E + plan.expert)[plan.kept]  # (kept,) index into G·S·E
    mask = torch.zeros(G * S * E, dtype=torch.bool, device=plan.token.device)
    return mask.index_fill_(0, flat, True).view(G, S, E)


def _evaluate(
    model: nn.Module,
    batches: list[tuple[Tensor, Tensor]],
    plans: list[tuple[str, Any]],
    aux_loss: bool,
    record: list[dict[tuple[str, int], Tensor]] | None,
    reference: list[dict[tuple[str, int], Tensor]] | None,
) -> dict[str, Any]:
    """Loss (sum of per-sample CE / N), accuracy and flips over ``batches`` at the current weights.

    With ``record``, each batch's kept-expert masks are appended to it (the base point); with
    ``reference``, the masks are compared with those.
    """
    loss = torch.zeros((), dtype=torch.float64, device=batches[0][1].device)
    correct = torch.zeros((), dtype=torch.long, device=loss.device)
    flips: dict[str, tuple[Tensor | int, int]] = {}  # per layer: (flipped tokens, tokens)
    num_samples = 0
    for b, (x, y) in enumerate(batches):
        plans.clear()
        logits = model(x)  # (B, classes)
        logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
        loss = loss + F.cross_entropy(logits, y, reduction="sum").double()
        if aux_loss:
            loss = loss + collect_aux_loss(model).double() * len(y)
        correct = correct + (logits.argmax(dim=-1) == y).sum()
        num_samples += len(y)
        masks, calls = {}, {}
        for name, plan in plans:
            key = (name, calls.setdefault(name, 0))
            calls[name] += 1
            if isinstance(plan, Routing):  # Soft MoE and dense layers make no discrete choice
                masks[key] = _kept_experts(plan)
        if record is not None:
            record.append(masks)
        ref = masks if reference is None else reference[b]  # the base point flips nothing, by definition
        for key, mask in masks.items():
            if key not in ref or ref[key].shape != mask.shape:
                raise RuntimeError(f"MoE layer {key[0]!r} (call {key[1]}) routed differently shaped groups than at θ₀")
            flipped = (mask != ref[key]).any(dim=-1).sum()  # tokens whose set of kept experts changed
            done, tokens = flips.get(key[0], (0, 0))
            flips[key[0]] = (done + flipped, tokens + mask.shape[0] * mask.shape[1])  # G·S tokens
    layers = {name: float(f) / t for name, (f, t) in flips.items()}
    flipped, tokens = sum(float(f) for f, _ in flips.values()), sum(t for _, t in flips.values())
    return {
        "loss": float(loss) / num_samples,
        "accuracy": int(correct) / num_samples,
        "flip_rate": flipped / tokens if tokens else math.nan,
        "layers": layers,
        "num_samples": num_samples,
    }


def plot_landscape(result: LossLandscape, path: str | Path, *, title: str | None = None, dpi: int = 120) -> Path:
    """A PNG of the surface: loss, accuracy and (with sparse layers) flip rate against α, or as contours over (α, β).

    Needs matplotlib (``pip install visionmoe[bench]``); it is imported here only. Returns the path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("loss", result.loss), ("accuracy", result.accuracy)]
    if bool(torch.isfinite(result.flip_rate).any()):
        panels.append(("routing-flip rate", result.flip_rate))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (label, grid) in zip(axes[0], panels, strict=True):
        values = np.ma.masked_invalid(grid.numpy())
        if result.ndim == 1:
            ax.plot(result.alphas, values, marker="o", markersize=3)
            ax.axvline(0.0, color="grey", linestyle=":", linewidth=1)
            ax.set_xlabel("α")
        else:
            # contourf takes Z as (rows = y, cols = x): the (A, B) grid transposed, α across, β up.
            filled = ax.contourf(result.alphas, result.betas, values.T, levels=20, cmap="viridis")
            fig.colorbar(filled, ax=ax)
            ax.plot([0.0], [0.0], marker="+", color="white", markersize=10)
            ax.set_xlabel("α")
            ax.set_ylabel("β")
        ax.set_title(label)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
