"""The streaming pipeline: files decoded per batch, batches a function of (seed, epoch, step)."""

import io
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from visionmoe.data.datasets import list_image_folder
from visionmoe.data.stream import (
    ImageFiles,
    StreamLoader,
    eval_transform,
    list_shards,
    train_transform,
    write_shards,
)


def write_folder(root, n, size=24, classes=3, seed=0):
    """``n`` noisy JPEGs, class c's label in file order: class{c}/{i}.jpg."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        path = root / f"class{i % classes}" / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path, quality=90)
    return ImageFiles.from_files(*list_image_folder(root))


def take(loader, n):
    out = []
    for x, y in loader:
        out.append((x, y))
        if len(out) == n:
            break
    return out


def same(a, b):
    return len(a) == len(b) and all(
        torch.equal(x, u) and torch.equal(y, v) for (x, y), (u, v) in zip(a, b, strict=True)
    )


def test_batches_depend_on_seed_epoch_step_not_on_workers_and_resume_exactly(tmp_path):
    files = write_folder(tmp_path / "train", 40)
    transform = train_transform(16, randaugment=9)

    def loader(workers, seed=0):
        return StreamLoader(files, 8, transform, seed=seed, workers=workers)

    run = loader(0)
    whole = take(run, 5) + take(run, 5)  # epochs 0 and 1: 5 batches of 8 each
    assert whole[0][0].shape == (8, 3, 16, 16) and whole[0][0].dtype == torch.float32
    two = loader(2)
    assert same(take(two, 5) + take(two, 5), whole)  # 2 worker processes: the same bits
    resumed = loader(1)
    resumed.load_state_dict({"epoch": 0, "step": 3, "seed": 0})  # killed after 3 steps of epoch 0
    assert same(take(resumed, 2) + take(resumed, 5), whole[3:])
    assert not torch.equal(take(loader(0, seed=1), 1)[0][0], whole[0][0])
    assert not torch.equal(whole[0][0], whole[5][0])  # a new order and new augmentations each epoch


def test_a_rank_decodes_only_its_rows_and_gets_the_global_batch_rows(tmp_path):
    files = write_folder(tmp_path / "train", 16)
    transform = train_transform(16, randaugment=5)
    full = take(StreamLoader(files, 8, transform, seed=4), 2)
    for rank, rows in enumerate((torch.tensor([0, 1, 6, 7]), torch.tensor([2, 3, 4, 5]))):
        mine = StreamLoader(files, 8, transform, seed=4, rows=lambda n, r=rows: r)
        for (x, y), (gx, gy) in zip(take(mine, 2), full, strict=True):
            assert torch.equal(x, gx[rows]) and torch.equal(y, gy[rows]), rank


def test_eval_is_resize_and_centre_crop_normalised_by_hand(tmp_path):
    # A 32x32 image: left half red, right half blue. crop_pct 0.5: resize to 16/0.5 = 32 (unchanged),
    # centre-crop 16: columns 8..23, so output columns 0..7 red, 8..15 blue. Red's R channel with
    # ImageNet's mean/std: (1 - 0.485) / 0.229 = 2.2489; its B channel (0 - 0.406) / 0.225 = -1.8044.
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    image[:, :16, 0] = 255
    image[:, 16:, 2] = 255
    (tmp_path / "a").mkdir()
    Image.fromarray(image).save(tmp_path / "a" / "0.png")
    files = ImageFiles.from_files(*list_image_folder(tmp_path))
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    loader = StreamLoader(files, 4, eval_transform(16, 0.5), shuffle=False, drop_last=False, mean=mean, std=std)
    ((x, y),) = list(loader)
    assert x.shape == (1, 3, 16, 16) and y.tolist() == [0]
    assert x[0, 0, 5, 2].item() == pytest.approx(2.2489, abs=1e-3)
    assert x[0, 2, 5, 2].item() == pytest.approx(-1.8044, abs=1e-3)
    assert x[0, 2, 5, 13].item() == pytest.approx((1 - 0.406) / 0.225, abs=1e-3)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_corrupt_jpeg_is_named_in_one_line_or_skipped_and_counted(tmp_path, workers):
    files = write_folder(tmp_path / "train", 12)
    bad = tmp_path / "train" / "class1" / "00004.jpg"
    bad.write_bytes(bad.read_bytes()[:200])  # truncated: the header parses, the pixels do not
    transform = eval_transform(16, 1.0)
    loader = StreamLoader(files, 6, transform, shuffle=False, workers=workers)
    with pytest.raises(ValueError) as e:
        list(loader)
    message = str(e.value)
    assert "\n" not in message and "00004.jpg" in message and "skip_corrupt" in message
    skipping = StreamLoader(files, 6, transform, shuffle=False, workers=workers, skip_corrupt=True)
    with pytest.warns(UserWarning, match="00004.jpg"):
        batches = list(skipping)
    assert [len(y) for _, y in batches] == [5, 6] and skipping.skipped == 1


def test_tar_shards_round_trip_in_the_webdataset_layout(tmp_path):
    pytest.importorskip("webdataset")
    files = write_folder(tmp_path / "train", 10)
    shards = write_shards(files, tmp_path / "shards", shard_size=4)
    assert [s.name for s in shards] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    back = list_shards(tmp_path / "shards")
    assert back.classes == files.classes and torch.equal(back.labels, files.labels)
    assert all(back.read(i) == files.read(i) for i in range(10))
    transform = train_transform(16)
    a, b = StreamLoader(files, 5, transform, seed=2), StreamLoader(back, 5, transform, seed=2)
    assert same(take(a, 2), take(b, 2))  # the same bytes, order and seeds: the same batches

    import webdataset as wds

    samples = list(wds.WebDataset([str(s) for s in shards], shardshuffle=False))
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(10)]
    assert [int(s["cls"]) for s in samples] == files.labels.tolist()


@pytest.mark.parametrize("shard_size", [0, -1, 2.0, True])
def test_write_shards_refuses_a_shard_size_below_one_before_writing_anything(tmp_path, shard_size):
    # maxcount 0 or -1 made webdataset open a new shard per image after an empty first one
    files = write_folder(tmp_path / "train", 3)
    with pytest.raises(ValueError) as e:
        write_shards(files, tmp_path / "shards", shard_size=shard_size)
    message = str(e.value)
    assert "\n" not in message and f"shard_size={shard_size!r}" in message and ">= 1" in message
    assert not (tmp_path / "shards").exists()


def test_write_shards_refuses_a_folder_that_already_holds_shards_and_keeps_them(tmp_path):
    pytest.importorskip("webdataset")
    files = write_folder(tmp_path / "train", 6)
    out = tmp_path / "shards"
    first = write_shards(files, out, shard_size=1)
    assert len(first) == 6
    before = {s.name: s.read_bytes() for s in first}
    # a second run into the same folder would write shard-000000.tar only and leave 000001..5, so
    # list_shards(out) would read 11 samples from 6 images; refused, nothing deleted or overwritten
    with pytest.raises(ValueError) as e:
        write_shards(files, out, shard_size=1000)
    message = str(e.value)
    assert "\n" not in message and str(out) in message and "6 tar shards" in message
    assert "empty folder" in message and "remove them" in message
    assert {s.name: s.read_bytes() for s in sorted(out.glob("*.tar"))} == before
    assert len(list_shards(out)) == 6
    (out / "other.tar").write_bytes(b"")  # list_shards reads every *.tar, whatever its name
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "other.tar").write_bytes(b"")
    with pytest.raises(ValueError, match="holds 1 tar shard "):
        write_shards(files, tmp_path / "empty")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file; expected a folder"):
        write_shards(files, tmp_path / "file")
    assert (tmp_path / "file").read_text() == "x"


def test_shards_command_turns_bad_input_into_one_line(tmp_path, capsys):
    pytest.importorskip("webdataset")
    from visionmoe.cli import main

    write_folder(tmp_path / "train", 6)
    out = tmp_path / "out"
    assert main(["shards", str(tmp_path / "train"), str(out), "--shard-size", "1"]) == 0
    assert "6 images of 3 classes -> 6 shards" in capsys.readouterr().out
    cases = [
        ([str(tmp_path / "train"), str(out)], [str(out), "6 tar shards", "empty folder"]),
        ([str(tmp_path / "train"), str(tmp_path / "o2"), "--shard-size", "0"], ["shard_size=0", ">= 1"]),
        ([str(tmp_path / "train"), str(tmp_path / "o2"), "--shard-size", "-1"], ["shard_size=-1", ">= 1"]),
        ([str(tmp_path / "nonexistent"), str(tmp_path / "o2")], [str(tmp_path / "nonexistent"), "ImageFolder"]),
    ]
    for argv, words in cases:
        with pytest.raises(SystemExit) as e:
            main(["shards", *argv])
        message = str(e.value.code)
        assert message.startswith("visionmoe shards: ") and "\n" not in message, message
        assert all(word in message for word in words), message
    assert len(list_shards(out)) == 6 and not (tmp_path / "o2").exists()


RSS = """
import resource, sys
from visionmoe.data.datasets import list_image_folder
from visionmoe.data.stream import ImageFiles, StreamLoader, train_transform
files = ImageFiles.from_files(*list_image_folder(sys.argv[1]))
for x, y in StreamLoader(files, 16, train_transform(64), workers=1):
    pass
peak = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
print(peak // 1024)
"""


def test_streaming_peak_memory_does_not_grow_with_the_data(tmp_path):
    # 160-px RGB: 76,800 bytes of pixels per image, so 1,000 images more are 77 MB more pixels, which
    # an in-memory split holds (benchmarks/data_pipeline.py measures it). Streamed, the training
    # process (and its worker) grows only by the file list: a few hundred bytes per image.
    blobs = []
    for c in range(4):
        buffer = io.BytesIO()
        Image.new("RGB", (160, 160), (60 * c, 200 - 40 * c, 90)).save(buffer, format="JPEG")
        blobs.append(buffer.getvalue())
    for n in (500, 1500):
        for i in range(n):
            path = tmp_path / str(n) / f"class{i % 4}" / f"{i:05d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(blobs[i % 4])

    def peak_mb(n):
        args = [sys.executable, "-c", textwrap.dedent(RSS), str(tmp_path / str(n))]
        return int(subprocess.run(args, capture_output=True, text=True, check=True).stdout.split()[-1])

    growth = peak_mb(1500) - peak_mb(500)
    assert abs(growth) < 8, f"peak RSS grew {growth} MB for 77 MB more pixels"


def test_cli_writes_shards_and_the_config_refuses_what_cannot_stream(tmp_path, capsys):
    pytest.importorskip("webdataset")
    from visionmoe.cli import main
    from visionmoe.train import load_config
    from visionmoe.train.data import load_splits

    write_folder(tmp_path / "train", 5)
    write_folder(tmp_path / "test", 3)
    assert main(["shards", str(tmp_path / "train"), str(tmp_path / "shards" / "train"), "--shard-size", "2"]) == 0
    assert "5 images of 3 classes -> 3 shards" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"data\.loader=.fast. is not one of"):
        load_config(None, ["data.loader=fast"]).validate()
    with pytest.raises(ValueError, match=r"cifar10 is pickles, use data\.loader=memory"):
        load_splits(load_config(None, ["data.loader=stream"]).data)
    with pytest.raises(ValueError, match=r"needs data\.image_size"):
        cfg = load_config(None, ["data.dataset=imagefolder", f"data.data_dir={tmp_path}", "data.loader=stream"])
        load_splits(cfg.data)


def test_under_torchrun_each_rank_reads_only_its_rows_of_the_global_batch(tmp_path, monkeypatch):
    from visionmoe.distributed import shard_loader, shard_rows

    files = write_folder(tmp_path / "train", 10)
    transform = train_transform(16, randaugment=9)
    reference = list(StreamLoader(files, 4, transform, seed=5))  # 2 batches of 4 (drop_last)
    reads = []
    real_read = ImageFiles.read
    monkeypatch.setattr(ImageFiles, "read", lambda self, i: reads.append(i) or real_read(self, i))
    order = StreamLoader(files, 4, transform, seed=5).order(0)
    for rank in range(2):
        reads.clear()
        mine = list(shard_loader(StreamLoader(files, 4, transform, seed=5), rank, 2))
        rows = shard_rows(4, rank, 2)  # batch 4 over 2 ranks, mirrored: rank 0 rows [0, 3], rank 1 rows [1, 2]
        assert rows.tolist() == ([0, 3] if rank == 0 else [1, 2])
        for (x, y), (gx, gy) in zip(mine, reference, strict=True):
            assert torch.equal(x, gx[rows]) and torch.equal(y, gy[rows])
        assert sorted(reads) == sorted(order[:8].view(2, 4)[:, rows].flatten().tolist())  # its 4 images only
    # Evaluation over 4 ranks: 10 images in batches of 4, 4, 2; the last batch's pieces are 1, 1, 0, 0
    # images, so ranks 2 and 3 forward one unlabelled stand-in row there.
    test = StreamLoader(files, 4, eval_transform(16), shuffle=False, drop_last=False)
    pieces = [[len(y) for _, y in shard_loader(test, r, 4)] for r in range(4)]
    assert pieces == [[1, 1, 1], [1, 1, 1], [1, 1, 0], [1, 1, 0]]


def test_analyze_subsets_decode_a_streamed_split(tmp_path):
    from visionmoe.analysis.trained_run import subset_batches

    files = write_folder(tmp_path / "train", 9)
    batches = subset_batches(files, (0.5,) * 3, (0.5,) * 3, 5, 2, transform=eval_transform(16))
    assert [tuple(x.shape) for x, _ in batches] == [(2, 3, 16, 16), (2, 3, 16, 16), (1, 3, 16, 16)]
    assert sum(len(y) for _, y in batches) == 5
