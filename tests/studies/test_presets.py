"""Every study preset's tiny form runs end to end on stand-in data, through the statistics and the report."""

import json

import pandas as pd
import pytest

from visionmoe.cli import main
from visionmoe.studies import STUDIES, get_study, run_sweep, write_report

pytestmark = pytest.mark.usefixtures("one_thread")

# The plots each study's report must hold (beyond gap_vs_rho, drawn wherever there are pairs).
EXPECTED_PLOTS = {
    "rho": ["placement"],
    "hidden": ["gap_vs_hidden"],
    "topk": ["gap_vs_k"],
    "soft": ["router"],
    "heads": ["head", "sharpness"],
    "placement": ["placement", "experts"],
    "routers": ["router"],
}


@pytest.fixture(scope="module")
def tiny_sweeps(tmp_path_factory, standin_data):
    """All seven tiny studies, one seed each, inline, in one folder (shared by the tests below)."""
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
    full = get_study("hidden").build().runs(tmp_path)
    assert len(full) == 6 * 2 * 3  # 2 backbones × 3 widths, each with its twin, seeds 0-2
