"""The speed benchmark's library: rows, counts of processed work, the einsum reference, FLOP ratios.

Tiny shapes only, and never an assertion about speed: these tests check what is measured, not how fast.
"""

import math
import sys

import pytest
import torch

from visionmoe import MoE
from visionmoe.analysis.speed import (
    IMPLEMENTATIONS,
    PEERS,
    EinsumMoE,
    inference_speedup,
    layer_benchmark,
    markdown_table,
    time_fn,
    write_csv,
)
from visionmoe.cli import main

FAST = {"threads": 1, "repeats": 1, "min_run_time": 0.0}
KEYS = {
    "images", "tokens_per_image", "tokens", "dim", "hidden", "num_experts", "k", "capacity_factor", "mode",
    "threads", "implementation", "median", "iqr", "assignments", "expert_rows", "capacity", "note", "vs_dense",
    "vs_dense_iqr", "per_assignment_vs_dense",
}  # fmt: skip


def test_time_fn_gives_one_time_per_repeat():
    timing = time_fn(lambda: torch.ones(4).sum(), threads=1, repeats=3, min_run_time=0.0)
    assert len(timing.times) == 3 and timing.median == sorted(timing.times)[1] and timing.iqr >= 0
    with pytest.raises(ValueError, match="repeats"):
        time_fn(lambda: None, threads=1, repeats=0)


def test_layer_benchmark_rows_cover_every_implementation(tmp_path):
    # 1 image × 16 tokens, d=8 (H=32), E=4, k=2, cf=1.25: C = ceil(2·16·1.25/4) = 10 per expert.
    rows = layer_benchmark([(1, 16, 8, 4, 2, 1.25)], **FAST)
    assert [r["implementation"] for r in rows] == list(IMPLEMENTATIONS)
    by_name = {r["implementation"]: r for r in rows}
    for r in rows:
        assert set(r) == KEYS
        assert r["median"] is not None or r["note"].startswith("skipped")
    assert by_name["dense"]["vs_dense"] == by_name["dense"]["per_assignment_vs_dense"] == 1.0
    assert by_name["dense"]["expert_rows"] == 16 * 2  # k token-expert pairs per token
    for name in ("visionmoe:auto", "visionmoe:sorted", "visionmoe:padded", "einsum"):
        r = by_name[name]
        assert r["capacity"] == 10 and r["assignments"] <= 32  # at most 2 per token, fewer if dropped
    assert by_name["visionmoe:sorted"]["expert_rows"] == by_name["visionmoe:sorted"]["assignments"]
    assert by_name["visionmoe:padded"]["expert_rows"] == by_name["einsum"]["expert_rows"] == 4 * 10  # E·C slots
    # Soft MoE: P = k·S/E = 2·16/4 = 8 slots per expert, 4·8 = 32 = k·S pairs' worth.
    assert (by_name["visionmoe:soft"]["capacity"], by_name["visionmoe:soft"]["assignments"]) == (8, 32)
    table = markdown_table(rows, [("impl", lambda r: r["implementation"])])
    assert table.count("\n") == len(rows) + 1
    assert write_csv(rows, tmp_path / "rows.csv").read_text().count("\n") == len(rows) + 1


def test_einsum_wrapper_equals_the_layer_for_the_same_plan():
    torch.manual_seed(0)
    # cf=1.0 with k=2 drops assignments, so the test covers dropped and kept ones alike.
    moe = MoE(16, 4, 32, router="topk", k=2, capacity_factor=1.0, router_options={"noise_std": 0.0})
    x = torch.randn(3, 12, 16)
    for training in (False, True):
        moe.train(training)
        einsum = EinsumMoE(moe)
        torch.testing.assert_close(einsum(x), moe(x), rtol=1e-5, atol=1e-5)
        assert int(einsum.last_plan.kept.sum()) == int(moe.last_stats.tokens_per_expert.sum())


def test_dropless_top2_processes_exactly_two_assignments_per_token():
    # capacity_factor None: dropless, so 2 images × 8 tokens × k=2 = 32 assignments, in both modes.
    for mode in ("fwd", "fwdbwd"):
        names = ["visionmoe:sorted", "visionmoe:padded", "einsum"]
        rows = layer_benchmark([(2, 8, 8, 4, 2, None)], implementations=names, mode=mode, **FAST)
        assert [(r["implementation"], r["assignments"]) for r in rows] == [("dense", None)] + [(n, 32) for n in names]
        # Dropless C is the largest load, so the padded buffers (G·E·C rows) hold at least the 32 assignments.
        assert rows[2]["expert_rows"] == 2 * 4 * rows[2]["capacity"] >= 32


@pytest.mark.parametrize("name", ["mixture_of_experts", "st_moe_pytorch"])
def test_peer_counts_when_capacity_does_not_bind(name):
    pytest.importorskip(name)
    # cf = E = 4: the peers' C = min(S, int(S·cf/E)) = S = 8 per image, room for every first and second
    # choice, so each of the 2·8 tokens keeps both: 32 assignments; the buffers execute G·E·C = 2·4·8 = 64 rows.
    (_, row) = layer_benchmark([(2, 8, 8, 4, 2, 4.0)], implementations=[name], **FAST)
    assert (row["assignments"], row["expert_rows"], row["capacity"]) == (32, 64, 8)


def test_implementations_and_mode_are_checked():
    with pytest.raises(ValueError, match="unknown implementations"):
        layer_benchmark([(1, 8, 8, 4, 2, 1.25)], implementations=["fast"], **FAST)
    with pytest.raises(ValueError, match="mode"):
        layer_benchmark([(1, 8, 8, 4, 2, 1.25)], mode="bwd", **FAST)


def test_inference_speedup_theoretical_is_the_flop_ratio_by_hand():
    rows = inference_speedup(
        batch_sizes=(4,),
        token_batch_sizes=(2,),
        head_dim=16,
        head_hidden=16,
        block_dim=8,
        block_hidden=32,
        tokens_per_image=4,
        num_experts=8,
        capacity_factor=8.0,  # C = ceil(S·8/8) = S: no token can be dropped, so the counts are exact
        **FAST,
    )
    head, block = rows
    # Head, per sample (one vector), 2 FLOPs per multiply-add:
    #   top-1: router 2·16·8 = 256 + one expert 2·16·16 + 2·16·16 = 1024 → 1280; all 8 experts: 8·1024 = 8192.
    assert (head["case"], head["dropped"], head["flops_top1"], head["flops_all"]) == ("head", 0.0, 1280, 8192)
    assert head["theoretical"] == pytest.approx(8192 / 1280)  # 6.4
    # Block, per image of 4 tokens: router 2·8·8 = 128 + expert 2·8·32 + 2·32·8 = 1024 → 4·1152 = 4608;
    #   all: 4 · 8 · 1024 = 32768.
    assert (block["case"], block["tokens"], block["flops_top1"], block["flops_all"]) == ("block", 8, 4608, 32768)
    assert block["theoretical"] == pytest.approx(64 / 9)
    for r in rows:
        assert r["realised"] == pytest.approx(r["seconds_all"] / r["seconds_top1"])
        assert r["realised_over_theoretical"] == pytest.approx(r["realised"] / r["theoretical"])
        assert math.isfinite(r["iqr_top1"]) and math.isfinite(r["iqr_all"])


def test_bench_command_skips_missing_peers(monkeypatch, capsys):
    for module in PEERS:
        monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    assert main(["bench", "--quick", "--repeats", "1", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("dense", "visionmoe:sorted", "visionmoe:padded", "einsum"))
    assert out.count("skipped:") == len(PEERS)
    rows = layer_benchmark([(1, 8, 8, 4, 2, 1.25)], **FAST)
    assert all(r["note"].startswith("skipped: not importable") for r in rows if r["implementation"] in PEERS)
