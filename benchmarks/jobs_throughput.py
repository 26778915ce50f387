"""Sweep parallelism on a small machine: one training process with all cores' threads against
``cores`` processes of one thread each, run at the same time — the choice `visionmoe sweep --jobs`
makes. Training steps (forward, backward, SGD) on random CIFAR-sized batches, channels-last, fp32.

    python benchmarks/jobs_throughput.py --models cnn_dw_cifar_moe:16 cnn_dw_cifar_moe:32 --repeats 3

Prints a Markdown table (the command and machine first): images/s of the whole machine under each
setting, median over repeats, and their ratio. The two settings alternate within each repeat.
``--quick`` runs a tiny model for a few steps, to check the script, not to measure anything.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from visionmoe.analysis.speed import benchmark_header, markdown_table
from visionmoe.models import create_model


def worker(model_name: str, width: int, batch: int, steps: int, threads: int) -> float:
    """Images per second of ``steps`` timed training steps after two warm-up steps."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = create_model(model_name, width=width).to(memory_format=torch.channels_last).train()
    optim = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))

    def step() -> None:
        optim.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optim.step()

    for _ in range(2):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - start)


def run(spec: str, args: argparse.Namespace, processes: int, threads: int) -> float:
    """Total images/s of ``processes`` workers started together, ``threads`` threads each."""
    name, width = spec.split(":")
    cmd = [sys.executable, __file__, "--worker", name, width, str(args.batch), str(args.steps), str(threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env) for _ in range(processes)]
    rates = []
    for proc in procs:
        out, _ = proc.communicate()
        if proc.returncode:
            raise RuntimeError(f"worker for {spec} exited with {proc.returncode}")
        rates.append(json.loads(out.strip().splitlines()[-1])["images_per_s"])
    return sum(rates)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        name, width, batch, steps, threads = sys.argv[2:7]
        print(json.dumps({"images_per_s": worker(name, int(width), int(batch), int(steps), int(threads))}))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["cnn_dw_cifar_moe:16", "cnn_dw_cifar:16"])
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.models, args.batch, args.steps, args.repeats = ["cnn_dw_cifar_moe:8"], 32, 2, 1
    for spec in args.models:
        if spec.count(":") != 1 or not spec.split(":")[1].isdigit():
            parser.error(f"--models entry {spec!r}: expected MODEL:WIDTH, e.g. cnn_dw_cifar_moe:16")

    rows = []
    for spec in args.models:
        one, many = [], []
        for _ in range(args.repeats):
            one.append(run(spec, args, 1, args.cores))
            many.append(run(spec, args, args.cores, 1))
        a, b = statistics.median(one), statistics.median(many)
        rows.append({"model": spec, "one": a, "many": b, "ratio": b / a})
    print(benchmark_header("Sweep parallelism: one job × all threads vs one job per core", args.cores))
    print(f"\nbatch {args.batch}, {args.steps} timed steps after 2 warm-up, median of {args.repeats} repeats\n")
    print(
        markdown_table(
            rows,
            [
                ("model:width", lambda r: r["model"]),
                (f"1 job × {args.cores} threads, img/s", lambda r: f"{r['one']:.0f}"),
                (f"{args.cores} jobs × 1 thread, img/s (sum)", lambda r: f"{r['many']:.0f}"),
                ("ratio", lambda r: f"{r['ratio']:.2f}"),
            ],
        )
    )


if __name__ == "__main__":
    main()
