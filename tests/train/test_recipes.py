"""Every preset in configs/ trains for a few steps on a tiny stand-in of its dataset, in its layout."""

import math
import shutil

import pytest
from standins import write_cifar, write_image_folder, write_tiny_imagenet

from visionmoe.train import Trainer, load_config
from visionmoe.train.config import preset_names

# What each preset needs to run on a stand-in: its data written in the official layout, small images
# for the 224 px recipes, small batches. The architecture and the rest of the recipe are unchanged.
STAND_INS = {
    "cifar10": (lambda root: write_cifar(root, "cifar10", per_class=4, test_per_class=2), []),
    "cifar100": (lambda root: write_cifar(root, "cifar100", per_class=1, test_per_class=1), []),
    "tiny-imagenet": (lambda root: write_tiny_imagenet(root, num_classes=3, per_class=6, size=16), []),
    "imagefolder": (
        lambda root: write_image_folder(root, splits=("train", "val"), num_classes=3, per_class=6, size=16),
        ["data.image_size=32", "model.kwargs.img_size=32"],
    ),
}


@pytest.mark.parametrize("preset", preset_names())
def test_preset_runs_on_a_tiny_stand_in(preset, tmp_path):
    dataset = load_config(preset).data.dataset
    write, extra = STAND_INS[dataset]
    root = write(tmp_path / "data")
    config = load_config(
        preset,
        [
            f"data.data_dir={root}",
            "data.batch_size=8",
            "data.eval_batch_size=16",
            "train.epochs=2",
            "optim.warmup_epochs=1",
            f"train.out_dir={tmp_path / 'runs'}",
            "train.progress=false",
            "train.tensorboard=false",
            *extra,
        ],
    )
    try:
        summary = Trainer(config).fit()
    finally:  # the 224 px presets write full-size checkpoints (up to 460 MB): not kept in the temp dir
        shutil.rmtree(tmp_path / "runs", ignore_errors=True)
    assert summary["steps"] >= 2 and summary["stopped"] == "completed"
    assert math.isfinite(summary["test"]["nll"]) and 0 <= summary["test"]["top1"] <= 1
    if "dense" not in preset:
        assert summary["rho"] > 0, f"{preset}: no routed expert FLOPs"
        assert summary["test_routing"], f"{preset}: no routing statistics"
