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


def sync_bn(out: str) -> None:
    """A small BatchNorm CNN, one process on the global batch of 6 against DDP with sync_bn on 3 rows per rank.

    Two training steps (outputs, input and parameter gradients, running statistics), then evaluation;
    channels-last and BatchNorm1d on (N, C) and (N, C, L) inputs included. Also records how far plain
    per-rank BatchNorm is from one process, which the test requires to be large.
    """
    from visionmoe.distributed import SyncBatchNorm, init_parallel, parallelize, shard_rows, shutdown

    env = init_parallel(ep_size=1)
    W = env.world_size
    nn = torch.nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 3))
            self.bn_seq, self.bn_vec = nn.BatchNorm1d(5, momentum=None), nn.BatchNorm1d(5, affine=False)
            self.fc = nn.Linear(5, 3)

        def forward(self, x):
            h = self.bn_seq(self.conv(x).flatten(2))  # (N, C, L): the cumulative-average kind
            return self.fc(self.bn_vec(h.mean(dim=2)).relu())  # (N, C), no affine

    torch.manual_seed(0)
    reference = Net().to(memory_format=torch.channels_last)
    local, plain = copy.deepcopy(reference), copy.deepcopy(reference)
    parallel = parallelize(local, env, sync_bn=True)
    forward = parallel.wrap(local)
    parallel_plain = parallelize(plain, env)  # per-rank statistics
    forward_plain = parallel_plain.wrap(plain)
    d = {"converted": float(sum(isinstance(m, SyncBatchNorm) for m in local.modules()))}
    rows = shard_rows(6, env.rank, W)
    for step in range(2):
        x = torch.randn(6, 3, 8, 8).contiguous(memory_format=torch.channels_last).requires_grad_(True)
        target = torch.randn(6, 3)
        for m in (reference, local, plain):
            m.zero_grad()
        y = reference(x)
        (y - target).square().sum(dim=1).mean().backward()
        xl = x.detach()[rows].clone().requires_grad_(True)
        yl = forward(xl)
        (yl - target[rows]).square().sum(dim=1).mean().backward()
        parallel.reduce_gradients()
        d[f"output {step}"] = (yl - y[rows]).abs().max()
        d[f"input grad {step}"] = (xl.grad / W - x.grad[rows]).abs().max()
        for name, p in local.named_parameters():
            d[f"grad {name} {step}"] = (p.grad - reference.get_parameter(name).grad).abs().max()
        d["plain output"] = max(
            d.get("plain output", 0.0), float((forward_plain(x.detach()[rows]) - y[rows]).abs().max())
        )
    for name, buffer in local.named_buffers():
        d[f"buffer {name}"] = (buffer.double() - reference.get_buffer(name).double()).abs().max()
    local.eval(), reference.eval()
    x = torch.randn(6, 3, 8, 8)
    with torch.no_grad():
        d["eval output"] = (local(x[rows]) - reference(x)[rows]).abs().max()  # running statistics, no collective
    torch.save({k: float(v) for k, v in d.items()}, Path(out) / f"rank{env.rank}.pt")
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
