"""Where a CPU training step's time goes besides compute: system time and page faults (issue 22).

    python benchmarks/page_faults.py --model cnn_dw_cifar_moe --batch 64 --steps 15
    python benchmarks/page_faults.py --model cnn_dw_cifar_moe --batch 64 --steps 15 --keep-freed-memory

Trains ``--steps`` SGD steps (after 3 warm-up steps) of a CIFAR CNN with MoE in every stage (width 8,
hidden ratio 4: ``hidden``'s highest-ρ model) or its dense twin (``--twin``) on one random channels-last
batch, one thread, and reports per step: wall time, user and system CPU time, minor page faults, and the
process's peak resident memory. glibc's malloc returns large blocks (above its mmap threshold, at most
32 MB) to the system when they are freed, so a step that frees and reallocates big activation buffers
faults their pages in again every time; the second command asks glibc to keep them, as training does
(``visionmoe.allocator.keep_freed_memory``, ``train.keep_freed_memory``), for comparison. The same can be
had from outside with ``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=4294967295:glibc.malloc.trim_threshold=4294967295``.
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import torch
import torch.nn.functional as F

from visionmoe.allocator import keep_freed_memory
from visionmoe.analysis.twin import dense_twin
from visionmoe.layers.moe import collect_aux_loss
from visionmoe.models import create_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="cnn_dw_cifar_moe", choices=["cnn_dw_cifar_moe", "cnn_resnet_cifar_moe"])
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--ratio", type=float, default=4.0)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--twin", action="store_true", help="the dense twin of equal active FLOPs instead")
    parser.add_argument("--keep-freed-memory", action="store_true", help="glibc keeps freed memory (as training)")
    args = parser.parse_args(argv)
    malloc = keep_freed_memory() if args.keep_freed_memory else "defaults"
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = create_model(args.model, width=args.width, hidden_ratio=args.ratio, moe_stages="all")
    if args.twin:
        model = dense_twin(model, match="flops")
    model = model.to(memory_format=torch.channels_last).train()
    optim = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(args.batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch,))

    def step() -> None:
        optim.zero_grad(set_to_none=True)
        (F.cross_entropy(model(x), y) + collect_aux_loss(model)).backward()
        optim.step()

    for _ in range(3):
        step()
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(args.steps):
        step()
    after, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - start
    n = args.steps
    tunables = os.environ.get("GLIBC_TUNABLES")
    malloc = f"{malloc}, GLIBC_TUNABLES={tunables}" if tunables else malloc
    print(
        f"| {args.model}{' twin' if args.twin else ''} | {args.batch} | {malloc} | {1e3 * wall / n:.0f} | "
        f"{1e3 * (after.ru_utime - before.ru_utime) / n:.0f} | {1e3 * (after.ru_stime - before.ru_stime) / n:.0f} | "
        f"{(after.ru_minflt - before.ru_minflt) / n:,.0f} | {after.ru_maxrss / 1024:,.0f} |"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
