"""Where a sweep stands, without running anything (``visionmoe sweep --status``).

    table = sweep_status(get_study("hidden").build(seeds=(0, 1, 2)), "results/hidden")
    print(status_markdown(table))

One row per run, from its directory (``summary.json``: finished; ``config.yaml`` without it: started,
with the epochs its ``metrics.jsonl`` has logged) and the manifest (attempts; failed and invalid
runs). A finished run's minutes are its own training and evaluation time. What is left is
estimated from the finished seeds of the same configuration: their mean minutes for each run not
begun, less the share already logged for one started — so it needs one seed of a configuration
finished to time the others, and says how many runs it could not time.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from visionmoe.jsonl import read_jsonl
from visionmoe.studies.lock import lock_holder
from visionmoe.studies.sweep import MANIFEST, Sweep


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _logged_epochs(run_dir: Path) -> float:
    """The last epoch ``metrics.jsonl`` logged (0 when it logged none)."""
    try:
        records = read_jsonl(run_dir / "metrics.jsonl")  # a torn last line is dropped, not "0 epochs"
        return float(records[-1]["epoch"]) if records else 0.0
    except (OSError, ValueError, KeyError, IndexError):
        return 0.0


def sweep_status(sweep: Sweep, out: str | Path, seeds: Sequence[int] | None = None) -> pd.DataFrame:
    """One row per run of ``sweep`` in ``out``: ``state`` (finished, reused, started, pending, failed,
    invalid), ``top1``, ``minutes`` (finished runs), ``epochs_done`` / ``epochs``, ``attempts``, and
    ``minutes_left`` (None where no seed of its configuration has finished). ``attrs``: ``running``
    (the lock holder, or None), ``minutes_left`` (the sum of the timed ones) and ``untimed`` (how many
    unfinished runs could not be timed)."""
    out = Path(out)
    root = out.expanduser()
    manifest = {row["name"]: row for row in (_read_json(root / MANIFEST) or []) if isinstance(row, dict)}
    rows = []
    for run in sweep.runs(out, seeds):
        previous = manifest.get(run.name, {})
        summary = _read_json(run.run_dir / "summary.json") if run.finished() else None
        try:
            epochs = float(run.config().train.epochs)
        except (ValueError, TypeError, FileNotFoundError):
            epochs, state = float("nan"), "invalid"
        else:
            if summary is not None:
                state = "reused" if summary.get("reused_from") else "finished"
            elif previous.get("status") == "failed":
                state = "failed"
            elif (run.run_dir / "config.yaml").is_file():
                state = "started"
            else:
                state = "pending"
        minutes = None
        if summary is not None:
            minutes = (float(summary.get("train_seconds") or 0) + float(summary.get("eval_seconds") or 0)) / 60
        rows.append(
            {
                "name": run.name,
                "key": run.key,
                "seed": run.seed,
                "state": state,
                "top1": (summary or {}).get("test", {}).get("top1"),
                "minutes": minutes,
                "epochs_done": epochs if summary is not None else _logged_epochs(run.run_dir),
                "epochs": epochs,
                "attempts": int(previous.get("attempts") or 0),
            }
        )
    table = pd.DataFrame(rows)
    per_config = table.dropna(subset=["minutes"]).groupby("key")["minutes"].mean()
    left = []
    for row in table.itertuples(index=False):
        if row.state in ("finished", "reused", "invalid"):
            left.append(0.0 if row.state != "invalid" else None)
        elif row.key in per_config.index:
            left.append(float(per_config[row.key]) * max(0.0, 1 - row.epochs_done / row.epochs))
        else:
            left.append(None)
    table["minutes_left"] = left
    unfinished = table["state"].isin(["started", "pending", "failed"])
    table.attrs.update(
        running=lock_holder(root),
        minutes_left=float(table.loc[unfinished, "minutes_left"].dropna().sum()),
        untimed=int((unfinished & table["minutes_left"].isna()).sum()),
    )
    return table


def status_markdown(table: pd.DataFrame, name: str = "sweep") -> str:
    """The table as Markdown, and a line: how many runs in each state, what is left, whether one runs."""
    lines = [
        "| run | state | top-1 | minutes | epochs | attempts | minutes left |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]

    def number(value, fmt):
        return "—" if value is None or pd.isna(value) else format(value, fmt)

    for r in table.itertuples(index=False):
        lines.append(
            f"| {r.name} | {r.state} | {number(None if r.top1 is None else 100 * r.top1, '.2f')} | "
            f"{number(r.minutes, '.1f')} | {number(r.epochs_done, 'g')}/{number(r.epochs, 'g')} | {r.attempts} | "
            f"{number(r.minutes_left, '.0f')} |"
        )
    a = table.attrs
    counts = ", ".join(f"{n} {state}" for state, n in table["state"].value_counts().items())
    left = f"about {a['minutes_left'] / 60:.1f} h of runs left at one job"
    if a["untimed"]:
        left += f", plus {a['untimed']} run(s) with no finished seed to time them by"
    running = f"running: {a['running']}" if a["running"] else "no sweep is running there"
    lines += ["", f"{name}: {len(table)} runs ({counts}); {left}; {running}"]
    return "\n".join(lines)
