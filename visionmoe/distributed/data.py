"""Each rank's share of the global batch, and metrics summed back across ranks.

The loader's batches are a function of (seed, epoch, step) (:mod:`visionmoe.data.loader`), so every
rank can build the *global* batch's indices and augmentation draws without talking to the others and
keep its own rows: the global batch is exactly one process's batch, whatever the number of ranks, and
resume stays exact. Every rank draws the whole batch's random numbers (a few per image: cheap), but
an augmentation that ``supports_rows`` (:class:`visionmoe.train.data.Augment`) applies them to the
rank's own rows only, so the per-image work — crops, flips and RandAugment — shrinks with the ranks.

Which rows a rank keeps: with B = 2·W·h, rank r takes rows ``[r·h, (r+1)·h)`` and their mirrors
``[B-(r+1)·h, B-r·h)``. Mixup and CutMix (timm, batch mode) pair row i with row B-1-i, and in this
layout the mirror of a row stays on its rank, so a rank's mixed samples are the global batch's.
Without mixup any equal split would do; this one is used throughout. Evaluation batches are cut into
W contiguous pieces of sizes differing by at most one.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from visionmoe.data.augment import normalize
from visionmoe.data.loader import TensorLoader
from visionmoe.data.stream import StreamLoader
from visionmoe.layers.stats import RoutingStats, RoutingStatsAccumulator


def shard_rows(batch_size: int, rank: int, world_size: int) -> Tensor:
    """Rows of a global training batch that ``rank`` keeps (the mirrored layout of the module docstring)."""
    if batch_size % world_size:
        raise ValueError(f"batch of {batch_size} rows cannot be split evenly over world_size={world_size} ranks")
    if batch_size % (2 * world_size):
        size = batch_size // world_size
        return torch.arange(rank * size, (rank + 1) * size)
    h = batch_size // (2 * world_size)
    return torch.cat(
        [torch.arange(rank * h, (rank + 1) * h), torch.arange(batch_size - (rank + 1) * h, batch_size - rank * h)]
    )


class ShardedLoader(TensorLoader):
    """A :class:`TensorLoader` that yields this rank's rows of each global batch.

    Same length, same ``state_dict`` and the same (seed, epoch, step) batches as the loader it copies.
    Training loaders (``drop_last``) keep :func:`shard_rows`; evaluation loaders keep contiguous pieces,
    and a rank whose piece of the last batch is empty gets one row of input with no label (callers
    forward it, so every rank joins the expert all-to-all, and score only the first ``len(labels)`` rows).
    """

    def __init__(self, loader: TensorLoader, rank: int, world_size: int) -> None:
        self.__dict__.update(loader.__dict__)
        self.rank, self.world_size = rank, world_size

    def _rows(self, n: int) -> Tensor:
        if self.drop_last:
            return shard_rows(n, self.rank, self.world_size)
        return torch.arange(n).tensor_split(self.world_size)[self.rank]

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        if self.step >= len(self):
            self.epoch, self.step = self.epoch + 1, 0
        order = self.order(self.epoch)
        while self.step < len(self):
            index = order[self.step * self.batch_size : (self.step + 1) * self.batch_size]
            rows = self._rows(len(index))
            labels = self.data.labels[index[rows]]
            generator = self._generator(self.epoch, self.step + 1)
            if self.augment is not None and getattr(self.augment, "supports_rows", False) and len(rows):
                # this rank's rows only, with the draws they get in the global batch
                images = self.augment(self.data.images[index[rows]], generator, rows=rows, batch_size=len(index))
            else:
                images = self.data.images[index]  # the global batch: its augmentation draws are one process's
                if self.augment is not None:
                    images = self.augment(images, generator)
                if len(rows) == 0:
                    rows = torch.zeros(1, dtype=torch.long)  # a stand-in row to forward; it has no label
                images = images[rows]
            x = normalize(images, self.mean, self.std, channels_last=self.channels_last)
            self.step += 1
            yield x, labels
        self.epoch, self.step = self.epoch + 1, 0


def shard_loader(loader: TensorLoader, rank: int, world_size: int) -> TensorLoader:
    """This rank's view of ``loader``: a :class:`StreamLoader` that reads only the rank's rows, or a
    :class:`ShardedLoader` over an in-memory split. Rows are those of :class:`ShardedLoader`."""
    if isinstance(loader, StreamLoader):
        sharded = copy.copy(loader)
        sharded.rows = ShardedLoader(loader, rank, world_size)._rows
        return sharded
    return ShardedLoader(loader, rank, world_size)


def sum_across_ranks(values: dict[str, float]) -> dict[str, float]:
    """Python numbers summed over every rank (a float64 all-reduce)."""
    keys = sorted(values)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    total = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return dict(zip(keys, total.tolist(), strict=True))


def sum_routing_across_ranks(accumulators: dict[str, RoutingStatsAccumulator]) -> dict[str, RoutingStatsAccumulator]:
    """Per-layer routing statistics summed over every rank (layers seen on any rank are kept)."""
    local = {name: _stats_dict(acc.total) for name, acc in accumulators.items() if acc.total is not None}
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    out: dict[str, RoutingStatsAccumulator] = {}
    for part in gathered:
        for name, values in part.items():
            out.setdefault(name, RoutingStatsAccumulator()).update(RoutingStats(**values))
    return out


def sum_meter_across_ranks(meter: Any) -> None:
    """Add every rank's :class:`~visionmoe.train.metrics.ClassificationMeter` sums into ``meter``, in place."""
    scalars = sum_across_ranks({"samples": meter.samples, "correct1": meter.correct1, "correct5": meter.correct5})
    meter.samples, meter.correct1, meter.correct5 = (int(scalars[k]) for k in ("samples", "correct1", "correct5"))
    meter.nll_sum = sum_across_ranks({"nll": meter.nll_sum})["nll"]
    for name in ("class_total", "class_correct", "bin_count", "bin_correct", "bin_confidence"):
        tensor = getattr(meter, name)
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, tensor)
        setattr(meter, name, torch.stack(gathered).sum(0))


def _stats_dict(stats: RoutingStats) -> dict[str, Tensor]:
    return {name: value.detach().cpu() for name, value in vars(stats).items()}
