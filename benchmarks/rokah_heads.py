"""Rokah et al. (2026) end to end: dense, mixture and sparse classifier heads on CIFAR-10, then their sharpness.

    python benchmarks/rokah_heads.py --data-dir ../shared/data/cifar10-jpeg            # CPU budget (below)
    python benchmarks/rokah_heads.py --width 64 --epochs 100 --out runs/rokah_full      # the full form (GPU)

1. Trains ``configs/rokah_{dense,mixture,sparse}_head.yaml`` (ResNet-18 whose 512-unit head is a
   dense FFN, a softmax-gated mixture of 4 × 128, or a noisy top-2 of 4 × 128: matched capacity),
   same recipe and seed, in ``--out/<preset>-s<seed>``. Finished runs are skipped, killed ones resumed.
2. Runs :func:`visionmoe.analysis.trained_run.analyze_run` on each: λmax and the top eigenvalues (Lanczos) and
   tr(H) ± stderr (Hutchinson) on ``--samples`` train and as many test images, over every parameter
   (``--params all``) and over the head alone (``head``: what differs between the three models), and
   the loss along one filter-normalised random direction and along the top Hessian eigenvector
   (1D perturbation curves). An analysis already written with the same settings is kept.
3. Writes ``--out/report.md`` (the table BENCHMARKS.md quotes) and ``--out/perturbation.png`` (the
   1D curves of the three heads side by side).

The CPU budget (defaults): backbone width 16 instead of 64 and 6 epochs, because a full-width
ResNet-18 epoch is far too slow for 2 cores (the times: BENCHMARKS.md, "Rokah et al."); the head keeps
its 512 units. ``--quick`` checks the script on 512 images.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from visionmoe.analysis.speed import machine_info
from visionmoe.analysis.trained_run import analyze_run
from visionmoe.train import Trainer, load_config

PRESETS = ("rokah_dense_head", "rokah_mixture_head", "rokah_sparse_head")
HEADS = {
    "rokah_dense_head": "Dense",
    "rokah_mixture_head": "Mixture (their SoftMoE)",
    "rokah_sparse_head": "Sparse top-2",
}


def train_all(args: argparse.Namespace) -> dict[str, Path]:
    runs = {}
    for preset in args.presets:
        overrides = [
            "data.dataset=imagefolder",
            f"data.data_dir={args.data_dir}",
            f"model.kwargs.width={args.width}",
            f"train.epochs={args.epochs}",
            f"train.seed={args.seed}",
            f"train.out_dir={args.out}",
            f"train.threads={args.threads}",
            f"train.progress={str(not args.no_progress).lower()}",
            *args.overrides,
        ]
        if args.quick:
            overrides += ["data.train_subset=512", "data.test_subset=256", "optim.warmup_epochs=0"]
        config = load_config(preset, overrides)
        run_dir = Path(args.out) / f"{preset}-s{args.seed}"
        if (run_dir / "summary.json").is_file():
            print(f"{run_dir}: trained before, kept")
        else:
            Trainer(config, resume=(run_dir / "checkpoint.pt").is_file()).fit()
        runs[preset] = run_dir
    return runs


def analyze_all(runs: dict[str, Path], args: argparse.Namespace) -> dict[str, dict[str, dict]]:
    torch.set_num_threads(args.threads)
    results: dict[str, dict[str, dict]] = {}
    for preset, run_dir in runs.items():
        results[preset] = {}
        for params in args.params:
            settings = {
                "params": params,
                "samples": args.samples,
                # HVPs on the head run on cached features (milliseconds): it affords more eigenvalues and probes.
                "top_k": args.head_top_k if params == "head" else args.top_k,
                "trace_probes": args.head_trace_probes if params == "head" else args.trace_probes,
                "tol": args.tol,
                # The density costs `density_steps` HVPs per subset: seconds on the head, an hour on "all" here.
                "density_steps": args.density_steps if params == "head" else 0,
                "directions": ["random", "hessian"],
                "plane": 0,
                "seed": args.seed,
            }
            out = run_dir / f"analysis-{params}"
            done = out / "analysis.json"
            if done.is_file() and json.loads(done.read_text()).get("settings") == settings:
                print(f"{out}: analysed before with the same settings, kept")
                results[preset][params] = json.loads(done.read_text())
                continue
            results[preset][params] = analyze_run(
                run_dir,
                ("hessian", "landscape"),
                data_dir=args.data_dir,
                out=out,
                progress=not args.no_progress,
                **settings,
            )
    return results


def report(runs: dict[str, Path], results: dict[str, dict[str, dict]], args: argparse.Namespace) -> str:
    rows = []
    for preset, run_dir in runs.items():
        summary = json.loads((run_dir / "summary.json").read_text())
        for params, result in results[preset].items():
            h = result["hessian"]
            land = result["landscape"]["random"]
            eig = result["landscape"].get("hessian", {})

            def loss_at(line: dict, split: str, alpha: float) -> str:
                if split not in line:
                    return "—"
                alphas = line[split]["alphas"]
                i = min(range(len(alphas)), key=lambda j: abs(alphas[j] - alpha))
                return f"{line[split]['loss'][i]:.3f}"

            rows.append(
                f"| {HEADS[preset]} | {params} | {h['train']['num_params'] / 1e6:.3f}M | "
                f"{100 * summary['test']['top1']:.2f} | {h['train']['loss']:.3f} / {h['test']['loss']:.3f} | "
                f"{h['train']['lambda_max']:.3g} / {h['test']['lambda_max']:.3g} | "
                f"{h['train']['trace']:.4g} ± {h['train']['trace_stderr']:.2g} / "
                f"{h['test']['trace']:.4g} ± {h['test']['trace_stderr']:.2g} | "
                f"{loss_at(land, 'train', 1.0)} / {loss_at(land, 'test', 1.0)} | "
                f"{loss_at(eig, 'train', 0.1)} / {loss_at(eig, 'test', 0.1)} |"
            )
    command = "python benchmarks/rokah_heads.py " + " ".join(sys.argv[1:])
    m = machine_info(args.threads)
    machine = f"{m['cpu']}, {m['cores']} cores, {m['threads']} threads, torch {m['torch']}, GPU {m['gpu']}"
    first = json.loads((next(iter(runs.values())) / "summary.json").read_text())
    return "\n".join(
        [
            f"Command: `{command}`",
            f"Machine: {machine}.",
            f"Training: ResNet-18 at width {args.width}, {first['epochs']:g} epochs, seed {args.seed}, "
            f"{first['train_seconds'] / 60:.1f} min for the dense head.",
            "",
            "| head | Hessian over | params | test top-1 % | loss train / test | λmax train / test | "
            "tr(H) ± stderr train / test | loss at α=1, random dir. train / test | "
            "loss at α=0.1, top eigenvector (unit) train / test |",
            "|---|---|---|---|---|---|---|---|---|",
            *rows,
        ]
    )


def plot(runs: dict[str, Path], results: dict[str, dict[str, dict]], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params = next(iter(next(iter(results.values())).keys()))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    colors = dict(zip(PRESETS, ("tab:blue", "tab:orange", "tab:green"), strict=True))
    for ax, direction in zip(axes, ("random", "hessian"), strict=True):
        for preset in runs:
            line = results[preset][params]["landscape"].get(direction)
            if not line:
                continue
            for split, style in (("train", "-"), ("test", "--")):
                ax.plot(
                    line[split]["alphas"],
                    line[split]["loss"],
                    style,
                    color=colors[preset],
                    label=f"{HEADS[preset]}, {split}",
                )
        ax.set_title(f"{'filter-normalised random' if direction == 'random' else 'top Hessian eigenvector'} direction")
        ax.set_xlabel("α")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"cross-entropy (Hessian over {params})")
    axes[1].legend(fontsize=8)
    fig.suptitle("Loss along θ + α·d: dense vs mixture vs sparse heads (CIFAR-10, JPEG copy)")
    fig.tight_layout()
    path = out / "perturbation.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="../shared/data/cifar10-jpeg", help="ImageFolder root with train/ test/")
    parser.add_argument("--out", type=Path, default=Path("runs/rokah"))
    parser.add_argument("--presets", nargs="+", choices=PRESETS, default=list(PRESETS))
    parser.add_argument("--width", type=int, default=16, help="ResNet-18 first-stage channels (64 = the real one)")
    parser.add_argument("--epochs", type=float, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--phase", choices=("all", "train", "analyze"), default="all")
    parser.add_argument("--params", nargs="+", default=["all", "head"], help="Hessian parameter groups")
    parser.add_argument("--samples", type=int, default=1000, help="train and test images for the analyses")
    parser.add_argument("--top-k", type=int, default=1)
    parser.add_argument("--trace-probes", type=int, default=20)
    parser.add_argument("--head-top-k", type=int, default=3)
    parser.add_argument("--head-trace-probes", type=int, default=100)
    parser.add_argument("--tol", type=float, default=1e-3, help="Lanczos relative accuracy")
    parser.add_argument("--density-steps", type=int, default=40, help="SLQ steps of the head's spectral density")
    parser.add_argument(
        "--quick", action="store_true", help="1 epoch on 512 images, 64-image analyses: checks the script"
    )
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="applied to all three presets")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.samples, args.trace_probes, args.head_trace_probes, args.density_steps = 1, 64, 4, 8, 8
    runs = train_all(args) if args.phase != "analyze" else {p: args.out / f"{p}-s{args.seed}" for p in args.presets}
    if args.phase == "train":
        return 0
    results = analyze_all(runs, args)
    text = report(runs, results, args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.md").write_text(text + "\n")
    png = plot(runs, results, args.out)
    print(text)
    print(f"\nwrote {args.out / 'report.md'} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
