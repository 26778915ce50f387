"""Batches from an in-memory split: shuffling and augmentation determined by (seed, epoch, step).

Every random draw of an epoch comes from generators seeded with the seed, the epoch and the step, so
the batch at any position is a pure function of that position: a run resumed at (epoch, step) sees
exactly the batches an uninterrupted run would, without saving any RNG state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from visionmoe.data.augment import normalize
from visionmoe.data.datasets import ImageTensors
from visionmoe.seeding import loader_seed

Augment = Callable[[Tensor, torch.Generator], Tensor]  # uint8 batch, generator -> uint8 batch


class TensorLoader:
    """Iterate (images, labels) batches of an :class:`ImageTensors` split.

    Args:
        data: the split, uint8 images in memory.
        batch_size: images per batch.
        shuffle: a new permutation each epoch (from seed and epoch).
        drop_last: drop the last incomplete batch (training) or keep it (evaluation).
        augment: ``augment(uint8_batch, generator)``, e.g. ``random_crop_flip`` with its generator.
        mean, std: per-channel normalisation after augmentation.
        seed: the base of every generator.
        channels_last: return channels-last float batches (faster CNNs on the CPU).
    """

    skipped = 0  # unreadable images dropped from batches (a streamed loader's data.skip_corrupt); none here

    def __init__(
        self,
        data: ImageTensors,
        batch_size: int,
        *,
        shuffle: bool = True,
        drop_last: bool = True,
        augment: Augment | None = None,
        mean: tuple[float, ...] = (0.5, 0.5, 0.5),
        std: tuple[float, ...] = (0.5, 0.5, 0.5),
        seed: int = 0,
        channels_last: bool = False,
    ) -> None:
        if not (isinstance(batch_size, int) and batch_size >= 1):
            raise ValueError(f"batch_size must be an int >= 1, got batch_size={batch_size!r}")
        self.data, self.batch_size, self.shuffle, self.drop_last = data, batch_size, shuffle, drop_last
        self.augment, self.mean, self.std, self.seed = augment, mean, std, seed
        self.channels_last = channels_last
        self.epoch, self.step = 0, 0  # the next batch to produce

    def __len__(self) -> int:
        n = len(self.data)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _generator(self, *key: int) -> torch.Generator:
        # A distinct, reproducible stream per (seed, epoch[, step]): the rule is visionmoe.seeding's.
        return torch.Generator().manual_seed(loader_seed(self.seed, *key))

    def order(self, epoch: int) -> Tensor:
        """The sample order of ``epoch``."""
        n = len(self.data)
        return torch.randperm(n, generator=self._generator(epoch)) if self.shuffle else torch.arange(n)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        if self.step >= len(self):  # an epoch whose last batch was taken but whose iterator was left early
            self.epoch, self.step = self.epoch + 1, 0
        order = self.order(self.epoch)
        while self.step < len(self):
            index = order[self.step * self.batch_size : (self.step + 1) * self.batch_size]
            images = self.data.images[index]
            if self.augment is not None:
                images = self.augment(images, self._generator(self.epoch, self.step + 1))
            x = normalize(images, self.mean, self.std, channels_last=self.channels_last)
            self.step += 1
            yield x, self.data.labels[index]
        self.epoch, self.step = self.epoch + 1, 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"loader state is for seed {state['seed']}, this loader has seed {self.seed}")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
