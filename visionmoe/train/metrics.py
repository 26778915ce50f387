"""Metrics accumulated over batches: test metrics (:class:`ClassificationMeter`) and a training epoch's
running sums (:class:`EpochSums`).

Both keep sums only (no per-sample lists), so a whole test set costs O(classes + bins) memory, two
evaluation passes over the same data give identical numbers, and sums from several processes add up.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import torch
from torch import Tensor

from visionmoe.layers.stats import RoutingStats, RoutingStatsAccumulator


class ClassificationMeter:
    """Accumulate logits/labels batch by batch; :meth:`compute` returns the metrics.

    Metrics: ``top1`` and ``top5`` accuracy (top-k with k = min(5, classes)), ``nll`` (mean negative
    log-likelihood of the softmax), ``ece`` (expected calibration error with ``bins`` equal-width
    confidence bins, Guo et al. 2017: Σ_b |B_b|/N · |acc(B_b) − conf(B_b)|), ``per_class_accuracy``
    (a list, NaN for a class with no samples) and ``samples``.
    """

    def __init__(self, num_classes: int, bins: int = 15) -> None:
        if num_classes < 1 or bins < 1:
            raise ValueError(f"need num_classes >= 1 and bins >= 1, got num_classes={num_classes}, bins={bins}")
        self.num_classes, self.bins = num_classes, bins
        self.reset()

    def reset(self) -> None:
        self.samples = 0
        self.correct1 = 0
        self.correct5 = 0
        self.nll_sum = 0.0
        self.class_total = torch.zeros(self.num_classes, dtype=torch.long)
        self.class_correct = torch.zeros(self.num_classes, dtype=torch.long)
        self.bin_count = torch.zeros(self.bins, dtype=torch.long)
        self.bin_correct = torch.zeros(self.bins, dtype=torch.float64)
        self.bin_confidence = torch.zeros(self.bins, dtype=torch.float64)

    @torch.no_grad()
    def update(self, logits: Tensor, labels: Tensor) -> None:
        """logits: (B, classes); labels: (B,) class indices."""
        if logits.dim() != 2 or logits.shape[1] != self.num_classes or labels.shape != logits.shape[:1]:
            raise ValueError(
                f"expected logits (B, {self.num_classes}) and labels (B,), got {tuple(logits.shape)} "
                f"and {tuple(labels.shape)}"
            )
        logits, labels = logits.detach().float().cpu(), labels.detach().cpu()
        log_probs = logits.log_softmax(dim=1)  # (B, classes)
        self.nll_sum += float(-log_probs.gather(1, labels[:, None]).sum())
        k = min(5, self.num_classes)
        top = logits.topk(k, dim=1).indices  # (B, k)
        hit = top == labels[:, None]  # (B, k)
        correct = hit[:, 0]
        self.correct1 += int(correct.sum())
        self.correct5 += int(hit.any(dim=1).sum())
        self.samples += labels.shape[0]
        self.class_total += torch.bincount(labels, minlength=self.num_classes)
        self.class_correct += torch.bincount(labels[correct], minlength=self.num_classes)
        confidence = log_probs.exp().max(dim=1).values.double()  # (B,)
        index = (confidence * self.bins).long().clamp_(max=self.bins - 1)  # bin b holds (b/bins, (b+1)/bins]
        self.bin_count += torch.bincount(index, minlength=self.bins)
        self.bin_correct.index_add_(0, index, correct.double())
        self.bin_confidence.index_add_(0, index, confidence)

    def compute(self) -> dict[str, float | int | list[float]]:
        if self.samples == 0:
            raise RuntimeError("ClassificationMeter.compute() called before any update()")
        n = self.samples
        ece = float((self.bin_correct - self.bin_confidence).abs().sum() / n)
        per_class = (self.class_correct.double() / self.class_total.double()).tolist()  # NaN where empty
        return {
            "top1": self.correct1 / n,
            "top5": self.correct5 / n,
            "nll": self.nll_sum / n,
            "ece": ece,
            "per_class_accuracy": per_class,
            "samples": n,
        }


DEVICE_SUMS = ("loss", "aux", "correct")  # running sums kept on the device (see EpochSums)


class EpochSums:
    """The partial epoch's running sums of training: loss, aux loss, correct, images, time, routing.

    loss·n, aux·n and correct stay on ``device`` (float64, summed in step order exactly as Python floats
    would be) so a step needs no host sync; they are read at log points and epoch ends (:meth:`host`).
    The first step whose loss was not finite is remembered on the device too (-1: none) and raised
    there, so no checkpoint ever holds the bad step. They are saved with the checkpoint, so a resumed
    epoch reports what an uninterrupted one would.
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.reset()

    def reset(self) -> None:
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        self.values: dict[str, Any] = {"seen": 0, "seconds": 0.0, "data_seconds": 0.0}
        self.values.update({key: zero.clone() for key in DEVICE_SUMS})
        self.routing: dict[str, RoutingStatsAccumulator] = {}
        self.nonfinite_step = torch.full((), -1, dtype=torch.long, device=self.device)

    def add_step(self, task: Tensor, aux: Tensor, logits: Tensor, labels: Tensor, routing: dict[str, Any]) -> None:
        """One step's (B,) batch: its mean task and aux losses, (B, classes) logits and per-layer routing stats."""
        n = labels.shape[0]
        self.values["loss"] += task.detach().double() * n
        self.values["aux"] += aux.detach().double() * n
        self.values["correct"] += (logits.detach().argmax(dim=-1) == labels).sum().double()
        self.values["seen"] += n
        for name, stats in routing.items():
            self.routing.setdefault(name, RoutingStatsAccumulator()).update(stats)

    def add_time(self, seconds: float, data_seconds: float) -> None:
        """A step's training time, of which ``data_seconds`` building its batch."""
        self.values["seconds"] += seconds
        self.values["data_seconds"] += data_seconds

    def mark_nonfinite(self, finite: Tensor, step: int) -> None:
        """Remember ``step`` if its loss was not ``finite`` and no earlier one was (no host sync)."""
        first = (self.nonfinite_step < 0) & ~finite
        self.nonfinite_step = torch.where(first, step, self.nonfinite_step)

    def check_finite(self) -> None:
        step = int(self.nonfinite_step)
        if step >= 0:
            raise FloatingPointError(
                f"loss not finite at step {step}; lower optim.lr or set optim.grad_clip "
                "(checked at log points and before each checkpoint, so no checkpoint holds the bad step)"
            )

    def host(self) -> dict[str, float]:
        """The running sums as Python numbers (a host sync on an accelerator), after the finite check."""
        self.check_finite()
        return {key: float(value) if key in DEVICE_SUMS else value for key, value in self.values.items()}

    def set(self, values: dict[str, float], routing: dict[str, RoutingStatsAccumulator]) -> None:
        """Replace the sums (a checkpoint's, or totals over ranks) and the routing accumulators."""
        for key, value in values.items():
            on_device = key in DEVICE_SUMS
            self.values[key] = torch.tensor(value, dtype=torch.float64, device=self.device) if on_device else value
        self.routing = routing

    def state_dict(self) -> dict[str, Any]:
        return {
            "sums": self.host(),
            "routing": {name: _stats_to_dict(acc.total) for name, acc in self.routing.items() if acc.total},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reset()
        routing = {}
        for name, values in state["routing"].items():
            acc = RoutingStatsAccumulator()
            acc.update(RoutingStats(**values))
            routing[name] = acc
        self.set(state["sums"], routing)


def _stats_to_dict(stats: RoutingStats) -> dict[str, Tensor]:
    return {f.name: getattr(stats, f.name) for f in fields(stats)}
