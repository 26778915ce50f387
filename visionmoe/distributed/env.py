"""The process layout of a run: ranks from torchrun's environment, and the groups carved out of them.

Every rank trains on its own share of the global batch, so the data-parallel (DP) group is the
whole world. Expert parallelism (EP) is carved out of the DP ranks, as in torchtitan: the world is a
``(R, P)`` mesh of ``R = world / P`` replicas × ``P = ep_size`` expert shards, rank ``r`` sitting at
``(r // P, r % P)``.

    ep group       a row of the mesh: P consecutive ranks (one node's GPUs when P ≤ GPUs per node,
                   so the all-to-all stays on NVLink). Each holds E/P experts and they swap tokens.
    replica group  a column: the R ranks holding the *same* expert shard. Expert gradients are
                   reduced here and nowhere else — never across ranks holding different experts.
    dp group       every rank: dense (non-expert) gradients and metrics are reduced over it.

With P = 1 every rank holds every expert, the replica group is the world and this is plain DP.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


@dataclass(frozen=True)
class ParallelEnv:
    """Where this process sits: its ranks, its device and its process groups.

    Attributes:
        rank, world_size: in the default (DP) group.
        local_rank: the process's index on its node (its GPU).
        ep_size: P, processes an MoE layer's experts are spread over.
        device: ``cuda:<local_rank>`` with the NCCL backend, else the CPU (gloo).
        mesh: the 2-D ``("replica", "ep")`` device mesh (checkpoints place expert shards on it).
    """

    rank: int
    world_size: int
    local_rank: int
    ep_size: int
    device: torch.device
    mesh: DeviceMesh

    @property
    def ep_rank(self) -> int:
        """This rank's expert shard: it holds experts ``[ep_rank·E/P, (ep_rank+1)·E/P)``."""
        return self.rank % self.ep_size

    @property
    def ep_group(self) -> dist.ProcessGroup:
        return self.mesh.get_group("ep")

    @property
    def replica_group(self) -> dist.ProcessGroup:
        return self.mesh.get_group("replica")

    @property
    def is_main(self) -> bool:
        """Rank 0, the one process that writes logs, summaries and single-writer files."""
        return self.rank == 0


def launched_distributed() -> bool:
    """Whether this process was started by torchrun (or alike) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def check_ep_size(ep_size: int, world_size: int) -> None:
    """P must be an int >= 1 that divides the world size (the mesh is R × P)."""
    if isinstance(ep_size, bool) or not isinstance(ep_size, int) or ep_size < 1:
        raise ValueError(f"expert_parallel must be an int >= 1, got expert_parallel={ep_size!r}")
    if world_size % ep_size:
        raise ValueError(f"expert_parallel={ep_size} must divide the number of processes, got world_size={world_size}")


def init_parallel(ep_size: int = 1, *, backend: str | None = None, timeout_s: float = 600.0) -> ParallelEnv:
    """Join the process group from torchrun's environment (or use the one already initialised).

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` (torchrun
    sets them). The backend is NCCL when CUDA is available, else gloo; each process takes
    ``cuda:<LOCAL_RANK>``. ``timeout_s`` bounds every collective, so a rank that died makes the others
    fail instead of waiting forever.
    """
    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise RuntimeError("init_parallel needs RANK and WORLD_SIZE in the environment; launch with torchrun")
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
        atexit.register(shutdown)  # we made the group, so we leave it when the process ends
    world, rank = dist.get_world_size(), dist.get_rank()
    check_ep_size(ep_size, world)
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    mesh = init_device_mesh(device.type, (world // ep_size, ep_size), mesh_dim_names=("replica", "ep"))
    return ParallelEnv(rank, world, local_rank, ep_size, device, mesh)


def shutdown() -> None:
    """Leave the process group (a no-op when none is initialised)."""
    if dist.is_initialized():
        dist.destroy_process_group()
