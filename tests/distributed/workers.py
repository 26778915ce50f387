"""Worker functions for the distributed tests, run by harness.py as ``python workers.py <name> <json args>``."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)


def moe_layer(out: str, cases: list[dict]) -> None:
    """Each case: the single-process MoE on the global batch, then the EP layer on this rank's rows.

    Saves, per case, the largest differences of the outputs and every gradient. Each rank's loss is
    the mean over its rows, so the global batch's loss is their mean over ranks: its input gradient
    is the local one / W, and parameter gradients are what ``reduce_gradients`` leaves.
    """
    from visionmoe.distributed import init_parallel, parallelize, shard_rows, shutdown
    from visionmoe.layers.moe import MoE

    env = init_parallel(ep_size=2)
    W = env.world_size
    diffs = {}
    for case in cases:
        torch.manual_seed(0)
        moe = MoE(8, 4, 16, aux_loss_weights={}, **case["moe"])
        local = copy.deepcopy(moe)
        x = torch.randn(4, 6, 8, requires_grad=True)  # (B, N, D): the global batch
        weight = torch.randn(4, 6, 8)
        y = moe(x)
        (y * weight).sum().div(4).backward()  # mean over the batch of a per-sample loss

        rows = shard_rows(4, env.rank, W)
        parallel = parallelize(local, env)
        xl = x.detach()[rows].clone().requires_grad_(True)
        yl = local(xl)
        (yl * weight[rows]).sum().div(len(rows)).backward()
        parallel.reduce_gradients()
        d = {"output": (yl - y[rows]).abs().max(), "input grad": (xl.grad / W - x.grad[rows]).abs().max()}
        shard = local.experts
        for name, p in local.named_parameters():
            ref = moe.get_parameter(name).grad
            if name.startswith("experts."):
                ref = ref[shard.offset : shard.offset + shard.num_experts]
            d[f"grad {name}"] = (p.grad - ref).abs().max()
        diffs[case["name"]] = {k: float(v) for k, v in d.items()}
    torch.save(diffs, Path(out) / f"rank{env.rank}.pt")
    shutdown()


def train(out: str, overrides: list[str]) -> None:
    """``visionmoe train`` exactly as torchrun would start it (the harness set RANK, WORLD_SIZE, ...)."""
    from visionmoe.cli import main

    main(["train", *overrides])


def raises(out: str) -> None:
    """Rank 1 raises before the first collective; rank 0 waits in it (plain torch: no visionmoe import to wait for)."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    if dist.get_rank() == 1:
        raise RuntimeError("worker 1 failed on purpose")
    dist.all_reduce(torch.ones(1))


if __name__ == "__main__":
    globals()[sys.argv[1]](*json.loads(sys.argv[2]))
