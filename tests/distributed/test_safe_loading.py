"""A run directory is data, never code: DCP metadata is unpickled admitting only what torch writes (issue 18)."""

import os
import pickle

import pytest
import torch
from torch import nn

from visionmoe.distributed import read_checkpoint, save_sharded
from visionmoe.train import load_checkpoint


class Payload:
    """Unpickled by plain pickle, this creates ``marker``: proof that a file's code ran."""

    def __init__(self, call, args):
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


def small_checkpoint(path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))  # int64 num_batches_tracked: another dtype
    model.register_buffer("scale", torch.full((2,), 0.5, dtype=torch.bfloat16))  # and a third
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(5, 3)).sum().backward()
    optimizer.step()
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": 1, "config": {"name": "x"}}
    save_sharded(path, state, model, optimizer, None)
    return model


def test_a_real_checkpoint_still_reads(tmp_path):
    model = small_checkpoint(tmp_path / "checkpoint.dcp")
    state = read_checkpoint(tmp_path / "checkpoint.dcp")
    for key, value in model.state_dict().items():
        assert torch.equal(state["model"][key], value), key
    assert state["optimizer"]["state"][0]["momentum_buffer"].shape == (4, 3)
    assert load_checkpoint(tmp_path)["step"] == 1  # the run directory, as `visionmoe eval` gets it


@pytest.mark.parametrize("call", ["system", "open"])
def test_crafted_metadata_is_refused_and_never_runs(tmp_path, call):
    small_checkpoint(tmp_path / "checkpoint.dcp")
    marker = tmp_path / "pwned"
    payload = Payload(os.system, (f"touch {marker}",)) if call == "system" else Payload(open, (str(marker), "w"))
    metadata = tmp_path / "checkpoint.dcp" / ".metadata"
    metadata.write_bytes(pickle.dumps(payload))
    for load in (load_checkpoint, lambda run: read_checkpoint(run / "checkpoint.dcp")):
        with pytest.raises(ValueError) as e:
            load(tmp_path)
        message = str(e.value)
        assert "\n" not in message and str(metadata) in message and "refused" in message, message
        assert not marker.exists()


def test_a_pickle_hidden_inside_real_metadata_is_refused(tmp_path):
    # The real metadata with one field replaced by a payload: the first foreign global stops the load.
    from visionmoe.distributed.checkpoint import read_metadata

    small_checkpoint(tmp_path / "ck")
    real = read_metadata(tmp_path / "ck")
    real.planner_data = Payload(os.system, (f"touch {tmp_path / 'pwned'}",))
    (tmp_path / "ck" / ".metadata").write_bytes(pickle.dumps(real))
    with pytest.raises(ValueError, match=r"names (posix|nt)\.system"):
        read_metadata(tmp_path / "ck")
    assert not (tmp_path / "pwned").exists()


def test_truncated_metadata_is_a_one_line_error(tmp_path):
    small_checkpoint(tmp_path / "ck")
    metadata = tmp_path / "ck" / ".metadata"
    metadata.write_bytes(metadata.read_bytes()[:50])
    with pytest.raises(ValueError) as e:
        read_checkpoint(tmp_path / "ck")
    assert "\n" not in str(e.value) and str(metadata) in str(e.value)
