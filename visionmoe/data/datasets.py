"""Image classification datasets in their official layouts, decoded once into uint8 tensors.

    CIFAR-10      <root>/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}
    CIFAR-100     <root>/cifar-100-python/{train, test, meta}
    Tiny-ImageNet <root>/tiny-imagenet-200/{wnids.txt, train/<wnid>/images/*.JPEG,
                                           val/images/*.JPEG, val/val_annotations.txt}
    ImageFolder   <root>/<split>/<class>/<image>   (ImageNet-1K, the JPEG CIFAR-10 copy, any set)

The data root is ``data_dir`` if given, else ``$VISIONMOE_DATA``, else ``~/.cache/visionmoe/data``.
CIFAR archives are downloaded (and their MD5 checked) with ``download=True`` when a network is
there; otherwise a one-line error says where to put the files. Small images are decoded once and
cached next to the data as a ``.pt`` file of uint8 tensors (loaded with ``weights_only=True``), so
an epoch costs no decoding at all. A cache is used only while every image file is as it was when
the cache was written (same size and mtime_ns, and the same bytes when the whole set is under
:data:`CONTENT_DIGEST_BYTES`); otherwise it is rebuilt, and the log says so. The CIFAR pickles are
read admitting only numpy arrays (:mod:`visionmoe.safeload`): a data folder cannot run code.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from visionmoe.safeload import RefusedPickle, admits_numpy_arrays, restricted_load

log = logging.getLogger(__name__)

DATA_ENV = "VISIONMOE_DATA"
DEFAULT_ROOT = Path("~/.cache/visionmoe/data")
SPLITS = ("train", "test")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
CONTENT_DIGEST_BYTES = 256 << 20  # hash the image bytes into the cache key up to this total (~0.2 s/GB)


@dataclass(frozen=True)
class Archive:
    url: str
    filename: str
    md5: str
    folder: str


CIFAR10 = Archive(
    "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "cifar-10-python.tar.gz",
    "c58f30108f718f92721af3b95e74349a",
    "cifar-10-batches-py",
)
CIFAR100 = Archive(
    "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    "cifar-100-python.tar.gz",
    "eb9058c3a382ffc7106e4002c42a8d85",
    "cifar-100-python",
)


@dataclass(frozen=True)
class ImageTensors:
    """A whole split in memory: images (N, 3, H, W) uint8, labels (N,) int64, class names."""

    images: Tensor
    labels: Tensor
    classes: list[str]

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4 or self.images.shape[1] != 3:
            raise ValueError(f"images must be uint8 (N, 3, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"need one label per image, got {tuple(self.labels.shape)} for {self.images.shape[0]}")


def data_root(data_dir: str | os.PathLike | None = None) -> Path:
    """``data_dir``, else ``$VISIONMOE_DATA``, else ``~/.cache/visionmoe/data``."""
    return Path(data_dir or os.environ.get(DATA_ENV) or DEFAULT_ROOT).expanduser()


def md5sum(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_archive(archive: Archive, root: Path, url: str | None = None) -> Path:
    """Fetch ``archive`` into ``root``, check its MD5 and extract it; returns the extracted folder."""
    root.mkdir(parents=True, exist_ok=True)
    target = root / archive.filename
    if not target.exists() or md5sum(target) != archive.md5:
        partial = target.with_suffix(target.suffix + ".part")
        with urllib.request.urlopen(url or archive.url) as response, open(partial, "wb") as f:
            while chunk := response.read(1 << 20):
                f.write(chunk)
        if (got := md5sum(partial)) != archive.md5:
            partial.unlink()
            raise OSError(f"{archive.filename} from {url or archive.url} has MD5 {got}, expected {archive.md5}")
        partial.replace(target)
    with tarfile.open(target) as tar:
        tar.extractall(root, filter="data")
    return root / archive.folder


def _missing(path: Path, layout: str) -> FileNotFoundError:
    return FileNotFoundError(f"{path} not found; expected the {layout} (or pass download=True when online)")


def _unpickle(path: Path, layout: str) -> dict:
    if not path.is_file():
        raise _missing(path, layout)
    try:
        with open(path, "rb") as f:
            return restricted_load(f, admits_numpy_arrays, source=str(path), what=layout, encoding="bytes")
    except RefusedPickle as e:
        raise ValueError(str(e)) from None
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise ValueError(f"{path} is not a valid {layout} file ({type(e).__name__}: {e})") from None


def load_cifar(name: str, split: str, data_dir=None, *, download: bool = False) -> ImageTensors:
    """CIFAR-10 or CIFAR-100 ("cifar10" / "cifar100") from the official python pickles."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    archive = {"cifar10": CIFAR10, "cifar100": CIFAR100}.get(name)
    if archive is None:
        raise ValueError(f"unknown CIFAR name {name!r}; expected 'cifar10' or 'cifar100'")
    root = data_root(data_dir)
    folder = root / archive.folder
    if not folder.is_dir() and download:
        download_archive(archive, root)
    layout = f"official {archive.folder} layout from {archive.filename}"
    if not folder.is_dir():
        raise _missing(folder, layout)
    if name == "cifar10":
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        meta, label_key, names_key = "batches.meta", b"labels", b"label_names"
    else:
        files, meta, label_key, names_key = [split], "meta", b"fine_labels", b"fine_label_names"
    batches = [_unpickle(folder / f, layout) for f in files]
    try:
        data = torch.cat([torch.as_tensor(b[b"data"], dtype=torch.uint8) for b in batches])
        labels = torch.cat([torch.as_tensor(b[label_key], dtype=torch.long) for b in batches])
        classes = [c.decode() for c in _unpickle(folder / meta, layout)[names_key]]
    except KeyError as e:
        raise ValueError(f"{folder} lacks key {e} of the {layout}") from None
    return ImageTensors(data.reshape(-1, 3, 32, 32).contiguous(), labels, classes)


def _decode(path: Path, size: int | None) -> Tensor:
    """One image as an (H, W, 3) uint8 tensor, resized to ``size`` × ``size`` if given."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            if size is not None and image.size != (size, size):
                image = image.resize((size, size), Image.BILINEAR)
            pixels = bytearray(image.tobytes())  # one image: the only transient copy
            return torch.frombuffer(pixels, dtype=torch.uint8).reshape(image.size[1], image.size[0], 3)
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot decode image {path} ({type(e).__name__}: {e})") from None


def decode_into(files: list[Path], size: int | None, name: str) -> Tensor:
    """Decode ``files`` straight into one preallocated (N, 3, H, W) uint8 tensor.

    The first image fixes (H, W); every image is written into its row as it is decoded, so the peak
    is the split's pixels plus one image (no list of decoded images, no stacked or permuted copy).
    """
    first = _decode(files[0], size)  # (H, W, 3)
    H, W, _ = first.shape
    images = torch.empty(len(files), 3, H, W, dtype=torch.uint8)  # (N, 3, H, W)
    for i, f in enumerate(files):
        image = first if i == 0 else _decode(f, size)
        if image.shape != first.shape:
            raise ValueError(
                f"images of {name} differ in size ({f}: {tuple(image.shape[:2])}, {files[0]}: {(H, W)}); "
                "pass image_size to resize"
            )
        images[i].copy_(image.permute(2, 0, 1))  # HWC -> CHW, into the row
    return images


def shown(path: Path) -> str:
    """``path`` for logs that end up in committed run files: relative to the working directory when
    inside it, else with the home directory written ``~`` (no machine-specific prefix)."""
    path = Path(path).absolute()
    for base, prefix in ((Path.cwd(), ""), (Path.home(), "~/")):
        if path.is_relative_to(base):
            return prefix + str(path.relative_to(base))
    return str(path)


def _decode_all(
    files: list[Path], labels: list[int], classes: list[str], size: int | None, cache: Path
) -> ImageTensors:
    """Decode ``files`` once into a cached uint8 tensor file, named by the file list and ``size``
    and used only while the files are unchanged (:func:`_files_state`)."""
    fingerprint = hashlib.md5("\n".join(str(f) for f in files).encode() + f"|{size}".encode()).hexdigest()[:16]
    name = f"{cache.name}-{fingerprint}.pt"
    state = _files_state(files, labels, classes)
    # Next to the data, or in the user cache when the data folder is read-only (a shared copy).
    candidates = [cache.with_name(name), data_root() / ".visionmoe-cache" / name]
    for cached in candidates:
        if cached.is_file():
            blob = torch.load(cached, weights_only=True)
            if blob.get("state") == state:
                return ImageTensors(blob["images"], blob["labels"], list(blob["classes"]))
            log.warning("rebuilding the decode cache %s: its images changed since it was written", shown(cached))
    if not files:
        raise FileNotFoundError(f"no images found for {cache.name}")
    images = decode_into(files, size, cache.name)  # (N, 3, H, W)
    result = ImageTensors(images, torch.tensor(labels, dtype=torch.long), classes)
    blob = {"images": result.images, "labels": result.labels, "classes": classes, "state": state}
    for cached in candidates:
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_suffix(".tmp")
            torch.save(blob, tmp)
            tmp.replace(cached)  # atomic: a killed run never leaves half a cache
            break
        except OSError:
            continue  # read-only: try the next place; decoding again next time is the only cost
    return result


def _files_state(files: list[Path], labels: list[int], classes: list[str]) -> str:
    """A digest of everything a decode depends on: each file's size and mtime_ns, and its bytes when
    the whole set is at most :data:`CONTENT_DIGEST_BYTES` (a same-size rewrite with an old mtime)."""
    stats = [f.stat() for f in files]
    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr((labels, classes)).encode())
    for f, st in zip(files, stats, strict=True):
        digest.update(f"{f}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    if sum(st.st_size for st in stats) <= CONTENT_DIGEST_BYTES:
        for f in files:
            digest.update(f.read_bytes())
    return digest.hexdigest()


def list_image_folder(root: str | os.PathLike) -> tuple[list[Path], list[int], list[str]]:
    """The files, labels and classes of ``root/<class>/<image>`` (classes sorted by name = label order)."""
    root = Path(root).expanduser()
    layout = "ImageFolder layout <root>/<class>/<image>"
    if not root.is_dir():
        raise FileNotFoundError(f"{root} not found; expected the {layout}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise FileNotFoundError(f"{root} has no class folders; expected the {layout}")
    files, labels = [], []
    for label, name in enumerate(classes):
        for f in sorted((root / name).iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                files.append(f)
                labels.append(label)
    return files, labels, classes


def load_image_folder(root: str | os.PathLike, *, image_size: int | None = None) -> ImageTensors:
    """``root/<class>/<image>`` (classes sorted by name = label order), decoded and cached."""
    root = Path(root).expanduser()
    files, labels, classes = list_image_folder(root)
    cache = root.parent / ".visionmoe-cache" / f"imagefolder-{root.name}"
    return _decode_all(files, labels, classes, image_size, cache)


def load_tiny_imagenet(split: str, data_dir=None, *, image_size: int | None = None) -> ImageTensors:
    """Tiny-ImageNet-200 in its official layout; ``split`` "train" or "test" (= the labelled val set)."""
    files, labels, wnids = list_tiny_imagenet(split, data_dir)
    cache = data_root(data_dir) / "tiny-imagenet-200" / ".visionmoe-cache" / f"tiny-imagenet-{split}"
    return _decode_all(files, labels, wnids, image_size, cache)


def list_tiny_imagenet(split: str, data_dir=None) -> tuple[list[Path], list[int], list[str]]:
    """The files, labels and wnids (= classes) of Tiny-ImageNet-200's ``split`` ("train" or "test")."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = data_root(data_dir) / "tiny-imagenet-200"
    layout = "official tiny-imagenet-200 layout (wnids.txt, train/<wnid>/images, val/val_annotations.txt)"
    wnids_file = root / "wnids.txt"
    if not wnids_file.is_file():
        raise _missing(wnids_file, layout)
    wnids = wnids_file.read_text().split()
    index = {w: i for i, w in enumerate(wnids)}
    files, labels = [], []
    if split == "train":
        for wnid in wnids:
            folder = root / "train" / wnid / "images"
            if not folder.is_dir():
                raise _missing(folder, layout)
            for f in sorted(folder.iterdir()):
                files.append(f)
                labels.append(index[wnid])
    else:
        annotations = root / "val" / "val_annotations.txt"
        if not annotations.is_file():
            raise _missing(annotations, layout)
        for n, line in enumerate(annotations.read_text().splitlines(), 1):
            parts = line.split("\t")
            if len(parts) < 2 or parts[1] not in index:
                raise ValueError(f"{annotations}:{n}: expected '<file>\\t<wnid>\\t...' with a wnid of wnids.txt")
            files.append(root / "val" / "images" / parts[0])
            labels.append(index[parts[1]])
        if missing := [f for f in files if not f.is_file()][:1]:
            raise _missing(missing[0], layout)
    return files, labels, wnids
