"""The routing core's small-row choices, timed: E = 8 experts per token (issue 22).

    python benchmarks/routing_micro.py --threads 1 --repeats 9

A CNN feature map routes ~1,000 tokens per image, each over E = 8 experts, so the routing core works on
many rows of 8 values, where ATen's kernels for the last axis are at their slowest. Each choice below
replaces the plain call on its left; the table times both, interleaved, on (images, tokens, 8) float32:

- top-2 (:func:`visionmoe.routing.plan.stable_topk`, k <= ``SMALL_K``): k rounds of ``max`` instead of the
  stable sort (the same indices: ties go to the lower index either way);
- the load loss's threshold (``visionmoe.routing.losses._kth_largest``): the 2nd largest value by one
  ``max``, a scatter of -inf and an ``amax``, instead of ``torch.topk``;
- the router softmax (:func:`visionmoe.routing.plan.softmax_experts`), forward and backward: along the
  token axis of an expert-major copy instead of along the last axis (equal up to float rounding; the
  others are exact).

A running count over an expert-major one-hot for the capacity positions, tried against the argsort of
:func:`visionmoe.routing.plan.positions_in_expert`, was no faster (0.7-1.1×) and is not used.

Every pair is checked equal (or close, for the softmax) before timing. A second table times the two
softmax layouts at several expert counts: where the expert-major one stops paying
(``visionmoe.routing.plan.SHORT_SOFTMAX_ROWS``).
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch

import visionmoe.routing.plan as plan_module
from visionmoe.analysis.speed import benchmark_header, interleaved_times
from visionmoe.routing.losses import _kth_largest
from visionmoe.routing.plan import softmax_experts, stable_topk


def sort_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    values, index = torch.sort(scores, dim=-1, descending=True, stable=True)
    return values[..., :k], index[..., :k]


def forward_backward(softmax: Callable[[torch.Tensor], torch.Tensor], logits: torch.Tensor, grad: torch.Tensor):
    def run() -> None:
        logits.grad = None
        softmax(logits).backward(grad)

    return run


def pairs(images: int, tokens: int) -> dict[str, tuple[Callable[[], object], Callable[[], object]]]:
    """name -> (plain call, the choice made), on one image batch's router tensors."""
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(images, tokens, 8, generator=g).softmax(-1)
    logits = torch.randn(images, tokens, 8, generator=g, requires_grad=True)
    grad = torch.randn(images, tokens, 8, generator=g)
    assert all(torch.equal(a, b) for a, b in zip(stable_topk(scores, 2, -1), sort_topk(scores, 2), strict=True))
    assert torch.equal(_kth_largest(scores, 2), scores.topk(2, dim=-1).values[..., -1:])
    torch.testing.assert_close(softmax_experts(logits), logits.softmax(-1))
    return {
        "top-2 of 8 (sort → max rounds)": (lambda: sort_topk(scores, 2), lambda: stable_topk(scores, 2, -1)),
        "2nd largest (topk → max, scatter, amax)": (
            lambda: scores.topk(2, dim=-1).values[..., -1:],
            lambda: _kth_largest(scores, 2),
        ),
        "softmax fwd+bwd (last axis → expert-major)": (
            forward_backward(lambda t: t.softmax(-1), logits, grad),
            forward_backward(softmax_experts, logits, grad),
        ),
    }


def expert_major_softmax(logits: torch.Tensor) -> torch.Tensor:
    """softmax_experts with its expert-major layout at any E (it switches to the last axis from 16)."""
    saved = plan_module.SHORT_SOFTMAX_ROWS
    plan_module.SHORT_SOFTMAX_ROWS = logits.shape[-1] + 1
    try:
        return softmax_experts(logits)
    finally:
        plan_module.SHORT_SOFTMAX_ROWS = saved


def softmax_rows(images: int, tokens: int, experts: list[int], args: argparse.Namespace) -> None:
    print(
        "\n| experts | images × tokens | last axis ms | expert-major ms | last / expert-major |\n|---|---|---|---|---|"
    )
    for e in experts:
        g = torch.Generator().manual_seed(0)
        logits = torch.randn(images, tokens, e, generator=g, requires_grad=True)
        grad = torch.randn(images, tokens, e, generator=g)
        torch.testing.assert_close(expert_major_softmax(logits), logits.softmax(-1))
        fns = {
            "last": forward_backward(lambda t: t.softmax(-1), logits, grad),
            "major": forward_backward(expert_major_softmax, logits, grad),
        }
        times = interleaved_times(fns, threads=args.threads, repeats=args.repeats)
        ms = {key: statistics.median(t) * 1e3 for key, t in times.items()}
        print(f"| {e} | {images} × {tokens} | {ms['last']:.2f} | {ms['major']:.2f} | {ms['last'] / ms['major']:.2f}× |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--tokens", nargs="+", type=int, default=[1024, 256], help="tokens per image")
    parser.add_argument("--softmax-experts", nargs="+", type=int, default=[4, 8, 12, 16, 32, 64])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(benchmark_header("Routing core: E = 8 per token", args.threads))
    print("\n| choice | images × tokens | plain ms | chosen ms | plain / chosen |\n|---|---|---|---|---|")
    for tokens in args.tokens:
        for name, (plain, chosen) in pairs(args.images, tokens).items():
            times = interleaved_times({"plain": plain, "chosen": chosen}, threads=args.threads, repeats=args.repeats)
            ms = {key: statistics.median(t) * 1e3 for key, t in times.items()}
            print(
                f"| {name} | {args.images} × {tokens} | {ms['plain']:.2f} | {ms['chosen']:.2f} | "
                f"{ms['plain'] / ms['chosen']:.2f}× |",
                flush=True,
            )
    softmax_rows(args.images, args.tokens[0], args.softmax_experts, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
