"""The routing core's small-row choices, timed: top-2 of E = 8 scores per token (issue 22).

    python benchmarks/routing_micro.py --threads 1 --repeats 9

A CNN feature map routes ~1,000 tokens per image, each over E = 8 experts, so the routing core works on
many rows of 8 values. Two choices there rest on this measurement:

- :func:`visionmoe.routing.plan.stable_topk` takes k argmax rounds for k <= ``SMALL_K`` instead of the
  stable sort (same indices: ties go to the lower index either way);
- the load loss's threshold (``visionmoe.routing.losses``) is the 2nd largest value by one argmax, a
  scatter of -inf and a max, instead of ``torch.topk``.

Each pair gives identical results (checked here before timing); the table reports their medians over
interleaved repeats, on (tokens, 8) float32 scores.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from visionmoe.analysis.speed import benchmark_header, interleaved_times
from visionmoe.routing.losses import _kth_largest
from visionmoe.routing.plan import stable_topk


def sort_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    values, index = torch.sort(scores, dim=-1, descending=True, stable=True)
    return values[..., :k], index[..., :k]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", nargs="+", type=int, default=[16 * 1024, 128 * 1024])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(benchmark_header("Routing core: top-2 of 8 per token", args.threads))
    print(
        "\n| tokens | stable top-2: sort ms | argmax rounds ms | sort / rounds "
        "| 2nd largest: topk ms | argmax + max ms | topk / argmax |"
    )
    print("|---|---|---|---|---|---|---|")
    for n in args.tokens:
        scores = torch.randn(n, 8).softmax(-1)
        assert all(torch.equal(a, b) for a, b in zip(stable_topk(scores, 2, -1), sort_topk(scores, 2), strict=True))
        assert torch.equal(_kth_largest(scores, 2), scores.topk(2, dim=-1).values[..., -1:])
        times = interleaved_times(
            {
                "sort": lambda s=scores: sort_topk(s, 2),
                "rounds": lambda s=scores: stable_topk(s, 2, -1),
                "topk": lambda s=scores: s.topk(2, dim=-1).values[..., -1:],
                "argmax": lambda s=scores: _kth_largest(s, 2),
            },
            threads=args.threads,
            repeats=args.repeats,
        )
        ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
        print(
            f"| {n} | {ms['sort']:.2f} | {ms['rounds']:.2f} | {ms['sort'] / ms['rounds']:.2f}× | "
            f"{ms['topk']:.2f} | {ms['argmax']:.2f} | {ms['topk'] / ms['argmax']:.2f}× |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
