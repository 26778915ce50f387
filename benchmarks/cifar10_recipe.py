"""The CIFAR-10 recipe benchmark: the default MoE model and its dense twin, same recipe, several seeds.

    python benchmarks/cifar10_recipe.py --data-dir ../shared/data/cifar10-jpeg --seeds 0 1

Runs ``configs/cifar10_moe.yaml`` and ``configs/cifar10_dense.yaml`` for every seed, one after the
other (interleaved by seed, so a slow hour of a shared machine hits both models), in
``--out/<preset>-s<seed>``. Finished runs (with a ``summary.json``) are kept and skipped; a killed
run is resumed from its checkpoint. Then writes ``--out/report.md`` (model, total/active params, ρ,
test top-1 mean ± std over seeds, training minutes, images/s, the command, the machine) and
``--out/accuracy_vs_time.png`` (test top-1 after each epoch against cumulative training time).
``--quick`` checks the script on the data's first images in seconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from visionmoe.analysis.speed import machine_info
from visionmoe.train import Trainer, load_config

PRESETS = ("cifar10_moe", "cifar10_dense")


def run_all(args: argparse.Namespace) -> list[dict]:
    summaries = []
    for seed in args.seeds:
        for preset in args.presets:
            overrides = [
                "data.dataset=imagefolder",
                f"data.data_dir={args.data_dir}",
                f"train.seed={seed}",
                f"train.out_dir={args.out}",
                f"train.threads={args.threads}",
                f"train.progress={str(not args.no_progress).lower()}",
                *args.overrides,
            ]
            if args.quick:
                overrides += ["data.train_subset=1024", "data.test_subset=500", "train.epochs=1"]
                overrides += ["optim.warmup_epochs=0"]
            config = load_config(preset, overrides)
            run_dir = Path(args.out) / f"{preset}-s{seed}"
            if (run_dir / "summary.json").is_file():
                print(f"{run_dir}: finished before, kept")
            else:
                Trainer(config, resume=(run_dir / "checkpoint.pt").is_file()).fit()
            summaries.append(json.loads((run_dir / "summary.json").read_text()))
    return summaries


def report(summaries: list[dict], args: argparse.Namespace) -> str:
    rows = []
    for preset in PRESETS:
        runs = [s for s in summaries if s["name"] == preset]
        if not runs:
            continue
        top1 = [100 * s["test"]["top1"] for s in runs]
        minutes = [s["train_seconds"] / 60 for s in runs]
        ips = [s["images_per_s"] for s in runs]
        std = statistics.stdev(top1) if len(top1) > 1 else float("nan")
        r = runs[0]
        rows.append(
            f"| {preset} | {r['model']} | {r['total_params'] / 1e6:.2f}M | {r['active_params'] / 1e6:.2f}M | "
            f"{r['flops_per_image'] / 1e6:.0f}M | {r['rho']:.3f} | {statistics.mean(top1):.2f} ± {std:.2f} | "
            f"{', '.join(f'{v:.2f}' for v in top1)} | {', '.join(f'{m:.1f}' for m in minutes)} | "
            f"{', '.join(f'{v:.0f}' for v in ips)} | "
            f"{r['epochs']:g} |"
        )
    command = "python benchmarks/cifar10_recipe.py " + " ".join(sys.argv[1:])
    m = machine_info(args.threads)
    machine = f"{m['cpu']}, {m['cores']} cores, {m['threads']} threads, torch {m['torch']}, GPU {m['gpu']}"
    return "\n".join(
        [
            f"Command: `{command}`",
            f"Machine: {machine}.",
            "",
            "| preset | model | params | active | FLOPs/img | ρ | test top-1 % (mean ± std) | per seed | "
            "train min per seed | img/s per seed | epochs |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
            *rows,
        ]
    )


def plot(out: Path, seeds: list[int]) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for color, preset in zip(("tab:orange", "tab:blue"), PRESETS, strict=True):
        for i, seed in enumerate(seeds):
            path = out / f"{preset}-s{seed}" / "metrics.jsonl"
            if not path.is_file():
                continue
            records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            points = [(r["train_seconds"] / 60, 100 * r["test"]["top1"]) for r in records if "test" in r]
            if points:
                x, y = zip(*points, strict=True)
                ax.plot(x, y, "o-", color=color, alpha=0.8, label=preset if i == 0 else None)
    ax.set_xlabel("training time (minutes, evaluation excluded)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title("CIFAR-10 (JPEG copy): MoE vs its dense twin of equal active FLOPs")
    ax.grid(alpha=0.3)
    ax.legend()
    path = out / "accuracy_vs_time.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="../shared/data/cifar10-jpeg", help="ImageFolder root with train/ test/")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--out", type=Path, default=Path("runs/cifar10_recipe"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--presets", nargs="+", choices=PRESETS, default=list(PRESETS), help="run only these (e.g. one per process)"
    )
    parser.add_argument("--quick", action="store_true", help="1 epoch on 1024 images: checks the script only")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="applied to both presets")
    args = parser.parse_args(argv)
    summaries = run_all(args)
    text = report(summaries, args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.md").write_text(text + "\n")
    png = plot(args.out, args.seeds)
    print(text)
    print(f"\nwrote {args.out / 'report.md'}" + (f" and {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
