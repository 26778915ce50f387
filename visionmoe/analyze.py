"""``visionmoe analyze``: the analyses of a trained run, written into its directory.

    analyze_run("runs/cifar10_moe-s0", what=("routing", "hessian", "landscape", "efficiency"))

Sections (each optional):

- **routing**: :func:`~visionmoe.analysis.routing_report` on the test subset (load, collapse, drops,
  entropy, class × expert matrix and its mutual information) and the load history of the run's
  ``metrics.jsonl``; plots ``routing_classes.png`` and ``routing_history.png``.
- **hessian**: λmax and the top eigenvalues (Lanczos) and tr(H) ± stderr (Hutchinson) of the loss on
  the train and on the test subset (Rokah et al. 2026's sharpness measures).
- **landscape**: the loss, accuracy and routing-flip rate along one filter-normalised random
  direction (Li et al. 2018) on both subsets; ``landscape_{train,test}.png``.
- **efficiency**: forward time of the model against its dense twin of equal total parameters (what
  sparsity should beat) and of equal active FLOPs (what it should match), per batch size:
  theoretical speed-up (FLOP ratio, from :func:`~visionmoe.analysis.profile`) against realised
  (time ratio, interleaved repeats).

A model without MoE layers gets the sections that make sense for it (no routing, no twins). Results
go to ``analysis.json`` and ``analysis.md`` in ``--out`` (default: the run directory).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from visionmoe.layers.moe import moe_layers

SECTIONS = ("routing", "hessian", "landscape", "efficiency")


def subset_batches(data, mean, std, samples: int, batch_size: int, *, seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    """A fixed random subset of ``samples`` images as normalised (x, y) batches (no augmentation)."""
    from visionmoe.data import normalize

    n = min(samples, len(data))
    index = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    x = normalize(data.images[index], tuple(mean), tuple(std))
    y = data.labels[index]
    return list(zip(x.split(batch_size), y.split(batch_size), strict=True))


def efficiency(model: nn.Module, example: Tensor, batch_sizes: Sequence[int], *, repeats: int = 5) -> list[dict]:
    """Theoretical vs realised forward speed-up of ``model`` over its dense twins, per batch size."""
    from visionmoe.analysis import dense_twin, profile
    from visionmoe.analysis.speed import interleaved_times

    threads = torch.get_num_threads()
    twins = {
        "dense, equal params": dense_twin(model, match="params", example_input=example[:2]),
        "dense, equal active FLOPs": dense_twin(model, match="flops", example_input=example[:2]),
    }
    rows = []
    for batch in batch_sizes:
        x = example[:1].expand(batch, *example.shape[1:]).contiguous()
        flops = {"moe": profile(model, x).total_flops}
        fns = {"moe": _forward(model, x)}
        for name, twin in twins.items():
            flops[name] = profile(twin, x).total_flops
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
    alphas: Sequence[float] = tuple(i / 10 for i in range(-10, 11)),
    batch_sizes: Sequence[int] = (1, 16, 256),
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the ``what`` sections on the run of ``checkpoint``; returns (and writes) the results."""
    from rich.console import Console

    from visionmoe.train.trainer import load_run

    unknown = sorted(set(what) - set(SECTIONS))
    if unknown or not what:
        raise ValueError(f"unknown analysis section(s) {unknown or list(what)}; choose from {list(SECTIONS)}")
    checkpoint = Path(checkpoint)
    run_dir = checkpoint if checkpoint.is_dir() else checkpoint.parent
    out = Path(out) if out is not None else run_dir
    out.mkdir(parents=True, exist_ok=True)
    console = Console(quiet=not progress)
    config, model, splits, state = load_run(checkpoint, data_dir=data_dir, device="cpu")
    model = model.to(memory_format=torch.contiguous_format).float()
    has_moe = bool(moe_layers(model))
    subsets = {
        split: subset_batches(getattr(splits, split), splits.mean, splits.std, samples, batch_size, seed=seed)
        for split in ("train", "test")
    }
    result: dict[str, Any] = {
        "run": str(run_dir),
        "name": config.name,
        "model": config.model.name,
        "step": int(state["step"]),
        "samples": {k: sum(len(y) for _, y in v) for k, v in subsets.items()},
        "moe_layers": [name for name, _ in moe_layers(model)],
    }
    if "routing" in what:
        result["routing"] = _routing(model, subsets["test"], splits, run_dir, out, has_moe, console)
    if "hessian" in what:
        from visionmoe.analysis import hessian_summary

        result["hessian"] = {}
        for split, batches in subsets.items():
            with console.status(f"Hessian on the {split} subset (Lanczos top-{top_k}, {trace_probes} probes)"):
                result["hessian"][split] = hessian_summary(
                    model, batches, params, top_k=top_k, trace_probes=trace_probes, seed=seed, tol=tol
                )
    if "landscape" in what:
        from visionmoe.analysis import loss_line, plot_landscape, random_direction

        direction = random_direction(model, params, seed=seed)
        result["landscape"] = {}
        for split, batches in subsets.items():
            with console.status(f"loss surface on the {split} subset ({len(alphas)} points)"):
                line = loss_line(model, batches, direction, list(alphas))
            plot_landscape(line, out / f"landscape_{split}.png", title=f"{config.name}: {split} subset")
            result["landscape"][split] = line.to_dict()
    if "efficiency" in what:
        if has_moe:
            example = subsets["test"][0][0]
            with console.status("timing against the dense twins"):
                result["efficiency"] = efficiency(model, example, batch_sizes)
        else:
            result["efficiency"] = "no MoE layer: nothing to compare with a dense twin"
    (out / "analysis.json").write_text(json.dumps(result, indent=2, default=_json) + "\n")
    (out / "analysis.md").write_text(markdown(result) + "\n")
    console.print(markdown(result))
    return result


def _routing(model, batches, splits, run_dir: Path, out: Path, has_moe: bool, console) -> Any:
    from visionmoe.analysis import load_history, plot_class_expert, plot_load_history, routing_report

    if not has_moe:
        return "no MoE layer"
    with console.status("routing on the test subset"):
        report = routing_report(model, batches, splits.num_classes)
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
        lines += ["", "## Hessian", "", "| subset | loss | λmax | top eigenvalues | trace ± stderr |"]
        lines += ["|---|---|---|---|---|"]
        for split, h in result["hessian"].items():
            top = ", ".join(f"{v:.4g}" for v in h["top_eigenvalues"])
            trace = f"{h['trace']:.4g} ± {h['trace_stderr']:.2g}"
            lines.append(f"| {split} | {h['loss']:.4f} | {h['lambda_max']:.4g} | {top} | {trace} |")
    if "landscape" in result:
        lines += ["", "## Loss surface (filter-normalised random direction)", ""]
        lines += ["| subset | α | loss | accuracy | routing-flip rate |", "|---|---|---|---|---|"]
        for split, land in result["landscape"].items():
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
