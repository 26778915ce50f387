"""Every study preset's tiny form runs end to end on stand-in data, through the statistics and the report."""

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from visionmoe.analysis.profile import profile_model
from visionmoe.cli import main
from visionmoe.models import create_model
from visionmoe.studies import STUDIES, get_study, run_sweep, write_report
from visionmoe.studies.presets import BACKBONES, HIDDEN_POINTS, LONG_POINT, STUDY_WIDTH

pytestmark = pytest.mark.usefixtures("one_thread")

# The plots each study's report must hold (beyond gap_vs_rho, drawn wherever there are pairs).
EXPECTED_PLOTS = {
    "rho": ["placement"],
    "hidden": ["gap_vs_hidden"],
    "hidden_long": ["gap_by_epoch"],  # its tiny form trains 2 epochs
    "width": ["gap_vs_width"],
    "topk": ["gap_vs_k"],
    "soft": ["head"],
    "heads": ["head", "sharpness"],
    "placement": ["placement", "experts"],
    "routers": ["router"],
}


@pytest.fixture(scope="module")
def tiny_sweeps(tmp_path_factory, standin_data):
    """Every tiny study, one seed each, inline, in one folder (shared by the tests below)."""
    root = tmp_path_factory.mktemp("studies")
    manifests = {}
    for name, study in STUDIES.items():
        sweep = study.build(tiny=True, overrides=[f"data.data_dir={standin_data}"])
        manifests[name] = run_sweep(sweep, root / name, executor="inline", cores=1, echo=lambda line: None)
    return root, manifests


def test_every_tiny_study_runs(tiny_sweeps):
    root, manifests = tiny_sweeps
    for name, manifest in manifests.items():
        assert (manifest["status"] == "done").all(), (name, manifest[["name", "status", "error"]].to_dict("records"))
    heads = root / "heads" / "head=sparse-s0"
    analysis = json.loads((heads / "analysis.json").read_text())
    assert set(analysis["hessian"]) == {"train", "test"} and "landscape" in analysis


def test_report_renders_every_plot(tiny_sweeps, tmp_path):
    root, _ = tiny_sweeps
    files = write_report([root], tmp_path)
    names = {p.name for p in files["plots"]}
    for study, plots in EXPECTED_PLOTS.items():
        for plot in ["gap_vs_rho", *plots]:
            assert f"{study}_{plot}.png" in names, (study, plot, sorted(names))
            assert (tmp_path / f"{study}_{plot}.png").stat().st_size > 1000
    # the overview: every pair of every study on one ρ axis, first in the report
    assert (tmp_path / "overview_gap_vs_rho.png").stat().st_size > 1000
    text = (tmp_path / "report.md").read_text()
    assert text.index("## When does MoE help here?") < min(text.index(f"## {s}\n") for s in EXPECTED_PLOTS)
    text = (tmp_path / "report.md").read_text()
    assert all(f"## {study}" in text for study in STUDIES)
    assert "### Sharpness" in text and "head=sparse" in text
    assert "\\begin{tabular}" in (tmp_path / "tables.tex").read_text()
    for table in ("runs", "configs", "pairs", "gaps"):
        assert (tmp_path / f"{table}.csv").is_file()


def test_cli_resumes_a_finished_sweep_and_reports(tiny_sweeps, tmp_path, standin_data, capsys):
    root, _ = tiny_sweeps
    out = root / "topk"
    args = [
        "sweep",
        "--preset",
        "topk",
        "--tiny",
        "--out",
        str(out),
        "--executor",
        "inline",
        f"data.data_dir={standin_data}",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "(0 to run, 4 finished before" in printed and "4 done" in printed  # nothing trains again
    assert main(["report", str(out), "--out", str(tmp_path), "--contrast", "k=2:k=1"]) == 0
    assert (tmp_path / "topk_gap_vs_k.png").is_file()
    text = (tmp_path / "report.md").read_text()
    assert "### Contrasts: configuration − configuration (same seed)" in text and "| k=2 | k=1 | 1 |" in text
    assert "% study topk: contrasts" in (tmp_path / "tables.tex").read_text()
    assert len(pd.read_csv(tmp_path / "contrast_gaps.csv")) == 1  # one seed in the tiny sweep
    with pytest.raises(SystemExit, match="expected CONFIG:REFERENCE"):
        main(["report", str(out), "--out", str(tmp_path), "--contrast", "k=2"])


def test_presets_are_well_formed(tmp_path):
    for study in STUDIES.values():
        for tiny in (False, True):
            runs = study.build(tiny=tiny).runs(tmp_path)
            assert runs and all(r.config() for r in runs)  # every cell is a valid config
    runs = {name: get_study(name).build().runs(tmp_path) for name in ("width", "hidden", "hidden_long", "soft")}
    assert len(runs["width"]) == 6 * 2 * 3  # 2 backbones × 3 widths, each with its twin, seeds 0-2
    assert len(runs["hidden"]) == 10 * 2 * 3  # 5 hidden sizes × 2 backbones, each with its twin, seeds 0-2
    assert len(runs["hidden_long"]) == 2 * 2  # one pair, seeds 0-1
    assert len(runs["soft"]) == 4 * 3  # dense, Soft MoE over the batch, per sample, top-2; seeds 0-2
    long = runs["hidden_long"][0].config()
    assert long.train.epochs == 3 * get_study("hidden").build().runs(tmp_path)[0].config().train.epochs
    assert long.model.kwargs["moe_stages"] == "all" and long.model.kwargs["hidden_ratio"] == 4


@pytest.mark.parametrize(
    ("study", "override", "message"),
    [
        ("topk", "model.moe.k=4", "model.moe.k is set by this sweep's axis 'model.moe.k', which would replace it"),
        ("width", "model.kwargs.width=64", "is set by this sweep's axis 'model.kwargs.width'"),
        ("hidden", "model.name=cnn_resnet_cifar_moe", "is set by this sweep's axis 'backbone'"),  # inside a bundle
        ("topk", "train.seed=7", "the sweep sets train.seed for each run (use --seeds)"),
        ("topk", "train.seed=1,2", "the sweep sets train.seed for each run (use --seeds)"),
        ("topk", "train.out_dir=elsewhere", "use --out"),
        ("topk", "model.dense_twin=params", "pairs each configuration with its dense twin"),
    ],
)
def test_an_override_the_sweep_would_replace_is_refused(study, override, message):
    # Axis values and the per-run seed, directory and name are applied after the fixed overrides: such an
    # override was silently lost (k=4 trained k=1 and k=2; train.seed=7 trained seed 0).
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        get_study(study).build(tiny=True, overrides=[override])
    assert "\n" not in str(e.value)
    assert get_study("width").build(tiny=True, overrides=["model.moe.k=4"]).runs("runs/x")  # not an axis there


def test_width_keeps_the_run_names_of_its_results():
    """The width sweep was run as 'hidden' (issue 7): its committed runs are the runs its preset names."""
    results = Path(__file__).resolve().parents[2] / "results" / "width"
    names = {r.name for r in get_study("width").build().runs(results)}
    assert names == {p.name for p in results.iterdir() if p.is_dir()}
    assert all(json.loads((results / n / "sweep_run.json").read_text())["study"] == "width" for n in names)


def test_hidden_points_reach_the_issue_rho_ranges_and_state_their_rho():
    """Each point's nominal ρ as stated in the preset is the one profile measures on its model (width 8)."""
    by_backbone = {}
    for (backbone, stages, ratio), stated in HIDDEN_POINTS.items():
        model = create_model(
            BACKBONES[backbone][0].split("=")[1],
            width=STUDY_WIDTH,
            hidden_ratio=ratio,
            moe_stages=[1, 2] if stages == "1-2" else stages,
        )
        measured = profile_model(model, torch.randn(2, 3, 32, 32)).rho_nominal
        assert abs(measured - stated) < 5e-4, (backbone, stages, ratio, measured)
        by_backbone.setdefault(backbone, []).append(stated)
    # the issue: >= 5 hidden sizes per backbone, ρ spanning at least 0.15 -> 0.60 (standard), 0.25 -> 0.85 (depthwise)
    assert len(by_backbone["standard"]) >= 5 and len(by_backbone["depthwise"]) >= 5
    assert min(by_backbone["standard"]) <= 0.15 and max(by_backbone["standard"]) >= 0.60
    assert min(by_backbone["depthwise"]) <= 0.25 and max(by_backbone["depthwise"]) >= 0.85
    assert HIDDEN_POINTS[LONG_POINT] == max(by_backbone["depthwise"])


def test_tiny_soft_records_accuracy_per_eval_batch_size_and_equal_expert_flops(tiny_sweeps, tmp_path):
    root, _ = tiny_sweeps
    flops = {}
    for arm in ("dense", "soft_batch", "soft_per_sample", "top2"):
        summary = json.loads((root / "soft" / f"head={arm}-s0" / "summary.json").read_text())
        sizes = summary["test_by_batch_size"]
        assert list(sizes) == ["1", "32", "512"]
        assert all(0 <= m["top1"] <= 1 for m in sizes.values())
        assert summary["test"]["top1"] == pytest.approx(sizes["512"]["top1"])  # eval batch 64 >= the 40 test images
        flops[arm] = summary["expert_flops_per_image"]
    # every head at 64 active hidden units on a 32-d feature: 2 · 2 · 32 · 64 FLOPs per image; the batch-axis
    # arm is profiled at its training batch (64 images, 8 × 8 slots), not at two images
    assert flops == dict.fromkeys(flops, 8192)
    write_report([root / "soft"], tmp_path)
    text = (tmp_path / "report.md").read_text()
    assert "### Test top1 by evaluation batch size" in text and "| batch 1 | batch 32 | batch 512 |" in text


def test_overview_counts_each_pair_by_where_its_interval_lies(tmp_path):
    import pandas as pd

    from visionmoe.studies import report

    pairs = pd.DataFrame(
        {
            "model": ["a", "a", "a", "a", "b"],
            "rho": [0.1, 0.2, 0.3, 0.4, 0.5],
            "mean_gap": [1.0, -2.0, 0.5, -1.0, 3.0],
            "ci_low": [0.2, -3.0, -0.5, float("nan"), 2.0],
            "ci_high": [1.8, -1.0, 1.5, float("nan"), 4.0],
        }
    )
    text = report._overview_markdown(pairs, tmp_path / "overview_gap_vs_rho.png")
    rows = [line for line in text.splitlines() if line.startswith("| a ") or line.startswith("| b ")]
    # model | pairs | ρ | gap | above | below | across | one seed
    assert rows[0].split(" | ")[1:] == ["4", "0.10–0.40", "-2.00 to +1.00", "1", "1", "1", "1 |"]
    assert rows[1].split(" | ")[1:] == ["1", "0.50–0.50", "+3.00 to +3.00", "1", "0", "0", "0 |"]
