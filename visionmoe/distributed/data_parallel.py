"""Gradient reduction: DDP without expert parallelism; with it, each parameter over its own group.

The rule that rules out the classic expert-parallel bug (expert gradients averaged across ranks that
hold *different* experts): a gradient is reduced only over the ranks that hold the same tensor.

    dense parameters   identical on every rank -> summed over the DP group (every rank).
    expert parameters  shard ``ep_rank`` -> summed over the replica group (ranks with the same shard).

Both are then divided by the world size W. Each rank's loss is the mean over its own B/W samples,
so the gradient of the global mean is (1/W) Σ_ranks ∇(local loss). A dense parameter gets its W terms
from the all-reduce; an expert shard already received, through the backward all-to-all, the
gradients of the tokens that the P ranks of its EP group routed to it, and the replica all-reduce
adds the other W/P EP groups. Without expert parallelism this is exactly what DDP does, so DDP (with
its bucketed, overlapped all-reduce) is used there.

With FSDP (``fsdp=True``, :mod:`visionmoe.distributed.fsdp`) the dense parameters are not replicated
but sharded over every rank, and FSDP's reduce-scatter averages their gradients over the W ranks
during backward; expert shards are left out of it and reduced over their replica group as above.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from visionmoe.distributed.env import ParallelEnv
from visionmoe.distributed.expert_parallel import expert_shards, shard_experts
from visionmoe.distributed.fsdp import DEFAULT_UNIT_PARAMS, apply_fsdp
from visionmoe.distributed.sync_bn import convert_sync_batchnorm
from visionmoe.layers.routers import set_aux_loss_group


class Parallel:
    """A model made data (and expert) parallel: what to call, and the reductions a step needs.

    Build it with :func:`parallelize`. ``module`` is the model itself (expert shards in place, dense
    weights sharded with FSDP; its ``state_dict`` is the local one), ``wrap(forward)`` gives the
    callable to train with (DDP around it without expert parallelism or FSDP, itself otherwise), and
    after ``loss.backward()`` :meth:`reduce_gradients` must run (a no-op under DDP, which reduces
    during backward).
    """

    def __init__(
        self,
        module: nn.Module,
        env: ParallelEnv,
        *,
        fsdp: bool = False,
        fsdp_unit_params: int = DEFAULT_UNIT_PARAMS,
        global_aux_loss: bool = True,
        sync_bn: bool = False,
    ) -> None:
        self.module, self.env, self.fsdp = module, env, fsdp
        # the routers' aux losses over the global batch, as one process computes them (or each rank's own)
        set_aux_loss_group(module, dist.group.WORLD if global_aux_loss else None)
        if sync_bn:  # BatchNorm's batch statistics too (before DDP or FSDP wrap the model)
            convert_sync_batchnorm(module, dist.group.WORLD)
        self.expert_names = set(expert_shards(module))
        self.uses_ddp = not self.expert_names and not fsdp
        self.fsdp_units: list[str] = []
        if not self.uses_ddp:  # what DDP does when it wraps a model: every replica starts from rank 0's
            _broadcast([p for n, p in module.named_parameters() if n not in self.expert_names] + list(module.buffers()))
        if fsdp:
            ignored = [p for n, p in module.named_parameters() if n in self.expert_names]
            self.fsdp_units = apply_fsdp(module, env, ignored=ignored, min_params=fsdp_unit_params)
        named = list(module.named_parameters())  # after FSDP: its DTensor parameters
        self.expert_params = [p for n, p in named if n in self.expert_names]
        self.dense_params = [p for n, p in named if n not in self.expert_names]

    def wrap(self, forward: nn.Module) -> nn.Module:
        """The module to call in training: DDP around ``forward`` when no parameter is sharded."""
        if not self.uses_ddp:
            return forward
        device_ids = [self.env.device.index] if self.env.device.type == "cuda" else None
        # find_unused_parameters: a model may leave a parameter out of a step (an MoE layer that no
        # token of a batch reaches in a conditional model); DDP would otherwise wait for it forever.
        return DistributedDataParallel(forward, device_ids=device_ids, find_unused_parameters=True)

    @torch.no_grad()
    def reduce_gradients(self) -> None:
        """Average gradients as one process on the global batch would have them (see the module docstring)."""
        if self.uses_ddp:
            return
        if not self.fsdp:  # FSDP reduce-scattered the dense gradients (mean over W) during backward
            _all_reduce_mean(self.dense_params, None, self.env.world_size)
        _all_reduce_mean(self.expert_params, self.env.replica_group, self.env.world_size)
        _broadcast(list(self.module.buffers()))  # BatchNorm statistics: rank 0's everywhere, as DDP does

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> Tensor:
        """``nn.utils.clip_grad_norm_`` with the global norm: dense grads counted once, every shard once."""
        dense = _square_sum(self.dense_params)
        if self.fsdp:
            dist.all_reduce(dense)  # every rank holds its own slice of each dense gradient
        experts = _square_sum(self.expert_params)
        if self.expert_params:
            dist.all_reduce(experts, group=self.env.ep_group)  # the EP group together holds every expert once
        total = (dense + experts).sqrt()
        scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for p in self.dense_params + self.expert_params:
            if p.grad is not None:
                _local(p.grad).mul_(scale.to(p.grad.dtype))
        return total


def parallelize(
    model: nn.Module,
    env: ParallelEnv,
    *,
    fsdp: bool = False,
    fsdp_unit_params: int = DEFAULT_UNIT_PARAMS,
    global_aux_loss: bool = True,
    sync_bn: bool = False,
) -> Parallel:
    """Shard the experts of ``model`` over the EP group when ``env.ep_size`` > 1, in place, and with
    ``fsdp`` the rest over every rank (:func:`visionmoe.distributed.fsdp.apply_fsdp`). With
    ``global_aux_loss`` the routers' aux losses see the global batch
    (:func:`visionmoe.layers.routers.set_aux_loss_group`), else each rank's share; with ``sync_bn``
    so does every BatchNorm (:mod:`visionmoe.distributed.sync_bn`), else each normalises by its rank's rows.

    Every rank must have built the same model from the same seed; rank 0's parameters and buffers
    are broadcast to the others first (DDP, without EP or FSDP, does it when it wraps the model).
    Build the optimiser after this: FSDP replaces the parameters.
    """
    if env.ep_size > 1:
        shard_experts(model, env.ep_rank, env.ep_size, env.ep_group)
    return Parallel(
        model,
        env,
        fsdp=fsdp,
        fsdp_unit_params=fsdp_unit_params,
        global_aux_loss=global_aux_loss,
        sync_bn=sync_bn,
    )


def _all_reduce_mean(params: Iterable[nn.Parameter], group: dist.ProcessGroup | None, world_size: int) -> None:
    """Sum ``params``' gradients over ``group`` in one flat buffer, then divide by ``world_size``."""
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    if group is None or dist.get_world_size(group) > 1:
        dist.all_reduce(flat, group=group)
    flat.div_(world_size)
    for p, chunk in zip(params, flat.split([g.numel() for g in grads]), strict=True):
        p.grad = chunk.view_as(p).clone() if p.grad is None else p.grad.copy_(chunk.view_as(p))


def _broadcast(tensors: list[Tensor]) -> None:
    """Rank 0's values of ``tensors`` on every rank, one broadcast per dtype."""
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.detach().reshape(-1) for t in group])
        dist.broadcast(flat, src=0)
        with torch.no_grad():
            for t, chunk in zip(group, flat.split([t.numel() for t in group]), strict=True):
                t.copy_(chunk.view_as(t))


def _local(t: Tensor) -> Tensor:
    """This rank's part of ``t``: the local slice of an FSDP DTensor, else ``t`` itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def _square_sum(params: list[nn.Parameter]) -> Tensor:
    grads = [_local(p.grad).detach().double().square().sum() for p in params if p.grad is not None]
    return torch.stack(grads).sum() if grads else torch.zeros((), dtype=torch.float64, device=_device(params))


def _device(params: list[nn.Parameter]) -> torch.device:
    return params[0].device if params else torch.device("cpu")


def check_batch_size(batch_size: int, world_size: int, mixup: bool) -> None:
    """The global batch splits into equal shards (and even ones when mixup pairs samples)."""
    need = 2 * world_size if mixup else world_size
    if batch_size % need:
        what = (
            "2 × the number of processes (mixup pairs samples within a shard)" if mixup else "the number of processes"
        )
        raise ValueError(f"data.batch_size={batch_size} must be divisible by {what}, got {world_size} processes")
