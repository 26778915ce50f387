"""The routers' noise: the counter-based stream in C (:func:`visionmoe.native.standard_normal`) and by torch
ops (:func:`visionmoe.routing.noise.counter_normal`, the path without the kernels) against the
``torch.randn`` it replaced, on the (tokens, E = 8) shapes of the CIFAR CNNs' stages at batch 64 and a ViT's.
Interleaved round-robin, median of ``--repeats``.

    python benchmarks/router_noise.py --threads 2 --repeats 21
"""

from __future__ import annotations

import argparse
import statistics

import torch

from visionmoe import native
from visionmoe.analysis.speed import interleaved_times, start_native_benchmark
from visionmoe.routing.noise import counter_normal

TOKENS = [64 * 1024, 64 * 256, 64 * 64, 8 * 197]
"""Tokens per layer: the CIFAR CNNs' three stages at batch 64, then ViT-S/16 at batch 8."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--experts", type=int, default=8)
    args = parser.parse_args(argv)
    if not start_native_benchmark("router noise: counter-based stream against torch.randn", args.threads):
        return 1
    print("\n| draws | torch.randn ms | C ms | torch ops ms | C / randn | torch ops / randn |")
    print("|---|---|---|---|---|---|")
    key = torch.tensor([12345, 67890])
    for tokens in TOKENS:
        shape = (tokens, args.experts)
        times = interleaved_times(
            {
                "randn": lambda shape=shape: torch.randn(shape),
                "C": lambda shape=shape: native.standard_normal(shape, (12345, 67890)),
                "ops": lambda shape=shape: counter_normal(shape, key),
            },
            threads=args.threads,
            repeats=args.repeats,
        )
        randn, c, ops = (statistics.median(times[n]) * 1e3 for n in ("randn", "C", "ops"))
        print(
            f"| {tokens * args.experts:,} | {randn:.3f} | {c:.3f} | {ops:.3f} | {c / randn:.2f} | {ops / randn:.2f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
