"""The routers' logits in C (:func:`visionmoe.native.router_logits`) against ``F.linear``, forward and
backward, on CNN stage shapes and ViT widths (E = 8): the measurement behind
:data:`visionmoe.native.LOGITS_MAX_DIM`. Interleaved round-robin, median of ``--repeats``.

    python benchmarks/router_logits.py --threads 2 --repeats 15
"""

from __future__ import annotations

import argparse
import statistics

import torch

from visionmoe import native
from visionmoe.analysis.speed import interleaved_times, start_native_benchmark

SHAPES = [(64, 1024, 8), (64, 1024, 16), (64, 256, 16), (64, 256, 32), (64, 64, 64), (64, 64, 128), (16, 64, 128),
          (64, 16, 256), (8, 1024, 512), (1, 1024, 512)]  # fmt: skip
"""(groups, tokens per group, D): CIFAR CNN stages at batch 64, then ViT widths."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    if not start_native_benchmark("router logits: C against F.linear, forward + backward", args.threads):
        return 1
    print("\n| tokens | D | C ms | F.linear ms | C / F.linear |\n|---|---|---|---|---|")
    for groups, tokens, dim in SHAPES:
        torch.manual_seed(0)
        x = torch.randn(groups, tokens, dim, requires_grad=True)
        weight = torch.randn(8, dim, requires_grad=True)

        def step(fn, x=x, weight=weight) -> None:
            y = fn(x, weight)
            y.backward(torch.ones_like(y))

        times = interleaved_times(
            {"C": lambda: step(native.router_logits), "linear": lambda: step(torch.nn.functional.linear)},
            threads=args.threads,
            repeats=args.repeats,
        )
        c, linear = (statistics.median(times[n]) * 1e3 for n in ("C", "linear"))
        print(f"| {groups * tokens:,} | {dim} | {c:.2f} | {linear:.2f} | {c / linear:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
