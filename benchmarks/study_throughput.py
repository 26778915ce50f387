"""MoE / dense-twin training throughput as a study's own runs recorded it (issue 22).

Each finished run's ``summary.json`` holds ``images_per_s``: the training images of the run over its
training time, the data pipeline included. For every pair of a sweep (a configuration and its
reference under the same seed) this prints both throughputs and the ratio reference / configuration:
how much longer the MoE took per image than its twin, as trained, beside the benchmarks' ratios.

    python benchmarks/study_throughput.py results/hidden --seeds 1 2

Read the ratios with the conditions the runs trained in (jobs per core, other load, allocator), which
``summary.json`` does not all record: a run resumed across sessions averages over both.
"""

from __future__ import annotations

import argparse
import sys

from visionmoe.studies import load_runs, paired_gaps


def throughput_table(paths: list[str], seeds: list[int] | None = None) -> str:
    table = load_runs(paths)
    if seeds is not None:
        table = table[table["seed"].isin(seeds)]
    per_seed, _ = paired_gaps(table, "images_per_s")  # each seed's pair: images_per_s and images_per_s_ref
    lines = [
        "| study | configuration | seeds | MoE images/s | twin images/s | twin / MoE throughput, per seed |",
        "|---|---|---|---:|---:|---:|",
    ]
    for (study, config), pair in per_seed.groupby(["study", "config"], sort=False) if len(per_seed) else ():
        moe, twin = pair["images_per_s"], pair["images_per_s_ref"]
        ratios = " / ".join(f"{r:.2f}" for r in twin / moe)
        seeds_ = ",".join(str(int(s)) for s in pair["seed"])
        lines.append(f"| {study} | {config} | {seeds_} | {moe.mean():.0f} | {twin.mean():.0f} | {ratios} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="sweep output directories (results/hidden ...)")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="only these seeds")
    args = parser.parse_args(argv)
    print(throughput_table(args.paths, args.seeds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
