"""A sweep's record of its runs: ``<out>/manifest.json`` and ``manifest.csv``, one row per run.

Each row holds a run's status (pending, done, reused, failed, invalid), its attempts, the worker's wall
time over all of them, its test top-1 and its last error. The manifest is rewritten after every attempt,
atomically (a killed sweep never leaves half a manifest), so it says where a sweep stands while it runs.

A run finished by an earlier invocation keeps what that one recorded, or, with no manifest (lost, or
written by an older visionmoe), what its ``summary.json`` says; a run tried before and not finished carries
its attempts and time on (``--retries`` counts this invocation's attempts); rows of runs this invocation
does not plan stay as they were: so the manifest of a sweep run in several sittings is that of the whole
sweep.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from visionmoe.jsonl import write_atomic
from visionmoe.studies.grid import Run

MANIFEST = "manifest.json"
MANIFEST_CSV = "manifest.csv"


@dataclass
class Record:
    """One run's row of the manifest (its fields are the columns, in this order)."""

    name: str
    key: str
    seed: int
    twin: str | None
    run_dir: str
    status: str = "pending"  # pending, done, reused, failed, invalid
    attempts: int = 0
    seconds: float = 0.0  # the worker's wall time over all attempts, in every invocation
    top1: float | None = None
    error: str = ""
    source: str = ""  # the run it was copied from (status "reused")


class Manifest:
    """The records of a sweep's runs in ``out``, and what an earlier invocation recorded there."""

    def __init__(self, out: Path, runs: Sequence[Run]) -> None:
        self.out = out
        self.records = {r.name: Record(r.name, r.key, r.seed, r.twin, str(Path(r.out_dir) / r.name)) for r in runs}
        self.before = _previous_rows(out)
        self.tried: dict[str, int] = {}  # attempts in this invocation: what --retries counts
        for name, record in self.records.items():  # a run tried before: its attempts and time carry on
            row = self.before.get(name)
            if row is not None and row.get("status") in ("pending", "failed"):
                record.attempts, record.seconds = int(row.get("attempts") or 0), float(row.get("seconds") or 0.0)
                record.error = str(row.get("error") or "")

    def invalid(self, run: Run, error: Exception) -> None:
        """A run whose config or directory is refused: recorded, never run."""
        record = self.records[run.name]
        record.status, record.error = "invalid", f"{type(error).__name__}: {error}"

    def finished_before(self, run: Run) -> None:
        """A run an earlier invocation finished: from that invocation's manifest row when it recorded the
        finish, else from the run's ``summary.json``: copied in (``reused_from``), or trained in (at least)
        one attempt taking its train + eval time."""
        record, row = self.records[run.name], self.before.get(run.name)
        record.top1 = _top1(run.run_dir)
        if row is not None and row.get("status") in ("done", "reused"):
            record.status, record.source = row["status"], row.get("source") or ""
            record.attempts, record.seconds = int(row.get("attempts") or 0), float(row.get("seconds") or 0.0)
            return
        try:
            summary = json.loads((run.run_dir / "summary.json").read_text())
        except (OSError, ValueError):
            summary = {}
        record.source = str(summary.get("reused_from") or "")
        record.status = "reused" if record.source else "done"
        if not record.source:
            record.attempts = 1
            record.seconds = float(summary.get("train_seconds") or 0.0) + float(summary.get("eval_seconds") or 0.0)

    def reused(self, run: Run, source: Path) -> None:
        """A run copied in from ``source`` (:func:`visionmoe.studies.reuse.adopt`)."""
        record = self.records[run.name]
        record.status, record.source, record.top1 = "reused", str(source), _top1(run.run_dir)

    def attempt(self, run: Run, ok: bool, seconds: float, error: str, retries: int) -> Record:
        """Record one attempt at ``run`` (``ok``: it finished) and save; the run stays pending while it has
        retries left, then fails."""
        record = self.records[run.name]
        record.attempts += 1
        record.seconds += seconds
        self.tried[run.name] = self.tried.get(run.name, 0) + 1
        if ok:
            record.status, record.error, record.top1 = "done", "", _top1(run.run_dir)
        else:
            record.error = error or "the run ended without writing summary.json"
            record.status = "failed" if self.tried[run.name] > retries else "pending"
        self.save()
        return record

    def save(self) -> pd.DataFrame:
        """Write ``manifest.json`` and ``manifest.csv``; returns the manifest as a table. Rows of runs an earlier
        invocation recorded and this one does not plan (other seeds, say) are kept as they were."""
        rows = [asdict(r) for r in self.records.values()]
        rows += [dict(row) for name, row in self.before.items() if name not in self.records]
        write_atomic(self.out / MANIFEST, json.dumps(rows, indent=2) + "\n")
        frame = pd.DataFrame(rows)
        write_atomic(self.out / MANIFEST_CSV, frame.to_csv(index=False))
        return frame


def _previous_rows(out: Path) -> dict[str, Mapping[str, Any]]:
    """The rows of an earlier invocation's manifest by run name ({} when there is none or it is unreadable)."""
    try:
        return {row["name"]: row for row in json.loads((out / MANIFEST).read_text())}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _top1(run_dir: Path) -> float | None:
    try:
        return float(json.loads((run_dir / "summary.json").read_text())["test"]["top1"])
    except (OSError, KeyError, ValueError):
        return None
