"""Sweeps: expansion and names, resume after a killed run, failures recorded without losing other runs."""

import json
import math
import sys
import types

import pytest
import torch

import visionmoe.train.trainer as trainer_module
from visionmoe.studies import Run, Sweep, parse_axis, parse_seeds, run_sweep
from visionmoe.studies.executors import EXECUTE
from visionmoe.studies.plan import EXECUTORS, SweepPlan
from visionmoe.studies.presets import TINY

pytestmark = pytest.mark.usefixtures("one_thread")


def test_parse_axis_and_seeds():
    assert parse_axis("model.moe.k=1,2") == ("model.moe.k", [1, 2])
    assert parse_axis("model.kwargs.moe_stages=-1,[1, 2],all") == ("model.kwargs.moe_stages", [-1, [1, 2], "all"])
    assert parse_axis("model.kwargs.depths=[2,2,2]") is None  # one value: a fixed override
    assert parse_axis("model.moe={k: 1, router: topk}") is None
    assert parse_seeds("0-4") == (0, 1, 2, 3, 4) and parse_seeds("0-1,7") == (0, 1, 7)
    with pytest.raises(ValueError, match="seeds"):
        parse_seeds("0-1,1")


def test_expansion_names_and_pairs(tmp_path):
    bundles = {"standard": ["model.name=cnn_resnet_cifar_moe"], "depthwise": ["model.name=cnn_dw_cifar_moe"]}
    sweep = Sweep(
        "s",
        "cifar10_moe",
        grids=[{"backbone": bundles, "model.kwargs.width": [8, 16]}, {"backbone": bundles, "model.moe.k": [2, 1]}],
        seeds=(0, 1),
    )
    # Grid 1: 2 × 2 cells at the default k=2; grid 2 adds k=1 per backbone (its k=2 cells are grid 1's, at width 8).
    keys = [c for c in dict.fromkeys(r.key for r in sweep.runs(tmp_path)) if "twin" not in c]
    assert keys == [
        "backbone=standard,width=8,k=2",
        "backbone=standard,width=16,k=2",
        "backbone=depthwise,width=8,k=2",
        "backbone=depthwise,width=16,k=2",
        "backbone=standard,width=8,k=1",
        "backbone=depthwise,width=8,k=1",
    ]
    runs = sweep.runs(tmp_path)
    assert len(runs) == 6 * 2 * 2  # configurations × (MoE, twin) × seeds, seed 0 first
    moe, twin = runs[0], runs[1]
    assert moe.name == "backbone=standard,width=8,k=2-s0" and moe.reference == twin.key
    assert twin.key == "backbone=standard,width=8,k=2,twin=flops" and twin.twin == "flops"
    assert "model.dense_twin=flops" in twin.overrides and "model.dense_twin=flops" not in moe.overrides
    assert twin.config().model.kwargs == moe.config().model.kwargs == {"width": 8}
    assert moe.config().train.seed == 0 and moe.config().train.run_name == moe.name
    assert [r.seed for r in runs] == [0] * 12 + [1] * 12
    # Names are stable: the same sweep expands to the same directories.
    assert [r.name for r in sweep.runs(tmp_path)] == [r.name for r in runs]
    # A run's sweep_run.json (what the worker process and the report read) gives the run back.
    twin.run_dir.mkdir(parents=True)
    twin.spec_file.write_text(twin.to_json())
    assert twin.spec_file == twin.run_dir / "sweep_run.json" and Run.load(twin.spec_file) == twin


def test_plan_checks_its_arguments_and_shares_the_cores(tmp_path):
    sweep = Sweep("p", "cifar10_moe", grids=[{"model.moe.k": [1, 2]}], seeds=(0, 1))
    plan = SweepPlan.make(sweep, tmp_path, jobs=2, cores=5)
    # 2 configurations × (MoE, twin) × 2 seeds; 5 cores // 2 jobs = 2 threads per run
    assert len(plan.runs) == 8 and plan.seeds == (0, 1) and plan.threads == 2
    assert plan.runtime == ("train.threads=2", "train.progress=false")
    assert SweepPlan.make(sweep, tmp_path, jobs=4, cores=2).threads == 1  # never 0
    assert SweepPlan.make(sweep, tmp_path, executor="slurm", slurm={"cpus_per_task": 4}).threads == 4
    one_seed = SweepPlan.make(sweep, tmp_path, seeds=(1,)).to_dict()  # what sweep.json holds
    assert one_seed["seeds"] == [1] and one_seed["runs"] == [
        "k=1-s1",
        "k=1,twin=flops-s1",
        "k=2-s1",
        "k=2,twin=flops-s1",
    ]
    with pytest.raises(ValueError, match=r"executor must be one of \['local', 'inline', 'slurm'\], got 'ssh'"):
        SweepPlan.make(sweep, tmp_path, executor="ssh")
    with pytest.raises(ValueError, match="got jobs=0, retries=1"):
        SweepPlan.make(sweep, tmp_path, jobs=0)
    with pytest.raises(ValueError, match=r"seeds must name at least one seed .*got \(\)"):
        SweepPlan.make(sweep, tmp_path, seeds=())
    assert list(EXECUTE) == list(EXECUTORS)  # every executor name run_sweep accepts has its executor
    assert not any(tmp_path.iterdir())  # a plan writes nothing


def test_baseline_and_name_collisions(tmp_path):
    heads = {"dense": ["model.name=a"], "sparse": ["model.name=b"]}
    runs = Sweep("h", "cifar10_moe", grids=[{"head": heads}], twins=False, baseline={"head": "dense"}).runs(tmp_path)
    assert [(r.key, r.reference) for r in runs] == [("head=dense", None), ("head=sparse", "head=dense")]
    clash = Sweep("c", "cifar10_moe", grids=[{"model.kwargs.x": ["a/b", "a:b"]}])
    with pytest.raises(ValueError, match="same directory name"):
        clash.runs(tmp_path)


def test_twin_shares_data_and_initialisation_of_shared_parts():
    # What the sweep docstring claims, checked the way the Trainer seeds a run: every non-MoE weight of the
    # twin equals the MoE model's at initialisation.
    from visionmoe.train.config import load_config
    from visionmoe.train.trainer import build_model

    config = load_config("cifar10_moe", ["model.name=cnn_resnet_cifar_moe", "model.kwargs.width=8"])
    example = torch.randn(2, 3, 32, 32)
    torch.manual_seed(0)
    moe = build_model(config.model, 10, example)
    config.model.dense_twin = "flops"
    torch.manual_seed(0)
    twin = build_model(config.model, 10, example)
    moe_state, twin_state = moe.state_dict(), twin.state_dict()
    shared = [k for k in moe_state if k in twin_state and ".mlp." not in k]
    assert len(shared) > 20 and all(torch.equal(moe_state[k], twin_state[k]) for k in shared)


def summary_top1(run_dir):
    """The test top-1 a run's summary.json records: what the manifest's top1 column must say."""
    return json.loads((run_dir / "summary.json").read_text())["test"]["top1"]


def assert_top1(value, run_dir):
    # A fraction in [0, 1] (reports print it in %), equal to the summary's: NaN or None fails every comparison.
    assert math.isfinite(value) and 0 <= value <= 1 and value == summary_top1(run_dir), (value, run_dir)


def tiny_sweep(data, **kwargs):
    overrides = (*TINY, f"data.data_dir={data}", "model.name=cnn_resnet_cifar_moe", "model.kwargs.width=8")
    return Sweep("t", "cifar10_moe", overrides=overrides, **kwargs)


def test_resume_after_a_killed_run_and_skip_finished(tmp_path, standin_data, monkeypatch):
    sweep = tiny_sweep(standin_data, grids=[{"model.moe.k": [2]}])
    sweep.overrides = (*sweep.overrides, "data.batch_size=32", "train.checkpoint_every_steps=1")  # 3 steps
    moe = sweep.runs(tmp_path)[0]

    # Kill the MoE run after its second step (checkpointed), as a killed worker would leave it: no summary.
    def kill(trainer):
        if trainer.step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        trainer_module.Trainer(moe.config(["train.progress=false"]), callbacks=[kill]).fit()
    assert (moe.run_dir / "checkpoint.pt").is_file() and not (moe.run_dir / "summary.json").exists()

    resumed = []

    class Spy(trainer_module.Trainer):
        def __init__(self, config, *, resume=False, **kwargs):
            resumed.append((config.train.run_name, resume))
            super().__init__(config, resume=resume, **kwargs)

    monkeypatch.setattr(trainer_module, "Trainer", Spy)
    manifest = run_sweep(sweep, tmp_path, executor="inline", echo=lambda line: None)
    assert resumed == [(moe.name, True), ("k=2,twin=flops-s0", False)]
    assert manifest["status"].tolist() == ["done", "done"] and manifest["attempts"].tolist() == [1, 1]
    summary = json.loads((moe.run_dir / "summary.json").read_text())
    assert summary["steps"] == 3  # resumed at step 2 and finished the epoch
    for top1, run in zip(manifest["top1"], sweep.runs(tmp_path), strict=True):
        assert_top1(top1, run.run_dir)  # so the comparisons of top1 below compare numbers

    resumed.clear()
    again = run_sweep(sweep, tmp_path, executor="inline", echo=lambda line: None)
    assert resumed == []  # nothing runs again, and the manifest is still the whole sweep's: what the first recorded
    columns = ["status", "attempts", "seconds", "top1"]
    assert again[columns].to_dict("records") == manifest[columns].to_dict("records")

    # Without the manifest (lost, or written by an older visionmoe) the record comes from summary.json.
    (tmp_path / "manifest.json").unlink()
    rebuilt = run_sweep(sweep, tmp_path, executor="inline", echo=lambda line: None)
    assert rebuilt["status"].tolist() == ["done", "done"] and rebuilt["attempts"].tolist() == [1, 1]
    summary = json.loads((moe.run_dir / "summary.json").read_text())
    assert rebuilt["seconds"][0] == pytest.approx(summary["train_seconds"] + summary["eval_seconds"])
    assert rebuilt["top1"].tolist() == manifest["top1"].tolist()


def test_reuse_copies_finished_runs_of_the_same_config_from_another_sweep(tmp_path, standin_data, monkeypatch):
    first = tiny_sweep(standin_data, grids=[{"model.moe.k": [2]}])
    run_sweep(first, tmp_path / "first", executor="inline", echo=lambda line: None)
    trained = []

    class Spy(trainer_module.Trainer):
        def __init__(self, config, **kwargs):
            trained.append(config.train.run_name)
            super().__init__(config, **kwargs)

    monkeypatch.setattr(trainer_module, "Trainer", Spy)
    second = tiny_sweep(standin_data, grids=[{"model.moe.k": [1, 2]}])
    second.name = "second"
    second.overrides = (*second.overrides, "train.threads=1")  # changes no result: still the same config
    manifest = run_sweep(second, tmp_path / "second", executor="inline", reuse=[tmp_path / "first"], echo=print)
    assert trained == ["k=1-s0", "k=1,twin=flops-s0"]  # k=2 and its twin are the first sweep's
    status = dict(zip(manifest["name"], manifest["status"], strict=True))
    assert status == {"k=1-s0": "done", "k=1,twin=flops-s0": "done", "k=2-s0": "reused", "k=2,twin=flops-s0": "reused"}
    for name in ("k=2-s0", "k=2,twin=flops-s0"):
        source, copy = tmp_path / "first" / name, tmp_path / "second" / name
        a, b = (json.loads((d / "summary.json").read_text()) for d in (source, copy))
        assert b["test"] == a["test"] and b["reused_from"] == str(source) and b["run_dir"] == str(copy)
        assert json.loads((copy / "sweep_run.json").read_text())["study"] == "second"
        assert manifest.set_index("name").loc[name, "source"] == str(source)
        assert_top1(manifest.set_index("name").loc[name, "top1"], source)
    trained.clear()
    again = run_sweep(second, tmp_path / "second", executor="inline", echo=lambda line: None)
    assert trained == []  # the copies' configs are theirs: not stale
    assert again[["name", "status", "source"]].equals(manifest[["name", "status", "source"]])
    (tmp_path / "second" / "manifest.json").unlink()  # rebuilt from the summaries: still reused, from where
    rebuilt = run_sweep(second, tmp_path / "second", executor="inline", echo=lambda line: None)
    assert rebuilt[["name", "status", "source"]].equals(manifest[["name", "status", "source"]])
    with pytest.raises(FileNotFoundError, match="--reuse"):
        run_sweep(second, tmp_path / "third", executor="inline", reuse=[tmp_path / "nowhere"], echo=lambda line: None)


def test_reuse_needs_the_same_data_threads_and_a_run_that_ended_as_asked(tmp_path, standin_data):
    # data.data_dir and train.threads may change on resume (the checkpoint checks the classes, the trainer
    # keeps its threads), but a copied run has neither check: another data directory or thread count is
    # another run. A run stopped by a time limit is finished only for a sweep asking that same limit.
    import shutil

    first = tiny_sweep(standin_data, grids=[{"model.moe.k": [2]}], twins=False)
    run_sweep(first, tmp_path / "first", executor="inline", cores=1, echo=lambda line: None)
    limited = tiny_sweep(standin_data, grids=[{"model.moe.k": [2]}], twins=False)
    limited.overrides = (*limited.overrides, "train.time_limit_minutes=1e-9")
    run_sweep(limited, tmp_path / "limited", executor="inline", cores=1, echo=lambda line: None)
    moved = tmp_path / "moved"
    shutil.copytree(standin_data, moved)  # the same files at another place: not known to be the same data

    def statuses(sweep, out, cores=1, sources=("first",)):
        reuse = [tmp_path / source for source in sources]
        manifest = run_sweep(sweep, tmp_path / out, executor="inline", cores=cores, reuse=reuse, echo=print)
        return manifest["status"].tolist()

    assert statuses(tiny_sweep(moved, grids=[{"model.moe.k": [2]}], twins=False), "a") == ["done"]
    assert statuses(tiny_sweep(standin_data, grids=[{"model.moe.k": [2]}], twins=False), "b", cores=2) == ["done"]
    (tmp_path / "c" / "k=2-s0").mkdir(parents=True)  # left by an attempt that failed before training
    (tmp_path / "c" / "k=2-s0" / "sweep_run.json").write_text("{}")
    assert statuses(tiny_sweep(standin_data, grids=[{"model.moe.k": [2]}], twins=False), "c") == ["reused"]
    unlimited = tiny_sweep(standin_data, grids=[{"model.moe.k": [2]}], twins=False)
    assert statuses(unlimited, "d", sources=("limited",)) == ["done"]  # a 1-step run is no full run
    assert statuses(limited, "e", sources=("limited",)) == ["reused"]


def test_a_run_stopped_by_a_time_limit_trains_on_when_the_limit_is_lifted(tmp_path, standin_data):
    sweep = tiny_sweep(standin_data, grids=[{"model.moe.k": [2]}], twins=False)
    sweep.overrides = (*sweep.overrides, "data.batch_size=32")  # 3 steps
    limited = tiny_sweep(standin_data, grids=[{"model.moe.k": [2]}], twins=False)
    limited.overrides = (*sweep.overrides, "train.time_limit_minutes=1e-9")  # stops after its first step
    run_sweep(limited, tmp_path, executor="inline", echo=lambda line: None)
    summary = tmp_path / "k=2-s0" / "summary.json"
    assert json.loads(summary.read_text())["steps"] == 1
    assert run_sweep(limited, tmp_path, executor="inline", echo=lambda line: None)["attempts"].tolist() == [1]
    assert json.loads(summary.read_text())["steps"] == 1  # the same limit: finished, not trained again
    run_sweep(sweep, tmp_path, executor="inline", echo=lambda line: None)
    assert json.loads(summary.read_text())["stopped"] == "completed"
    assert json.loads(summary.read_text())["steps"] == 3  # resumed from its checkpoint, trained to the end


def test_failures_are_recorded_and_cost_no_other_run(tmp_path, standin_data):
    # Four cells (each grid varies one axis from the first values): a good one; a class count the data
    # contradicts (found only once the data is loaded: fails while running, retried once); a capacity
    # factor the MoE layer refuses and a learning rate the config refuses (invalid: found before
    # anything trains, recorded, never run).
    sweep = tiny_sweep(
        standin_data,
        grids=[{"data.num_classes": [10, 2]}, {"optim.lr": [0.4, -1.0]}, {"model.moe.capacity_factor": [1.25, 0]}],
        twins=False,
    )
    lines = []
    manifest = run_sweep(sweep, tmp_path, executor="inline", retries=1, echo=lines.append).set_index("key")
    assert manifest.loc["num_classes=10,lr=0.4,capacity_factor=1.25", "status"] == "done"
    done_top1 = manifest.loc["num_classes=10,lr=0.4,capacity_factor=1.25", "top1"]
    assert_top1(done_top1, tmp_path / "num_classes=10,lr=0.4,capacity_factor=1.25-s0")
    failed = manifest.loc["num_classes=2,lr=0.4,capacity_factor=1.25"]
    assert failed["status"] == "failed" and failed["attempts"] == 2 and "num_classes=2" in failed["error"]
    assert math.isnan(failed["top1"])  # no summary: no top-1
    invalid = manifest.loc["num_classes=10,lr=-1.0,capacity_factor=1.25"]
    assert invalid["status"] == "invalid" and invalid["attempts"] == 0 and "optim.lr" in invalid["error"]
    invalid = manifest.loc["num_classes=10,lr=0.4,capacity_factor=0"]
    assert invalid["status"] == "invalid" and invalid["attempts"] == 0 and "capacity_factor=0" in invalid["error"]
    assert (manifest["status"] == "invalid").sum() == 2
    # Reported before the first run trains (its line, "...: top-1 ...", comes later).
    first_run = next(i for i, line in enumerate(lines) if "attempt 1" in line)
    assert sum("invalid, not run" in line for line in lines[:first_run]) == 2, lines
    on_disk = json.loads((tmp_path / "manifest.json").read_text())
    assert {r["status"] for r in on_disk} == {"done", "failed", "invalid"}
    assert (tmp_path / "manifest.csv").is_file() and (tmp_path / "sweep.json").is_file()


def test_local_workers_record_a_crash(tmp_path, standin_data):
    # Real worker processes: one run trains, the other crashes in its worker; both are recorded.
    sweep = tiny_sweep(standin_data, grids=[{"data.num_classes": [10, 2]}], twins=False)
    manifest = run_sweep(sweep, tmp_path, executor="local", jobs=2, retries=0, echo=lambda line: None)
    status = dict(zip(manifest["key"], manifest["status"], strict=True))
    assert status == {"num_classes=10": "done", "num_classes=2": "failed"}
    assert_top1(manifest.set_index("key").loc["num_classes=10", "top1"], tmp_path / "num_classes=10-s0")
    error = manifest.set_index("key").loc["num_classes=2", "error"]
    assert "worker exited with 1" in error and "ValueError" in error
    assert "num_classes=2" in (tmp_path / "num_classes=2-s0" / "sweep.log").read_text()


def test_slurm_executor(tmp_path, standin_data, monkeypatch):
    sweep = tiny_sweep(standin_data, grids=[{"data.num_classes": [2]}], twins=False)  # fails once its data loads
    monkeypatch.setitem(sys.modules, "submitit", None)  # not installed
    with pytest.raises(ImportError, match=r"pip install 'visionmoe\[slurm\]'"):
        run_sweep(sweep, tmp_path, executor="slurm", echo=lambda line: None)

    submitted = []

    class Job:  # runs at once, like a cluster that is very fast
        def __init__(self, fn, args):
            try:
                self.value, self.error = fn(*args), None
            except Exception as error:
                self.value, self.error = None, error

        def done(self):
            return True

        def result(self):
            if self.error:
                raise self.error
            return self.value

    class AutoExecutor:
        def __init__(self, folder):
            self.folder = folder

        def update_parameters(self, **params):
            self.params = params

        def submit(self, fn, *args):
            submitted.append(args[0].name)
            return Job(fn, args)

    monkeypatch.setitem(sys.modules, "submitit", types.SimpleNamespace(AutoExecutor=AutoExecutor))
    manifest = run_sweep(sweep, tmp_path, executor="slurm", retries=1, slurm={"cpus_per_task": 1}, echo=print)
    assert submitted == ["num_classes=2-s0"] * 2 and manifest["status"].tolist() == ["failed"]


def test_estimate_times_every_configuration_and_trains_nothing(tmp_path, standin_data, capsys):
    from visionmoe.cli import main
    from visionmoe.studies import estimate_sweep

    sweep = tiny_sweep(standin_data, grids=[{"model.moe.k": [1, 2]}], seeds=(0, 1, 2))
    table = estimate_sweep(sweep, jobs=2, cores=2, steps=1, out=str(tmp_path), echo=lambda line: None)
    assert table["config"].tolist() == ["k=1", "k=1,twin=flops", "k=2", "k=2,twin=flops"]
    assert (table["seconds_per_step"] > 0).all() and (table["eval_minutes"] > 0).all()
    # TINY: 1 epoch of 256 stand-in images (120 here) at batch 64 → 1 step with drop_last, 1 evaluation
    assert table["steps"].tolist() == [1, 1, 1, 1]
    a = table.attrs
    assert a["threads"] == 1 and a["minutes_per_seed"] == pytest.approx(table["minutes"].sum())
    assert a["hours"] == pytest.approx(a["minutes_per_seed"] * 3 / 2 / 60)
    # CPU time: the process's, while it ran (one thread here: at most the wall time, plus clock granularity)
    assert (table["cpu_seconds_per_step"] > 0).all() and (table["cpu_minutes"] > 0).all()
    assert a["cpu_hours"] == pytest.approx(table["cpu_minutes"].sum() * 3 / 2 / 60)
    assert not any(tmp_path.iterdir())  # nothing trained, nothing written
    run_sweep(sweep, tmp_path, seeds=(0,), executor="inline", echo=lambda line: None)
    again = estimate_sweep(sweep, jobs=2, cores=2, steps=1, out=str(tmp_path), echo=lambda line: None)
    assert len(again) == 4  # a sweep under way (checkpoints in its run directories) is estimated too
    sized = tiny_sweep(standin_data, grids=[{"model.moe.k": [2]}])  # eval.batch_sizes: one more test pass per size
    sized.overrides = (*sized.overrides, "eval.batch_sizes=[1, 32]")
    sized = estimate_sweep(sized, jobs=2, cores=2, steps=1, out=str(tmp_path), echo=lambda line: None)
    assert (sized["eval_minutes"] > 0).all() and (sized["cpu_minutes"] > 0).all()

    overrides = [f"data.data_dir={standin_data}", "model.kwargs.width=8"]
    assert (
        main(
            [
                "sweep",
                "--preset",
                "topk",
                "--tiny",
                "--estimate",
                "--estimate-steps",
                "1",
                "--out",
                str(tmp_path),
                *overrides,
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "| k=1,twin=flops |" in out and "min per seed" in out


def test_an_out_directory_given_with_a_tilde(tmp_path, standin_data, monkeypatch):
    # `--out=~/sw` reaches Python unexpanded: every file goes to $HOME/sw (the trainer expanded it, the sweep's
    # own files went to a literal ./~/sw), and the run records the path as given, not this machine's home.
    from visionmoe.studies.status import sweep_status

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    sweep = tiny_sweep(standin_data, grids=[{"model.moe.k": [2]}], twins=False)
    manifest = run_sweep(sweep, "~/sw", executor="inline", echo=lambda line: None)
    assert manifest["status"].tolist() == ["done"]
    home = tmp_path / "home" / "sw"
    assert (home / "manifest.json").is_file() and (home / "sweep.json").is_file() and not (tmp_path / "~").exists()
    assert json.loads((home / "k=2-s0" / "summary.json").read_text())["run_dir"] == "~/sw/k=2-s0"
    assert sweep_status(sweep, "~/sw")["state"].tolist() == ["finished"]


def test_the_manifest_keeps_earlier_sittings(tmp_path, standin_data):
    # Seed 0 then seed 1 in two invocations: both rows stay. A run that failed in one sitting (its data
    # missing) and finished in the next counts both attempts; --retries counts this sitting's only.
    sweep = tiny_sweep(standin_data, grids=[{"model.moe.k": [2]}], twins=False)
    run_sweep(sweep, tmp_path / "seeds", seeds=(0,), executor="inline", echo=lambda line: None)
    manifest = run_sweep(sweep, tmp_path / "seeds", seeds=(1,), executor="inline", echo=lambda line: None)
    assert sorted(manifest["name"]) == ["k=2-s0", "k=2-s1"] and set(manifest["status"]) == {"done"}
    on_disk = json.loads((tmp_path / "seeds" / "manifest.json").read_text())
    assert sorted(row["name"] for row in on_disk) == ["k=2-s0", "k=2-s1"]
    from visionmoe.studies.status import sweep_status
    from visionmoe.studies.sweep import recorded_seeds

    assert recorded_seeds(tmp_path / "seeds") == [0, 1]  # sweep.json: every seed run, what --status shows
    assert sweep_status(sweep, tmp_path / "seeds", recorded_seeds(tmp_path / "seeds"))["state"].tolist() == [
        "finished",
        "finished",
    ]

    broken = tiny_sweep(tmp_path / "no-data", grids=[{"model.moe.k": [2]}], twins=False)
    failed = run_sweep(broken, tmp_path / "retry", executor="inline", retries=0, echo=lambda line: None)
    assert failed["status"].tolist() == ["failed"] and failed["attempts"].tolist() == [1]
    first_seconds = failed["seconds"].iloc[0]
    done = run_sweep(sweep, tmp_path / "retry", executor="inline", retries=0, echo=lambda line: None)
    assert done["status"].tolist() == ["done"] and done["attempts"].tolist() == [2]
    assert done["seconds"].iloc[0] > first_seconds and done["run_dir"].tolist() == [str(tmp_path / "retry" / "k=2-s0")]


def test_an_unknown_preset_is_refused_before_anything_is_written(tmp_path):
    from visionmoe.cli import main

    with pytest.raises(SystemExit) as e:
        main(["sweep", "--preset", "nosuch", "--out", str(tmp_path / "x")])
    message = str(e.value)
    assert "no preset 'nosuch'" in message and "topk" in message and "cifar10_moe" in message
    assert "\n" not in message and not (tmp_path / "x").exists()
