"""Evaluation: test metrics of a model over one full pass of a loader, and at several batch sizes.

Shared by the trainer (each ``eval_every`` epochs and at the end) and by ``visionmoe eval`` on a saved
run (:func:`visionmoe.train.runs.evaluate_checkpoint`), so a run's logged test metrics and a later
evaluation of its checkpoint are computed by the same code.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from visionmoe.data import TensorLoader
from visionmoe.layers.moe import collect_routing_stats
from visionmoe.layers.stats import RoutingStatsAccumulator
from visionmoe.train.config import DataConfig
from visionmoe.train.data import Splits, eval_loader
from visionmoe.train.metrics import ClassificationMeter


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: TensorLoader,
    num_classes: int,
    *,
    device: torch.device | str = "cpu",
    tta_flip: bool = False,
    bins: int = 15,
    autocast: Callable[[], Any] | None = None,
    reduce: Callable[[ClassificationMeter, dict], dict] | None = None,
) -> dict[str, Any]:
    """Top-1/top-5, NLL, calibration error, per-class accuracy and per-layer routing statistics.

    Routing statistics are those of the plain (unflipped) forward passes. The model is left in eval
    mode; the loader runs one full pass. A batch may hold more inputs than labels (a rank's stand-in
    row, :class:`visionmoe.distributed.ShardedLoader`): only the first ``len(labels)`` rows are scored.
    ``reduce(meter, routing)`` sums both across processes before the metrics are computed.
    """
    model.eval()
    meter = ClassificationMeter(num_classes, bins)
    routing: dict[str, RoutingStatsAccumulator] = {}
    loader.step = 0
    last = None  # the previous batch's first image (a view): the shape of a stand-in
    for x, y in loader:
        if x.numel() == 0:
            # a rank's piece whose every image was unreadable (data.skip_corrupt): nothing to score, but under
            # torchrun the ranks forward together (expert-parallel and FSDP layers exchange rows in forward),
            # so a blank image of the last batch's shape stands in, unscored (before any batch: skipped)
            if last is None:
                continue
            x = torch.zeros_like(last)
        else:
            last = x[:1]
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast() if autocast is not None else nullcontext():
            logits = model(x).float()[: len(y)]  # (B, classes)
            for name, stats in collect_routing_stats(model).items() if len(y) else ():
                routing.setdefault(name, RoutingStatsAccumulator()).update(stats)
            if tta_flip:
                logits = (logits + model(x.flip(-1)).float()[: len(y)]) / 2
        meter.update(logits, y)
    if reduce is not None:
        routing = reduce(meter, routing)
    result: dict[str, Any] = meter.compute()
    result["routing"] = {name: acc.compute().as_dict() for name, acc in routing.items()}
    return result


def evaluate_batch_sizes(
    model: nn.Module,
    data: DataConfig,
    splits: Splits,
    batch_sizes: Sequence[int],
    *,
    seed: int,
    channels_last: bool,
    device: torch.device | str = "cpu",
    tta_flip: bool = False,
    bins: int = 15,
    autocast: Callable[[], Any] | None = None,
) -> dict[str, dict[str, float]]:
    """Test metrics with the test set in fixed, unshuffled batches of each size in ``batch_sizes``.

    Same images, order and flip TTA as :func:`evaluate`; only the batch size changes, so a model
    whose samples never meet (per-sample routing, BatchNorm in eval mode) scores the same at every
    size up to float rounding, and one whose routing mixes the batch may not.
    """
    results = {}
    for size in batch_sizes:
        loader = eval_loader(data, splits, splits.test, size, seed, channels_last)
        metrics = evaluate(
            model, loader, splits.num_classes, device=device, tta_flip=tta_flip, bins=bins, autocast=autocast
        )
        results[str(size)] = {k: metrics[k] for k in ("top1", "top5", "nll", "ece") if k in metrics}
    return results
