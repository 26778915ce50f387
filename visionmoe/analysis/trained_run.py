"""The analyses of a trained run (``visionmoe analyze``), written into its directory.

    analyze_run("runs/cifar10_moe-s0", what=("routing", "hessian", "landscape", "efficiency"))

Sections (each optional):

- **routing**: :func:`~visionmoe.analysis.routing_report` on the test subset (load, collapse, drops,
  entropy, class × expert matrix and its mutual information) and the load history of the run's
  ``metrics.jsonl``; plots ``routing_classes.png`` and ``routing_history.png``.
- **hessian**: λmax and the top eigenvalues (Lanczos) and tr(H) ± stderr (Hutchinson) of the loss on
  the train and on the test subset (Rokah et al. 2026's sharpness measures), over a parameter group
  (all / router / experts / backbone / head); optionally the eigenvalue density (stochastic Lanczos
  quadrature), ``hessian_density_{train,test}.png``.
- **landscape**: the loss, accuracy and routing-flip rate along a filter-normalised random direction
  (Li et al. 2018) and/or the top Hessian eigenvector, on both subsets
  (``landscape[_hessian]_{train,test}.png``), and optionally on a 2D plane of two random directions
  (``landscape_plane_{train,test}.png``). The perturbation moves only the chosen parameter group.
- **efficiency**: forward time of the model against its dense twin of equal total parameters (what
  sparsity should beat) and of equal active FLOPs (what it should match), per batch size:
  theoretical speed-up (FLOP ratio, from :func:`~visionmoe.analysis.profile_model`) against realised
  (time ratio, interleaved repeats).

A model without MoE layers gets the sections that make sense for it (no routing, no twins). Results
go to ``analysis.json`` (with the settings that produced them) and ``analysis.md`` in ``--out``
(default: the run directory). The long parts show rich progress bars counting HVPs and points.

The one module of ``analysis/`` that reads a trained run (``train``'s :func:`load_run`), so it sits above
``train`` while the rest of the package sits below it; ``visionmoe.analysis`` does not import it.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from torch import Tensor, nn

from visionmoe.analysis.hessian import (
    HessianOperator,
    HessianSummary,
    hutchinson_trace,
    plot_spectral_density,
    spectral_density,
    top_eigenvalues,
)
from visionmoe.analysis.landscape import hessian_direction, loss_line, loss_plane, plot_landscape, random_direction
from visionmoe.analysis.profile import profile_model
from visionmoe.analysis.routing import load_history, plot_class_expert, plot_load_history, routing_report
from visionmoe.analysis.speed import interleaved_times
from visionmoe.analysis.twin import dense_twin
from visionmoe.data import normalize
from visionmoe.data.stream import ImageFiles, first_images
from visionmoe.jsonl import write_atomic
from visionmoe.layers.moe import moe_layers
from visionmoe.train.trainer import load_run

SECTIONS = ("routing", "hessian", "landscape", "efficiency")


def subset_batches(
    data, mean, std, samples: int, batch_size: int, *, seed: int = 0, transform=None
) -> list[tuple[Tensor, Tensor]]:
    """A fixed random subset of ``samples`` images as normalised (x, y) batches (no augmentation).

    ``data``: an in-memory split, or a streamed one (:class:`~visionmoe.data.stream.ImageFiles`)
    whose images are decoded here with ``transform`` (the evaluation transform)."""
    n = min(samples, len(data))
    index = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    streamed = isinstance(data, ImageFiles)
    images = first_images(data.subset(index), n, transform) if streamed else data.images[index]
    x = normalize(images, tuple(mean), tuple(std))
    y = data.labels[index]
    return list(zip(x.split(batch_size), y.split(batch_size), strict=True))


def efficiency(model: nn.Module, example: Tensor, batch_sizes: Sequence[int], *, repeats: int = 5) -> list[dict]:
    """Theoretical vs realised forward speed-up of ``model`` over its dense twins, per batch size."""
    threads = torch.get_num_threads()
    twins = {
        "dense, equal params": dense_twin(model, match="params", example_input=example[:2]),
        "dense, equal active FLOPs": dense_twin(model, match="flops", example_input=example[:2]),
    }
    rows = []
    for batch in batch_sizes:
        x = example[:1].expand(batch, *example.shape[1:]).contiguous()
        flops = {"moe": profile_model(model, x).total_flops}
        fns = {"moe": _forward(model, x)}
        for name, twin in twins.items():
            flops[name] = profile_model(twin, x).total_flops
            fns[name] = _forward(twin, x)
        times = interleaved_times(fns, threads=threads, repeats=repeats)
        for name in twins:
            ratios = [t / m for t, m in zip(times[name], times["moe"], strict=True)]
            rows.append(
                {
                    "batch": batch,
                    "against": name,
                    "moe_ms": 1e3 * statistics.median(times["moe"]),
                    "dense_ms": 1e3 * statistics.median(times[name]),
                    "theoretical": flops[name] / flops["moe"],
                    "realised": statistics.median(ratios),
                }
            )
    return rows


def _forward(model: nn.Module, x: Tensor):
    @torch.no_grad()
    def run() -> Tensor:
        return model(x)

    return run


DIRECTIONS = ("random", "hessian")


def analyze_run(
    checkpoint: str | Path,
    what: Sequence[str] = SECTIONS,
    *,
    data_dir: str | None = None,
    out: str | Path | None = None,
    samples: int = 1000,
    batch_size: int = 250,
    params: str = "all",
    top_k: int = 3,
    trace_probes: int = 50,
    tol: float = 1e-3,
    density_steps: int = 0,
    directions: Sequence[str] = ("random",),
    plane: int = 0,
    alphas: Sequence[float] = tuple(i / 10 for i in range(-10, 11)),
    eigen_alphas: Sequence[float] | None = None,
    batch_sizes: Sequence[int] = (1, 16, 256),
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the ``what`` sections on the run of ``checkpoint``; returns (and writes) the results.

    Args:
        samples, batch_size: the fixed random train and test subsets (from ``seed``) every section uses.
        params: the parameter group of the Hessian and of the perturbations (see
            :data:`~visionmoe.analysis.PARAM_GROUPS`): "all", "router", "experts", "backbone" or "head".
            With "head" the backbone runs once and every HVP on the head alone.
        top_k, trace_probes, tol: Lanczos eigenvalues, Hutchinson probes, Lanczos relative accuracy.
        density_steps: > 0 adds the spectral density by stochastic Lanczos quadrature (one probe of
            that many steps per subset; ``hessian_density_{train,test}.png``) and its negative mass,
            the weight of Ritz values below −1% of the largest |θ|. Its trace, kept in the JSON, is one
            probe's zᵀHz: trust Hutchinson's for the trace.
        directions: 1D perturbation directions: "random" (filter-normalised) and/or "hessian" (the
            unit top eigenvector of H over ``params`` on the train subset; α is then in parameter units).
        plane: > 0 adds a 2D plane of two random directions on a ``plane`` × ``plane`` grid spanning
            the range of ``alphas`` (``landscape_plane_{train,test}.png``).
        alphas: the grid of the random directions (α = 1 moves every filter by its own norm).
        eigen_alphas: the grid along the unit eigenvector, in parameter units; default ``alphas`` / 10,
            since a unit step along the sharpest direction raises the loss by about λmax / 2.
        batch_sizes: of the efficiency timing.
        progress: rich progress bars for the long parts (HVPs and perturbation points counted).
    """
    unknown = sorted(set(what) - set(SECTIONS))
    if unknown or not what:
        raise ValueError(f"unknown analysis section(s) {unknown or list(what)}; choose from {list(SECTIONS)}")
    if bad := sorted(set(directions) - set(DIRECTIONS)):
        raise ValueError(f"unknown perturbation direction(s) {bad}; choose from {list(DIRECTIONS)}")
    if plane < 0 or plane == 1 or density_steps < 0:
        raise ValueError(
            f"need plane = 0 or >= 2 and density_steps >= 0, got plane={plane}, density_steps={density_steps}"
        )
    counts = {"samples": samples, "batch_size": batch_size, "top_k": top_k, "trace_probes": trace_probes}
    if bad := [f"{name}={value!r}" for name, value in counts.items() if value < 1]:
        raise ValueError(f"{', '.join(bad)} out of range; expected >= 1")
    if not (math.isfinite(tol) and tol > 0):
        raise ValueError(f"tol={tol!r} is out of range; expected a finite relative accuracy > 0 (e.g. 1e-3)")
    checkpoint = Path(checkpoint)
    run_dir = checkpoint if checkpoint.is_dir() else checkpoint.parent
    out = Path(out) if out is not None else run_dir
    out.mkdir(parents=True, exist_ok=True)
    console = Console(quiet=not progress)
    config, model, splits, state = load_run(checkpoint, data_dir=data_dir, device="cpu")
    model = model.to(memory_format=torch.contiguous_format).float()
    has_moe = bool(moe_layers(model))
    subsets = {
        split: subset_batches(
            getattr(splits, split),
            splits.mean,
            splits.std,
            samples,
            batch_size,
            seed=seed,
            transform=splits.eval_transform,
        )
        for split in ("train", "test")
    }
    settings = {
        "params": params,
        "samples": samples,
        "top_k": top_k,
        "trace_probes": trace_probes,
        "tol": tol,
        "density_steps": density_steps,
        "directions": list(directions),
        "plane": plane,
        "seed": seed,
    }
    result: dict[str, Any] = {
        "run": str(run_dir),
        "name": config.name,
        "model": config.model.name,
        "step": int(state["step"]),
        "settings": settings,
        "samples": {k: sum(len(y) for _, y in v) for k, v in subsets.items()},
        "moe_layers": [name for name, _ in moe_layers(model)],
    }
    bars = _progress(console)
    with bars:
        if "routing" in what:
            result["routing"] = _routing(model, subsets["test"], splits, run_dir, out, has_moe, bars)
        eigenpairs = None
        if "hessian" in what:
            result["hessian"], eigenpairs = _hessian(model, subsets, settings, out, bars)
        if "landscape" in what:
            eigen_alphas = eigen_alphas if eigen_alphas is not None else [a / 10 for a in alphas]
            grids = {"random": list(alphas), "hessian": list(eigen_alphas)}
            result["landscape"] = _landscape(model, subsets, settings, grids, eigenpairs, out, config.name, bars)
        if "efficiency" in what:
            if has_moe:
                task = bars.add_task("timing against the dense twins", total=None)
                result["efficiency"] = efficiency(model, subsets["test"][0][0], batch_sizes)
                bars.update(task, total=1, completed=1)
            else:
                result["efficiency"] = "no MoE layer: nothing to compare with a dense twin"
    # analysis.md first: a sweep takes analysis.json as "analysed", so it is written last and whole
    write_atomic(out / "analysis.md", markdown(result) + "\n")
    write_atomic(out / "analysis.json", json.dumps(result, indent=2, default=_json) + "\n")
    console.print(markdown(result))
    return result


def _progress(console):
    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=console.quiet,
    )


def _hessian(model, subsets, settings, out: Path, bars) -> tuple[dict[str, Any], Any]:
    """λmax / top-k (Lanczos), trace (Hutchinson) and optionally the SLQ density on each subset.

    Returns the section and the train subset's eigenpairs (for the eigenvector direction).
    """
    section: dict[str, Any] = {}
    train_eig = None
    seed = settings["seed"]
    for split, batches in subsets.items():
        op = HessianOperator(model, batches, settings["params"])
        task = bars.add_task(f"Hessian ({split}): Lanczos top-{settings['top_k']}, HVPs", total=None)
        op.on_matvec = lambda _, task=task: bars.advance(task)
        eig = top_eigenvalues(op, settings["top_k"], tol=settings["tol"], seed=seed)
        bars.update(task, total=eig.matvecs, completed=eig.matvecs)
        task = bars.add_task(f"Hessian ({split}): Hutchinson trace, probes", total=settings["trace_probes"])
        op.on_matvec = lambda _, task=task: bars.advance(task)
        trace = hutchinson_trace(op, settings["trace_probes"], seed=seed)
        summary = HessianSummary.from_parts(op, settings["params"], eig, trace).to_dict()
        summary["cached_features"] = op.cached
        if settings["density_steps"]:
            steps = min(settings["density_steps"], op.n)
            task = bars.add_task(f"Hessian ({split}): spectral density, Lanczos steps", total=steps)
            op.on_matvec = lambda _, task=task: bars.advance(task)
            density = spectral_density(op, probes=1, steps=steps, seed=seed)
            plot_spectral_density(density, out / f"hessian_density_{split}.png", title=f"{split} subset")
            summary["density"] = {
                "nodes": density.nodes[0].tolist(),
                "weights": density.weights[0].tolist(),
                "trace": density.trace(),
                # Weight of clearly negative Ritz values: the near-zero bulk (rank-deficient H) gets nodes of
                # either sign at roundoff level, so "< 0" alone would count it.
                "negative_mass": float(
                    density.weights[density.nodes < -0.01 * density.nodes.abs().max()].sum() / len(density.nodes)
                ),
            }
        section[split] = summary
        if split == "train":
            train_eig = (op, eig)
    return section, train_eig


def _landscape(model, subsets, settings, grids, eigenpairs, out: Path, name: str, bars) -> dict[str, Any]:
    """1D lines along each of ``settings["directions"]`` and the optional 2D plane, on both subsets."""
    params, seed = settings["params"], settings["seed"]
    example = subsets["train"][0][0]
    section: dict[str, Any] = {}
    for kind in settings["directions"]:
        if kind == "random":
            direction = random_direction(model, params, seed=seed, example=example)
        else:
            if eigenpairs is None:
                op = HessianOperator(model, subsets["train"], params)
                task = bars.add_task("top Hessian eigenvector (train): Lanczos, HVPs", total=None)
                op.on_matvec = lambda _, task=task: bars.advance(task)
                eigenpairs = (op, top_eigenvalues(op, 1, tol=settings["tol"], seed=seed))
            direction = hessian_direction(*eigenpairs)
        section[kind] = {}
        for split, batches in subsets.items():
            task = bars.add_task(f"loss along the {kind} direction ({split}), points", total=len(grids[kind]))
            advance = lambda *_, task=task: bars.advance(task)  # noqa: E731
            line = loss_line(model, batches, direction, grids[kind], callback=advance)
            suffix = "" if kind == "random" else f"_{kind}"
            plot_landscape(line, out / f"landscape{suffix}_{split}.png", title=f"{name}: {kind} direction, {split}")
            section[kind][split] = line.to_dict()
    if settings["plane"]:
        generator = torch.Generator().manual_seed(seed)
        pair = tuple(random_direction(model, params, seed=generator, example=example) for _ in range(2))
        grid = torch.linspace(min(grids["random"]), max(grids["random"]), settings["plane"]).tolist()
        section["plane"] = {}
        for split, batches in subsets.items():
            task = bars.add_task(f"loss plane, two random directions ({split}), points", total=len(grid) ** 2)
            plane = loss_plane(model, batches, pair, grid, grid, callback=lambda *_, task=task: bars.advance(task))
            plot_landscape(plane, out / f"landscape_plane_{split}.png", title=f"{name}: random plane, {split}")
            section["plane"][split] = plane.to_dict()
    return section


def _routing(model, batches, splits, run_dir: Path, out: Path, has_moe: bool, bars) -> Any:
    if not has_moe:
        return "no MoE layer"
    task = bars.add_task("routing on the test subset", total=None)
    report = routing_report(model, batches, splits.num_classes)
    bars.update(task, total=1, completed=1)
    plot_class_expert(report, out / "routing_classes.png", class_names=splits.test.classes)
    section: dict[str, Any] = {"test": report.to_dict()}
    if (run_dir / "metrics.jsonl").is_file():
        history = load_history(run_dir)
        if len(history):
            plot_load_history(history, out / "routing_history.png")
            section["history_rows"] = len(history)
    return section


def _json(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def markdown(result: dict[str, Any]) -> str:
    """The report: one short table per section."""
    lines = [
        f"# Analysis of {result['name']} ({result['model']}, step {result['step']})",
        "",
        f"Subsets: {result['samples']['train']} train and {result['samples']['test']} test images. "
        f"MoE layers: {', '.join(result['moe_layers']) or 'none'}.",
    ]
    routing = result.get("routing")
    if isinstance(routing, dict):
        lines += [
            "",
            "## Routing (test subset)",
            "",
            "| layer | load share min / max | collapsed | dropped | entropy | I(class; expert) | normalised |",
            "|---|---|---|---|---|---|---|",
        ]
        for layer in routing["test"]["layers"].values():
            share = layer["share"]
            lines.append(
                f"| {layer['name']} | {min(share):.3f} / {max(share):.3f} | {layer['collapsed'] or '—'} | "
                f"{layer['dropped_fraction']:.1%} | {layer['router_entropy']:.3f} | "
                f"{layer['mutual_information']:.3f} | {layer['normalized_mutual_information']:.3f} |"
            )
    elif routing is not None:
        lines += ["", f"## Routing: {routing}"]
    if "hessian" in result:
        first = next(iter(result["hessian"].values()))
        lines += ["", f"## Hessian over {first['params']} ({first['num_params']:,} parameters)", ""]
        lines += ["| subset | loss | λmax | top eigenvalues | trace ± stderr | SLQ negative mass | HVPs |"]
        lines += ["|---|---|---|---|---|---|---|"]
        for split, h in result["hessian"].items():
            top = ", ".join(f"{v:.4g}" for v in h["top_eigenvalues"])
            trace = f"{h['trace']:.4g} ± {h['trace_stderr']:.2g}"
            d = h.get("density")
            negative = f"{d['negative_mass']:.1%}" if d else "—"
            lines.append(
                f"| {split} | {h['loss']:.4f} | {h['lambda_max']:.4g} | {top} | {trace} | {negative} | {h['matvecs']} |"
            )
    if "landscape" in result:
        for kind, lines_by_split in result["landscape"].items():
            if kind == "plane":
                lines += ["", "## Loss plane (two filter-normalised random directions)", ""]
                lines += ["| subset | loss at (0, 0) | min / max loss on the grid |", "|---|---|---|"]
                for split, plane in lines_by_split.items():
                    flat = [v for row in plane["loss"] for v in row if v is not None]
                    lines.append(f"| {split} | {plane['base_loss']:.4f} | {min(flat):.4f} / {max(flat):.4f} |")
                continue
            title = "filter-normalised random direction" if kind == "random" else "top Hessian eigenvector (unit)"
            lines += ["", f"## Loss surface ({title})", ""]
            lines += ["| subset | α | loss | accuracy | routing-flip rate |", "|---|---|---|---|---|"]
            for split, land in lines_by_split.items():
                alphas = land["alphas"]
                for i in sorted({0, len(alphas) // 4, len(alphas) // 2, 3 * len(alphas) // 4, len(alphas) - 1}):
                    flip = land["flip_rate"][i]
                    lines.append(
                        f"| {split} | {alphas[i]:+.2f} | {land['loss'][i]:.4f} | {land['accuracy'][i]:.2%} | "
                        f"{'—' if flip is None else f'{flip:.2%}'} |"
                    )
    eff = result.get("efficiency")
    if isinstance(eff, list):
        lines += ["", "## Efficiency (forward, this machine)", ""]
        lines += ["| batch | against | MoE ms | dense ms | theoretical × | realised × |", "|---|---|---|---|---|---|"]
        for r in eff:
            lines.append(
                f"| {r['batch']} | {r['against']} | {r['moe_ms']:.2f} | {r['dense_ms']:.2f} | "
                f"{r['theoretical']:.2f} | {r['realised']:.2f} |"
            )
    elif eff is not None:
        lines += ["", f"## Efficiency: {eff}"]
    return "\n".join(lines)
