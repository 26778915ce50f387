"""From a :class:`DataConfig` to loaders: the splits, their normalisation, the augmentation, mixup.

Every random draw is a function of (seed, epoch, step): the loader seeds crop/flip and RandAugment
per batch, and :class:`BatchMixer` seeds mixup/cutmix per step, so a resumed run sees exactly the
batches of an uninterrupted one.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup
from torch import Tensor

from visionmoe.data import ImageTensors, TensorLoader, load_cifar, load_image_folder, load_tiny_imagenet, normalize
from visionmoe.data.augment import random_crop_flip
from visionmoe.data.datasets import list_image_folder, list_tiny_imagenet
from visionmoe.data.stream import (
    ImageFiles,
    StreamLoader,
    Transform,
    eval_transform,
    first_images,
    list_shards,
    train_transform,
)
from visionmoe.train.config import DataConfig


@dataclass
class Splits:
    """The training and test splits: in memory (:class:`ImageTensors`) or as files to stream
    (:class:`ImageFiles`, with the ``eval_transform`` that sizes them)."""

    train: ImageTensors | ImageFiles
    test: ImageTensors | ImageFiles
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    eval_transform: Transform | None = None  # stream only

    @property
    def streamed(self) -> bool:
        return isinstance(self.train, ImageFiles)

    def first_images(self, n: int) -> Tensor:
        """The first ``n`` training images, unaugmented: (n, 3, H, W) uint8 (decoded here when streamed)."""
        if isinstance(self.train, ImageTensors):
            return self.train.images[:n]
        return first_images(self.train, n, self.eval_transform)

    def first_batch(self, n: int) -> Tensor:
        """The first ``n`` training images normalised as the loaders do, unaugmented: (n, 3, H, W) float.

        The batch a model is built, initialised from data (``init_from_data``) and profiled on.
        """
        return normalize(self.first_images(n), tuple(self.mean), tuple(self.std))


def load_splits(cfg: DataConfig) -> Splits:
    """The training and test splits of ``cfg.dataset``, subset as asked: in memory, with the training
    set's per-channel mean and std (computed from its uint8 pixels), or as files to stream
    (``cfg.loader``), normalised with ImageNet's mean and std."""
    files = _list_files(cfg)
    if files is not None and _streams(cfg, files[0]):
        train, test = files
        if cfg.image_size is None:
            raise ValueError(f"data.loader=stream needs data.image_size (the crop size), got {cfg.image_size}")
        train, test = _subset(train, cfg.train_subset), _subset(test, cfg.test_subset)
        num_classes = _num_classes(cfg, train)
        transform = eval_transform(cfg.image_size, cfg.crop_pct)
        return Splits(train, test, num_classes, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, transform)
    if cfg.dataset in ("cifar10", "cifar100"):
        train = load_cifar(cfg.dataset, "train", cfg.data_dir, download=cfg.download)
        test = load_cifar(cfg.dataset, "test", cfg.data_dir, download=cfg.download)
    elif cfg.dataset == "tiny-imagenet":
        train = load_tiny_imagenet("train", cfg.data_dir, image_size=cfg.image_size)
        test = load_tiny_imagenet("test", cfg.data_dir, image_size=cfg.image_size)
    elif cfg.dataset == "imagefolder":
        root = _folder_root(cfg)
        train = load_image_folder(root / cfg.train_split, image_size=cfg.image_size)
        test = load_image_folder(root / cfg.test_split, image_size=cfg.image_size)
        _check_same_classes(root, cfg, train.classes, test.classes)
    else:  # validated before
        raise ValueError(f"unknown dataset {cfg.dataset!r}")
    train, test = _subset(train, cfg.train_subset), _subset(test, cfg.test_subset)
    num_classes = _num_classes(cfg, train)
    mean, std = channel_stats(train.images)
    return Splits(train, test, num_classes, mean, std)


def class_difference(expected: list[str], found: list[str], where: str = "the data") -> str:
    """``expected`` vs ``found`` class names in one line: which are missing from ``where``, which are extra."""

    def few(names: list[str]) -> str:
        return repr(names[:5])[:-1] + (f", ... ({len(names)} in all)]" if len(names) > 5 else "]")

    missing = [c for c in expected if c not in set(found)]
    extra = [c for c in found if c not in set(expected)]
    parts = [f"missing from {where} {few(missing)}"] if missing else []
    parts += [f"extra in {where} {few(extra)}"] if extra else []
    if not parts:  # the same names, so another order: labels would be permuted
        first = next(i for i, (a, b) in enumerate(zip(expected, found, strict=True)) if a != b)
        parts = [f"the same names in another order (label {first} is {found[first]!r}, not {expected[first]!r})"]
    return f"{len(expected)} vs {len(found)} classes, " + "; ".join(parts)


def _folder_root(cfg: DataConfig) -> Path:
    if cfg.data_dir is None:
        raise ValueError(f"data.dataset={cfg.dataset!r} needs data.data_dir=<folder holding the split folders>")
    return Path(cfg.data_dir).expanduser()


def _check_same_classes(root: Path, cfg: DataConfig, train: list[str], test: list[str]) -> None:
    if train != test:
        raise ValueError(
            f"{root / cfg.train_split} and {root / cfg.test_split} have different class folders: "
            + class_difference(train, test, "the second")
        )


def _num_classes(cfg: DataConfig, train: ImageTensors | ImageFiles) -> int:
    num_classes = cfg.num_classes or len(train.classes)
    if int(train.labels.max()) >= num_classes:
        raise ValueError(f"data.num_classes={num_classes} but labels go up to {int(train.labels.max())}")
    return num_classes


def _list_files(cfg: DataConfig) -> tuple[ImageFiles, ImageFiles] | None:
    """The splits as files, for the layouts that can stream (None for CIFAR's pickles)."""
    if cfg.dataset in ("cifar10", "cifar100"):
        if cfg.loader == "stream":
            raise ValueError(f"data.loader=stream reads image files; {cfg.dataset} is pickles, use data.loader=memory")
        return None
    if cfg.dataset == "tiny-imagenet":
        return tuple(ImageFiles.from_files(*list_tiny_imagenet(s, cfg.data_dir)) for s in ("train", "test"))
    root = _folder_root(cfg)
    if cfg.dataset == "shards":
        if cfg.loader == "memory":
            raise ValueError("data.dataset=shards streams; use data.loader=stream (or auto)")
        train, test = list_shards(root / cfg.train_split), list_shards(root / cfg.test_split)
    else:
        train = ImageFiles.from_files(*list_image_folder(root / cfg.train_split))
        test = ImageFiles.from_files(*list_image_folder(root / cfg.test_split))
    _check_same_classes(root, cfg, train.classes, test.classes)
    return train, test


def _streams(cfg: DataConfig, train: ImageFiles) -> bool:
    """``cfg.loader``, with ``auto`` resolved: stream shards, and an ImageFolder whose decoded training
    pixels (N × 3 × S², S the image size or the first image's) exceed a quarter of physical memory."""
    if cfg.loader != "auto":
        return cfg.loader == "stream"
    if cfg.dataset == "shards":
        return True
    if cfg.dataset != "imagefolder":
        return False
    size = cfg.image_size
    if size is None:
        from PIL import Image

        with Image.open(io.BytesIO(train.read(0))) as image:
            size = max(image.size)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return len(train) * 3 * size * size > memory / 4


def _subset(data: ImageTensors | ImageFiles, n: int | None) -> ImageTensors | ImageFiles:
    """A fixed random subset of ``n`` images (the same for every seed; in file order), not the first
    ``n``: ImageFolder splits are sorted by class, so their first images are all one class."""
    if n is None or n >= len(data):
        return data
    index = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:n].sort().values
    if isinstance(data, ImageFiles):
        return data.subset(index)
    return ImageTensors(data.images[index], data.labels[index], data.classes)


def channel_stats(images: Tensor, max_images: int = 10_000) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] units, from (at most) the first ``max_images`` images.

    Exact, from each channel's histogram of the 256 uint8 values, counted a chunk of images at a
    time: no float copy of the split (which cost 8 bytes per pixel, and more for the std's temporaries).
    """
    counts = torch.zeros(3, 256, dtype=torch.float64)  # (C, 256): how often each value occurs per channel
    for chunk in images[:max_images].split(256):
        for c in range(3):
            counts[c] += torch.bincount(chunk[:, c].flatten(), minlength=256).double()
    values = torch.arange(256, dtype=torch.float64) / 255.0
    n = counts.sum(dim=1)  # (C,)
    mean = counts @ values / n
    var = (counts @ values**2 - n * mean**2) / (n - 1)  # unbiased, as Tensor.std
    std = var.clamp_min(0).sqrt().clamp_min(1e-3)
    return tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std)


class Augment:
    """Batched random crop (zero padding) and flip, then optionally RandAugment per image.

    RandAugment is torchvision's (2 ops of the given magnitude) on uint8 tensors. Each image gets its
    own seed, drawn from the batch's generator, and its ops are drawn under a forked global RNG seeded
    with it: reproducible, the training RNG untouched, and an image's augmentation does not depend on
    which other images are augmented with it. So a data-parallel rank can augment only its own
    ``rows`` of the global batch and get exactly what one process would (``supports_rows``).
    """

    supports_rows = True

    def __init__(self, padding: int, flip: bool, randaugment: int | None) -> None:
        self.padding, self.flip, self.randaugment = padding, flip, randaugment
        self._rand = None
        if randaugment is not None:
            from torchvision.transforms import v2

            self._rand = v2.RandAugment(num_ops=2, magnitude=randaugment)

    def __call__(
        self, images: Tensor, generator: torch.Generator, *, rows: Tensor | None = None, batch_size: int | None = None
    ) -> Tensor:
        """Augment a batch, or (``rows``, ``batch_size``) only rows ``rows`` of a batch, given as ``images``."""
        if self.padding or self.flip:
            images = random_crop_flip(
                images, self.padding, flip=self.flip, generator=generator, rows=rows, batch_size=batch_size
            )
        if self._rand is not None:
            seeds = torch.randint(0, 2**62, (batch_size or len(images),), generator=generator)
            seeds = seeds if rows is None else seeds[rows]
            out = []
            with torch.random.fork_rng(devices=[]):
                for image, seed in zip(images, seeds.tolist(), strict=True):
                    torch.manual_seed(seed)
                    out.append(self._rand(image))  # per image: its own ops and magnitudes
            images = torch.stack(out)
        return images


class BatchMixer:
    """timm's Mixup/CutMix on a normalised batch, seeded by (seed, step) for exact resume.

    Returns the mixed batch and soft targets (label smoothing folded in, as timm does).
    """

    def __init__(self, mixup_alpha: float, cutmix_alpha: float, label_smoothing: float, num_classes: int) -> None:
        self.mixup = Mixup(
            mixup_alpha=mixup_alpha,
            cutmix_alpha=cutmix_alpha,
            label_smoothing=label_smoothing,
            num_classes=num_classes,
        )

    def __call__(self, x: Tensor, y: Tensor, seed: int) -> tuple[Tensor, Tensor]:
        state = np.random.get_state()
        np.random.seed(seed % 2**32)  # timm draws lambda and the box from numpy's global RNG
        try:
            return self.mixup(x, y)
        finally:
            np.random.set_state(state)


def build_loaders(cfg: DataConfig, splits: Splits, seed: int, channels_last: bool) -> tuple[TensorLoader, TensorLoader]:
    """The training loader (shuffled, augmented) and the test loader, in memory or streamed as ``splits``."""
    if splits.streamed:
        transform = train_transform(
            cfg.image_size, scale=tuple(cfg.crop_scale), flip=cfg.flip, randaugment=cfg.randaugment
        )
        train = StreamLoader(
            splits.train,
            cfg.batch_size,
            transform,
            shuffle=True,
            drop_last=len(splits.train) >= cfg.batch_size,
            mean=splits.mean,
            std=splits.std,
            seed=seed,
            channels_last=channels_last,
            workers=cfg.workers,
            prefetch=cfg.prefetch,
            skip_corrupt=cfg.skip_corrupt,
        )
    else:
        augment = Augment(cfg.crop_padding, cfg.flip, cfg.randaugment)
        train = TensorLoader(
            splits.train,
            cfg.batch_size,
            shuffle=True,
            drop_last=len(splits.train) >= cfg.batch_size,
            augment=augment,
            mean=splits.mean,
            std=splits.std,
            seed=seed,
            channels_last=channels_last,
        )
    return train, eval_loader(cfg, splits, splits.test, cfg.eval_batch_size, seed, channels_last)


def eval_loader(
    cfg: DataConfig, splits: Splits, data: ImageTensors | ImageFiles, batch_size: int, seed: int, channels_last: bool
) -> TensorLoader:
    """One unaugmented pass over ``data`` (a split of ``splits``) in file order, the last batch kept."""
    common = {"shuffle": False, "drop_last": False, "mean": splits.mean, "std": splits.std, "seed": seed}
    if isinstance(data, ImageFiles):
        return StreamLoader(
            data,
            batch_size,
            splits.eval_transform,
            channels_last=channels_last,
            workers=cfg.workers,
            prefetch=cfg.prefetch,
            skip_corrupt=cfg.skip_corrupt,
            **common,
        )
    return TensorLoader(data, batch_size, channels_last=channels_last, **common)
