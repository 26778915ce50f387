"""Data and expert parallelism on 2 CPU processes (gloo), checked against one process."""

import time

import pytest
import torch
from harness import WorkerFailed, run_workers

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")

# Every sparse router family, through both exchanges: "auto" picks grouped/sorted rows here (variable
# splits), "padded" sends the (E, G·C, D) capacity buffers (equal splits). Noise off and no aux loss:
# both are per-rank by design (see the README), everything else must match one process.
CASES = [
    {
        "name": "topk k=2 cf=1.0",
        "moe": {"router": "topk", "k": 2, "capacity_factor": 1.0, "router_options": {"noise_std": 0.0}},
    },
    {
        "name": "topk k=2 cf=1.0 padded",
        "moe": {
            "router": "topk",
            "k": 2,
            "capacity_factor": 1.0,
            "router_options": {"noise_std": 0.0},
            "backend": "padded",
        },
    },
    {
        "name": "topk dropless",
        "moe": {"router": "topk", "k": 2, "capacity_factor": None, "router_options": {"noise_std": 0.0}},
    },
    {
        "name": "topk dropless padded",
        "moe": {
            "router": "topk",
            "k": 1,
            "capacity_factor": None,
            "router_options": {"noise_std": 0.0},
            "backend": "padded",
        },
    },
    {"name": "expert choice", "moe": {"router": "expert_choice", "capacity_factor": 1.0}},
    {"name": "expert choice padded", "moe": {"router": "expert_choice", "capacity_factor": 2.0, "backend": "padded"}},
    {"name": "soft", "moe": {"router": "soft", "router_options": {"slots_per_expert": 2}}},
]


def test_expert_parallel_layer_equals_one_process(tmp_path):
    run_workers("moe_layer", 2, tmp_path, CASES)
    for rank in range(2):
        diffs = torch.load(tmp_path / f"rank{rank}.pt")
        assert set(diffs) == {c["name"] for c in CASES}
        for case, values in diffs.items():
            assert {"output", "input grad", "grad experts.w1", "grad experts.b2"} <= set(values)
            bad = {k: v for k, v in values.items() if not v <= 1e-5}
            assert not bad, f"rank {rank}, {case}: {bad}"


def test_a_failing_worker_is_reported_and_nothing_hangs(tmp_path):
    start = time.monotonic()
    with pytest.raises(WorkerFailed, match="failed on purpose"):
        run_workers("raises", 2, tmp_path, timeout=30)
    assert time.monotonic() - start < 30
