"""Classification metrics accumulated over batches: top-1/top-5, NLL, calibration error, per class.

The accumulator keeps sums only (no per-sample lists), so a whole test set costs O(classes + bins)
memory, and two evaluation passes over the same data give identical numbers.
"""

from __future__ import annotations

import torch
from torch import Tensor


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
