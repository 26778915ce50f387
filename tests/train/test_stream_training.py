"""A Tiny-ImageNet-shaped run end to end through the streaming loader, killed mid-epoch and resumed."""

import json

import pytest
import torch
from standins import write_tiny_imagenet

from visionmoe.train import Trainer, load_checkpoint, load_config


def test_streamed_tiny_imagenet_run_resumes_bit_identically_on_any_number_of_workers(tmp_path):
    root = write_tiny_imagenet(tmp_path / "data", num_classes=3, per_class=6, size=16)  # 18 train, 6 val
    base = [
        "data.dataset=tiny-imagenet",
        f"data.data_dir={root}",
        "data.loader=stream",
        "data.image_size=16",
        "data.randaugment=9",
        "data.mixup_alpha=0.4",
        "data.batch_size=4",  # 18 // 4 = 4 steps per epoch
        "data.eval_batch_size=4",
        "model.name=cnn_resnet_cifar_moe",
        "model.kwargs={width: 8}",
        "train.epochs=2",
        "train.checkpoint_every_steps=3",
        f"train.out_dir={tmp_path / 'runs'}",
        "train.progress=false",
        "train.tensorboard=false",
    ]

    def trainer(name, workers, **kwargs):
        return Trainer(load_config(None, [*base, f"train.run_name={name}", f"data.workers={workers}"]), **kwargs)

    full = trainer("full", 2)
    assert full.splits.streamed and type(full.train_loader).__name__ == "StreamLoader"
    summary = full.fit()
    assert summary["steps"] == 8 and 0 <= summary["test"]["top1"] <= 1

    class Killed(Exception):
        pass

    def kill_at_step_7(t):  # checkpoints at steps 3, 4 (epoch end) and 6 = epoch 1, step 2: mid-epoch
        if t.step == 7:
            raise Killed

    with pytest.raises(Killed):
        trainer("cut", 0, callbacks=[kill_at_step_7]).fit()
    assert load_checkpoint(tmp_path / "runs" / "cut")["loader"] == {"epoch": 1, "step": 2, "seed": 0}
    resumed = trainer("cut", 1, resume=True)  # another worker count: data.workers changes no batch
    resumed.fit()
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]

    def losses(name):
        lines = (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()
        return [(r["step"], r["train_loss"]) for r in map(json.loads, lines)]

    assert losses("full") == losses("cut")


def test_a_corrupt_image_stops_the_run_in_one_line_or_is_skipped_and_counted(tmp_path):
    root = write_tiny_imagenet(tmp_path / "data", num_classes=3, per_class=6, size=16)
    bad = sorted((root / "tiny-imagenet-200" / "train" / "n00000000" / "images").iterdir())[0]  # the first file
    bad.write_bytes(b"not an image")
    base = [
        "data.dataset=tiny-imagenet",
        f"data.data_dir={root}",
        "data.loader=stream",
        "data.image_size=16",
        "data.workers=1",
        "data.mixup_alpha=0.4",
        "data.batch_size=6",
        "model.name=cnn_resnet_cifar_moe",
        "model.kwargs={width: 8}",
        "train.epochs=1",
        f"train.out_dir={tmp_path / 'runs'}",
        "train.progress=false",
        "train.tensorboard=false",
    ]
    with pytest.raises(ValueError) as e:
        Trainer(load_config(None, [*base, "train.run_name=stop"])).fit()
    assert bad.name in str(e.value) and "\n" not in str(e.value)
    with pytest.warns(UserWarning, match=bad.name):
        summary = Trainer(load_config(None, [*base, "train.run_name=skip", "data.skip_corrupt=true"])).fit()
    assert summary["skipped_images_this_session"] == 1 and summary["steps"] == 3  # 18 // 6; one batch of 5


def test_a_batch_whose_every_image_is_skipped_is_a_step_without_an_update(tmp_path):
    # batch size 1 and one unreadable image: the loader yields one batch fewer per epoch. The trainer counted
    # only the batches it received, so its epochs slid against the loader's (4 records for 2 epochs).
    root = write_tiny_imagenet(tmp_path / "data", num_classes=3, per_class=4, size=16)
    bad = sorted((root / "tiny-imagenet-200" / "train" / "n00000000" / "images").iterdir())[0]
    bad.write_bytes(b"not an image")
    config = load_config(
        None,
        [
            "data.dataset=tiny-imagenet",
            f"data.data_dir={root}",
            "data.loader=stream",
            "data.image_size=16",
            "data.workers=0",
            "data.batch_size=1",
            "data.skip_corrupt=true",
            "model.name=cnn_resnet_cifar_moe",
            "model.kwargs={width: 8}",
            "train.epochs=2",
            f"train.out_dir={tmp_path / 'runs'}",
            "train.progress=false",
            "train.tensorboard=false",
        ],
    )
    trainer = Trainer(config)
    with pytest.warns(UserWarning, match=bad.name):
        summary = trainer.fit()
    records = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["step"]) for r in records] == [(1.0, 12), (2.0, 24)]
    assert summary["steps"] == 24 and trainer.train_loader.state_dict()["epoch"] == 2  # two epochs, no third
    assert trainer.scheduler.last_epoch == 24  # the schedule stepped for the skipped batches too
