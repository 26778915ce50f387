"""Sparse inference: the realised speed-up of top-1 of 8 experts over running all 8, against the FLOP ratio.

    python benchmarks/inference_speedup.py --threads 2 --repeats 5 --out runs/bench

Two cases, eval mode, no grad, forward only, across batch sizes: ``head``, a sparse head on (B, 512)
vectors (experts of width 512, capacity factor 1.25 shared by the batch), and ``block``, an MoE MLP
block on B images × 64 tokens (D=192, H=768, capacity per image). Prints a Markdown table (command and
machine first) and writes inference_speedup.csv and inference_speedup.png under --out. ``--quick``
runs tiny layers in seconds, to check the script, not to measure anything.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from visionmoe.analysis.speed import benchmark_header, fmt, inference_speedup, markdown_table, write_csv

QUICK = dict(batch_sizes=(1, 4, 16), token_batch_sizes=(1, 4), head_dim=64, head_hidden=64, block_dim=32)
QUICK.update(block_hidden=128, tokens_per_image=16)

COLUMNS = [
    ("case", lambda r: r["case"]),
    ("batch", lambda r: str(r["batch"])),
    ("tokens", lambda r: str(r["tokens"])),
    ("dropped", lambda r: f"{r['dropped']:.1%}"),
    ("top-1 ms", lambda r: f"{r['seconds_top1'] * 1e3:.3f} ± {r['iqr_top1'] * 1e3:.3f}"),
    ("all-8 ms", lambda r: f"{r['seconds_all'] * 1e3:.3f} ± {r['iqr_all'] * 1e3:.3f}"),
    ("theoretical ×", lambda r: fmt(r["theoretical"], ".2f")),
    ("realised ×", lambda r: fmt(r["realised"], ".2f")),
    ("realised / theoretical", lambda r: fmt(r["realised_over_theoretical"], ".2f")),
]


def plot(rows: list[dict], path: Path) -> Path | None:
    """Left: time vs tokens, top-1 and all experts, per case. Right: realised and theoretical speed-up."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install visionmoe[bench]): no plot")
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for case in dict.fromkeys(r["case"] for r in rows):
        sub = sorted((r for r in rows if r["case"] == case), key=lambda r: r["tokens"])
        tokens = [r["tokens"] for r in sub]
        left.plot(tokens, [r["seconds_top1"] for r in sub], marker="o", label=f"{case}: top-1")
        left.plot(tokens, [r["seconds_all"] for r in sub], marker="s", linestyle="--", label=f"{case}: all experts")
        right.plot(tokens, [r["realised"] for r in sub], marker="o", label=f"{case}: realised")
        right.plot(tokens, [r["theoretical"] for r in sub], linestyle=":", label=f"{case}: theoretical (FLOPs)")
    left.set(xscale="log", yscale="log", xlabel="tokens", ylabel="seconds per forward (median)")
    right.set(xscale="log", xlabel="tokens", ylabel="speed-up of top-1 over all experts")
    right.axhline(1.0, color="grey", linewidth=0.5)
    for ax in (left, right):
        ax.legend(fontsize=8)
    fig.suptitle(f"Sparse inference, eval, no grad, {rows[0]['threads']} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, help="default: torch's thread count (1 with --quick)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="tiny layers, seconds: checks the script only")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    parser.add_argument("--min-run-time", type=float, default=0.02, help="seconds per measurement, at least")
    args = parser.parse_args(argv)
    if args.threads is None:  # a quick check on 1 thread: not stalled by OpenMP barriers when the CPU is shared
        args.threads = 1 if args.quick else torch.get_num_threads()
    print(benchmark_header("Sparse inference: top-1 of 8 experts vs all 8", args.threads), flush=True)
    rows = inference_speedup(
        threads=args.threads, repeats=args.repeats, min_run_time=args.min_run_time, **(QUICK if args.quick else {})
    )
    print()
    for case in dict.fromkeys(r["case"] for r in rows):
        r = next(r for r in rows if r["case"] == case)
        print(f"- {case}: d={r['dim']}, E={r['num_experts']} experts of width {r['hidden']}, groups={r['groups']!r}")
    print()
    print(markdown_table(rows, COLUMNS))
    print(
        f"\nTimes: median ± IQR of {args.repeats} repeats, forward in eval mode under no_grad. theoretical = total "
        "FLOPs(all experts) / FLOPs(top-1) from visionmoe.analysis.profile (router and dropped assignments "
        "included); realised = time(all) / time(top-1)."
    )
    csv_path = write_csv(rows, args.out / "inference_speedup.csv")
    png_path = plot(rows, args.out / "inference_speedup.png")
    print(f"\nwrote {csv_path}" + (f" and {png_path}" if png_path else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
