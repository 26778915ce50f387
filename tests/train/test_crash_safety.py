"""What a crash can tear (issue 18): only the last line of metrics.jsonl, which resume drops with a warning."""

import json
import logging

import pytest

from visionmoe.jsonl import append_jsonl, read_jsonl
from visionmoe.train.logger import RunLogger


def record(step):
    return {"epoch": step / 10, "step": step, "train_loss": 1.0 / step, "routing": {}}


def test_resume_drops_a_torn_last_line_with_a_warning(tmp_path, caplog):
    logger = RunLogger(tmp_path, tensorboard=False)
    logger.log(record(10))
    logger.log(record(20))
    logger.close()
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write(json.dumps(record(30))[:25])  # power lost mid-write: half a line, no newline
    with caplog.at_level(logging.WARNING, logger="visionmoe.jsonl"):
        resumed = RunLogger(tmp_path, tensorboard=False, resume_step=30)
    assert [r["step"] for r in resumed.records] == [10, 20]
    assert "incomplete last line 3" in caplog.text
    resumed.log(record(30))
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [10, 20, 30]  # the torn half is gone
    assert (tmp_path / "metrics.csv").read_text().count("\n") == 4  # header + 3 rows


def test_a_damaged_line_inside_the_file_is_an_error_naming_it(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(record(10)) + "\n{broken\n" + json.dumps(record(30)) + "\n")
    with pytest.raises(ValueError) as e:
        read_jsonl(path)
    assert f"{path}:2" in str(e.value) and "\n" not in str(e.value)


def test_each_record_is_one_complete_line(tmp_path):
    path = tmp_path / "log.jsonl"
    append_jsonl(path, {"a": 1})
    append_jsonl(path, {"b": "x" * 100_000})  # far over any buffer: still one line, whole
    assert read_jsonl(path) == [{"a": 1}, {"b": "x" * 100_000}]
    assert path.read_text().endswith("}\n")


def test_load_history_and_status_read_past_a_torn_last_line(tmp_path):
    from visionmoe.analysis.routing import load_history
    from visionmoe.studies.status import _logged_epochs

    stats = {"tokens_per_expert": [3, 1], "dropped_fraction": 0.0}
    (tmp_path / "metrics.jsonl").write_text(json.dumps({**record(10), "routing": {"moe": stats}}) + '\n{"epo')
    assert len(load_history(tmp_path)) == 2  # one record, one layer, two experts
    assert _logged_epochs(tmp_path) == 1.0  # the last whole record's epoch, not 0


def test_write_atomic_leaves_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    """A crash between writing and renaming (here: fsync fails) must leave the previous file whole:
    sweep_run.json, the worker specs and eval_*.json are written this way."""
    import os

    from visionmoe.jsonl import write_atomic

    path = tmp_path / "sweep_run.json"
    write_atomic(path, '{"seed": 0}\n')

    def crash(fd):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk gone"):
        write_atomic(path, '{"seed": 1, "half": ')
    assert path.read_text() == '{"seed": 0}\n'


def test_a_checkpoint_is_on_disk_before_it_replaces_the_previous_one(tmp_path, monkeypatch):
    """save_checkpoint syncs the new file before the rename: a crash (here: fsync fails) before it is on disk
    leaves the previous checkpoint in place, and one that succeeds synced exactly the file it renamed."""
    import os

    import torch

    from visionmoe.train.checkpoint import save_checkpoint

    def load_checkpoint(path):
        return torch.load(path, weights_only=True)

    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"step": 1})
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    save_checkpoint(path, {"step": 2, "w": torch.ones(3)})
    assert synced == [str(tmp_path / "checkpoint.pt.tmp")] and load_checkpoint(path)["step"] == 2

    def crash(fd):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk gone"):
        save_checkpoint(path, {"step": 3})
    assert load_checkpoint(path)["step"] == 2
