"""Routing analytics of MoE models: expert load, collapse, drops, entropy and class specialisation.

Two sources, one vocabulary:

* :func:`routing_report` runs a model over labelled batches and, per MoE layer, sums the layer's
  :class:`~visionmoe.layers.stats.RoutingStats` (load, dropped and unrouted fractions, router
  entropy) and a class × expert matrix: which experts the tokens of each class's samples go to.
  From the matrix: each class's distribution over experts, the experts each class uses most (for a
  head: "which experts does class c use"), and the mutual information I(class; expert).
* :func:`load_history` reads the per-epoch routing statistics a training run logged in
  ``metrics.jsonl`` into a long pandas DataFrame, to follow load balance over training.

Axes as in :mod:`visionmoe.routing.plan`: G groups, S tokens per group, E experts, A assignments per
group; here also B samples, N tokens per sample and K classes.

Load is what :meth:`Plan.tokens_per_expert` counts: kept assignments for sparse routers, combine
mass for Soft MoE, every token for the dense router. An expert has *collapsed* when its share of the
load is below ``threshold`` × the uniform share 1/E (default 0.1: fewer than a tenth of the tokens a
balanced router would give it).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from visionmoe.analysis.modes import eval_mode
from visionmoe.jsonl import read_jsonl
from visionmoe.layers.moe import MoE, moe_layers
from visionmoe.layers.stats import RoutingStatsAccumulator
from visionmoe.routing.plan import Plan, Routing, SoftRouting

if TYPE_CHECKING:  # pandas loads when a history is read; `import visionmoe.analysis` (`visionmoe --help`) skips it
    import pandas as pd

COLLAPSE_THRESHOLD = 0.1
"""An expert with less than this fraction of the uniform share 1/E of the load counts as collapsed."""

LAYER_STATS = ("dropped_fraction", "unrouted_fraction", "router_entropy", "load_cv")
"""Per-layer statistics of a logged epoch that :func:`load_history` repeats on each expert's row."""

HISTORY_COLUMNS = ("epoch", "step", "split", "layer", "expert", "load", "share", "collapsed", *LAYER_STATS)
"""The columns of :func:`load_history`'s DataFrame."""


# ---- functions of a load vector or a class × expert matrix -----------------------------------------


def collapsed_experts(load: Tensor | Sequence[float], threshold: float = COLLAPSE_THRESHOLD) -> list[int]:
    """Experts whose share of ``load`` (E,) is below ``threshold / E``; none if nothing was routed."""
    if not threshold >= 0:
        raise ValueError(f"threshold must be >= 0, got threshold={threshold}")
    load = torch.as_tensor(load, dtype=torch.float64).flatten()
    total = float(load.sum())
    if load.numel() == 0 or total <= 0:
        return []
    share = load / total  # (E,)
    return torch.nonzero(share < threshold / load.numel()).flatten().tolist()


def mutual_information(matrix: Tensor, *, normalized: bool = False) -> float:
    """I(class; expert) in nats of the joint distribution ``matrix / matrix.sum()`` (K, E).

    I = Σ p(c, e) · ln(p(c, e) / (p(c) p(e))), with 0 · ln 0 = 0: 0 when every class spreads over the
    experts alike, ln K when K equally frequent classes each own their experts. ``normalized`` divides
    by min(H(class), H(expert)), the largest value I can take, so 1 is a perfect split; it is 0 when
    either marginal is a point mass (then I = 0 too). An empty matrix gives 0.
    """
    p = torch.as_tensor(matrix, dtype=torch.float64)
    if p.dim() != 2:
        raise ValueError(f"need a (classes, experts) matrix, got shape {tuple(p.shape)}")
    total = float(p.sum())
    if total <= 0:
        return 0.0
    p = p / total  # (K, E) joint
    pc, pe = p.sum(1, keepdim=True), p.sum(0, keepdim=True)  # (K, 1), (1, E) marginals
    ratio = torch.where(p > 0, p / (pc * pe).clamp_min(1e-300), torch.ones_like(p))
    mi = max(float((p * ratio.log()).sum()), 0.0)  # clamp rounding below 0
    if not normalized:
        return mi
    bound = min(_entropy(pc), _entropy(pe))
    return mi / bound if bound > 1e-12 else 0.0


def _entropy(p: Tensor) -> float:
    return float(-torch.xlogy(p, p).sum())


def _rows(matrix: Tensor) -> Tensor:
    """Each row divided by its sum; rows that sum to 0 stay 0."""
    return matrix / matrix.sum(dim=1, keepdim=True).clamp_min(1e-300)


# ---- the report on a dataset ------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerRouting:
    """One MoE layer's routing over the data :func:`routing_report` saw.

    Attributes:
        name, router, groups, num_experts: the layer (qualified name, router name, grouping, E).
        tokens: tokens routed (B·N summed over batches and calls).
        load: (E,) per-expert load (see the module docstring); ``share`` = load / Σ load.
        collapsed: experts whose share is below ``threshold / E``.
        dropped_fraction, unrouted_fraction, router_entropy, load_cv: as in :class:`RoutingStats`.
        counts: (K, E) float64, row c = class c's samples: the number of their tokens' processed
            assignments to each expert (top-k counts each kept choice; Soft MoE adds combine mass,
            the same quantity as ``load``; dense adds 1 per token and expert). Σ_c counts = load.
        weights: (K, E) float64, the same with each assignment's combine weight (gate value) in place
            of 1: how much of each expert's output the class receives. Soft MoE: combine mass (=
            counts); dense: 1 (= counts).
        mutual_information: I(class; expert) of ``counts`` in nats; ``normalized_mutual_information``
            divides it by min(H(class), H(expert)) (see :func:`mutual_information`).
    """

    name: str
    router: str
    groups: str | int
    num_experts: int
    tokens: float
    load: list[float]
    share: list[float]
    collapsed: list[int]
    dropped_fraction: float
    unrouted_fraction: float
    router_entropy: float
    load_cv: float
    counts: Tensor
    weights: Tensor
    mutual_information: float
    normalized_mutual_information: float
    top: int = 3

    def class_distribution(self, *, weighted: bool = False) -> Tensor:
        """(K, E) each class's distribution over experts: ``counts`` (or ``weights``) row-normalised."""
        return _rows(self.weights if weighted else self.counts)

    def top_experts(self, k: int | None = None, *, weighted: bool = False) -> list[list[int]]:
        """Per class, its ``k`` (default ``top``) most used experts, most used first; experts it never
        uses are left out, so a class without samples gets []. Ties go to the lower expert index."""
        k = min(self.top if k is None else k, self.num_experts)
        dist = self.class_distribution(weighted=weighted)  # (K, E)
        order = torch.sort(dist, dim=1, descending=True, stable=True).indices[:, :k]  # (K, k)
        return [[e for e in row if dist[c, e] > 0] for c, row in enumerate(order.tolist())]

    def to_dict(self) -> dict[str, Any]:
        """Plain Python values (JSON-ready); the matrices as nested lists, with the top experts per class."""
        out = {f: getattr(self, f) for f in self.__dataclass_fields__ if f not in ("counts", "weights", "top")}
        out["counts"], out["weights"] = self.counts.tolist(), self.weights.tolist()
        out["top_experts"] = self.top_experts()
        return out


@dataclass(frozen=True)
class RoutingReport:
    """What :func:`routing_report` measured: one :class:`LayerRouting` per MoE layer that ran."""

    num_classes: int
    samples: int
    threshold: float
    layers: dict[str, LayerRouting] = field(default_factory=dict)

    @property
    def collapsed(self) -> dict[str, list[int]]:
        """Collapsed experts of the layers that have any, by layer name."""
        return {name: layer.collapsed for name, layer in self.layers.items() if layer.collapsed}

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_classes": self.num_classes,
            "samples": self.samples,
            "threshold": self.threshold,
            "layers": {name: layer.to_dict() for name, layer in self.layers.items()},
        }


class _Tally:
    """Hooks on one MoE layer that sum its RoutingStats and its class × expert matrices."""

    def __init__(self, name: str, moe: MoE, num_classes: int, device: torch.device | None) -> None:
        self.name, self.moe, self.num_classes = name, moe, num_classes
        self.stats = RoutingStatsAccumulator()
        size = num_classes * moe.num_experts
        self.counts = torch.zeros(size, dtype=torch.float64, device=device)  # flattened (K, E)
        self.weights = torch.zeros(size, dtype=torch.float64, device=device)
        self.labels: Tensor | None = None  # (B,) labels of the batch being run, set by routing_report
        self.shape: tuple[int, int] = (0, 0)  # (B, N) of the layer's latest input

    def attach(self) -> list[Any]:
        return [
            self.moe.register_forward_pre_hook(self.pre),
            self.moe.router.register_forward_hook(self.routed),
            self.moe.register_forward_hook(self.post),
        ]

    def pre(self, moe: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0]  # (B, D), (B, N, D) or (B, D, H, W): N as MoE.to_tokens makes them
        self.shape = (x.shape[0], 1 if x.dim() == 2 else x.shape[1] if x.dim() == 3 else x.shape[2] * x.shape[3])

    def routed(self, router: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        G, S = args[0].shape[:2]
        B, N = self.shape
        y = self.labels
        if y is None or y.numel() != B:
            raise ValueError(
                f"MoE layer {self.name!r} saw a batch of {B} samples but the labels have "
                f"{None if y is None else y.numel()}; routing_report needs the layer's batch axis to be the "
                "model's (layers that fold windows or crops into the batch axis are not supported)"
            )
        self.add(output.plan, y, G, S, N)

    def add(self, plan: Plan, y: Tensor, G: int, S: int, N: int) -> None:
        """Add one call's plan. MoE.group only reshapes the (B·N) tokens of the batch into (G, S), so
        for every grouping ("sample": G=B, S=N; "batch": G=1, S=B·N; an int g: S=g) token s of group g
        is token g·S + s of the flattened batch, which belongs to sample (g·S + s) // N."""
        E = self.moe.num_experts
        if isinstance(plan, Routing):
            flat = torch.arange(G, device=plan.token.device)[:, None] * S + plan.token  # (G, A)
            index = (y[flat // N] * E + plan.expert).reshape(-1)  # (G·A,) into the flattened (K, E)
            self.counts.scatter_add_(0, index, plan.kept.reshape(-1).double())
            self.weights.scatter_add_(0, index, plan.weight.detach().reshape(-1).double())
            return
        if isinstance(plan, SoftRouting):
            per_token = plan.combine.detach().sum(dim=-1).reshape(G * S, E).double()  # combine mass per expert
        else:  # dense: every token through every expert with weight 1
            per_token = torch.ones(G * S, E, dtype=torch.float64, device=self.counts.device)
        label = y[torch.arange(G * S, device=y.device) // N]  # (G·S,) class of each token's sample
        self.counts.view(-1, E).index_add_(0, label, per_token)
        self.weights.view(-1, E).index_add_(0, label, per_token)

    def post(self, moe: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        self.stats.update(moe.last_stats)

    def result(self, threshold: float, top: int) -> LayerRouting:
        stats = self.stats.compute()
        load = stats.tokens_per_expert.double().cpu()  # (E,)
        share = load / load.sum().clamp_min(1e-300)
        counts = self.counts.cpu().view(self.num_classes, -1)
        return LayerRouting(
            name=self.name,
            router=self.moe.router.name,
            groups=self.moe.groups,
            num_experts=self.moe.num_experts,
            tokens=float(stats.tokens),
            load=load.tolist(),
            share=share.tolist(),
            collapsed=collapsed_experts(load, threshold),
            dropped_fraction=stats.dropped_fraction,
            unrouted_fraction=stats.unrouted_fraction,
            router_entropy=stats.router_entropy,
            load_cv=stats.load_cv,
            counts=counts,
            weights=self.weights.cpu().view(self.num_classes, -1),
            mutual_information=mutual_information(counts),
            normalized_mutual_information=mutual_information(counts, normalized=True),
            top=top,
        )


@torch.no_grad()
def routing_report(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    num_classes: int,
    *,
    threshold: float = COLLAPSE_THRESHOLD,
    top: int = 3,
    device: torch.device | str | None = None,
) -> RoutingReport:
    """Run ``model`` over labelled ``batches`` in eval mode and report every MoE layer's routing.

    Args:
        model: any module with :class:`MoE` layers; its training flags are restored afterwards.
        batches: (x, y) pairs with y (B,) class indices in [0, num_classes); x as the model takes it
            (already normalised). A layer's input must keep the model's batch axis (B first).
        num_classes: K, the rows of the class × expert matrices.
        threshold: collapse threshold, as a fraction of the uniform share (see the module docstring).
        top: experts listed per class in ``to_dict()`` (:meth:`LayerRouting.top_experts`).
        device: where batches are moved; default the device of the model's first parameter.

    Returns:
        A :class:`RoutingReport`; a model without MoE layers (or whose layers never ran) gives one
        with no layers. Statistics are those of the eval-mode routing (no router noise, the eval
        capacity factor).
    """
    if not (isinstance(num_classes, int) and num_classes >= 1):
        raise ValueError(f"num_classes must be an int >= 1, got num_classes={num_classes!r}")
    if not (isinstance(top, int) and top >= 1):
        raise ValueError(f"top must be an int >= 1, got top={top!r}")
    collapsed_experts([], threshold)  # validates it
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    tallies = [_Tally(name, moe, num_classes, torch.device(device)) for name, moe in moe_layers(model)]
    handles = [h for tally in tallies for h in tally.attach()]
    samples = 0
    try:
        with eval_mode(model):
            for x, y in batches:
                y = torch.as_tensor(y)
                if y.dim() != 1 or y.dtype.is_floating_point or y.dtype == torch.bool:
                    raise ValueError(f"labels must be (B,) class indices, got {y.dtype} of shape {tuple(y.shape)}")
                if y.numel() and not 0 <= int(y.min()) <= int(y.max()) < num_classes:
                    raise ValueError(f"labels must lie in [0, {num_classes}), got {int(y.min())}..{int(y.max())}")
                samples += y.numel()
                if not tallies:
                    continue  # nothing to measure: no forward pass
                y = y.to(device, torch.long)
                for tally in tallies:
                    tally.labels = y
                model(x.to(device))
    finally:
        for handle in handles:
            handle.remove()
    layers = {t.name: t.result(threshold, top) for t in tallies if t.stats.total is not None}
    return RoutingReport(num_classes, samples, threshold, layers)


# ---- load over training, from a run's metrics.jsonl -------------------------------------------------


def load_history(run: str | Path, *, threshold: float = COLLAPSE_THRESHOLD) -> pd.DataFrame:
    """Per-expert load per epoch of a training run, as a long DataFrame (one row per record, split,
    layer and expert).

    ``run`` is a run directory (its ``metrics.jsonl``) or the file itself. Columns are
    :data:`HISTORY_COLUMNS`: ``split`` is "train" (the epoch's training batches, ``record["routing"]``)
    or "test" (the evaluation, ``record["test"]["routing"]``, on the epochs that evaluated);
    ``load`` is the expert's logged tokens_per_expert, ``share`` its fraction of the layer's load,
    ``collapsed`` whether that share is below ``threshold / E``. The per-layer statistics
    (``dropped_fraction``, ``unrouted_fraction``, ``router_entropy``, ``load_cv``) repeat on each
    expert's row (NaN where the log lacks them), so ``df[df.expert == 0]`` lists them once per layer.
    """
    import pandas as pd

    path = Path(run)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics log at {path} (a run directory holds metrics.jsonl)")
    rows = []
    for record in read_jsonl(path):  # a torn last line (a crash mid-write) dropped with a warning
        splits = {"train": record.get("routing") or {}, "test": (record.get("test") or {}).get("routing") or {}}
        for split, layers in splits.items():
            for layer, stats in layers.items():
                load = [float(v) for v in stats["tokens_per_expert"]]
                total = sum(load)
                collapsed = set(collapsed_experts(load, threshold))
                per_layer = {k: float(stats.get(k, math.nan)) for k in LAYER_STATS}
                where = {"epoch": record.get("epoch"), "step": record.get("step"), "split": split, "layer": layer}
                for expert, value in enumerate(load):
                    share = value / total if total > 0 else math.nan
                    row = {"expert": expert, "load": value, "share": share, "collapsed": expert in collapsed}
                    rows.append({**where, **row, **per_layer})
    return pd.DataFrame(rows, columns=list(HISTORY_COLUMNS))


# ---- plots ------------------------------------------------------------------------------------------


def plot_class_expert(
    report: RoutingReport, path: str | Path, *, weighted: bool = False, class_names: Sequence[str] | None = None
) -> Path:
    """Heatmaps of each layer's class × expert distribution (rows sum to 1), side by side, to ``path``.

    ``weighted`` plots ``weights`` instead of ``counts``. A report without layers writes a figure
    that says so.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(report.layers.values())
    n = max(len(layers), 1)
    width = max(4.0, 0.35 * max((layer.num_experts for layer in layers), default=4) + 2)
    height = min(max(2.5, 0.25 * report.num_classes + 1.5), 20)
    fig, axes = plt.subplots(1, n, figsize=(width * n, height), squeeze=False)
    axes = list(axes[0])
    if not layers:
        axes[0].text(0.5, 0.5, "no MoE layers", ha="center", va="center")
        axes[0].set_axis_off()
    for ax, layer in zip(axes, layers, strict=False):
        image = ax.imshow(layer.class_distribution(weighted=weighted).numpy(), aspect="auto", cmap="viridis", vmin=0)
        mi, nmi = layer.mutual_information, layer.normalized_mutual_information
        ax.set_title(f"{layer.name}\nI = {mi:.3f} nats (normalised {nmi:.2f})", fontsize=9)
        ax.set_xlabel("expert")
        ax.set_ylabel("class")
        if class_names is not None and len(class_names) <= 30:
            ax.set_yticks(range(len(class_names)), class_names, fontsize=7)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return _save(fig, path)


def plot_load_history(
    history: pd.DataFrame, path: str | Path, *, split: str = "train", threshold: float = COLLAPSE_THRESHOLD
) -> Path:
    """Each layer's per-expert load share over epochs (one panel per layer) from :func:`load_history`.

    Dashed: the uniform share 1/E; dotted: the collapse line ``threshold / E``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = history[history["split"] == split]
    names = list(dict.fromkeys(data["layer"]))
    n = max(len(names), 1)
    fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 3.2), squeeze=False)
    axes = list(axes[0])
    if not names:
        axes[0].text(0.5, 0.5, f"no routing logged ({split})", ha="center", va="center")
        axes[0].set_axis_off()
    for ax, name in zip(axes, names, strict=False):
        layer = data[data["layer"] == name]
        num_experts = int(layer["expert"].max()) + 1
        for expert, rows in layer.groupby("expert"):
            ax.plot(rows["epoch"], rows["share"], marker=".", lw=1, label=f"e{expert}")
        ax.axhline(1 / num_experts, color="k", ls="--", lw=0.8)
        ax.axhline(threshold / num_experts, color="r", ls=":", lw=0.8)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylabel("load share")
        if num_experts <= 16:
            ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig: Any, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
