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

    diffs = {}
    for case in cases:
        env = init_parallel(ep_size=case.get("ep_size", 2))  # ep_size 1: DDP
        W = env.world_size
        torch.manual_seed(0)
        moe = MoE(8, 4, 16, **{"aux_loss_weights": {}, **case["moe"]})
        local = copy.deepcopy(moe)
        x = torch.randn(4, 6, 8, requires_grad=True)  # (B, N, D): the global batch
        weight = torch.randn(4, 6, 8)
        y = moe(x)
        ((y * weight).sum().div(4) + moe.aux_loss).backward()  # mean over the batch of a per-sample loss

        rows = shard_rows(4, env.rank, W)
        parallel = parallelize(local, env)
        xl = x.detach()[rows].clone().requires_grad_(True)
        forward = parallel.wrap(local)  # DDP around it for ep_size 1 (kept alive until backward)
        yl = forward(xl)
        ((yl * weight[rows]).sum().div(len(rows)) + local.aux_loss).backward()  # aux: the global batch's
        parallel.reduce_gradients()
        d = {"output": (yl - y[rows]).abs().max(), "input grad": (xl.grad / W - x.grad[rows]).abs().max()}
        d["aux loss"] = (local.aux_loss - moe.aux_loss).abs()
        lo, n = getattr(local.experts, "offset", 0), local.experts.num_experts  # this rank's experts
        for name, p in local.named_parameters():
            ref = moe.get_parameter(name).grad
            if name.startswith("experts."):
                ref = ref[lo : lo + n]
            d[f"grad {name}"] = (p.grad - ref).abs().max()
        diffs[case["name"]] = {k: float(v) for k, v in d.items()}
    torch.save(diffs, Path(out) / f"rank{env.rank}.pt")
    shutdown()


def tiny_model(seed: int) -> torch.nn.Module:
    from visionmoe.layers.moe import MoE

    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 8), MoE(8, 4, 16, router="topk", k=2, capacity_factor=None))


def sgd_step(model: torch.nn.Module, seed: int, parallel=None) -> torch.optim.Optimizer:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    torch.manual_seed(seed)
    model(torch.randn(2, 6, 8)).square().mean().backward()
    if parallel is not None:
        parallel.reduce_gradients()
    optimizer.step()
    return optimizer


def _full(value):
    """Whole tensors in place of FSDP's DTensors (a collective: every rank calls it alike), recursively."""
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        return value.full_tensor()
    if isinstance(value, dict):
        return {k: _full(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_full(v) for v in value]
    return value


def checkpoints(out: str, ep_size: int = 2, fsdp: bool = False) -> None:
    """1 -> 2: load ``one.dcp`` (saved by one process) into expert shards (and FSDP slices), directly and
    via ``localize`` of the full state. 2 -> 1: take a step and save ``two.dcp``. Dumps every rank's
    state, FSDP slices gathered whole."""
    from visionmoe.distributed import init_parallel, load_sharded, localize, parallelize, save_sharded, shutdown

    env = init_parallel(ep_size=ep_size)
    model = tiny_model(seed=1)  # other weights: everything must come from the checkpoint
    parallel = parallelize(model, env, fsdp=fsdp, fsdp_unit_params=1)  # with FSDP: both layers are units
    optimizer = sgd_step(model, seed=env.rank, parallel=parallel)
    state = load_sharded(Path(out) / "one.dcp", model, env)
    full = torch.load(Path(out) / "one.pt")
    sliced = localize(full, model, optimizer)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    tag = f"ep{ep_size}{'-fsdp' if fsdp else ''}"
    from torch.distributed.tensor import DTensor

    dump = {"loaded": _full(state), "localized": _full(sliced), "model": _full(model.state_dict())}
    dump["sharded"] = {  # which tensors each way gave as FSDP slices
        how: sorted(k for k, v in s["model"].items() if isinstance(v, DTensor))
        for how, s in (("loaded", state), ("localized", sliced))
    }
    dump["sharded"]["model"] = sorted(n for n, p in model.named_parameters() if isinstance(p, DTensor))
    torch.save(dump, Path(out) / f"loaded{env.rank}-{tag}.pt")

    optimizer.zero_grad()
    torch.manual_seed(10 + env.rank)
    model(torch.randn(2, 6, 8)).square().mean().backward()
    parallel.reduce_gradients()
    optimizer.step()
    local = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": 4, "rng": torch.get_rng_state()}
    save_sharded(Path(out) / f"two-{tag}.dcp", local, model, optimizer, env)
    torch.save(_full(local), Path(out) / f"saved{env.rank}-{tag}.pt")
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
