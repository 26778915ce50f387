"""A streaming input pipeline: image files read and decoded lazily, in worker processes, per batch.

For splits too large to hold decoded (ImageNet-1K at 224 px: ~190 GB of uint8 pixels). The split is
a list of files (:class:`ImageFiles`: an ImageFolder, Tiny-ImageNet's official layout, or tar shards
in the WebDataset layout); a :class:`StreamLoader` reads, decodes and augments only the images of the
batches in flight, so memory is bounded by ``workers × prefetch`` batches, not by the split.

Guarantees, as the in-memory :class:`~visionmoe.data.TensorLoader`:
- the order of epoch e is the same permutation of (seed, e); a batch's images get augmentations
  seeded by (seed, epoch, image index), never by a worker's RNG, so batches are a function of
  (seed, epoch, step) and bit-identical for any number of workers;
- a resumed loader starts at its saved (epoch, step) and yields the batches an uninterrupted one would;
- ``rows`` (under torchrun): a rank reads and decodes only its own rows of each global batch.

The pieces are the field's: PIL decodes (libjpeg-turbo, as fast as ``torchvision.io.decode_jpeg`` on
the CPU here); timm's ``RandomResizedCropAndInterpolation`` and eval ``create_transform`` (resize +
centre crop); torchvision's ``RandAugment`` (the same op as the in-memory path; timm's rand-augment
asks Pillow >= 13 to posterize to 0 bits, which it refuses); tar shards written by ``webdataset``.
BENCHMARKS.md, section "Data", compares the candidates behind these choices.
"""

from __future__ import annotations

import io
import os
import random
import tarfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.data import create_transform
from timm.data.transforms import MaybePILToTensor, RandomResizedCropAndInterpolation
from torch import Tensor

from visionmoe.data.augment import normalize
from visionmoe.data.datasets import IMAGE_SUFFIXES
from visionmoe.data.loader import TensorLoader

Transform = Callable[[Any], Tensor]  # PIL image -> (3, S, S) uint8
SHARD_CLASSES = "classes.txt"  # next to the shards: one class name per line, in label order


@dataclass(frozen=True)
class ImageFiles:
    """A split as files, decoded only when read: ``paths`` (N,) of files or of tar shards, labels (N,).

    For tar shards, ``offsets`` and ``sizes`` (N,) locate each image's bytes inside its shard. Paths
    are one numpy bytes array, not N Python objects: forked workers share it without copying it.
    """

    paths: np.ndarray  # (N,) bytes: the file, or the shard holding the image
    labels: Tensor  # (N,) int64
    classes: list[str]
    offsets: np.ndarray | None = None  # (N,) int64, tar shards only
    sizes: np.ndarray | None = None
    keys: np.ndarray | None = None  # (N,) bytes: the sample's key in its shard (for error messages)

    def __len__(self) -> int:
        return len(self.labels)

    @classmethod
    def from_files(cls, files: list[Path], labels: list[int], classes: list[str]) -> ImageFiles:
        if not files:
            raise FileNotFoundError(f"no images found for classes {classes[:3]}...")
        return cls(np.array([os.fsencode(f) for f in files]), torch.tensor(labels, dtype=torch.long), classes)

    def name(self, i: int) -> str:
        path = os.fsdecode(self.paths[i])
        return path if self.keys is None else f"{path}:{self.keys[i].decode()}"

    def read(self, i: int) -> bytes:
        path = os.fsdecode(self.paths[i])
        if self.offsets is None:
            with open(path, "rb") as f:
                return f.read()
        with open(path, "rb") as f:  # one image of a shard: a seek and a read
            f.seek(int(self.offsets[i]))
            return f.read(int(self.sizes[i]))

    def subset(self, index: Tensor) -> ImageFiles:
        i = index.numpy()
        pick = lambda a: None if a is None else a[i]  # noqa: E731
        return ImageFiles(
            self.paths[i], self.labels[index], self.classes, pick(self.offsets), pick(self.sizes), pick(self.keys)
        )


# ---- tar shards in the WebDataset layout --------------------------------------------------------


def check_shard_target(out: str | os.PathLike, shard_size: int) -> Path:
    """``out`` as a Path if :func:`write_shards` may write ``shard_size``-image shards there, else ValueError:
    ``shard_size`` < 1, ``out`` a file, or ``out`` already holding ``*.tar`` (refused, never deleted)."""
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size={shard_size!r}: expected an integer >= 1 (images per shard)")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file; expected a folder for the shards")
    held = sorted(out.glob("*.tar")) if out.is_dir() else []
    if held:
        raise ValueError(
            f"{out} already holds {len(held)} tar shard{'s' if len(held) > 1 else ''} ({held[0].name}, ...), "
            "which would be read as samples too; pick an empty folder or remove them first"
        )
    return out


def write_shards(files: ImageFiles, out: str | os.PathLike, shard_size: int = 1000) -> list[Path]:
    """Write ``files`` as tar shards ``<out>/shard-NNNNNN.tar`` in the WebDataset layout, in order.

    Each sample is ``<key>.<ext>`` (the image file's bytes, unchanged) and ``<key>.cls`` (its label);
    ``<out>/classes.txt`` names the labels. Needs ``webdataset`` (``pip install visionmoe[stream]``).

    ``out`` must hold no ``*.tar`` yet: :func:`list_shards` reads every one there, so shards left by an
    earlier run would be read as samples too; they are refused, never deleted.
    """
    out = check_shard_target(out, shard_size)
    try:
        import webdataset as wds
    except ImportError:
        raise ImportError("writing tar shards needs webdataset: pip install 'visionmoe[stream]'") from None
    if files.offsets is not None:
        raise ValueError("these images are already in tar shards")
    out.mkdir(parents=True, exist_ok=True)
    (out / SHARD_CLASSES).write_text("\n".join(files.classes) + "\n")
    with wds.ShardWriter(str(out / "shard-%06d.tar"), maxcount=shard_size, verbose=0) as sink:
        for i in range(len(files)):
            ext = Path(os.fsdecode(files.paths[i])).suffix.lower().lstrip(".") or "jpg"
            sink.write({"__key__": f"{i:09d}", ext: files.read(i), "cls": int(files.labels[i])})
    return sorted(out.glob("shard-*.tar"))


def list_shards(folder: str | os.PathLike) -> ImageFiles:
    """The samples of ``<folder>/*.tar`` (sorted by name; WebDataset layout) with ``classes.txt``.

    Reads only the tar headers, to find where each image's bytes lie; images are then read one by
    one at random, so the order and augmentation guarantees of the module docstring hold for shards.
    """
    folder = Path(folder).expanduser()
    layout = f"tar shards in the WebDataset layout (<key>.jpg + <key>.cls) with {SHARD_CLASSES}"
    names = folder / SHARD_CLASSES
    shards = sorted(folder.glob("*.tar"))
    if not names.is_file() or not shards:
        raise FileNotFoundError(f"{folder} has no {SHARD_CLASSES} or no *.tar; expected {layout}")
    classes = names.read_text().split("\n")[:-1]
    paths, offsets, sizes, keys, labels = [], [], [], [], []
    for shard in shards:
        images, cls = {}, {}
        try:
            with tarfile.open(shard) as tar:
                for m in tar:
                    key, _, ext = m.name.partition(".")
                    if ("." + ext) in IMAGE_SUFFIXES:
                        images[key] = (m.offset_data, m.size)
                    elif ext == "cls":
                        cls[key] = int(tar.extractfile(m).read())
        except (tarfile.TarError, ValueError) as e:
            raise ValueError(f"{shard} is not a valid shard ({type(e).__name__}: {e}); expected {layout}") from None
        for key, (offset, size) in images.items():
            if key not in cls:
                raise ValueError(f"{shard}: sample {key} has no .cls label; expected {layout}")
            if not 0 <= cls[key] < len(classes):
                raise ValueError(f"{shard}: sample {key} has label {cls[key]}, expected 0..{len(classes) - 1}")
            paths.append(os.fsencode(shard))
            offsets.append(offset)
            sizes.append(size)
            keys.append(key.encode())
            labels.append(cls[key])
    return ImageFiles(
        np.array(paths),
        torch.tensor(labels, dtype=torch.long),
        classes,
        np.array(offsets),
        np.array(sizes),
        np.array(keys),
    )


# ---- transforms ---------------------------------------------------------------------------------


def train_transform(
    size: int, *, scale: tuple[float, float] = (0.08, 1.0), flip: bool = True, randaugment: int | None = None
) -> Transform:
    """The ImageNet recipes' per-image augmentation: random-resized crop (bicubic), flip, RandAugment
    (2 ops of magnitude ``randaugment``); returns (3, size, size) uint8."""
    from torchvision.transforms import v2  # lazy: the only import here that import visionmoe has not paid for

    steps: list[Any] = [RandomResizedCropAndInterpolation(size, scale=scale, interpolation="bicubic")]
    if flip:
        steps.append(v2.RandomHorizontalFlip())
    if randaugment is not None:
        steps.append(v2.RandAugment(num_ops=2, magnitude=randaugment))
    steps.append(MaybePILToTensor())
    return v2.Compose(steps)


def eval_transform(size: int, crop_pct: float = 0.875) -> Transform:
    """timm's evaluation transform: resize the short side to size / crop_pct (bicubic), centre-crop size."""
    return create_transform(size, is_training=False, crop_pct=crop_pct, interpolation="bicubic", use_prefetcher=True)


@contextmanager
def _seeded(seed: int):
    """Python's, numpy's and torch's (CPU) global RNGs seeded with ``seed``, and restored afterwards
    (the transforms draw from all three; the caller's streams — the training RNG — stay untouched).
    The CPU generator is set directly: ``torch.manual_seed`` also seeds every accelerator, per image."""
    state = random.getstate(), np.random.get_state(), torch.default_generator.get_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])
        torch.default_generator.set_state(state[2])


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of image ``index``'s augmentation in ``epoch``: a hash of the three (numpy SeedSequence)."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint64)[0] >> np.uint64(1))


class _Decode(torch.utils.data.Dataset):
    """(index, epoch, labelled) -> (uint8 image, label or -1, error), augmented under the RNGs seeded
    by (seed, epoch, index). Errors are returned, not raised, so the main process reports them in one
    line (or skips them), whichever process decoded."""

    def __init__(self, files: ImageFiles, transform: Transform, seed: int) -> None:
        self.files, self.transform, self.seed = files, transform, seed

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: tuple[int, int, bool]) -> tuple[Tensor | None, int, str | None]:
        from PIL import Image, UnidentifiedImageError

        index, epoch, labelled = key
        label = int(self.files.labels[index]) if labelled else -1
        try:
            with Image.open(io.BytesIO(self.files.read(index))) as image:
                image = image.convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError) as e:
            return None, label, f"cannot decode image {self.files.name(index)} ({type(e).__name__}: {e})"
        with _seeded(sample_seed(self.seed, epoch, index)):
            return self.transform(image), label, None


def _collate(items: list[tuple[Tensor | None, int, str | None]]) -> list[tuple[Tensor | None, int, str | None]]:
    return items


class _Batches:
    """The batch sampler: (index, epoch, labelled) of this process's rows of steps start, ... of ``epoch``."""

    def __init__(self, loader: StreamLoader, epoch: int, start: int) -> None:
        self.loader, self.epoch, self.start = loader, epoch, start
        self.order = loader.order(epoch)

    def __len__(self) -> int:
        return len(self.loader) - self.start

    def __iter__(self) -> Iterator[list[tuple[int, int, bool]]]:
        B, rows = self.loader.batch_size, self.loader.rows
        for step in range(self.start, len(self.loader)):
            index = self.order[step * B : (step + 1) * B]
            if rows is not None:
                index = index[rows(len(index))]
            if len(index) == 0:  # an empty piece of an evaluation batch: image 0, unlabelled, stands in
                yield [(0, self.epoch, False)]
            else:
                yield [(i, self.epoch, True) for i in index.tolist()]


def first_images(files: ImageFiles, n: int, transform: Transform) -> Tensor:
    """The first ``n`` readable images of ``files`` (file order) through ``transform``: (n, 3, S, S) uint8.

    For example batches (shapes, FLOPs, data-dependent init): an unreadable image is passed over here
    and reported (or skipped) by the loader that reaches it in training."""
    dataset = _Decode(files, transform, seed=0)
    out, errors = [], []
    for i in range(len(files)):
        image, _, error = dataset[(i, 0, True)]
        if error is None:
            out.append(image)
        else:
            errors.append(error)
        if len(out) == n:
            break
    if not out:
        raise ValueError(errors[0] if errors else "no images to decode")
    return torch.stack(out)


class StreamLoader(TensorLoader):
    """Batches of an :class:`ImageFiles` split, decoded and augmented per image in ``workers`` processes.

    Same interface, length, order and ``state_dict`` as :class:`~visionmoe.data.TensorLoader`.

    Args:
        files: the split.
        batch_size, shuffle, drop_last, mean, std, seed, channels_last: as TensorLoader.
        transform: PIL image -> (3, S, S) uint8 (:func:`train_transform`, :func:`eval_transform`);
            it runs under RNGs seeded by (seed, epoch, image index).
        workers: decoding processes (0: in this process). prefetch: batches each worker keeps ready.
        skip_corrupt: drop an image that cannot be decoded from its batch and count it in
            ``skipped`` (with a warning naming it), instead of stopping with a one-line error.
        rows: ``rows(n)``: the rows of a batch of n that this process keeps (under torchrun); an
            empty piece of an evaluation batch gets one unlabelled stand-in row.
    """

    def __init__(
        self,
        files: ImageFiles,
        batch_size: int,
        transform: Transform,
        *,
        shuffle: bool = True,
        drop_last: bool = True,
        mean: tuple[float, ...] = (0.5, 0.5, 0.5),
        std: tuple[float, ...] = (0.5, 0.5, 0.5),
        seed: int = 0,
        channels_last: bool = False,
        workers: int = 0,
        prefetch: int = 2,
        skip_corrupt: bool = False,
        rows: Callable[[int], Tensor] | None = None,
    ) -> None:
        super().__init__(
            files, batch_size, shuffle=shuffle, drop_last=drop_last, mean=mean, std=std, seed=seed,
            channels_last=channels_last,
        )  # fmt: skip
        if workers < 0 or prefetch < 1:
            raise ValueError(f"need workers >= 0 and prefetch >= 1, got workers={workers}, prefetch={prefetch}")
        self.transform, self.workers, self.prefetch = transform, workers, prefetch
        self.skip_corrupt, self.rows, self.skipped = skip_corrupt, rows, 0

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        if self.step >= len(self):
            self.epoch, self.step = self.epoch + 1, 0
        epoch = self.epoch
        loader = torch.utils.data.DataLoader(
            _Decode(self.data, self.transform, self.seed),
            batch_sampler=_Batches(self, epoch, self.step),
            num_workers=self.workers,
            collate_fn=_collate,
            prefetch_factor=self.prefetch if self.workers else None,
            generator=torch.Generator().manual_seed(self.seed),  # not the global RNG: training's stream stays
        )
        for items in loader:
            self.step += 1
            images, labels = [], []
            for image, label, error in items:
                if error is not None and not self.skip_corrupt:
                    raise ValueError(f"{error}; set data.skip_corrupt=true to skip unreadable images and count them")
                if error is not None:
                    self.skipped += 1
                    warnings.warn(f"skipped {error} ({self.skipped} so far)", stacklevel=2)
                    continue
                images.append(image)
                if label >= 0:
                    labels.append(label)
            if not images:  # every image of this batch (or of this rank's piece of it) was unreadable
                if self.rows is not None:  # under torchrun: an empty batch, so the ranks still count the same steps
                    yield torch.empty(0), torch.empty(0, dtype=torch.long)
                continue
            x = normalize(torch.stack(images), self.mean, self.std, channels_last=self.channels_last)
            yield x, torch.tensor(labels, dtype=torch.long)
        self.epoch, self.step = epoch + 1, 0
