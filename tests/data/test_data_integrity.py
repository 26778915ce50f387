"""Data folders are data (issue 18): the decode cache follows every change to a file, pickles run no code."""

import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visionmoe.data import load_cifar, load_image_folder


def write_bmp(path, color):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), color).save(path, format="BMP")  # uncompressed: same size whatever the colour


def test_an_image_rewritten_at_the_same_size_and_mtime_is_read_again(tmp_path, caplog):
    root = tmp_path / "train"
    write_bmp(root / "cat" / "0.bmp", (255, 0, 0))
    write_bmp(root / "dog" / "0.bmp", (0, 0, 255))
    assert load_image_folder(root).images[0, :, 0, 0].tolist() == [255, 0, 0]
    # Re-colour cat/0.bmp in place: same byte count, and its old mtime put back (as `cp -p` or a restore
    # would), so only the bytes differ. The cache keyed by path and size served the old red pixels.
    path = root / "cat" / "0.bmp"
    before = path.stat()
    write_bmp(path, (0, 255, 0))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size and path.stat().st_mtime_ns == before.st_mtime_ns
    with caplog.at_level(logging.WARNING, logger="visionmoe.data"):
        again = load_image_folder(root)
    assert again.images[0, :, 0, 0].tolist() == [0, 255, 0]
    assert any("rebuilding the decode cache" in r.getMessage() for r in caplog.records), caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="visionmoe.data"):
        assert load_image_folder(root).images[0, :, 0, 0].tolist() == [0, 255, 0]  # the new cache, silently
    assert not caplog.records
    assert len(list((tmp_path / ".visionmoe-cache").glob("*.pt"))) == 1  # rewritten, not one more


def test_an_image_corrupted_in_place_is_an_error_not_its_cached_pixels(tmp_path):
    root = tmp_path / "train"
    write_bmp(root / "cat" / "0.bmp", (255, 0, 0))
    load_image_folder(root)
    path = root / "cat" / "0.bmp"
    path.write_bytes(b"\0" * path.stat().st_size)  # same size, no longer an image
    with pytest.raises(ValueError, match="cannot decode image"):
        load_image_folder(root)


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_a_crafted_cifar_pickle_is_refused_and_never_runs(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    data = np.zeros((2, 3072), dtype=np.uint8)
    for name in [f"data_batch_{i}" for i in range(1, 6)]:
        (folder / name).write_bytes(pickle.dumps({b"data": data, b"labels": [0, 1]}))  # numpy arrays: admitted
    marker = tmp_path / "pwned"
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": Payload(marker)}))
    with pytest.raises(ValueError) as e:
        load_cifar("cifar10", "train", tmp_path)
    message = str(e.value)
    assert "\n" not in message and "batches.meta" in message and "open, which no" in message, message
    assert not marker.exists()


def test_logged_paths_name_no_machine_prefix(tmp_path, monkeypatch):
    from visionmoe.data.datasets import shown

    home, work = tmp_path / "home" / "someone", tmp_path / "project"
    work.mkdir(parents=True)
    monkeypatch.setattr(Path, "home", classmethod(lambda cls: home))
    monkeypatch.chdir(work)
    cache = home / ".cache" / "visionmoe" / "data" / ".visionmoe-cache" / "x.pt"
    assert shown(cache) == "~/.cache/visionmoe/data/.visionmoe-cache/x.pt"
    assert shown(work / "runs" / "a.pt") == "runs/a.pt"
    assert shown(Path("runs/a.pt")) == "runs/a.pt"
    assert shown(tmp_path / "elsewhere.pt") == str(tmp_path / "elsewhere.pt")  # outside both: as it is
