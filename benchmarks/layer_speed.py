"""Layer speed: our MoE (each backend) vs the dense FFN of equal active FLOPs, the einsum (GShard / V-MoE)
dispatch, Soft MoE, and the peer packages that are installed, all timed in one run on one input.

    python benchmarks/layer_speed.py --threads 2 --repeats 5 --out runs/bench

Prints one Markdown table per shape (the command and machine first) and writes layer_speed.csv and
layer_speed.png (time vs tokens at the target's D, E, K) under --out. ``--quick`` runs tiny shapes in
seconds, to check the script, not to measure anything.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from visionmoe.analysis.speed import (
    IMPLEMENTATIONS,
    MODES,
    TARGET_SHAPE,
    benchmark_header,
    fmt,
    layer_benchmark,
    markdown_table,
    write_csv,
)

# (images, tokens per image, D, E, K, capacity factor); H = 4·D. All combinations of tokens 1k-16k,
# D ∈ {256, 512, 768}, E ∈ {4, 8, 16, 64}, K ∈ {1, 2} take hours on 2 cores: vary one factor at a time
# around the target instead.
DEFAULT_SHAPES = [
    TARGET_SHAPE,
    *((images, 1024, 512, 8, 2, 1.25) for images in (1, 2, 4, 16)),  # tokens sweep: 1k-16k
    *((4, 1024, 512, E, 2, 1.25) for E in (4, 16, 64)),  # E sweep at 4k tokens (E = 8 is in the tokens sweep)
    *((4, 1024, d, 8, 2, 1.25) for d in (256, 768)),  # D sweep at 4k tokens
    (8, 1024, 512, 8, 1, 1.25),  # top-1 at the target shape
]
QUICK_SHAPES = [(1, 64, 32, 4, 2, 1.25), (2, 64, 32, 4, 2, 1.25), (4, 64, 32, 4, 2, 1.25), (2, 64, 32, 4, 1, 1.25)]

COLUMNS = [
    ("implementation", lambda r: r["implementation"]),
    ("ms (median ± IQR)", lambda r: "—" if r["median"] is None else f"{r['median'] * 1e3:.2f} ± {r['iqr'] * 1e3:.2f}"),
    ("× dense (median ± IQR of per-repeat ratios)", lambda r: _ratio(r)),
    ("assignments", lambda r: fmt(r["assignments"])),
    ("expert rows", lambda r: fmt(r["expert_rows"])),
    ("C", lambda r: fmt(r["capacity"])),
    ("per assignment × dense", lambda r: fmt(r["per_assignment_vs_dense"], ".2f")),
    ("note", lambda r: r["note"]),
]


def plot(rows: list[dict], path: Path, like: tuple) -> Path | None:
    """Median time vs tokens, one line per implementation, for the shapes sharing the target's D, E, K, cf."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install visionmoe[bench]): no plot")
        return None
    _, _, d, E, k, cf = like
    sweep = [r for r in rows if (r["dim"], r["num_experts"], r["k"], r["capacity_factor"]) == (d, E, k, cf)]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in dict.fromkeys(r["implementation"] for r in sweep):
        points = sorted((r["tokens"], r["median"]) for r in sweep if r["implementation"] == name and r["median"])
        if points:
            ax.plot([t for t, _ in points], [s for _, s in points], marker="o", label=name)
    ax.set(xscale="log", yscale="log", xlabel="tokens", ylabel=f"seconds per {rows[0]['mode']} (median)")
    ax.set_title(f"MoE layer speed: D={d}, E={E}, k={k}, cf={cf}, H=4D, {rows[0]['threads']} threads")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _shape(text: str) -> tuple:
    parts = text.split(",")
    if len(parts) != 6:
        raise argparse.ArgumentTypeError(f"a shape is images,tokens,d,E,k,cf; got {text!r}")
    *ints, cf = parts
    return (*(int(p) for p in ints), None if cf.lower() == "none" else float(cf))


def _ratio(r: dict) -> str:
    if r.get("vs_dense") is None:
        return "—"
    return f"{r['vs_dense']:.2f} ± {r.get('vs_dense_iqr') or 0.0:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--shapes",
        nargs="+",
        type=_shape,
        default=None,
        help="images,tokens,d,E,k,cf (cf 'none' = dropless); default: the sweep in DEFAULT_SHAPES",
    )
    parser.add_argument("--threads", type=int, help="default: torch's thread count (1 with --quick)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, seconds: checks the script only")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    parser.add_argument("--mode", choices=MODES, default="fwdbwd")
    parser.add_argument("--implementations", nargs="+", choices=IMPLEMENTATIONS, default=list(IMPLEMENTATIONS))
    parser.add_argument("--min-run-time", type=float, default=0.02, help="seconds per measurement, at least")
    args = parser.parse_args(argv)
    shapes = QUICK_SHAPES if args.quick else (args.shapes or DEFAULT_SHAPES)
    if args.threads is None:  # a quick check on 1 thread: not stalled by OpenMP barriers when the CPU is shared
        args.threads = 1 if args.quick else torch.get_num_threads()
    print(benchmark_header(f"MoE layer speed ({args.mode})", args.threads), flush=True)
    rows = []
    for shape in shapes:
        images, n, d, E, k, cf = shape
        shape_rows = layer_benchmark(
            [shape],
            threads=args.threads,
            repeats=args.repeats,
            implementations=args.implementations,
            mode=args.mode,
            min_run_time=args.min_run_time,
        )
        print(f"\n### {images} images × {n} tokens, d={d}, H={4 * d}, E={E}, k={k}, cf={cf}\n")
        print(markdown_table(shape_rows, COLUMNS), flush=True)
        rows += shape_rows
    print(
        f"\nTimes: median ± IQR of {args.repeats} repeats, implementations interleaved round-robin. × dense: median "
        "± IQR over repeats of time / the time of the dense FFN of width k·H in the same repeat. assignments: "
        "kept token-expert assignments (Soft MoE: slots). expert rows: rows the expert GEMMs "
        "execute, capacity padding included. per assignment × dense: time per assignment / dense time per "
        "token-expert pair (k per token)."
    )
    csv_path = write_csv(rows, args.out / "layer_speed.csv")
    png_path = plot(rows, args.out / "layer_speed.png", shapes[0])
    print(f"\nwrote {csv_path}" + (f" and {png_path}" if png_path else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
