"""``visionmoe report``: a study's tables (Markdown, CSV, LaTeX) and plots from its run directories.

    write_report(["runs/topk", "runs/width"], "reports/cifar10")

Writes into ``out``:

- ``report.md``: per study, the configurations (top-1 mean ± std over seeds, 95% t-interval, ρ,
  parameters, FLOPs, training time), the pairs (gap to the reference per seed, its mean and 95%
  interval, how many seeds share its sign, paired t-test and Wilcoxon p-values, notes), λmax / tr(H)
  where runs were analysed, test top-1 at each evaluation batch size where runs measured it
  (``eval.batch_sizes``), failed runs from the sweep manifests, and the plots;
- ``runs.csv`` (one row per run), ``configs.csv``, ``pairs.csv``, ``gaps.csv`` (one row per pair and
  seed), ``gaps_by_epoch.csv`` and ``epoch_gaps.csv`` (each pair's gap at every epoch both runs
  evaluated, per pair and per seed: :func:`~visionmoe.studies.stats.epoch_gaps`) and ``tables.tex``
  (the configuration and pair tables of each study, booktabs);
- with ``contrasts`` (``--contrast k=2:k=1``), the same paired statistics for two configurations of
  a study compared directly, in ``contrasts.csv``, ``contrast_gaps.csv`` and a table of their own;
- ``overview_gap_vs_rho.png`` and a first section "When does MoE help here?": every pair of every
  study on one axis (gap to the reference, 95% interval, against nominal ρ; a marker per MoE model),
  per model how many pairs' intervals lie above, below or across zero, and per model and study the
  trend of the gap with ρ (slope with its interval, and where a rising line reaches zero; ``trend.csv``);
- plots ``<study>_<plot>.png``, each where the study has what it needs: ``gap_vs_rho`` (the
  compute-leverage plot: gap against the routed FLOP share) wherever there are pairs, and one
  comparison per axis the study varies — ``gap_vs_width`` (backbone width), ``gap_vs_hidden``
  (the FFN / experts' hidden size; one line per backbone and MoE stages), ``gap_vs_k``,
  ``placement``, ``router``, ``experts`` (num_experts), and ``<axis>`` for any other axis;
  ``sharpness`` where runs carry Hessian results; ``gap_by_epoch`` where pairs evaluated at more than
  one epoch (the test gap with its interval and the training top-1 gap, epoch by epoch: whether the
  sign depends on the training budget), with its table in the report. Comparisons show the gap to the reference with its
  95% interval, or top-1 itself in a study without pairs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from visionmoe.studies.stats import (
    BY_BATCH_SIZE,
    axis_columns,
    contrast_gaps,
    epoch_gaps,
    load_runs,
    paired_gaps,
    pairs_with_model,
    rho_trend,
    summarize,
)

PLOTS = {  # plot name -> the axis names it is drawn for
    "gap_vs_width": ("width", "embed_dim"),
    "gap_vs_hidden": ("hidden_ratio", "hidden_dim", "hidden_size", "head_width", "head_hidden"),
    "gap_vs_k": ("k",),
    "placement": ("placement", "moe_stages"),
    "router": ("router",),
    "experts": ("num_experts",),
}
SYMLOG_POINTS = 10.0
"""The overview's y axis turns symmetric-log beyond this many points when some gap exceeds twice it."""
HUES = ("backbone",)  # axes drawn as separate lines rather than along x


def write_report(
    paths: Iterable[str | Path],
    out: str | Path,
    *,
    metric: str = "top1",
    contrasts: Sequence[tuple[str, str]] = (),
) -> dict[str, Any]:
    """Tables and plots of every finished run under ``paths``; returns the written files by kind.

    ``contrasts``: ``(config, reference)`` keys compared seed by seed within each study that has both
    (:func:`~visionmoe.studies.stats.contrast_gaps`), beside the pairs each sweep made.
    """
    paths = [Path(p) for p in paths]
    table = load_runs(paths)
    if table.empty:
        raise ValueError(f"no finished runs (summary.json) under {[str(p) for p in paths]}")
    if metric not in (valid := metric_columns(table)):
        raise ValueError(f"metric {metric!r} is not a numeric column of the runs table; expected one of {valid}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    configs = summarize(table, metric)
    per_seed, pairs = paired_gaps(table, metric)
    contrast_seed, contrast = contrast_gaps(table, contrasts, metric)
    epoch_seed, by_epoch = epoch_gaps(table, metric)
    files: dict[str, Any] = {"csv": [], "plots": []}
    overview = pairs_with_model(pairs, table)
    trend = rho_trend(per_seed, overview)
    frames = [("runs", table), ("configs", configs), ("pairs", pairs), ("gaps", per_seed)]
    frames += [("gaps_by_epoch", by_epoch), ("epoch_gaps", epoch_seed), ("trend", trend)]
    if contrasts:
        frames += [("contrasts", contrast), ("contrast_gaps", contrast_seed)]
    for name, frame in frames:
        frame.to_csv(out / f"{name}.csv", index=False)
        files["csv"].append(out / f"{name}.csv")
    sweeps = _sweeps(paths)
    sections, latex = [], []
    if not overview.empty:
        files["plots"].append(_overview_plot(overview, out))
        sections.append(_overview_markdown(overview, files["plots"][-1], trend))
    for study in dict.fromkeys(table["study"]):
        rows = table[table["study"] == study]
        cfg = configs[configs["study"] == study]
        prs, gaps = _of(pairs, study), _of(per_seed, study)
        con = _of(contrast, study), _of(contrast_seed, study)
        curves = _of(by_epoch, study)
        plots = _plots(study, rows, cfg, prs, out)
        if _over_epochs(curves):
            plots.append(_epoch_plot(study, curves, _of(epoch_seed, study), _varying(rows), metric, out))
        files["plots"] += plots
        sections.append(_markdown_study(study, rows, cfg, prs, gaps, con, plots, sweeps.get(study, {}), metric, curves))
        latex.append(_latex_study(study, cfg, prs, con[0]))
    text = "\n\n".join([f"# Study report ({metric})", _preamble(table), *sections]) + "\n"
    (out / "report.md").write_text(text)
    (out / "tables.tex").write_text("\n\n".join(latex) + "\n")
    files["markdown"], files["latex"] = out / "report.md", out / "tables.tex"
    return files


NOT_METRICS = ("study", "config", "reference", "is_twin", "seed", "model", "dataset", "stopped", "run")
"""Columns of :func:`~visionmoe.studies.stats.load_runs`' table that name a run rather than measure it."""


def metric_columns(table: pd.DataFrame) -> list[str]:
    """The columns ``write_report(metric=...)`` can summarise: the numeric ones that measure a run (no axes)."""
    skip = {*NOT_METRICS, *axis_columns(table)}
    return [c for c in table.columns if c not in skip and pd.api.types.is_numeric_dtype(table[c])]


def _overview_plot(pairs: pd.DataFrame, out: Path) -> Path:
    """Every pair of every study on one axis: gap to the reference (95% interval) against nominal ρ, a
    marker per model. Where the sign changes with ρ, if anywhere, shows here first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for marker, (model, group) in zip("osD^vP*X<>", pairs.groupby("model", sort=True), strict=False):
        low, high = group["ci_low"].fillna(group["mean_gap"]), group["ci_high"].fillna(group["mean_gap"])
        err = [group["mean_gap"] - low, high - group["mean_gap"]]
        ax.errorbar(group["rho"], group["mean_gap"], yerr=err, fmt=marker, capsize=3, label=model, alpha=0.85)
    ax.axhline(0, color="grey", lw=0.8)
    title = "Every pair: gap vs ρ (mean, 95% CI over seeds)"
    if pairs["mean_gap"].abs().max() > 2 * SYMLOG_POINTS:  # an arm that collapsed: keep the others readable
        ax.set_yscale("symlog", linthresh=SYMLOG_POINTS)
        low, high = ax.get_ylim()
        ticks = [t for t in (-100, -50, -20, -10, -5, 0, 5, 10, 20, 50, 100) if low <= t <= high]
        ax.set_yticks(ticks, [f"{t:+d}" if t else "0" for t in ticks])
        title += f"\ny axis linear within ±{SYMLOG_POINTS:g} points, logarithmic beyond"
    ax.set(xlabel="ρ (nominal share of FLOPs through experts)", ylabel="top-1 gap to reference (points)", title=title)
    ax.legend(title="MoE model", fontsize=8)
    return _save(fig, out / "overview_gap_vs_rho.png")


def _overview_markdown(pairs: pd.DataFrame, plot: Path, trend: pd.DataFrame | None = None) -> str:
    """Per model: the ρ reached, the gaps, and how many pairs' 95% intervals lie above, below or across 0
    (pairs with one seed have no interval and are counted apart); then, per model and study where ρ
    varies, the trend of the gap with ρ (:func:`~visionmoe.studies.stats.rho_trend`)."""
    rows = []
    for model, group in pairs.groupby("model", sort=True):
        above, below = int((group["ci_low"] > 0).sum()), int((group["ci_high"] < 0).sum())
        single = int(group["ci_low"].isna().sum())  # one seed so far: no interval yet
        rows.append(
            {
                "MoE model": model,
                "pairs": len(group),
                "ρ": f"{group['rho'].min():.2f}–{group['rho'].max():.2f}",
                "gap (points)": f"{group['mean_gap'].min():+.2f} to {group['mean_gap'].max():+.2f}",
                "CI above 0": above,
                "CI below 0": below,
                "CI across 0": len(group) - above - below - single,
                "one seed (no CI)": single,
            }
        )
    parts = ["## When does MoE help here?", _markdown(pd.DataFrame(rows))]
    if trend is not None and not trend.empty:
        parts += [
            "Trend with ρ: the least-squares line through every seed's gap at its pair's ρ, per MoE model "
            "and study (seeds of one pair share a configuration, so read the slope's interval with the "
            "pairs' own):",
            _markdown(_trend_table(trend)),
        ]
    return "\n\n".join([*parts, f"![gap vs rho, every pair]({plot.name})"])


def _trend_table(trend: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for t in trend.itertuples(index=False):
        if math.isnan(t.zero_at):
            zero = "— (the line does not rise)"
        elif t.zero_at > 1:
            zero = f"{t.zero_at:.2f} (beyond ρ = 1: nowhere)"
        else:
            zero = f"{t.zero_at:.2f} ({'inside the ρ reached' if t.zero_in_range else 'extrapolated'})"
        rows.append(
            {
                "MoE model": t.model,
                "study": t.study,
                "pairs (seed gaps)": f"{t.pairs} ({t.n})",
                "ρ": f"{t.rho_min:.2f}–{t.rho_max:.2f}",
                "slope, points per 0.1 ρ [95% CI]": (
                    f"{t.slope / 10:+.2f} [{t.slope_low / 10:+.2f}, {t.slope_high / 10:+.2f}]"
                ),
                "p": _fmt(t.p, ".3f"),
                "line at the highest ρ": f"{t.gap_at_max:+.2f}",
                "line reaches 0 at ρ": zero,
            }
        )
    return pd.DataFrame(rows)


def _of(frame: pd.DataFrame, study: str) -> pd.DataFrame:
    return frame[frame["study"] == study] if not frame.empty else frame


def _sweeps(paths: Sequence[Path]) -> dict[str, dict[str, Any]]:
    """study -> {"sweep": spec, "failed": [manifest rows]} from the sweep folders among ``paths``."""
    found: dict[str, dict[str, Any]] = {}
    for path in paths:
        for plan in [path / "sweep.json", *path.glob("*/sweep.json")] if path.is_dir() else []:
            if not plan.is_file():
                continue
            spec = json.loads(plan.read_text())["sweep"]
            entry = found.setdefault(spec["name"], {"sweep": spec, "failed": []})
            manifest = plan.parent / "manifest.json"
            if manifest.is_file():
                entry["failed"] += [r for r in json.loads(manifest.read_text()) if r["status"] in ("failed", "invalid")]
    return found


def _preamble(table: pd.DataFrame) -> str:
    seeds = sorted(table["seed"].dropna().unique())
    return (
        f"{len(table)} runs in {table['study'].nunique()} studies; seeds {', '.join(str(int(s)) for s in seeds)}. "
        "Top-1 in %, gaps in points (configuration − reference under the same seed); intervals are 95% "
        "Student-t over seeds; 'same sign' counts the seeds whose gap has the sign of the mean gap."
    )


# ---- tables ------------------------------------------------------------------------------------


def _fmt(value: Any, spec: str = ".2f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return format(value, spec) if isinstance(value, int | float) else str(value)


def _markdown(frame: pd.DataFrame) -> str:
    """A GitHub table of an all-string frame."""
    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += [
        "| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |" for row in frame.itertuples(index=False)
    ]
    return "\n".join(lines)


def _config_table(cfg: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "configuration": cfg["config"],
            "n": cfg["n"],
            "top-1 (mean ± std)": [f"{_fmt(m)} ± {_fmt(s)}" for m, s in zip(cfg["mean"], cfg["std"], strict=True)],
            "95% CI": [f"[{_fmt(lo)}, {_fmt(hi)}]" for lo, hi in zip(cfg["ci_low"], cfg["ci_high"], strict=True)],
            "ρ (nominal)": [_fmt(v, ".3f") for v in cfg["rho"]],
            "params (M)": [_fmt(v / 1e6, ".3f") for v in cfg["params"]],
            "active (M)": [_fmt(v / 1e6, ".3f") for v in cfg["active_params"]],
            "MFLOPs/img": [_fmt(v / 1e6, ".1f") for v in cfg["flops"]],
            "train min": [_fmt(v, ".1f") for v in cfg["train_minutes"]],
        }
    )


def _pair_table(prs: pd.DataFrame, gaps: pd.DataFrame) -> pd.DataFrame:
    per_seed = {
        pair: ", ".join(f"{g:+.2f}" for g in group.sort_values("seed")["gap"])
        for pair, group in (gaps.groupby(["config", "reference"]) if not gaps.empty else [])
    }
    return pd.DataFrame(
        {
            "configuration": prs["config"],
            "reference": prs["reference"],
            "n": prs["n"],
            "gap": [_fmt(v, "+.2f") for v in prs["mean_gap"]],
            "95% CI": [
                f"[{_fmt(a, '+.2f')}, {_fmt(b, '+.2f')}]" for a, b in zip(prs["ci_low"], prs["ci_high"], strict=True)
            ],
            "same sign": [f"{s}/{n}" for s, n in zip(prs["same_sign"], prs["n"], strict=True)],
            "t-test p": [_fmt(v, ".3g") for v in prs["t_p"]],
            "Wilcoxon p": [_fmt(v, ".3g") for v in prs["w_p"]],
            "per seed": [per_seed.get(pair, "") for pair in zip(prs["config"], prs["reference"], strict=True)],
            "note": prs["note"],
        }
    )


def _markdown_study(study, rows, cfg, prs, gaps, contrast, plots, sweep, metric, curves) -> str:
    models = ", ".join(dict.fromkeys(str(m) for m in rows["model"]))
    datasets = ", ".join(dict.fromkeys(str(d) for d in rows["dataset"]))
    epochs = ", ".join(dict.fromkeys(f"{e:g}" for e in rows["epochs"].dropna()))
    parts = [f"## {study}", f"Data: {datasets}. Models: {models}. Epochs: {epochs}."]
    if notes := sweep.get("sweep", {}).get("notes"):
        parts.append(notes)
    parts += [f"### Configurations ({metric})", _markdown(_config_table(cfg))]
    if not prs.empty:
        parts += ["### Pairs: configuration − reference (same seed)", _markdown(_pair_table(prs, gaps))]
    if not contrast[0].empty:
        parts += ["### Contrasts: configuration − configuration (same seed)", _markdown(_pair_table(*contrast))]
    if _over_epochs(curves):
        parts += [
            f"### Pairs by epoch: test {metric} gap, mean over seeds [95% interval] (training top-1 gap)",
            _markdown(_epoch_table(curves)),
        ]
    sizes = [c for c in cfg if c.startswith(BY_BATCH_SIZE) and not c.endswith("_std") and cfg[c].notna().any()]
    if sizes:
        frame = pd.DataFrame(
            {
                "configuration": cfg["config"],
                **{
                    f"batch {c.removeprefix(BY_BATCH_SIZE)}": [
                        f"{_fmt(m)} ± {_fmt(s)}" for m, s in zip(cfg[c], cfg[f"{c}_std"], strict=True)
                    ]
                    for c in sizes
                },
            }
        )
        parts += [
            f"### Test {metric} by evaluation batch size (mean ± std over seeds; fixed, unshuffled test batches)",
            _markdown(frame),
        ]
    sharp = [c for c in ("lambda_max_train", "lambda_max_test", "trace_train", "trace_test") if c in cfg]
    if sharp:
        frame = pd.DataFrame({"configuration": cfg["config"], **{c: [_fmt(v, ".4g") for v in cfg[c]] for c in sharp}})
        parts += ["### Sharpness (mean over seeds; Hessian of the training loss on subsets)", _markdown(frame)]
    if failed := sweep.get("failed"):
        lines = [
            f"- `{r['name']}` ({r['status']}, {r['attempts']} attempt(s)): {r['error'].splitlines()[-1]}"
            for r in failed
        ]
        parts += ["### Runs that did not finish", "\n".join(lines)]
    parts += [f"![{p.stem}]({p.name})" for p in plots]
    return "\n\n".join(parts)


def _latex_study(study: str, cfg: pd.DataFrame, prs: pd.DataFrame, contrast: pd.DataFrame) -> str:
    """Booktabs tables (pandas ``to_latex``, which renders through jinja2)."""
    frame = _config_table(cfg)
    blocks = [f"% study {study}: configurations", frame.to_latex(index=False, caption=f"{study}: configurations")]
    if not prs.empty:
        pair = _pair_table(prs, pd.DataFrame()).drop(columns=["per seed"])
        blocks += [f"% study {study}: pairs", pair.to_latex(index=False, caption=f"{study}: gap to the reference")]
    if not contrast.empty:
        table = _pair_table(contrast, pd.DataFrame()).drop(columns=["per seed"])
        blocks += [f"% study {study}: contrasts", table.to_latex(index=False, caption=f"{study}: contrasts")]
    return "\n".join(blocks)


# ---- plots -------------------------------------------------------------------------------------


def _varying(rows: pd.DataFrame) -> list[str]:
    return [a for a in axis_columns(rows) if a in rows and rows[a].nunique(dropna=True) > 1]


def _order(values: Iterable[Any]) -> list[Any]:
    values = list(dict.fromkeys(values))
    numbers = pd.to_numeric(pd.Series(values, dtype=object), errors="coerce")
    if numbers.notna().all():
        return [v for _, v in sorted(zip(numbers, values, strict=True))]
    return values


def _plots(study: str, rows: pd.DataFrame, cfg: pd.DataFrame, prs: pd.DataFrame, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    varying = _varying(rows)
    has_pairs = not prs.empty
    data = prs if has_pairs else cfg[~cfg["is_twin"]]
    y, lo, hi = ("mean_gap", "ci_low", "ci_high") if has_pairs else ("mean", "ci_low", "ci_high")
    ylabel = "top-1 gap to reference (points)" if has_pairs else "top-1 (%)"
    written = []
    if has_pairs:
        written.append(_rho_plot(study, data, varying, out))
    claimed = set()
    for name, axes in PLOTS.items():
        for axis in (a for a in varying if a in axes and a not in claimed):
            claimed.add(axis)
            written.append(_compare(study, name, axis, data, varying, y, lo, hi, ylabel, has_pairs, out))
            break
    for axis in (a for a in varying if a not in claimed and a not in HUES):
        written.append(_compare(study, axis, axis, data, varying, y, lo, hi, ylabel, has_pairs, out))
    if "lambda_max_train" in cfg:
        written.append(_sharpness_plot(study, cfg, out))
    return written


def _label(row: pd.Series, axes: Sequence[str]) -> str:
    return ", ".join(f"{a}={row[a]}" for a in axes) or str(row["config"])


def _rho_plot(study: str, prs: pd.DataFrame, varying: list[str], out: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    hue = next((h for h in HUES if h in varying), None)
    groups = prs.groupby(hue, sort=False) if hue else [(None, prs)]
    for value, group in groups:
        group = group.sort_values("rho")
        err = [group["mean_gap"] - group["ci_low"], group["ci_high"] - group["mean_gap"]]
        ax.errorbar(group["rho"], group["mean_gap"], yerr=err, fmt="o-", capsize=3, label=value)
        # a label sits above its point when the line rises into it, else below: points with close ρ
        # (widths of one backbone) keep their labels apart
        rises = group["mean_gap"].diff().fillna(-1.0) > 0
        for (_, r), up in zip(group.iterrows(), rises, strict=True):
            ax.annotate(
                _label(r, [a for a in varying if a != hue]),
                (r["rho"], r["mean_gap"]),
                fontsize=7,
                xytext=(4, 4 if up else -11),
                textcoords="offset points",
            )
    ax.axhline(0, color="grey", lw=0.8)
    ax.set(
        xlabel="ρ (nominal share of FLOPs through experts)",
        ylabel="top-1 gap to reference (points)",
        title=f"{study}: gap vs ρ (mean, 95% CI over seeds)",
    )
    if hue:
        ax.legend(title=hue)
    return _save(fig, out / f"{study}_gap_vs_rho.png")


def _compare(study, name, axis, data, varying, y, lo, hi, ylabel, has_pairs, out) -> Path:
    """``y`` with its interval against ``axis``; one line per combination of the other varying axes
    (combinations with a single point, i.e. other grids of a one-factor-at-a-time study, left out)."""
    import matplotlib.pyplot as plt

    others = [a for a in varying if a != axis]
    order = _order(data[axis])
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    groups = list(data.groupby(others, sort=False)) if others else [((), data)]
    if any(len(g) > 1 for _, g in groups):
        groups = [(k, g) for k, g in groups if len(g) > 1]
    for key, group in groups:
        group = group.set_index(axis).reindex([v for v in order if v in set(group[axis])])
        x = [order.index(v) for v in group.index]
        err = [group[y] - group[lo], group[hi] - group[y]]
        key = key if isinstance(key, tuple) else (key,)
        label = ", ".join(f"{a}={v}" for a, v in zip(others, key, strict=True)) or None
        ax.errorbar(x, group[y], yerr=err, fmt="o-", capsize=3, label=label)
    ax.set_xticks(range(len(order)), [str(v) for v in order], rotation=20 if len(order) > 4 else 0)
    if has_pairs:
        ax.axhline(0, color="grey", lw=0.8)
    ax.set(xlabel=axis, ylabel=ylabel, title=f"{study}: {ylabel.split(' (')[0]} by {axis} (95% CI)")
    if others:
        ax.legend(fontsize=8)
    return _save(fig, out / f"{study}_{name}.png")


def _over_epochs(curves: pd.DataFrame) -> bool:
    """Whether a study's by-epoch gaps span more than one epoch (else there is nothing to show by epoch)."""
    return not curves.empty and curves["epoch"].nunique() > 1


EPOCH_COLUMNS = 8
"""At most this many epochs in a report's by-epoch table: evenly spaced, the first and last included."""


def _epoch_table(curves: pd.DataFrame) -> pd.DataFrame:
    epochs = sorted(curves["epoch"].unique())
    if len(epochs) > EPOCH_COLUMNS:
        picks = {round(i * (len(epochs) - 1) / (EPOCH_COLUMNS - 1)) for i in range(EPOCH_COLUMNS)}
        epochs = [epochs[i] for i in sorted(picks)]
    rows = []
    for config, group in curves.groupby("config", sort=False):
        at = group.set_index("epoch")
        cells = {}
        for epoch in epochs:
            if epoch not in at.index:
                cells[f"epoch {epoch:g}"] = "—"
                continue
            r = at.loc[epoch]
            interval = f" [{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]" if r["n"] > 1 else ""
            cells[f"epoch {epoch:g}"] = f"{_fmt(r['mean_gap'])}{interval} ({_fmt(r['mean_train_gap'], '+.1f')})"
        rows.append({"pair": f"{config} − {group['reference'].iloc[0]}", "seeds": int(group["n"].max()), **cells})
    return pd.DataFrame(rows)


BAND_SEEDS = 3
"""The by-epoch plot shades a pair's 95% band from this many seeds on; below it (t(0.975, 1) = 12.7 at two
seeds) the band would dwarf the curves, so each seed's own gap is drawn instead (the table keeps the interval)."""


def _epoch_plot(study, curves: pd.DataFrame, seeds: pd.DataFrame, varying: list[str], metric: str, out: Path) -> Path:
    """Each pair's mean test gap by epoch (solid) with its 95% band or, with few seeds, each seed's gap
    (thin), and its mean training top-1 gap (dashed)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for config, group in curves.groupby("config", sort=False):
        group = group.sort_values("epoch")
        label = _label(group.iloc[0], varying) if varying else config
        (line,) = ax.plot(group["epoch"], group["mean_gap"], "o-", ms=3, label=f"{label} (n={group['n'].max()})")
        if group["n"].max() >= BAND_SEEDS:
            ax.fill_between(group["epoch"], group["ci_low"], group["ci_high"], color=line.get_color(), alpha=0.15)
        elif group["n"].max() > 1:
            for _, seed in seeds[seeds["config"] == config].groupby("seed"):
                seed = seed.sort_values("epoch")
                ax.plot(seed["epoch"], seed["gap"], "-", color=line.get_color(), lw=0.7, alpha=0.4)
        ax.plot(group["epoch"], group["mean_train_gap"], "--", color=line.get_color(), lw=0.9)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set(
        xlabel="epoch",
        ylabel=f"{metric} gap to reference (points)",
        title=f"{study}: test gap by epoch (dashed: training top-1 gap)",
    )
    ax.legend(fontsize=7)
    return _save(fig, out / f"{study}_gap_by_epoch.png")


def _sharpness_plot(study: str, cfg: pd.DataFrame, out: Path) -> Path:
    import matplotlib.pyplot as plt

    cols = [c for c in ("lambda_max_train", "lambda_max_test") if c in cfg]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    width = 0.8 / len(cols)
    for i, col in enumerate(cols):
        ax.bar([j + i * width for j in range(len(cfg))], cfg[col], width, label=col.replace("lambda_max_", "λmax "))
    ax.set_xticks([j + width * (len(cols) - 1) / 2 for j in range(len(cfg))], list(cfg["config"]), fontsize=8)
    ax.set(ylabel="λmax of the loss Hessian", title=f"{study}: sharpness (mean over seeds)")
    ax.legend()
    return _save(fig, out / f"{study}_sharpness.png")


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
