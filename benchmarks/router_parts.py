"""Where the routers of a CIFAR CNN with MoE in every stage spend one training step, piece by piece, and
what an MoE layer costs before it does any work (issue 22).

For one cell of ``cnn_moe_step.py`` (``--backbone``, ``--width``, ``--ratio``, batch ``--batch``): every MoE
layer's routing groups are captured from one training forward, then timed, summed over the layers,
interleaved round-robin with the dense twin's training step (median of ``--repeats``):

- logits: the routers' logits, forward only;
- noise: the routers' normal draws;
- kernel: the fused top-k router on those logits and draws, forward only
  (:func:`visionmoe.native.topk_router`);
- router forward: each router module's forward (the three above and what is around them: the plan, the
  losses), no gradient;
- routers step: each router's forward and backward, as in a training step (the "floor" of
  ``cnn_moe_step.py``);
- MoE layers, twin layers: forward and backward of every MoE layer of the MoE model, and of every dense FFN
  layer of its twin, on the inputs each saw in one training forward (a fixed random output gradient, the aux
  loss added): what the MoE model's layers cost against the twin's, the rest of the two steps being equal.

Then the fixed cost: forward and backward of an MoE layer (E = 8, top-2, D = H = 8, ReLU) on a map of
2 images of 4 × 4 positions, where the work is nothing and what is left is Python, dispatch and the
kernels' calls, against its dense twin's.

    python benchmarks/router_parts.py --threads 2 --repeats 15
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

from visionmoe import native
from visionmoe.allocator import keep_freed_memory
from visionmoe.analysis.speed import benchmark_header, interleaved_times
from visionmoe.analysis.twin import dense_twin
from visionmoe.layers.moe import MoE, moe_layers
from visionmoe.layers.router_base import router_noise

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cnn_moe_step import add_cell_arguments, build, captured_groups, routers_step


def parts(args: argparse.Namespace) -> dict[str, list[float]]:
    moe, twin, stepper = build(args.backbone, args.width, args.ratio, args.batch)
    seen = captured_groups(moe, args.batch)
    with torch.no_grad():
        logits = [layer.router.logits(tokens) for layer, tokens in seen]
    noise = [router_noise(lg) for lg in logits]

    def logits_only() -> None:
        with torch.no_grad():
            for layer, tokens in seen:
                layer.router.logits(tokens)

    def noise_only() -> None:
        for lg in logits:
            router_noise(lg)

    def kernel() -> None:
        with torch.no_grad():
            for (layer, tokens), lg, n in zip(seen, logits, noise, strict=True):
                router = layer.router
                native.topk_router(lg, n, router.noise_std, router.k, router.group_capacity(tokens.shape[1]), True)

    def router_forward() -> None:
        with torch.no_grad():
            for layer, tokens in seen:
                layer.router(tokens)

    steps = {
        "twin step": stepper(twin),
        "MoE layers": layers_step(moe, args.batch),
        "twin layers": layers_step(twin, args.batch),
        "logits": logits_only,
        "noise": noise_only,
        "kernel": kernel,
        "router forward": router_forward,
        "routers step": routers_step(moe, args.batch),
    }
    return interleaved_times(steps, threads=args.threads, repeats=args.repeats)


def layers_step(model: torch.nn.Module, batch: int):
    """Forward and backward of every MoE layer of ``model`` on the input it saw in one training forward."""
    seen = []
    hooks = [
        layer.register_forward_pre_hook(lambda m, a: seen.append((m, a[0].detach()))) for _, layer in moe_layers(model)
    ]
    model.train()
    with torch.no_grad():
        model(torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last))
    for hook in hooks:
        hook.remove()
    grads = [torch.randn_like(x) for _, x in seen]

    def step() -> None:
        for (layer, x), grad in zip(seen, grads, strict=True):
            x.requires_grad_()
            loss = (layer(x) * grad).sum()
            (loss if layer.aux_loss is None else loss + layer.aux_loss).backward()
            x.grad = None
            layer.zero_grad(set_to_none=True)

    return step


def fixed_cost(args: argparse.Namespace) -> dict[str, list[float]]:
    torch.manual_seed(0)
    layer = MoE(8, 8, 8, k=2, activation=torch.nn.ReLU).train()
    twin = dense_twin(layer).train()
    x = torch.randn(2, 8, 4, 4).contiguous(memory_format=torch.channels_last).requires_grad_()

    def step(module: MoE):
        def run() -> None:
            y = module(x)
            loss = y.sum() if module.aux_loss is None else y.sum() + module.aux_loss
            loss.backward()

        return run

    return interleaved_times(
        {"MoE layer": step(layer), "twin layer": step(twin)}, threads=args.threads, repeats=args.repeats
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cell_arguments(parser)
    args = parser.parse_args(argv)
    keep_freed_memory()
    torch.set_num_threads(args.threads)
    if not native.available():
        print(f"no native kernels here: {native.unavailable_reason()}", file=sys.stderr)
        return 1
    cell = f"{args.backbone}, width {args.width}, hidden ratio {args.ratio:g}, batch {args.batch}"
    print(benchmark_header(f"The routers of a CNN step, piece by piece ({cell})", args.threads))
    print("\n| piece | ms per step | / twin step |\n|---|---|---|")
    times = parts(args)
    twin = statistics.median(times["twin step"])
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(ts) * 1e3:.2f} | {statistics.median(ts) / twin:.3f} |")
    fixed = fixed_cost(args)
    print("\n| fixed cost (2 × 4² tokens, D = H = 8) | µs forward + backward |\n|---|---|")
    for name, ts in fixed.items():
        print(f"| {name} | {statistics.median(ts) * 1e6:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
