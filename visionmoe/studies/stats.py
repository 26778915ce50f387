"""A study's statistics: one row per run, per-configuration means with t-intervals, paired gaps with tests.

    table = load_runs(["runs/topk"])             # long format, one row per run (summary.json + sweep_run.json)
    configs = summarize(table)                    # per configuration: n, mean, std, 95% t-interval
    per_seed, pairs = paired_gaps(table)          # per pair: MoE − reference per seed; mean, CI, sign, tests
    per_seed, by_epoch = epoch_gaps(table)        # the same gaps at every epoch both runs evaluated
    trend = rho_trend(per_seed, pairs_with_model(pairs, table))  # per MoE model and study: gap against ρ

A *pair* is a configuration and its reference (its dense twin of equal active FLOPs, or a study's
baseline configuration) trained under the same seed. Seeds are the unit of replication: the gap of
seed s is ``metric(config, s) − metric(reference, s)``, and the tests are paired over seeds (a seed
without its partner run is left out and counted in the note). Accuracies are in percent.

The interval is Student's t: mean ± t(0.975, n−1)·s/√n. The paired t-test is
``scipy.stats.ttest_rel``; the Wilcoxon signed-rank test is ``scipy.stats.wilcoxon`` on the
non-zero gaps (exact for small n). Where a test cannot say anything (n < 2, all gaps zero, all gaps
equal) its statistic and p-value are NaN and ``note`` says why; with n non-zero gaps the two-sided
Wilcoxon p-value cannot go below 2/2ⁿ, so n ≤ 5 can never reach p < 0.05 — the note says that too.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from scipy import stats

from visionmoe.jsonl import read_jsonl

RUN_COLUMNS = [
    "study",
    "config",
    "reference",
    "is_twin",
    "seed",
    "model",
    "dataset",
    "top1",
    "top5",
    "nll",
    "ece",
    "best_top1",
    "rho",
    "rho_measured",
    "params",
    "active_params",
    "flops",
    "epochs",
    "train_minutes",
    "images_per_s",
    "stopped",
    "run",
]
SHARPNESS = ["lambda_max_train", "lambda_max_test", "trace_train", "trace_test"]
BY_BATCH_SIZE = "top1_bs"  # + the size: test top-1 (%) with the test set in batches of that size (eval.batch_sizes)
MEANS = ["rho", "rho_measured", "params", "active_params", "flops", "train_minutes", *SHARPNESS]  # per configuration


def load_runs(paths: Iterable[str | Path]) -> pd.DataFrame:
    """The long table of every finished run under ``paths`` (run directories or folders holding them).

    One row per run: study, config (the sweep's key, or the directory name without its ``-s<seed>``),
    reference (the config it is compared against, if any), is_twin, seed, one column per axis of the
    study (value labels as strings), metrics (top1/top5/best_top1 in %, nll, ece), compute (rho: the
    nominal ρ, the share of FLOPs the experts control with no assignment dropped; rho_measured: the
    useful share on the run's first two training images at initialisation; params, active_params,
    flops per image), train_minutes, images_per_s and, where ``analysis.json``
    holds a Hessian section, λmax and tr(H) on the train and test subsets; where the run evaluated the
    test set at several batch sizes (``eval.batch_sizes``), ``top1_bs<size>`` for each. ``table.attrs["axes"]``
    lists the axis columns.
    """
    found: list[Path] = []
    for path in map(Path, paths):
        if (path / "summary.json").is_file():
            found.append(path)
        elif path.is_dir():
            found += sorted((p.parent for p in path.rglob("summary.json")), key=_natural)
        else:
            raise FileNotFoundError(f"{path} is neither a run directory (with summary.json) nor a folder of runs")
    rows, axes, by_size = [], [], []
    for run_dir in dict.fromkeys(found):
        row = _row(run_dir)
        for name in row.pop("_axes"):
            if name not in axes:
                axes.append(name)
        by_size += [c for c in row if c.startswith(BY_BATCH_SIZE) and c not in by_size]
        rows.append(row)
    by_size.sort(key=lambda c: int(c.removeprefix(BY_BATCH_SIZE)))
    table = pd.DataFrame(rows, columns=[*RUN_COLUMNS, *axes, *SHARPNESS, *by_size])
    table = table.drop(columns=[c for c in SHARPNESS if table[c].isna().all()])
    table.attrs["axes"] = axes
    return table


def _natural(path: Path) -> list[str | int]:
    """Sort key that reads the numbers in a run's name as numbers: ``width=8`` before ``width=16``, ``-s2``
    before ``-s10`` (so tables list configurations in axis order, not character order)."""
    return [int(part) if i % 2 else part for i, part in enumerate(re.split(r"(\d+)", path.as_posix()))]


def _row(run_dir: Path) -> dict[str, Any]:
    summary = json.loads((run_dir / "summary.json").read_text())
    spec = json.loads((run_dir / "sweep_run.json").read_text()) if (run_dir / "sweep_run.json").is_file() else {}
    config = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
    data = config.get("data", {})
    dataset = data.get("dataset")
    if dataset == "imagefolder" and data.get("data_dir"):
        dataset = f"imagefolder:{Path(data['data_dir']).name}"
    test = summary.get("test", {})
    row: dict[str, Any] = {
        "study": spec.get("study", "runs"),
        "config": spec.get("key", re.sub(r"-s\d+$", "", run_dir.name)),
        "reference": spec.get("reference"),
        "is_twin": summary.get("dense_twin") is not None,
        "seed": summary.get("seed"),
        "model": summary.get("model"),
        "dataset": dataset,
        "top1": 100 * test["top1"],
        "top5": 100 * test["top5"] if "top5" in test else math.nan,
        "nll": test.get("nll", math.nan),
        "ece": test.get("ece", math.nan),
        "best_top1": 100 * summary.get("best_top1", math.nan),
        "rho": summary.get("rho_nominal", summary.get("rho")),  # the architecture's share (see profile)
        "rho_measured": summary.get("rho"),
        "params": summary.get("total_params"),
        "active_params": summary.get("active_params"),
        "flops": summary.get("flops_per_image"),
        "epochs": summary.get("epochs"),
        "train_minutes": summary.get("train_seconds", math.nan) / 60,
        "images_per_s": summary.get("images_per_s"),
        "stopped": summary.get("stopped"),
        "run": str(run_dir),
    }
    axes = {}
    for name, label in spec.get("axes", {}).items():
        axes[name if name not in row else f"axis_{name}"] = label
    row.update(axes)
    row["_axes"] = list(axes)
    for size, metrics in summary.get("test_by_batch_size", {}).items():
        row[f"{BY_BATCH_SIZE}{size}"] = 100 * metrics["top1"]
    analysis = run_dir / "analysis.json"
    if analysis.is_file():
        hessian = json.loads(analysis.read_text()).get("hessian") or {}
        for split in ("train", "test"):
            if isinstance(hessian.get(split), dict):
                row[f"lambda_max_{split}"] = hessian[split].get("lambda_max")
                row[f"trace_{split}"] = hessian[split].get("trace")
    return row


def axis_columns(table: pd.DataFrame) -> list[str]:
    """The axis columns of a :func:`load_runs` table (those that vary in at least one study first)."""
    return [c for c in table.attrs.get("axes", []) if c in table.columns]


def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float, float]:
    """(mean, std, low, high): sample std (n − 1) and the Student-t interval of the mean; NaN spread for n < 2."""
    x = np.asarray(values, dtype=float)
    x = x[~np.isnan(x)]
    if x.size == 0:
        return (math.nan,) * 4
    mean = float(x.mean())
    if x.size < 2:
        return mean, math.nan, math.nan, math.nan
    std = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, x.size - 1)) * std / math.sqrt(x.size)
    return mean, std, mean - half, mean + half


def summarize(table: pd.DataFrame, metric: str = "top1") -> pd.DataFrame:
    """Per configuration (study, config): n seeds, mean, std, 95% t-interval of ``metric``, compute means."""
    rows = []
    for (study, config), group in table.groupby(["study", "config"], sort=False):
        mean, std, low, high = t_interval(group[metric])
        first = group.iloc[0]
        row = {"study": study, "config": config, "is_twin": bool(first["is_twin"]), "reference": first["reference"]}
        row.update({a: first[a] for a in axis_columns(table)})
        row.update({"n": int(group[metric].notna().sum()), "mean": mean, "std": std, "ci_low": low, "ci_high": high})
        row.update({c: group[c].mean() for c in MEANS if c in group})
        for column in (c for c in group if c.startswith(BY_BATCH_SIZE)):  # mean and std over seeds
            row[column], row[f"{column}_std"] = group[column].mean(), group[column].std()
        row["seeds"] = ",".join(str(s) for s in sorted(group["seed"]))
        rows.append(row)
    return pd.DataFrame(rows)


def paired_gaps(table: pd.DataFrame, metric: str = "top1") -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per_seed, pairs): the gap ``metric(config) − metric(reference)`` of each seed, and per pair its summary.

    ``pairs`` columns: study, config, reference, axes, n, mean_gap, std_gap, ci_low, ci_high,
    same_sign (seeds whose gap has the sign of the mean gap; a zero gap shares no sign), t_stat,
    t_p (paired t-test), w_stat, w_p (Wilcoxon signed-rank), rho and flops of the configuration,
    note.
    """
    per_seed, pairs = [], []
    for (study, config), group in table[table["reference"].notna()].groupby(["study", "config"], sort=False):
        seeds, row = _pair(table, study, config, group["reference"].iloc[0], metric)
        per_seed += seeds
        pairs.append(row)
    return pd.DataFrame(per_seed), pd.DataFrame(pairs)


def pairs_with_model(pairs: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame:
    """The pairs that have a nominal ρ and a mean gap, each with its MoE configuration's model name."""
    if pairs.empty or "rho" not in pairs:
        return pairs.iloc[0:0]
    models = table.drop_duplicates(["study", "config"]).set_index(["study", "config"])["model"]
    keys = zip(pairs["study"], pairs["config"], strict=True)
    frame = pairs.assign(model=[models.get(key, "?") for key in keys])
    return frame.dropna(subset=["rho", "mean_gap"])


MIN_RHO_SPREAD = 0.05
"""A study's pairs must span at least this much nominal ρ for :func:`rho_trend` to fit a line: a sweep
that barely moves ρ (the backbone width, a head's arms) would give a slope of noise over a tiny spread."""


def rho_trend(per_seed: pd.DataFrame, pairs: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
    """The trend of the gap with nominal ρ (Sun et al.'s compute leverage): per MoE model and study, the
    least-squares line gap = intercept + slope · ρ through every seed's gap, each at its pair's ρ.

    ``pairs``: as :func:`pairs_with_model` gives them (study, config, rho and the model name). A group
    needs at least three seed gaps over a ρ range of at least :data:`MIN_RHO_SPREAD` (else it has no
    row). Columns: model, study, pairs, n (seed gaps), rho_min, rho_max, slope (points per unit of ρ)
    with its t-interval (n − 2 degrees of freedom: slope_low, slope_high) and two-sided p-value
    (``scipy.stats.linregress``), intercept, gap_at_max (the line at the highest ρ reached) and
    zero_at: where a rising line reaches 0 (NaN for a flat or falling one), with zero_in_range saying
    whether that is inside the ρ reached or an extrapolation. The seeds of one pair share their
    configuration, so where pairs differ by more than their seeds do the residuals are correlated and
    the interval is too narrow: read it with the per-pair intervals beside it.
    """
    columns = ["model", "study", "pairs", "n", "rho_min", "rho_max", "slope", "slope_low", "slope_high", "p"]
    columns += ["intercept", "gap_at_max", "zero_at", "zero_in_range"]
    if per_seed.empty or pairs.empty:
        return pd.DataFrame(columns=columns)
    points = per_seed[["study", "config", "gap"]].merge(
        pairs[["study", "config", "rho", "model"]], on=["study", "config"]
    )
    points = points.dropna(subset=["gap", "rho"])
    rows = []
    for (model, study), group in points.groupby(["model", "study"], sort=True):
        if len(group) < 3 or group["rho"].max() - group["rho"].min() < MIN_RHO_SPREAD:
            continue
        fit = stats.linregress(group["rho"], group["gap"])
        half = float(stats.t.ppf(0.5 + confidence / 2, len(group) - 2)) * fit.stderr
        low, high = float(group["rho"].min()), float(group["rho"].max())
        zero = -fit.intercept / fit.slope if fit.slope > 0 else math.nan
        rows.append(
            {
                "model": model,
                "study": study,
                "pairs": group["config"].nunique(),
                "n": len(group),
                "rho_min": low,
                "rho_max": high,
                "slope": fit.slope,
                "slope_low": fit.slope - half,
                "slope_high": fit.slope + half,
                "p": fit.pvalue,
                "intercept": fit.intercept,
                "gap_at_max": fit.intercept + fit.slope * high,
                "zero_at": zero,
                "zero_in_range": bool(low <= zero <= high),
            }
        )
    return pd.DataFrame(rows, columns=columns)


PERCENT = ("top1", "top5")  # metrics logged as fractions and reported in percent


def epoch_gaps(table: pd.DataFrame, metric: str = "top1") -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per_seed, by_epoch): each pair's gap at every epoch both of its runs evaluated, from their
    ``metrics.jsonl``: does the sign depend on how long the models trained?

    ``per_seed`` columns: study, config, reference, the axes, seed, epoch, ``metric`` and
    ``<metric>_ref`` (test), gap, and train_gap (training top-1 of the epoch, config − reference, in
    points). ``by_epoch``: per pair and epoch, n seeds, mean_gap with its 95% t-interval (ci_low,
    ci_high) and mean_train_gap. Both are empty for a metric the records do not log per epoch (such as
    best_top1) or where no pair has both runs' records.
    """
    axes = axis_columns(table)
    scale = 100.0 if metric in PERCENT else 1.0
    curves: dict[str, pd.DataFrame] = {}

    def curve(run: str) -> pd.DataFrame:
        if run not in curves:
            path = Path(run) / "metrics.jsonl"
            records = read_jsonl(path) if path.is_file() else []
            curves[run] = pd.DataFrame(
                [
                    {"epoch": r["epoch"], "value": scale * r["test"][metric], "train": 100 * r["train_top1"]}
                    for r in records
                    if isinstance(r.get("test"), dict) and metric in r["test"] and "train_top1" in r
                ],
                columns=["epoch", "value", "train"],
            )
        return curves[run]

    per_seed = []
    for (study, config), group in table[table["reference"].notna()].groupby(["study", "config"], sort=False):
        reference = group["reference"].iloc[0]
        ref = table[(table["study"] == study) & (table["config"] == reference)]
        ref = ref.drop_duplicates("seed").set_index("seed")["run"]
        for _, row in group.sort_values("seed").iterrows():
            if row["seed"] not in ref.index:
                continue
            both = curve(row["run"]).merge(curve(ref[row["seed"]]), on="epoch", suffixes=("", "_ref"))
            for _, e in both.iterrows():
                per_seed.append(
                    {
                        "study": study,
                        "config": config,
                        "reference": reference,
                        **{a: row[a] for a in axes},
                        "seed": row["seed"],
                        "epoch": e["epoch"],
                        metric: e["value"],
                        f"{metric}_ref": e["value_ref"],
                        "gap": e["value"] - e["value_ref"],
                        "train_gap": e["train"] - e["train_ref"],
                    }
                )
    per_seed = pd.DataFrame(per_seed)
    rows = []
    if not per_seed.empty:
        for (study, config, epoch), group in per_seed.groupby(["study", "config", "epoch"], sort=False):
            mean, _, low, high = t_interval(group["gap"])
            first = group.iloc[0]
            rows.append(
                {
                    "study": study,
                    "config": config,
                    "reference": first["reference"],
                    **{a: first[a] for a in axes},
                    "epoch": epoch,
                    "n": len(group),
                    "mean_gap": mean,
                    "ci_low": low,
                    "ci_high": high,
                    "mean_train_gap": group["train_gap"].mean(),
                }
            )
    return per_seed, pd.DataFrame(rows)


def contrast_gaps(
    table: pd.DataFrame, contrasts: Sequence[tuple[str, str]], metric: str = "top1"
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """:func:`paired_gaps` for pairs named by hand: ``(config, reference)`` keys of one study's runs.

    A contrast compares two configurations of a study directly under the same seed — ``("k=2", "k=1")``
    asks whether top-2 beats top-1 at equal initialisation, where the pairs ask how each does against
    its own dense twin. It applies to every study that has both configurations and must apply to one.
    """
    per_seed, pairs = [], []
    for config, reference in contrasts:
        studies = [
            study for study, rows in table.groupby("study", sort=False) if {config, reference} <= set(rows["config"])
        ]
        if not studies:
            known = ", ".join(dict.fromkeys(table["config"]))
            raise ValueError(f"contrast {config}:{reference}: no study has both configurations; there are: {known}")
        for study in studies:
            seeds, row = _pair(table, study, config, reference, metric)
            per_seed += seeds
            pairs.append(row)
    return pd.DataFrame(per_seed), pd.DataFrame(pairs)


def _pair(table: pd.DataFrame, study: str, config: str, reference: str, metric: str) -> tuple[list[dict], dict]:
    """Per-seed gaps of ``config`` − ``reference`` within ``study``, and their summary row."""
    axes = axis_columns(table)
    group = table[(table["study"] == study) & (table["config"] == config)]
    ref = table[(table["study"] == study) & (table["config"] == reference)]
    merged = group.merge(ref[["seed", metric]], on="seed", suffixes=("", "_ref")).sort_values("seed")
    a, b = merged[metric].to_numpy(float), merged[f"{metric}_ref"].to_numpy(float)
    per_seed = [
        {
            "study": study,
            "config": config,
            "reference": reference,
            **{x: r[x] for x in axes},
            "seed": r["seed"],
            metric: r[metric],
            f"{metric}_ref": r[f"{metric}_ref"],
            "gap": r[metric] - r[f"{metric}_ref"],
        }
        for _, r in merged.iterrows()
    ]
    row = {"study": study, "config": config, "reference": reference, **{x: group[x].iloc[0] for x in axes}}
    row.update(gap_tests(a, b))
    if missing := len(group) - len(merged):
        row["note"] = "; ".join(filter(None, [f"{missing} seed(s) without a reference run", row["note"]]))
    row["rho"] = group["rho"].mean()
    row["flops"] = group["flops"].mean()
    return per_seed, row


def gap_tests(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> dict[str, Any]:
    """Paired summary of a − b: n, mean/std/interval of the gap, seeds sharing its sign, t and Wilcoxon tests."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    gaps = a - b
    n = int(gaps.size)
    mean, std, low, high = t_interval(gaps, confidence)
    same = int(np.sum(np.sign(gaps) == np.sign(mean))) if n and mean != 0 else 0
    out: dict[str, Any] = {"n": n, "mean_gap": mean, "std_gap": std, "ci_low": low, "ci_high": high}
    out.update({"same_sign": same, "t_stat": math.nan, "t_p": math.nan, "w_stat": math.nan, "w_p": math.nan})
    notes = []
    nonzero = int(np.count_nonzero(gaps))
    if n < 2:
        notes.append(f"n={n} < 2: no test")
    elif nonzero == 0:
        notes.append("all gaps zero: no test")
    else:
        if np.all(gaps == gaps[0]):
            notes.append("all gaps equal: t undefined")
        else:
            t = stats.ttest_rel(a, b)
            out["t_stat"], out["t_p"] = float(t.statistic), float(t.pvalue)
        w = stats.wilcoxon(gaps[gaps != 0])
        out["w_stat"], out["w_p"] = float(w.statistic), float(w.pvalue)
        if (floor := 2 / 2**nonzero) > 0.05:
            notes.append(f"Wilcoxon on {nonzero} non-zero gap(s) cannot reach p < 0.05 (smallest p = {floor:.3g})")
    out["note"] = "; ".join(notes)
    return out
