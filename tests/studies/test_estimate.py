"""The estimator times the Trainer's own training step, on a Trainer built as the run builds it."""

import pytest
import torch

from visionmoe.studies.estimate import estimate_run
from visionmoe.train import load_config
from visionmoe.train.data import load_splits
from visionmoe.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(standin_data, tmp_path, *extra):
    overrides = ["model.name=cnn_resnet_cifar_moe", "model.kwargs={width: 8}", "data.batch_size=16",
                 "data.eval_batch_size=16", f"data.data_dir={standin_data}", f"train.out_dir={tmp_path}",
                 "train.progress=false", "train.epochs=1", "optim.grad_clip=1.0", *extra]  # fmt: skip
    return load_config(None, overrides)


def test_the_estimator_times_the_trainers_step(standin_data, tmp_path, monkeypatch):
    config = tiny(standin_data, tmp_path, "data.mixup_alpha=0.8")
    splits = load_splits(config.data)
    steps = []
    real_step = Trainer.train_step

    def spy(trainer, x, y):
        steps.append((type(trainer), tuple(x.shape), y.tolist()))
        return real_step(trainer, x, y)

    monkeypatch.setattr(Trainer, "train_step", spy)
    row = estimate_run(config, splits, steps=2)
    # one untimed warm-up step and two timed ones, each the Trainer's, on the first 16 training images
    assert steps == [(Trainer, (16, 3, 32, 32), splits.train.labels[:16].tolist())] * 3
    # 120 stand-in images at batch 16 (drop_last): 7 steps per epoch, 1 epoch
    assert row["steps"] == 7 and row["seconds_per_step"] > 0 and row["cpu_seconds_per_step"] > 0
    assert row["minutes"] == pytest.approx(row["train_minutes"] + row["eval_minutes"])
    assert not any(tmp_path.iterdir())  # nothing written


def test_the_estimators_step_changes_the_weights_as_one_trainer_step(standin_data, tmp_path, monkeypatch):
    # The estimator's trainer after its warm-up step holds the weights a Trainer has after one
    # train_step on the same batch: same model, seed, optimiser, schedule and loss.
    config = tiny(standin_data, tmp_path)
    splits = load_splits(config.data)
    built = []
    real_init = Trainer.__init__

    def keep(trainer, *args, **kwargs):
        real_init(trainer, *args, **kwargs)
        built.append(trainer)

    monkeypatch.setattr(Trainer, "__init__", keep)
    monkeypatch.setattr("visionmoe.studies.estimate._time", lambda fn, repeats: (fn(), (1.0, 1.0))[1])
    estimate_run(config, splits, steps=1)
    monkeypatch.setattr(Trainer, "__init__", real_init)
    reference = Trainer(config, splits=splits)
    reference.train_step(splits.first_batch(16), splits.train.labels[:16])
    estimated = built[0].model.state_dict()
    for name, value in reference.model.state_dict().items():
        assert torch.equal(value, estimated[name]), name
