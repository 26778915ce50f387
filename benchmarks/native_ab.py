"""The native kernels of two revisions side by side: is a change to ``visionmoe/native/moe.c`` faster, and
does it give the same numbers?

Builds ``moe.c`` as committed at ``--base`` (a git revision) and as it is in the working tree, loads both
into one process and, on CNN stage shapes (``--batch`` images of 32², 16², 8² tokens, E = 8, noisy top-2,
capacity factor 1.25, both V-MoE losses), times each library's routers' logits (forward and backward) and,
where both have the same ABI version, its fused router (forward; forward and backward) and fused experts
(``visionmoe.native.expert_ffn`` with the loop it takes at that shape, or the one ``--loop`` names, ReLU
and GELU, forward and backward; stage widths D, 2D, 4D for each first-stage width of ``--widths``,
H = ratio · width for each of ``--ratios``), interleaved round-robin, median of ``--repeats``. Each row
also says whether the two give the same outputs and gradients bit for bit.

    python benchmarks/native_ab.py --base HEAD~1 --threads 2 --repeats 15
    python benchmarks/native_ab.py --base HEAD~1 --widths 32 --ratios 1 2 --loop tiled
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from visionmoe import native
from visionmoe.allocator import keep_freed_memory
from visionmoe.analysis.speed import benchmark_header, interleaved_times
from visionmoe.layers.experts import Experts

ROOT = Path(__file__).resolve().parents[1]


def build(source: str, target: Path) -> ctypes.CDLL:
    """moe.c's text compiled as the library builds it; its functions typed as the library types them."""
    src = target.with_suffix(".c")
    src.write_text(source)
    cc = native._compiler()
    subprocess.run([cc, *native._flags(), str(src), "-o", str(target)], check=True, capture_output=True)
    return native.typed(ctypes.CDLL(str(target)))


def using(lib: ctypes.CDLL, fn):
    def call():
        native._lib = lib
        return fn()

    return call


def router_case(tokens: int, images: int):
    logits = torch.randn(images, tokens, 8, requires_grad=True)
    noise = torch.randn(images, tokens, 8)
    capacity = -(-2 * tokens * 5 // (4 * 8))  # ceil(k·S·1.25 / E)

    def forward():
        return native.topk_router(logits, noise, 1 / 8, 2, capacity, True)

    def both():
        outputs = forward()
        gates, weight, importance, load, *_ = outputs
        loss = (gates * gates).sum() + (weight * weight).sum() + importance.square().sum() + load.square().sum()
        return (*outputs, *torch.autograd.grad(loss, logits))

    return {"router forward": forward, "router forward + backward": both}


def logits_case(tokens: int, dim: int):
    x = torch.randn(tokens, dim, requires_grad=True)
    weight = torch.randn(8, dim, requires_grad=True)
    grad = torch.randn(tokens, 8)

    def both():
        y = native.router_logits(x, weight)
        return (y, *torch.autograd.grad(y, [x, weight], grad))

    return {f"logits D={dim} forward + backward": both}


def ffn_case(tokens: int, dim: int, hidden: int, activation, loop: str):
    experts = Experts(8, dim, hidden, activation=activation)
    x = torch.randn(tokens, dim, requires_grad=True)
    expert = torch.randint(0, 8, (tokens, 2))
    expert[torch.rand(tokens, 2) < 0.1] = -1
    weight = torch.rand(tokens, 2, requires_grad=True)
    grad = torch.randn(tokens, dim)

    loop = native.ffn_loop(dim, hidden) if loop == "auto" else loop

    def both():
        y = native.expert_ffn(x, expert, weight, experts, loop=loop)
        return (y, *torch.autograd.grad(y, [x, weight, *experts.parameters()], grad))

    return {f"experts D={dim} H={hidden} {activation.__name__} ({loop})": both}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="HEAD", help="the git revision to compare the working tree with")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument(
        "--widths", type=int, nargs="+", default=[8], help="first-stage widths D (the stages: D, 2D, 4D)"
    )
    parser.add_argument("--ratios", type=int, nargs="+", default=[1], help="the experts' hidden ratios H / D")
    parser.add_argument(
        "--loop", choices=("auto", *native.FFN_LOOPS), default="auto",
        help="the experts' loop (auto: native.ffn_loop's choice from the shapes)",
    )  # fmt: skip
    parser.add_argument("--keep-freed-memory", action="store_true")
    args = parser.parse_args(argv)
    if not native.available():
        print(f"no native kernels here: {native.unavailable_reason()}", file=sys.stderr)
        return 1
    if args.keep_freed_memory:
        keep_freed_memory()
    torch.set_num_threads(args.threads)
    base = subprocess.run(
        ["git", "show", f"{args.base}:visionmoe/native/moe.c"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    print(benchmark_header(f"native kernels: {args.base} against the working tree", args.threads))
    print("\n| case | tokens | base ms | new ms | new / base | bit-identical |\n|---|---|---|---|---|---|")
    original = native._library()
    with tempfile.TemporaryDirectory() as tmp:
        libs = {
            "base": build(base, Path(tmp) / "base.so"),
            "new": build(native.SOURCE.read_text(), Path(tmp) / "new.so"),
        }
        torch.manual_seed(0)
        cases = []
        for first in args.widths:
            for side, width in ((32, first), (16, 2 * first), (8, 4 * first)):
                tokens = args.batch * side * side
                if first == args.widths[0]:
                    cases += [(tokens, name, fn) for name, fn in router_case(side * side, args.batch).items()]
                cases += [(tokens, name, fn) for name, fn in logits_case(tokens, width).items()]
                for ratio in args.ratios:
                    for activation in (torch.nn.ReLU, torch.nn.GELU):
                        case = ffn_case(tokens, width, ratio * width, activation, args.loop)
                        cases += [(tokens, name, fn) for name, fn in case.items()]
        same_abi = len({lib.vmoe_abi_version() for lib in libs.values()}) == 1  # a signature changed
        if not same_abi:
            print("\n(the two ABI versions differ: the rows of the router and the experts, whose signatures changed,")
            print("are left out; the base's are called through this tree's wrappers)")
        for tokens, name, fn in cases:
            loop = name[name.rfind("(") + 1 : -1]
            needs = f"vmoe_{loop}_forward"
            if name.startswith("router") and not same_abi:
                continue
            present = not name.startswith("experts") or (same_abi and all(hasattr(lib, needs) for lib in libs.values()))
            if not present:
                continue
            outputs = {side: using(lib, fn)() for side, lib in libs.items()}
            same = all(torch.equal(a, b) for a, b in zip(outputs["base"], outputs["new"], strict=True))
            times = interleaved_times(
                {side: using(lib, fn) for side, lib in libs.items()}, threads=args.threads, repeats=args.repeats
            )
            old, new = (statistics.median(times[side]) * 1e3 for side in ("base", "new"))
            print(f"| {name} | {tokens:,} | {old:.2f} | {new:.2f} | {new / old:.2f} | {'yes' if same else 'no'} |")
    native._lib = original
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
