"""Eval on data whose classes are not the training classes is refused, not silently permuted (issue 18)."""

import logging
import shutil

import pytest
import torch
from standins import write_image_folder

from visionmoe.train import Trainer, evaluate_checkpoint, load_config
from visionmoe.train.checkpoint import CHECKPOINT

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One step of a tiny model on a 3-class ImageFolder (class0..class2), checkpoint and summary written."""
    root = tmp_path_factory.mktemp("run")
    data = write_image_folder(root / "data", num_classes=3, per_class=4, size=16)
    overrides = [
        "data.dataset=imagefolder",
        f"data.data_dir={data}",
        "data.test_split=val",
        "data.batch_size=12",
        "data.eval_batch_size=12",
        "model.name=cnn_resnet_cifar_moe",
        "model.kwargs={width: 8}",
        "train.epochs=1",
        f"train.out_dir={root / 'runs'}",
        "train.progress=false",
        "train.tensorboard=false",
    ]
    summary = Trainer(load_config(None, overrides)).fit()
    return root / "runs" / "custom-s0", data, summary


def renamed_copy(data, tmp_path, old, new):
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    for split in ("train", "val"):
        (copy / split / old).rename(copy / split / new)
    return copy


def test_class_names_are_recorded_in_checkpoint_and_summary(trained):
    run, _, summary = trained
    assert summary["classes"] == ["class0", "class1", "class2"]
    assert torch.load(run / CHECKPOINT, weights_only=True)["classes"] == ["class0", "class1", "class2"]
    assert evaluate_checkpoint(run)["classes_checked"] is True


def test_eval_refuses_a_renamed_class_folder_naming_it(trained, tmp_path):
    # class0 renamed to "zebra": sorted, the folders are class1, class2, zebra, so every label moves by one.
    run, data, _ = trained
    other = renamed_copy(data, tmp_path, "class0", "zebra")
    with pytest.raises(ValueError) as e:
        evaluate_checkpoint(run, data_dir=str(other))
    message = str(e.value)
    assert "\n" not in message and "missing from the data ['class0']" in message, message
    assert "extra in the data ['zebra']" in message, message


def test_resume_refuses_data_with_other_classes(trained, tmp_path):
    run, data, _ = trained
    other = renamed_copy(data, tmp_path, "class2", "aardvark")
    config = load_config(run / "config.yaml", [f"data.data_dir={other}"])  # data.data_dir may change on resume
    with pytest.raises(ValueError, match=r"missing from the data \['class2'\]; extra in the data \['aardvark'\]"):
        Trainer(config, resume=True)  # refused before anything is written


def test_a_checkpoint_without_class_names_still_loads_with_a_warning(trained, tmp_path, caplog):
    run, _, _ = trained
    state = torch.load(run / CHECKPOINT, weights_only=True)
    del state["classes"]  # as written before class names were recorded
    state["config"]["optim"]["milestones"] = [0.5]  # and with a setting it ignored, which a new run refuses
    torch.save(state, tmp_path / CHECKPOINT)
    with caplog.at_level(logging.WARNING, logger="visionmoe.train.runs"):
        result = evaluate_checkpoint(tmp_path / CHECKPOINT)
    assert result["classes_checked"] is False and result["samples"] == 12
    assert "records no class names" in caplog.text and "taken in the data's own order" in caplog.text


def test_train_and_test_folders_that_differ_are_named(tmp_path):
    from visionmoe.train.data import load_splits

    data = write_image_folder(tmp_path / "data", num_classes=3, per_class=2, size=8)
    (data / "val" / "class1").rename(data / "val" / "klass1")
    config = load_config(None, ["data.dataset=imagefolder", f"data.data_dir={data}", "data.test_split=val"])
    with pytest.raises(ValueError) as e:
        load_splits(config.data)
    message = str(e.value)
    assert "3 vs 3 classes" in message and "['class1']" in message and "['klass1']" in message, message
