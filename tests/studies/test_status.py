"""Where a sweep stands (``--status``), and one sweep at a time per directory (the lock)."""

import json
import subprocess
import sys
import textwrap

import pytest

from visionmoe.cli import main
from visionmoe.studies import Sweep, lock, run_sweep
from visionmoe.studies.lock import SweepBusy, lock_holder, sweep_lock
from visionmoe.studies.status import status_markdown, sweep_status
from visionmoe.train.config import save_config


def sweep(data="unused"):
    overrides = (f"data.data_dir={data}", "model.name=cnn_resnet_cifar_moe", "train.epochs=4")
    return Sweep("s", "cifar10_moe", grids=[{"model.kwargs.width": [8]}], overrides=overrides, seeds=(0, 1))


def test_status_of_a_sweep_in_several_states(tmp_path):
    # Four runs: the MoE and its twin under seeds 0 and 1. Seed 0's MoE finished (6 min), its twin
    # failed twice; seed 1's MoE logged 1 of 4 epochs; seed 1's twin never began.
    moe0, twin0, moe1, twin1 = sweep().runs(tmp_path)
    moe0.run_dir.mkdir(parents=True)
    summary = {"train_seconds": 300.0, "eval_seconds": 60.0, "test": {"top1": 0.625}}
    (moe0.run_dir / "summary.json").write_text(json.dumps(summary))
    moe1.run_dir.mkdir()
    save_config(moe1.config(), moe1.run_dir / "config.yaml")
    (moe1.run_dir / "metrics.jsonl").write_text(json.dumps({"epoch": 1.0, "step": 97}) + "\n")
    manifest = [
        {"name": twin0.name, "status": "failed", "attempts": 2},
        {"name": moe0.name, "status": "done", "attempts": 1},
    ]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))

    table = sweep_status(sweep(), tmp_path).set_index("name")
    assert table["state"].to_dict() == {
        moe0.name: "finished",
        twin0.name: "failed",
        moe1.name: "started",
        twin1.name: "pending",
    }
    assert table.loc[moe0.name, "minutes"] == 6.0 and table.loc[moe0.name, "top1"] == 0.625
    assert table.loc[twin0.name, "attempts"] == 2 and table.loc[moe1.name, "epochs_done"] == 1.0
    # Seed 1's MoE: 6 min × (1 - 1/4) = 4.5 min left; the twin has no finished seed to be timed by.
    assert table.loc[moe1.name, "minutes_left"] == pytest.approx(4.5)
    assert table["minutes_left"].isna().sum() == 2
    assert table.attrs == {"running": None, "minutes_left": pytest.approx(4.5), "untimed": 2}
    text = status_markdown(table.reset_index(), "sweep s")
    assert f"| {moe1.name} | started | — | — | 1/4 | 0 | 4 |" in text  # 4.5 rounds to even
    assert "about 0.1 h of runs left at one job, plus 2 run(s) with no finished seed" in text
    assert "no sweep is running there" in text


no_flock = pytest.mark.skipif(lock.fcntl is None, reason="no fcntl (Windows): no lock")


@no_flock
def test_a_second_sweep_on_the_same_directory_stops_at_once(tmp_path, monkeypatch):
    with sweep_lock(tmp_path):
        holder = lock_holder(tmp_path)
        assert holder.startswith("pid ") and " since " in holder
        trained = []
        monkeypatch.setattr("visionmoe.studies.executors.run_one", lambda run, runtime=(): trained.append(run))
        with pytest.raises(SweepBusy, match=r"in use by another visionmoe sweep \(pid \d+ on "):
            run_sweep(sweep(), tmp_path, executor="inline", echo=lambda line: None)
        assert trained == [] and not (tmp_path / "manifest.json").exists()
        assert sweep_status(sweep(), tmp_path).attrs["running"] == holder
    assert lock_holder(tmp_path) is None
    with sweep_lock(tmp_path):  # released: the next sweep takes it
        pass


@no_flock
def test_a_killed_holder_leaves_no_lock_behind(tmp_path):
    # Another process takes the lock and is killed; the kernel drops it, the file stays. (lock.py needs
    # only the standard library: loaded by path, the child starts without importing torch.)
    code = textwrap.dedent(f"""
        import importlib.util, os, signal
        spec = importlib.util.spec_from_file_location("lock", {str(lock.__file__)!r})
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        with module.sweep_lock({str(tmp_path)!r}):
            print("locked", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "locked" and result.returncode == -9, result.stderr
    assert (tmp_path / ".sweep.lock").is_file() and lock_holder(tmp_path) is None


def test_cli_status(tmp_path, capsys):
    out = tmp_path / "topk"
    assert main(["sweep", "--preset", "topk", "--tiny", "--seeds", "0-1", "--out", str(out), "--status"]) == 0
    printed = capsys.readouterr().out
    assert "8 runs (8 pending); about 0.0 h of runs left at one job, plus 8 run(s)" in printed
    assert not out.exists()  # nothing written


@pytest.mark.parametrize(
    ("mode", "extra", "named"),
    [
        ("--status", ["--jobs", "2"], "--jobs"),
        ("--status", ["--retries", "3"], "--retries"),
        ("--estimate", ["--reuse", "runs/old"], "--reuse"),
        ("--estimate", ["--executor", "inline"], "--executor"),
        ("--estimate", ["--status"], "--status"),
    ],
)
def test_status_and_estimate_refuse_options_they_would_ignore(mode, extra, named, tmp_path):
    # --status and --estimate train nothing: an option that only changes how runs train is named, not
    # silently dropped (--jobs still counts for --estimate: its time left is at that many jobs).
    out = tmp_path / "topk"
    with pytest.raises(SystemExit, match=f"visionmoe sweep: {mode} trains nothing, so {named} would be ignored"):
        main(["sweep", "--preset", "topk", "--tiny", "--out", str(out), mode, *extra])
    assert not out.exists()


def test_a_preset_given_as_a_yaml_path_names_the_sweep_by_its_stem(tmp_path, monkeypatch, capsys):
    # Not "runs/configs/my_recipe.yaml": the sweep is my_recipe, in runs/my_recipe.
    recipe = tmp_path / "configs" / "my_recipe.yaml"
    recipe.parent.mkdir()
    recipe.write_text("base: cifar10_moe\n")
    monkeypatch.chdir(tmp_path)
    assert main(["sweep", "--preset", "configs/my_recipe.yaml", "--status", "train.epochs=1,2"]) == 0
    assert "sweep my_recipe in runs/my_recipe" in capsys.readouterr().out
