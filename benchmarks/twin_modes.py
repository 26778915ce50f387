"""The dense twin's two speeds (issue 22): the same step, timed in fresh processes, with a memory copy beside it.

The CNN step grid (``cnn_moe_step.py``) found the twin's training step at one of two speeds per process
(standard backbone, width 8, ratio 1, batch 64: ~37 ms or ~48 ms), the MoE step moving much less. This runs
``--processes`` fresh Python processes one after another; each builds that cell (``cnn_moe_step.build``),
times ``--moe-steps`` MoE steps first (0: none), then, interleaved, the twin's step, the MoE step and a copy
of a 64 MB float32 tensor into another (median of ``--repeats``), and prints one row: which speed the twin
drew, and whether the plain memory copy moved with it.

    python benchmarks/twin_modes.py --processes 6
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from visionmoe.allocator import keep_freed_memory
from visionmoe.analysis.speed import benchmark_header, interleaved_times

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cnn_moe_step import add_cell_arguments, build


def child(args: argparse.Namespace) -> None:
    keep_freed_memory()
    torch.set_num_threads(args.threads)
    moe, twin, stepper = build(args.backbone, args.width, args.ratio, args.batch)
    moe_step = stepper(moe)
    for _ in range(args.moe_steps):
        moe_step()
    source = torch.randn(16 << 20)
    target = torch.empty_like(source)
    steps = {"twin": stepper(twin), "moe": moe_step, "copy": lambda: target.copy_(source)}
    times = interleaved_times(steps, threads=args.threads, repeats=args.repeats)
    print(json.dumps({name: statistics.median(ts) * 1e3 for name, ts in times.items()}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=6)
    add_cell_arguments(parser)
    parser.add_argument("--moe-steps", type=int, default=0, help="MoE steps each process takes before timing")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return 0
    cell = f"{args.backbone}, width {args.width}, hidden ratio {args.ratio:g}, batch {args.batch}"
    print(benchmark_header(f"The twin's step in fresh processes ({cell})", args.threads))
    print("\n| process | twin step ms | MoE step ms | MoE / twin | 64 MB copy ms |\n|---|---|---|---|---|", flush=True)
    settings = ("backbone", "width", "ratio", "batch", "threads", "repeats", "moe_steps")
    forwarded = [str(v) for name in settings for v in (f"--{name.replace('_', '-')}", getattr(args, name))]
    for i in range(args.processes):
        out = subprocess.run(
            [sys.executable, __file__, "--child", *forwarded], capture_output=True, text=True, check=True
        ).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(
            f"| {i + 1} | {r['twin']:.1f} | {r['moe']:.1f} | {r['moe'] / r['twin']:.2f} | {r['copy']:.2f} |", flush=True
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
