"""keep_freed_memory: after it, glibc serves a large tensor from its heap and reuses its pages; the trainer
applies it unless told not to, records what it did, and a run resumes across the setting."""

import json
import subprocess
import sys

import pytest

from visionmoe.allocator import KEPT, keep_freed_memory, mapped_bytes
from visionmoe.train import Trainer, load_config

# In a fresh interpreter (the setting is process-wide and cannot be undone): a 64 MiB tensor allocated and
# freed 4 times; prints the bytes glibc mapped for it and the page faults of the last 3 rounds.
PROBE = """
import json, resource, sys, torch
from visionmoe.allocator import keep_freed_memory, mapped_bytes
from visionmoe.allocator import kept
status = keep_freed_memory() if sys.argv[1] == "keep" else None
assert kept() == (status == "keep freed")
def round_():
    before, faults = mapped_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(16 * 2**20)
    mapped = mapped_bytes() - before
    del x
    return mapped, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
rounds = [round_() for _ in range(4)]
print(json.dumps({"status": status, "mapped": rounds[0][0], "faults": [f for _, f in rounds[1:]]}))
"""

glibc_only = pytest.mark.skipif(mapped_bytes() is None, reason="needs glibc >= 2.33 (mallinfo2)")


def probe(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@glibc_only
def test_freed_tensors_stay_mapped_and_their_pages_are_reused():
    pages = 16 * 2**20 * 4 // 4096  # the tensor's 4 KiB pages
    default, keep = probe("default"), probe("keep")
    # glibc's defaults: the tensor is its own mapping, unmapped when freed, faulted in again every round
    assert default["status"] is None and default["mapped"] >= 64 * 2**20
    # kept: served from the heap, and once the heap has grown, the same pages serve the next rounds
    assert keep["status"] == KEPT and keep["mapped"] == 0
    assert min(keep["faults"]) < min(pages // 100, *default["faults"]), (keep, default)  # ~pages, or fewer with THP


def test_outside_glibc_it_changes_nothing_and_says_so(monkeypatch):
    import visionmoe.allocator as allocator

    monkeypatch.setattr(allocator, "_glibc", lambda: None)
    assert keep_freed_memory() == "not glibc" and mapped_bytes() is None


def test_the_trainer_applies_it_records_it_and_resumes_across_it(cifar10_root, tmp_path, monkeypatch):
    import visionmoe.train.trainer as trainer_module

    calls = []
    monkeypatch.setattr(trainer_module, "keep_freed_memory", lambda: calls.append(1) or KEPT)
    monkeypatch.setattr(trainer_module, "kept", lambda: False)  # as if no earlier run of this process kept it

    def run(*extra, resume=False):
        overrides = ["model.name=cnn_resnet_cifar_moe", "model.kwargs={width: 8}", "data.batch_size=16"]
        overrides += [f"data.data_dir={cifar10_root}", f"train.out_dir={tmp_path}", "train.progress=false"]
        overrides += ["train.tensorboard=false", *extra]
        return Trainer(load_config(None, overrides), resume=resume)

    first = run("train.epochs=1", "train.keep_freed_memory=false")
    assert calls == [] and first.malloc == "allocator defaults"
    first.fit()
    assert json.loads((tmp_path / "custom-s0" / "summary.json").read_text())["malloc"] == "allocator defaults"
    resumed = run("train.epochs=1", resume=True)  # the default: on; a setting a run resumes across
    assert calls == [1] and resumed.malloc == KEPT
    monkeypatch.setattr(trainer_module, "kept", lambda: True)  # once kept, a later run of the process says so
    again = run("train.epochs=1", "train.keep_freed_memory=false", resume=True)
    assert calls == [1] and again.malloc == f"{KEPT} (by an earlier run of this process)"
