"""Data and expert parallelism on torch.distributed, launched with ``torchrun``.

    env             ranks from torchrun's environment; the (replica, ep) mesh carved out of DP ranks
    expert_parallel ExpertShard: E/P experts per rank, tokens swapped by a differentiable all-to-all
    data_parallel   DDP without EP; with EP, dense grads over every rank, expert grads per replica group
    fsdp            FSDP2 (``train.fsdp``): what is not expert-parallel sharded over every rank
    sync_bn         BatchNorm over the global batch (``train.sync_bn``), on the CPU too
    data            each rank's rows of the deterministic global batch; metrics summed across ranks
    checkpoint      DCP checkpoints (expert shards as DTensors) that load on any number of processes

``visionmoe train`` turns all of this on by itself when ``WORLD_SIZE`` > 1 (see the README section
"Multi-GPU and multi-node").
"""

from visionmoe.distributed.checkpoint import (
    SHARDED_CHECKPOINT,
    is_sharded_checkpoint,
    load_sharded,
    localize,
    read_checkpoint,
    save_sharded,
)
from visionmoe.distributed.data import ShardedLoader, shard_loader, shard_rows
from visionmoe.distributed.data_parallel import Parallel, parallelize
from visionmoe.distributed.env import ParallelEnv, init_parallel, launched_distributed, shutdown
from visionmoe.distributed.expert_parallel import ExpertShard, all_to_all, expert_shards, shard_experts
from visionmoe.distributed.fsdp import apply_fsdp, fsdp_units
from visionmoe.distributed.sync_bn import SyncBatchNorm, convert_sync_batchnorm

__all__ = [
    "SHARDED_CHECKPOINT",
    "ExpertShard",
    "Parallel",
    "ParallelEnv",
    "ShardedLoader",
    "SyncBatchNorm",
    "all_to_all",
    "apply_fsdp",
    "convert_sync_batchnorm",
    "expert_shards",
    "fsdp_units",
    "init_parallel",
    "is_sharded_checkpoint",
    "launched_distributed",
    "load_sharded",
    "localize",
    "parallelize",
    "read_checkpoint",
    "save_sharded",
    "shard_experts",
    "shard_loader",
    "shard_rows",
    "shutdown",
]
