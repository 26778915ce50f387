"""FSDP2 for the part of a model that is not expert-parallel: sharded weights, gradients and optimiser state.

With ``train.fsdp=true`` under torchrun, every parameter that is not an expert shard is cut along
its first dimension over the data-parallel group (every rank) with ``torch.distributed.fsdp.fully_shard``
instead of being replicated as DDP replicates it: each rank stores 1/W of the dense weights, their
gradients and their optimiser state, and gathers a unit's weights just before the unit runs.

    units          a module becomes an FSDP unit (gathered, run, freed as one) when it is an element
                   of an ``nn.Sequential`` or ``nn.ModuleList`` — a block of a stage, a layer of a
                   stack, as torchtitan wraps each transformer block — and holds at least
                   ``min_params`` parameters not already in a unit below it. What is left (stem,
                   embeddings, norms, head, small blocks) is the root unit.
    expert shards  with expert parallelism (P > 1) they stay plain, rank-local tensors, left out of
                   FSDP (``ignored_params``); their gradients are summed over the replica group as
                   without FSDP (:mod:`visionmoe.distributed.data_parallel`). With P = 1 there are
                   no shards and FSDP cuts the experts' stacked weights like any other weight.

The gradients are those of one process on the global batch: FSDP's reduce-scatter averages over the W
ranks, which is the 1/W of the data-parallel rule. Checkpoints stay layout-free: a sharded weight is
a DTensor, which DCP writes as its pieces, so a run saved with FSDP loads without it, on any number
of processes, and the reverse (:mod:`visionmoe.distributed.checkpoint`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard

from visionmoe.distributed.env import ParallelEnv

DEFAULT_UNIT_PARAMS = 1_000_000


def fsdp_units(
    model: nn.Module, min_params: int = DEFAULT_UNIT_PARAMS, ignored: Iterable[nn.Parameter] = ()
) -> list[str]:
    """The qualified names of the modules that become their own FSDP units, innermost first.

    A module qualifies when its parent is an ``nn.Sequential`` or ``nn.ModuleList`` and it holds at
    least ``min_params`` parameters (``ignored`` ones and those of qualifying descendants not counted).
    The root is not listed: it is always a unit.
    """
    if isinstance(min_params, bool) or not isinstance(min_params, int) or min_params < 1:
        raise ValueError(f"fsdp unit size must be an int >= 1 parameters, got {min_params!r}")
    skip = {id(p) for p in ignored}
    seen: set[int] = set()  # a parameter shared by two modules counts once, where it is met first
    units: list[str] = []

    def visit(module: nn.Module, prefix: str) -> int:
        """Parameters under ``module`` that no unit below it holds (post-order, so inner units first)."""
        count = 0
        for p in module.parameters(recurse=False):
            if id(p) not in skip and id(p) not in seen:
                seen.add(id(p))
                count += p.numel()
        stack = isinstance(module, (nn.Sequential, nn.ModuleList))
        for name, child in module.named_children():
            qualified = f"{prefix}.{name}" if prefix else name
            n = visit(child, qualified)
            if stack and n >= min_params:
                units.append(qualified)
                n = 0
            count += n
        return count

    visit(model, "")
    return units


def dp_mesh(env: ParallelEnv) -> DeviceMesh:
    """The 1-D mesh of every rank, which FSDP shards over."""
    return init_device_mesh(env.device.type, (env.world_size,), mesh_dim_names=("dp",))


def apply_fsdp(
    model: nn.Module, env: ParallelEnv, *, ignored: Iterable[nn.Parameter] = (), min_params: int = DEFAULT_UNIT_PARAMS
) -> list[str]:
    """``fully_shard`` each unit of :func:`fsdp_units`, then the root, in place; returns the unit names.

    Every rank must hold the same weights before the call (each keeps its own slice of them). The
    parameters of ``model`` are DTensors afterwards: build the optimiser after this.
    """
    ignored = set(ignored)
    with torch.no_grad():  # FSDP2 shards contiguous tensors only: channels-last conv weights are made
        for p in model.parameters():  # contiguous (inputs stay channels-last, so convolutions still are)
            if p not in ignored and not p.is_contiguous():
                p.data = p.data.contiguous()
    units = fsdp_units(model, min_params, ignored)
    mesh = dp_mesh(env)
    for name in units:
        fully_shard(model.get_submodule(name), mesh=mesh, ignored_params=ignored or None)
    fully_shard(model, mesh=mesh, ignored_params=ignored or None)
    return units
