"""What one training process does differently when it is one of several: behind one object.

The training loop is written once, for one process. Every place where a torchrun rank must do more —
keep its rows of each batch, start its own RNG stream, reduce gradients, sum metrics over ranks, agree
on when to stop, write a sharded checkpoint — is a method of a :class:`Replica`, which in one process
is the identity or does nothing:

    replica = make_replica(config)             # Replica(), or DistributedReplica under torchrun
    loader = replica.shard(loader)             # this rank's rows of every global batch
    replica.parallelize(model, config.train)   # expert shards, FSDP, SyncBatchNorm: in place
    forward = replica.wrap(forward)            # gradient reduction hooks (DDP)
    ...loss.backward(); replica.reduce_gradients(); replica.clip_grad_norm_(model, max_norm)

So the distributed differences are read in one file, next to each other, and the loop
(:mod:`visionmoe.train.trainer`) reads top to bottom.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from visionmoe import distributed
from visionmoe.data import TensorLoader
from visionmoe.train.checkpoint import CHECKPOINT, load_checkpoint, save_checkpoint
from visionmoe.train.config import Config, TrainConfig
from visionmoe.train.metrics import DEVICE_SUMS, ClassificationMeter, EpochSums


class Replica:
    """One process: the whole batch, the whole model, no one to agree with."""

    rank, world_size, is_main = 0, 1, True
    fsdp_units: list[str] | None = None  # the modules FSDP gathers one at a time (None: not FSDP)

    def device(self, requested: torch.device) -> torch.device:
        """The device this process trains on."""
        return requested

    def shard(self, loader: TensorLoader) -> TensorLoader:
        """This process's rows of each of ``loader``'s batches."""
        return loader

    def parallelize(self, model: nn.Module, t: TrainConfig) -> None:
        """Spread ``model`` over the processes, in place (expert shards, FSDP, SyncBatchNorm)."""

    def wrap(self, forward: nn.Module) -> nn.Module:
        """The training forward: ``forward`` (the model, perhaps compiled) with gradient reduction hooks."""
        return forward

    def reduce_gradients(self) -> None:
        """After ``backward``: gradients of the global batch (no-op in one process)."""

    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> Tensor:
        return nn.utils.clip_grad_norm_(model.parameters(), max_norm)

    def fold(self, sums: EpochSums) -> None:
        """The partial epoch's sums over every process, in rank 0's ``sums`` (no-op in one process)."""

    def agree_time_is_up(self, local: bool) -> bool:
        """Whether every process stops now (they must stop at the same step): rank 0's clock decides."""
        return local

    def agree_any(self, local: bool) -> bool:
        """Whether ``local`` holds on any process (every process gets the same answer)."""
        return local

    def eval_reduce(self) -> Callable[[ClassificationMeter, dict], dict] | None:
        """:func:`visionmoe.train.evaluation.evaluate`'s ``reduce``: test sums over every process."""
        return None

    def require_one_process(self, what: str) -> None:
        """Refuse ``what`` (a config key) where it is computed in one process only."""

    def read_checkpoint(self, run_dir: Path) -> dict[str, Any]:
        """The state to resume from; at least its config, which is checked before anything is built."""
        return load_checkpoint(run_dir / CHECKPOINT)

    def localize(self, state: dict[str, Any], run_dir: Path, model: nn.Module, optimizer: Optimizer) -> dict[str, Any]:
        """``state`` as this process holds it (its expert shards), once ``model`` and ``optimizer`` are built."""
        return state

    def keep_own_sums(self, sums: EpochSums) -> None:
        """After a restore: a checkpoint's partial-epoch sums are rank 0's (folded there before saving)."""

    def save(self, run_dir: Path, state: dict[str, Any], model: nn.Module, optimizer: Optimizer) -> Path:
        """Write ``state``; only the newest format is kept, so a resume on any process count reads the latest."""
        path = save_checkpoint(run_dir / CHECKPOINT, state)
        if (run_dir / distributed.SHARDED_CHECKPOINT).exists():
            shutil.rmtree(run_dir / distributed.SHARDED_CHECKPOINT)
        return path


class DistributedReplica(Replica):
    """A torchrun rank: its rows of the global batch, expert shards, sums over ranks, DCP checkpoints."""

    def __init__(self, env: distributed.ParallelEnv) -> None:
        self.env = env
        self.rank, self.world_size, self.is_main = env.rank, env.world_size, env.is_main
        self.parallel: distributed.Parallel | None = None

    def device(self, requested: torch.device) -> torch.device:
        return self.env.device if self.env.device.type == "cuda" else requested  # cuda:<LOCAL_RANK>

    def shard(self, loader: TensorLoader) -> TensorLoader:
        return distributed.shard_loader(loader, self.rank, self.world_size)

    def parallelize(self, model: nn.Module, t: TrainConfig) -> None:
        self.parallel = distributed.parallelize(
            model,
            self.env,
            fsdp=t.fsdp,
            fsdp_unit_params=t.fsdp_unit_params,
            global_aux_loss=t.global_aux_loss,
            sync_bn=t.sync_bn,
        )
        self.fsdp_units = self.parallel.fsdp_units if self.parallel.fsdp else None

    def wrap(self, forward: nn.Module) -> nn.Module:
        return self.parallel.wrap(forward)

    def reduce_gradients(self) -> None:
        self.parallel.reduce_gradients()  # a no-op under DDP, which reduced during backward

    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> Tensor:
        return self.parallel.clip_grad_norm_(max_norm)  # the norm over every rank's expert shards

    def fold(self, sums: EpochSums) -> None:
        host = sums.host()
        total = distributed.data.sum_across_ranks({k: host[k] for k in (*DEVICE_SUMS, "seen")})
        routing = distributed.data.sum_routing_across_ranks(sums.routing)
        if self.is_main:
            sums.set({**{k: total[k] for k in DEVICE_SUMS}, "seen": int(total["seen"])}, routing)
        else:  # the other ranks restart from zero
            sums.set({**{k: 0.0 for k in DEVICE_SUMS}, "seen": 0}, {})

    def agree_time_is_up(self, local: bool) -> bool:
        return distributed.data.sum_across_ranks({"up": local and self.is_main})["up"] > 0

    def agree_any(self, local: bool) -> bool:
        return distributed.data.sum_across_ranks({"any": local})["any"] > 0

    def eval_reduce(self) -> Callable[[ClassificationMeter, dict], dict] | None:
        return _sum_eval_across_ranks

    def require_one_process(self, what: str) -> None:
        raise ValueError(f"{what} is evaluated in one process; unset it under torchrun")

    def read_checkpoint(self, run_dir: Path) -> dict[str, Any]:
        sharded = run_dir / distributed.SHARDED_CHECKPOINT
        if distributed.is_sharded_checkpoint(sharded):
            return {"config": distributed.checkpoint.read_extra(sharded)["config"], "sharded": True}
        return super().read_checkpoint(run_dir)

    def localize(self, state: dict[str, Any], run_dir: Path, model: nn.Module, optimizer: Optimizer) -> dict[str, Any]:
        # this rank's part, from a checkpoint of any number of processes
        if state.get("sharded"):
            return distributed.load_sharded(run_dir / distributed.SHARDED_CHECKPOINT, model, self.env)
        return distributed.localize(state, model, optimizer)

    def keep_own_sums(self, sums: EpochSums) -> None:
        if not self.is_main:
            sums.reset()  # the partial epoch's sums were folded into rank 0's

    def save(self, run_dir: Path, state: dict[str, Any], model: nn.Module, optimizer: Optimizer) -> Path:
        path = distributed.save_sharded(run_dir / distributed.SHARDED_CHECKPOINT, state, model, optimizer, self.env)
        if self.is_main:
            (run_dir / CHECKPOINT).unlink(missing_ok=True)
        return path


def make_replica(config: Config) -> Replica:
    """Join torchrun's process group when there is one (``WORLD_SIZE`` > 1); else the one-process replica."""
    t, d = config.train, config.data
    if not distributed.launched_distributed():
        if t.expert_parallel != 1:
            raise ValueError(
                f"train.expert_parallel={t.expert_parallel!r} needs as many processes (or a multiple); "
                "launch with torchrun --nproc_per_node N, or set train.expert_parallel=1"
            )
        return Replica()
    env = distributed.init_parallel(t.expert_parallel, backend="gloo" if t.device == "cpu" else None)
    distributed.data_parallel.check_batch_size(d.batch_size, env.world_size, d.mixup_alpha > 0 or d.cutmix_alpha > 0)
    return DistributedReplica(env)


def _sum_eval_across_ranks(meter: ClassificationMeter, routing: dict) -> dict:
    distributed.data.sum_meter_across_ranks(meter)
    return distributed.data.sum_routing_across_ranks(routing)
