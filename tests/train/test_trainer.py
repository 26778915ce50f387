"""End to end on tiny data written here: training learns, eval reports everything, resume is exact."""

import json
import math

import pytest
import torch

from visionmoe.cli import main
from visionmoe.train import Trainer, evaluate_checkpoint, load_checkpoint, load_config
from visionmoe.train.checkpoint import CHECKPOINT

TINY = ["model.name=cnn_resnet_cifar_moe", "model.kwargs={width: 8}", "data.batch_size=16", "data.eval_batch_size=32"]


def config(root, out, *extra):
    overrides = [*TINY, f"data.data_dir={root}", f"train.out_dir={out}", "train.progress=false", *extra]
    return load_config(None, overrides)


def test_training_learns_and_writes_the_run(cifar10_root, tmp_path):
    summary = Trainer(config(cifar10_root, tmp_path, "train.epochs=4", "optim.lr=0.05")).fit()
    run = tmp_path / "custom-s0"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    assert summary["test"]["top1"] > 0.3  # 10 colour classes; chance is 0.1
    for r in records:
        layer = r["routing"]["stages.2.blocks.0.mlp"]
        assert len(layer["tokens_per_expert"]) == 8 and 0 <= layer["dropped_fraction"] < 1
        assert {"top1", "top5", "nll", "ece", "routing"} <= set(r["test"])
    header = (run / "metrics.csv").read_text().splitlines()[0]
    assert "routing/stages.2.blocks.0.mlp/dropped_fraction" in header and "test/top1" in header
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert (run / "config.yaml").is_file() and (run / "summary.json").is_file()
    assert summary["rho"] > 0 and summary["active_params"] < summary["total_params"]
    assert summary["code"]["visionmoe"] and summary["stopped"] == "completed"


def test_eval_reports_every_metric_and_matches_training(cifar10_root, tmp_path):
    summary = Trainer(config(cifar10_root, tmp_path, "train.epochs=1")).fit()
    result = evaluate_checkpoint(tmp_path / "custom-s0" / CHECKPOINT)
    assert result["top1"] == summary["test"]["top1"] and result["nll"] == pytest.approx(summary["test"]["nll"])
    assert {"top1", "top5", "nll", "ece", "per_class_accuracy", "routing", "samples"} <= set(result)
    assert len(result["per_class_accuracy"]) == 10 and result["samples"] == 40
    assert set(result["routing"]) == {"stages.2.blocks.0.mlp", "stages.2.blocks.1.mlp"}
    train_split = evaluate_checkpoint(tmp_path / "custom-s0", split="train")
    assert train_split["samples"] == 120


def test_resume_after_a_kill_is_bit_identical(cifar10_root, tmp_path):
    # Router noise, dropout-free CNN, mixup seeded per step: every random source is exercised.
    extra = ["train.epochs=2", "train.checkpoint_every_steps=2", "data.mixup_alpha=0.4", "train.tensorboard=false"]

    full = Trainer(config(cifar10_root, tmp_path, *extra, "train.run_name=full"))
    full.fit()

    class Killed(Exception):
        pass

    def kill_at_step_9(trainer):  # 7 steps per epoch: checkpoints at 2, 4, 6, 7 (epoch end), 8; killed at 9
        if trainer.step == 9:
            raise Killed

    with pytest.raises(Killed):
        Trainer(config(cifar10_root, tmp_path, *extra, "train.run_name=cut"), callbacks=[kill_at_step_9]).fit()
    assert load_checkpoint(tmp_path / "cut")["step"] == 8
    with pytest.raises(FileExistsError, match="--resume"):
        Trainer(config(cifar10_root, tmp_path, *extra, "train.run_name=cut"))
    resumed = Trainer(config(cifar10_root, tmp_path, *extra, "train.run_name=cut"), resume=True)
    assert resumed.step == 8
    resumed.fit()

    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    states = full.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    for x, y in zip(states[0].values(), states[1].values(), strict=True):
        assert torch.equal(x["momentum_buffer"], y["momentum_buffer"])

    def results(name):
        records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        drop = ("train_seconds", "eval_seconds", "images_per_s", "data_share")
        return [{k: v for k, v in r.items() if k not in drop} for r in records]

    assert results("full") == results("cut")  # same metrics, and epoch 2 logged once
    summaries = [json.loads((tmp_path / name / "summary.json").read_text()) for name in ("full", "cut")]
    profile = ("total_params", "active_params", "flops_per_image", "expert_flops_per_image", "rho", "rho_nominal")
    assert [{k: s[k] for k in profile} for s in summaries[:1]] == [{k: s[k] for k in profile} for s in summaries[1:]]
    # the best accuracy so far is resumed too (epoch 1's, kept in the checkpoint), not restarted from 0
    assert resumed.best_top1 == full.best_top1 == max(r["test"]["top1"] for r in results("full") if "test" in r)
    assert summaries[1]["best_top1"] == summaries[0]["best_top1"]


def test_resume_keeps_the_thread_count_the_run_trained_with(cifar10_root, tmp_path):
    # 1 and 2 threads split GEMMs and reductions differently (different last bits); a resume asked for 2
    # threads trains on with the checkpoint's 1, says so, and ends bit-identical to the 1-thread run.
    before = torch.get_num_threads()
    extra = ["train.epochs=1", "train.checkpoint_every_steps=3", "train.tensorboard=false"]

    def kill_at_step_4(trainer):
        if trainer.step == 4:
            raise KeyboardInterrupt

    try:
        full = Trainer(config(cifar10_root, tmp_path, *extra, "train.threads=1", "train.run_name=full"))
        full.fit()
        with pytest.raises(KeyboardInterrupt):
            cut = config(cifar10_root, tmp_path, *extra, "train.threads=1", "train.run_name=cut")
            Trainer(cut, callbacks=[kill_at_step_4]).fit()
        with pytest.warns(UserWarning, match=r"with the 1 thread\(s\) it trained with, not 2"):
            resumed = Trainer(
                config(cifar10_root, tmp_path, *extra, "train.threads=2", "train.run_name=cut"), resume=True
            )
        assert torch.get_num_threads() == 1
        resumed.fit()
    finally:
        torch.set_num_threads(before)
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_time_limited_run_resumed_logs_what_the_uninterrupted_run_logs(cifar10_root, tmp_path, monkeypatch):
    # 7 steps per epoch; the clock runs out after step 3, inside epoch 1. Resumed, epoch 1's record must
    # cover all 7 steps (not 4-7), the stop's partial record must go, and TensorBoard must keep epoch 1.
    full = Trainer(config(cifar10_root, tmp_path, "train.epochs=2", "train.run_name=full"))
    full.fit()
    limit = ["train.epochs=2", "train.run_name=cut", "train.time_limit_minutes=100"]
    monkeypatch.setattr(Trainer, "_out_of_time", lambda self: self.step == 3)
    assert Trainer(config(cifar10_root, tmp_path, *limit)).fit()["stopped"] == "time_limit"
    monkeypatch.undo()
    records = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [3]  # the partial epoch, with a test pass, as a time limit promises
    Trainer(config(cifar10_root, tmp_path, *limit), resume=True).fit()

    def results(name):
        records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        keep = ("epoch", "step", "lr", "train_loss", "train_top1", "aux_loss", "routing", "test")
        return [{k: r.get(k) for k in keep} for r in records]

    assert results("full") == results("cut")

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def logged_steps(name):
        events = EventAccumulator(str(tmp_path / name / "tensorboard"))
        events.Reload()
        return [e.step for e in events.Scalars("train_loss")]

    assert logged_steps("cut") == logged_steps("full") == [7, 14]


def test_resume_refuses_other_data_with_the_same_classes(cifar10_root, tmp_path):
    # data.data_dir may change on resume (the data moved); other data of the same classes may not: the schedule
    # and the epochs were laid out for the first data's size.
    from standins import write_cifar

    other = tmp_path / "other"
    write_cifar(other, "cifar10", per_class=6)
    extra = ["train.epochs=1", "train.checkpoint_every_steps=2", "train.tensorboard=false"]

    def kill_at_step_3(trainer):
        if trainer.step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Trainer(config(cifar10_root, tmp_path, *extra), callbacks=[kill_at_step_3]).fit()
    with pytest.raises(ValueError, match=r"it trained on 120 train / 40 test images, .* holds 60 / 40: other") as e:
        Trainer(config(other, tmp_path, *extra), resume=True)
    assert "\n" not in str(e.value)
    moved = tmp_path / "moved"
    cifar10_root.rename(moved)  # the same data elsewhere resumes
    assert Trainer(config(moved, tmp_path, *extra), resume=True).step == 2


def test_resume_refuses_another_config_and_another_model(cifar10_root, tmp_path):
    Trainer(config(cifar10_root, tmp_path, "train.epochs=0.5", "train.tensorboard=false")).fit()
    with pytest.raises(ValueError, match=r"differs in \['optim.lr'\]"):
        Trainer(config(cifar10_root, tmp_path, "train.epochs=0.5", "optim.lr=0.3"), resume=True)
    state = load_checkpoint(tmp_path / "custom-s0")
    state["config"]["model"]["kwargs"] = {"width": 16}
    other = tmp_path / "other.pt"
    torch.save(state, other)
    with pytest.raises(ValueError) as e:
        evaluate_checkpoint(other)
    assert "weights of another model" in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"cannot load checkpoint .*broken\.pt"):
        load_checkpoint(tmp_path / "broken.pt")
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "missing.pt")


def test_fractional_epochs_and_time_limit(cifar10_root, tmp_path):
    summary = Trainer(config(cifar10_root, tmp_path, "train.epochs=1.5", "train.tensorboard=false")).fit()
    assert summary["steps"] == 10 and summary["epochs"] == pytest.approx(10 / 7, abs=1e-3)  # round(1.5 · 7)
    limited = Trainer(
        config(cifar10_root, tmp_path, "train.run_name=limited", "train.time_limit_minutes=1e-6", "train.epochs=5")
    ).fit()
    assert limited["stopped"] == "time_limit" and limited["steps"] == 1 and "top1" in limited["test"]


def test_cli_train_and_eval(cifar10_root, tmp_path, capsys):
    args = [*TINY, f"data.data_dir={cifar10_root}", f"train.out_dir={tmp_path}", "train.epochs=1"]
    args += ["train.progress=false"]
    assert main(["train", *args]) == 0
    assert "test top-1" in capsys.readouterr().out
    assert main(["eval", "--checkpoint", str(tmp_path / "custom-s0")]) == 0
    out = capsys.readouterr().out
    assert "top-1" in out and "per-class accuracy" in out and "routing on this split" in out
    assert json.loads((tmp_path / "custom-s0" / "eval_test.json").read_text())["samples"] == 40
    with pytest.raises(SystemExit) as e:
        main(["train", *args, "optim.lr=-1"])
    assert "optim.lr=-1.0" in str(e.value)
    with pytest.raises(SystemExit) as e:
        main(["train", *args])  # the run directory exists
    assert "--resume" in str(e.value)
    with pytest.raises(SystemExit) as e:
        main(["eval", "--checkpoint", str(tmp_path / "nowhere")])
    assert "no checkpoint" in str(e.value)


def test_missing_dataset_is_a_one_line_error(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        Trainer(config(tmp_path / "empty", tmp_path))
    message = str(e.value)
    assert "\n" not in message and "cifar-10-batches-py" in message


@pytest.mark.parametrize("eager", [True, False], ids=["eager", "deferred"])
def test_a_non_finite_loss_stops_the_run_before_a_checkpoint_holds_it(cifar10_root, tmp_path, eager):
    # deferred is the accelerator path (no host sync per step), forced here on the CPU. The dense
    # model has no router, whose own check would raise first on the CPU.
    extra = ["model.name=cnn_resnet_cifar", "optim.lr=1e30", "optim.warmup_epochs=0", "train.checkpoint_every_steps=1"]
    trainer = Trainer(config(cifar10_root, tmp_path, *extra))
    trainer.eager_finite_check = eager
    with pytest.raises(FloatingPointError) as e:
        trainer.fit()
    message = str(e.value)
    assert ("not finite" in message) != eager and ("loss nan" in message or "loss inf" in message) == eager
    bad = int(message.split("at step ")[1].split(";")[0])
    saved = load_checkpoint(tmp_path / "custom-s0")
    assert saved["step"] <= bad and all(torch.isfinite(v).all() for v in saved["model"].values())
    assert all(isinstance(saved["sums"][k], float) and math.isfinite(saved["sums"][k]) for k in ("loss", "aux"))
