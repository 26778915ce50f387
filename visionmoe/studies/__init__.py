"""Studies: multi-seed sweeps with matched dense twins, the seed studies as presets, statistics and reports.

from visionmoe.studies import get_study, run_sweep, write_report

sweep = get_study("topk").build(tiny=True, overrides=["data.data_dir=..."])
print(estimate_sweep(sweep).attrs["hours"])     # how long it will take here
run_sweep(sweep, "runs/topk-tiny", jobs=1)
write_report(["runs/topk-tiny"], "runs/topk-tiny/report")
"""

from visionmoe.studies.estimate import estimate_sweep
from visionmoe.studies.presets import STUDIES, Study, get_study
from visionmoe.studies.report import write_report
from visionmoe.studies.stats import (
    contrast_gaps,
    epoch_gaps,
    gap_tests,
    load_runs,
    paired_gaps,
    pairs_with_model,
    rho_trend,
    summarize,
    t_interval,
)
from visionmoe.studies.sweep import Run, Sweep, parse_axis, parse_seeds, run_one, run_sweep

__all__ = [
    "STUDIES",
    "Run",
    "Study",
    "Sweep",
    "contrast_gaps",
    "epoch_gaps",
    "estimate_sweep",
    "gap_tests",
    "get_study",
    "load_runs",
    "paired_gaps",
    "pairs_with_model",
    "parse_axis",
    "parse_seeds",
    "rho_trend",
    "run_one",
    "run_sweep",
    "summarize",
    "t_interval",
    "write_report",
]
