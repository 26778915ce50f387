"""Datasets in their official layouts (tiny copies written here), augmentation, and the loader."""

import hashlib
import pickle
import tarfile

import pytest
import torch
from PIL import Image

from visionmoe.data import (
    Archive,
    ImageTensors,
    TensorLoader,
    data_root,
    download_archive,
    load_cifar,
    load_image_folder,
    load_tiny_imagenet,
    random_crop_flip,
)


def one_line(exc_info):
    message = str(exc_info.value)
    assert "\n" not in message, message
    return message


def write_pickle(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj))


def cifar10_layout(root, per_batch=2):
    folder = root / "cifar-10-batches-py"
    g = torch.Generator().manual_seed(0)
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        data = torch.randint(0, 256, (per_batch, 3072), dtype=torch.uint8, generator=g).numpy()
        write_pickle(folder / name, {b"data": data, b"labels": list(range(per_batch))})
    write_pickle(folder / "batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)]})
    return folder


def write_image(path, color, size=(8, 8)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def test_data_root(monkeypatch, tmp_path):
    monkeypatch.setenv("VISIONMOE_DATA", str(tmp_path / "env"))
    assert data_root() == tmp_path / "env"
    assert data_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("VISIONMOE_DATA")
    assert data_root().name == "data" and ".cache" in str(data_root())


def test_cifar10_official_layout(tmp_path):
    folder = cifar10_layout(tmp_path)
    train, test = load_cifar("cifar10", "train", tmp_path), load_cifar("cifar10", "test", tmp_path)
    assert train.images.shape == (10, 3, 32, 32) and train.images.dtype == torch.uint8
    assert test.labels.tolist() == [0, 1] and train.classes[3] == "c3"
    # The pickle's row is R plane, G plane, B plane, each 32×32 row-major.
    raw = pickle.loads((folder / "test_batch").read_bytes())[b"data"][1]
    assert test.images[1, 2, 0, 5] == raw[2 * 1024 + 5]


def test_cifar100_official_layout(tmp_path):
    folder = tmp_path / "cifar-100-python"
    data = torch.randint(0, 256, (3, 3072), dtype=torch.uint8).numpy()
    for split in ("train", "test"):
        write_pickle(folder / split, {b"data": data, b"fine_labels": [5, 0, 99], b"coarse_labels": [1, 0, 19]})
    write_pickle(folder / "meta", {b"fine_label_names": [f"f{i}".encode() for i in range(100)]})
    ds = load_cifar("cifar100", "test", tmp_path)
    assert ds.labels.tolist() == [5, 0, 99] and len(ds.classes) == 100


def test_cifar_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_cifar("cifar10", "train", tmp_path)
    assert "cifar-10-batches-py" in one_line(e) and "download=True" in one_line(e)
    folder = cifar10_layout(tmp_path)
    (folder / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError) as e:
        load_cifar("cifar10", "train", tmp_path)
    assert "data_batch_3" in one_line(e)
    (folder / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(ValueError) as e:
        load_cifar("cifar10", "test", tmp_path)
    assert "test_batch" in one_line(e) and "not a valid" in one_line(e)
    with pytest.raises(ValueError, match="split must be one of"):
        load_cifar("cifar10", "val", tmp_path)


def test_download_checks_md5_and_extracts(tmp_path):
    # The real download code, fed a small archive through a file:// URL.
    source = tmp_path / "source"
    cifar10_layout(source)
    archive_path = tmp_path / "tiny.tar.gz"
    with tarfile.open(archive_path, "w:gz") as tar:
        tar.add(source / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    md5 = hashlib.md5(archive_path.read_bytes()).hexdigest()
    archive = Archive(archive_path.as_uri(), "cifar-10-python.tar.gz", md5, "cifar-10-batches-py")
    folder = download_archive(archive, tmp_path / "root")
    assert (folder / "data_batch_1").is_file()
    assert len(load_cifar("cifar10", "train", tmp_path / "root")) == 10
    wrong = Archive(archive_path.as_uri(), "other.tar.gz", "0" * 32, "x")
    with pytest.raises(OSError) as e:
        download_archive(wrong, tmp_path / "root2")
    assert "expected 00000" in one_line(e)
    assert not (tmp_path / "root2" / "other.tar.gz").exists()


def test_image_folder_decodes_once_and_caches(tmp_path):
    root = tmp_path / "train"
    write_image(root / "cat" / "0.png", (255, 0, 0))
    write_image(root / "cat" / "1.jpg", (250, 0, 0))
    write_image(root / "dog" / "0.png", (0, 0, 255))
    ds = load_image_folder(root)
    assert ds.classes == ["cat", "dog"] and ds.labels.tolist() == [0, 0, 1]
    assert ds.images.shape == (3, 3, 8, 8) and ds.images[0, 0, 0, 0] == 255 and ds.images[2, 2, 4, 4] == 255
    caches = list((tmp_path / ".visionmoe-cache").glob("*.pt"))
    assert len(caches) == 1
    again = load_image_folder(root)  # from the cache (weights_only load)
    assert torch.equal(again.images, ds.images)
    write_image(root / "dog" / "1.png", (0, 0, 250), size=(16, 16))
    with pytest.raises(ValueError) as e:
        load_image_folder(root)
    assert "differ in size" in one_line(e)
    assert load_image_folder(root, image_size=8).images.shape == (4, 3, 8, 8)
    (root / "dog" / "2.png").write_bytes(b"broken")
    with pytest.raises(ValueError) as e:
        load_image_folder(root, image_size=8)
    assert "2.png" in one_line(e)


def test_tiny_imagenet_official_layout(tmp_path):
    root = tmp_path / "tiny-imagenet-200"
    wnids = ["n01", "n02"]
    (root).mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for i, wnid in enumerate(wnids):
        write_image(root / "train" / wnid / "images" / f"{wnid}_0.JPEG", (i * 100, 0, 0))
    write_image(root / "val" / "images" / "val_0.JPEG", (0, 100, 0))
    write_image(root / "val" / "images" / "val_1.JPEG", (0, 0, 100))
    (root / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn02\t0\t0\t8\t8\nval_1.JPEG\tn01\t0\t0\t8\t8\n")
    train = load_tiny_imagenet("train", tmp_path)
    test = load_tiny_imagenet("test", tmp_path)
    assert train.labels.tolist() == [0, 1] and test.labels.tolist() == [1, 0] and test.classes == wnids
    (root / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn99\n")
    with pytest.raises(ValueError) as e:
        load_tiny_imagenet("test", tmp_path)
    assert "val_annotations.txt:1" in one_line(e)
    with pytest.raises(FileNotFoundError) as e:
        load_tiny_imagenet("train", tmp_path / "nowhere")
    assert "wnids.txt" in one_line(e)


def test_random_crop_flip_by_hand():
    # A 1×1×2×2 image [[1, 2], [3, 4]] padded by 1: every crop is a 2×2 window of the 4×4 padded
    # image, so the output always holds values of {0, 1, 2, 3, 4} and, with padding 0 and a flip,
    # is [[2, 1], [4, 3]] or the original.
    image = torch.tensor([[[[1, 2], [3, 4]]]], dtype=torch.uint8).expand(64, 3, 2, 2)
    out = random_crop_flip(image, padding=0, generator=torch.Generator().manual_seed(0))
    flipped = torch.tensor([[2, 1], [4, 3]], dtype=torch.uint8)
    is_flipped = (out[:, 0] == flipped).all(dim=(1, 2))
    is_same = (out[:, 0] == image[:, 0]).all(dim=(1, 2))
    assert bool((is_flipped | is_same).all()) and 10 < int(is_flipped.sum()) < 54
    crops = random_crop_flip(image, padding=1, flip=False, generator=torch.Generator().manual_seed(0))
    assert crops.shape == image.shape and crops.dtype == torch.uint8
    assert set(crops.unique().tolist()) <= {0, 1, 2, 3, 4} and (crops == 0).any()
    # The same generator seed gives the same batch.
    again = random_crop_flip(image, padding=1, flip=False, generator=torch.Generator().manual_seed(0))
    assert torch.equal(crops, again)


def dataset(n=10):
    images = torch.arange(n, dtype=torch.uint8)[:, None, None, None].expand(n, 3, 4, 4).contiguous()
    return ImageTensors(images, torch.arange(n), [str(i) for i in range(n)])


def test_loader_resume_is_exact():
    def augment(x, g):
        return random_crop_flip(x, 1, generator=g)

    def batches(loader, count):
        out = []
        for _ in range(count):
            for x, y in loader:
                out.append((x, y))
                if len(out) == count:
                    return out
        return out

    full = TensorLoader(dataset(), 3, augment=augment, seed=7)
    assert len(full) == 3
    reference = batches(full, 7)  # 2 epochs + 1 batch
    first = TensorLoader(dataset(), 3, augment=augment, seed=7)
    head = batches(first, 4)  # killed after the first batch of epoch 1
    resumed = TensorLoader(dataset(), 3, augment=augment, seed=7)
    resumed.load_state_dict(first.state_dict())
    tail = batches(resumed, 3)
    for (x, y), (rx, ry) in zip(head + tail, reference, strict=True):
        assert torch.equal(x, rx) and torch.equal(y, ry)
    # Epochs are shuffled differently, and every sample appears once per epoch (drop_last: 9 of 10).
    e0 = torch.cat([y for _, y in reference[:3]])
    e1 = torch.cat([y for _, y in reference[3:6]])
    assert not torch.equal(e0, e1) and len(set(e0.tolist())) == 9
    with pytest.raises(ValueError, match="seed 7"):
        TensorLoader(dataset(), 3, seed=8).load_state_dict(first.state_dict())


def test_loader_eval_keeps_last_batch_and_channels_last():
    loader = TensorLoader(dataset(), 4, shuffle=False, drop_last=False, channels_last=True)
    out = list(loader)
    assert [len(y) for _, y in out] == [4, 4, 2] and torch.equal(torch.cat([y for _, y in out]), torch.arange(10))
    assert out[0][0].is_contiguous(memory_format=torch.channels_last)
    # Normalised with mean 0.5, std 0.5: pixel value v -> (v/255 - 0.5) / 0.5.
    assert torch.allclose(out[0][0][1, 0, 0, 0], torch.tensor((1 / 255 - 0.5) / 0.5))
    with pytest.raises(ValueError, match="batch_size"):
        TensorLoader(dataset(), 0)
    with pytest.raises(ValueError, match="uint8"):
        ImageTensors(torch.zeros(2, 3, 4, 4), torch.zeros(2, dtype=torch.long), [])


def test_cache_falls_back_when_the_data_folder_is_read_only(tmp_path, monkeypatch):
    root = tmp_path / "shared" / "train"
    write_image(root / "a" / "0.png", (1, 2, 3))
    monkeypatch.setenv("VISIONMOE_DATA", str(tmp_path / "user"))
    real_save = torch.save

    def save(obj, path, *args, **kwargs):  # the shared folder refuses writes
        if str(path).startswith(str(tmp_path / "shared")):
            raise PermissionError(f"read-only: {path}")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    ds = load_image_folder(root)
    assert len(list((tmp_path / "user" / ".visionmoe-cache").glob("*.pt"))) == 1
    assert torch.equal(load_image_folder(root).images, ds.images)


def test_random_crop_flip_of_some_rows_is_those_rows_of_the_batch():
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (6, 3, 5, 5), dtype=torch.uint8, generator=g)
    whole = random_crop_flip(images, 2, generator=torch.Generator().manual_seed(4))
    rows = torch.tensor([4, 1])
    some = random_crop_flip(images[rows], 2, generator=torch.Generator().manual_seed(4), rows=rows, batch_size=6)
    assert torch.equal(some, whole[rows])
    with pytest.raises(ValueError, match="rows and batch_size go together"):
        random_crop_flip(images, 2, rows=rows)
    with pytest.raises(ValueError, match="got 6 images for 2 rows"):
        random_crop_flip(images, 2, rows=rows, batch_size=6)


def test_channel_stats_by_hand_from_histograms():
    from visionmoe.train.data import channel_stats

    # 2 images of 1 pixel: red 0 and 255 -> mean 0.5, unbiased std sqrt((0.5² + 0.5²) / 1) = 0.7071;
    # green 51 in both (0.2, std 0 -> clamped to 1e-3); blue 0 and 51 -> mean 0.1, std sqrt(2·0.1²) = 0.1414.
    images = torch.tensor([[0, 51, 0], [255, 51, 51]], dtype=torch.uint8).reshape(2, 3, 1, 1)
    assert channel_stats(images) == ((0.5, 0.2, 0.1), (0.7071, 0.001, 0.1414))


def test_decode_into_fills_rows_and_names_a_mismatched_file(tmp_path):
    from visionmoe.data.datasets import decode_into

    write_image(tmp_path / "a.png", (10, 20, 30))
    write_image(tmp_path / "b.png", (40, 50, 60))
    images = decode_into([tmp_path / "a.png", tmp_path / "b.png"], None, "t")
    assert images.shape == (2, 3, 8, 8) and images[:, :, 3, 5].tolist() == [[10, 20, 30], [40, 50, 60]]
    write_image(tmp_path / "c.png", (0, 0, 0), size=(4, 4))
    with pytest.raises(ValueError, match=r"c\.png: \(4, 4\)"):
        decode_into([tmp_path / "a.png", tmp_path / "c.png"], None, "t")
