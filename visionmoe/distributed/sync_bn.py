"""BatchNorm over the global batch (``train.sync_bn``): every rank normalises with the statistics of
all ranks' rows, as one process on the whole batch would.

``convert_sync_batchnorm(model, group)`` swaps every BatchNorm of ``model`` for a synchronised one
with the same parameters and buffers (checkpoints are interchangeable with the plain model's). On
CUDA and XPU that is ``torch.nn.SyncBatchNorm``: the fused kernels and their one all-gather per
layer. torch's refuses CPU tensors (and DDP refuses it on CPU modules), so a model on the CPU (gloo)
gets :class:`SyncBatchNorm`, which computes the same thing with two differentiable all-reduces per
layer — the global sum and count, then the global sum of squared deviations from the global mean
(two-pass, like one process's BatchNorm, so no cancellation when the mean is large against the
spread). Their backward sums the gradient over ranks, so each rank gets its rows' share of the
gradient of the global batch's loss, which data parallelism then averages as it averages everything
else.

Evaluation uses the running statistics and never communicates. Every rank must run the same
training forwards (as data parallelism does anyway); a rank whose share of a batch is empty still
takes part.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.nn.functional import all_reduce  # differentiable: its backward sums too
from torch.nn.modules.batchnorm import _BatchNorm


class SyncBatchNorm(_BatchNorm):
    """BatchNorm over the batches of every rank of ``process_group`` (default: all), for (N, C, *)
    inputs, on any device (see the module docstring); without a process group, plain BatchNorm."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"SyncBatchNorm expects (N, C, *) input, got {input.dim()}D of shape {tuple(input.shape)}")

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        group = self.process_group or (dist.group.WORLD if dist.is_available() and dist.is_initialized() else None)
        batch_stats = self.training or not self.track_running_stats
        if not batch_stats or group is None or dist.get_world_size(group) == 1:
            return F.batch_norm(
                input,
                self.running_mean,  # None without track_running_stats
                self.running_var,
                self.weight,
                self.bias,
                batch_stats,
                self._momentum(),
                self.eps,
            )
        C = input.shape[1]
        dims = [0, *range(2, input.dim())]
        x = input.float() if input.dtype in (torch.float16, torch.bfloat16) else input
        count = x.new_full((1,), x.numel() // C if C else 0)
        both = all_reduce(torch.cat([x.sum(dim=dims), count]), group=group)
        n = both[-1]
        if not n > 1:
            raise ValueError(f"SyncBatchNorm needs more than 1 value per channel over all ranks, got {int(n)}")
        mean = both[:C] / n
        shape = [1, C] + [1] * (input.dim() - 2)
        centred = x - mean.reshape(shape)
        var = all_reduce(centred.square().sum(dim=dims), group=group) / n  # biased: what normalises
        if self.track_running_stats:
            with torch.no_grad():
                momentum = self._momentum()
                self.running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
                self.running_var.mul_(1 - momentum).add_(var.detach() * (n / (n - 1)), alpha=momentum)
        out = centred * torch.rsqrt(var + self.eps).reshape(shape)
        if self.affine:
            out = out * self.weight.reshape(shape) + self.bias.reshape(shape)
        return out.to(input.dtype)

    def _momentum(self) -> float:
        """The running-average factor of this step, as ``_BatchNorm.forward`` computes it (and counts the step)."""
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # a cumulative moving average
                return 1.0 / float(self.num_batches_tracked)
        return 0.0 if self.momentum is None else self.momentum


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Every BatchNorm of ``module`` (1d/2d/3d) synchronised over ``process_group`` (default: every
    rank), keeping its parameters (the same objects), buffers and mode: ``torch.nn.SyncBatchNorm`` when
    ``module`` is on a GPU, else :class:`SyncBatchNorm`. Returns the new module when ``module`` itself is
    a BatchNorm, else ``module`` changed in place."""
    device = next((t.device for t in [*module.parameters(), *module.buffers()]), torch.device("cpu"))
    if device.type in ("cuda", "xpu"):
        return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
    return _convert_cpu(module, process_group)


def _convert_cpu(module: nn.Module, process_group) -> nn.Module:
    if isinstance(module, _BatchNorm) and not isinstance(module, (SyncBatchNorm, nn.SyncBatchNorm)):
        if isinstance(module, nn.modules.lazy.LazyModuleMixin):
            raise ValueError(f"convert_sync_batchnorm: {type(module).__name__} is uninitialised; run a forward first")
        new = SyncBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats, process_group
        )
        if module.affine:
            with torch.no_grad():
                new.weight, new.bias = module.weight, module.bias  # the same Parameters: optimiser state stays valid
        new.running_mean, new.running_var = module.running_mean, module.running_var
        new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    for name, child in module.named_children():
        new = _convert_cpu(child, process_group)
        if new is not child:
            setattr(module, name, new)
    return module
