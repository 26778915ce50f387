"""Run a sweep: every run of a preset × axes × seeds not finished yet, resumable, into one directory.

    sweep = Sweep("topk", "cifar10_moe", grids=[{"model.moe.k": [1, 2]}], seeds=(0, 1, 2))
    manifest = run_sweep(sweep, "runs/topk", jobs=2)          # -> runs/topk/k=1-s0/, k=1,twin=flops-s0/, ...

A sweep reads as the steps of :func:`run_sweep`, each in its own module:

1. expand the sweep into runs, their directories and pairs (:mod:`~visionmoe.studies.grid`) and fix how
   to run them (:class:`~visionmoe.studies.plan.SweepPlan`); write ``<out>/sweep.json``;
2. check every run before any trains: an invalid grid cell (a bad override) or a directory holding a
   run of another config is recorded without being run (:mod:`~visionmoe.studies.reuse`); a run with
   ``summary.json`` (and, if the sweep analyses runs, ``analysis.json``) is skipped;
3. copy in finished runs of other sweeps with the same config (``reuse=[dirs]``,
   :func:`~visionmoe.studies.reuse.adopt_finished`), so studies that share a configuration train it once;
4. train the rest (:mod:`~visionmoe.studies.executors`): a run with a checkpoint is resumed; one that
   fails is retried ``retries`` times (resuming from its last checkpoint), then recorded as failed.
   Nothing a run does reaches another run's directory, so a failure costs no other run its result;
5. record every run in ``<out>/manifest.json`` and ``manifest.csv`` as it goes
   (:mod:`~visionmoe.studies.manifest`): its status, attempts, time and error.

One sweep at a time per directory (:mod:`visionmoe.studies.lock`): a second stops at once, naming the
first; :func:`visionmoe.studies.status.sweep_status` (``visionmoe sweep --status``) says where one stands.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from visionmoe.jsonl import write_atomic
from visionmoe.studies.executors import EXECUTE, Finish, run_one
from visionmoe.studies.grid import Run, Sweep, config_key, parse_axis, parse_seeds
from visionmoe.studies.lock import sweep_lock
from visionmoe.studies.manifest import MANIFEST, Manifest
from visionmoe.studies.plan import SweepPlan, available_cores
from visionmoe.studies.reuse import adopt_finished, check_not_stale

SWEEP_FILE = "sweep.json"

__all__ = [  # the sweep's public names, importable from here as before the split
    "MANIFEST",
    "Run",
    "Sweep",
    "SweepPlan",
    "available_cores",
    "check_not_stale",
    "config_key",
    "parse_axis",
    "parse_seeds",
    "run_one",
    "run_sweep",
]


def run_sweep(
    sweep: Sweep,
    out: str | Path,
    *,
    seeds: Sequence[int] | None = None,
    jobs: int = 1,
    retries: int = 1,
    executor: str = "local",
    cores: int | None = None,
    slurm: Mapping[str, Any] | None = None,
    reuse: Sequence[str | Path] = (),
    echo: Callable[[str], Any] = print,
) -> pd.DataFrame:
    """Run every run of ``sweep`` not finished yet; returns the manifest (one row per run).

    Args:
        sweep: what to run.
        out: the sweep directory.
        seeds: replaces ``sweep.seeds``.
        jobs: runs at once (local executor); each gets ``train.threads = cores // jobs``.
        retries: further attempts of a failed run (each resumes from its last checkpoint).
        executor: "local" (worker processes), "inline" (this process, one at a time), "slurm".
        cores: the cores to share (default: those this process may use).
        slurm: submitit parameters for the slurm executor (``timeout_min``, ``slurm_partition``,
            ``cpus_per_task``, ``gpus_per_node``, ...).
        reuse: sweep or run directories whose finished runs are copied in (:func:`~visionmoe.studies.reuse.adopt`)
            for every run not started yet that has the same config up to where it lives and what
            changes no result (threads, progress bar, data_dir...), instead of training it again: two
            studies that share a configuration (the hidden-size sweep's w=16 pair is the top-k study's
            k=2 pair) train it once.
        echo: where progress lines go.
    """
    plan = SweepPlan.make(
        sweep, out, seeds=seeds, jobs=jobs, retries=retries, executor=executor, cores=cores, slurm=slurm, reuse=reuse
    )
    with sweep_lock(plan.root):  # SweepBusy when another sweep runs here
        return _run_sweep(plan, echo)


def recorded_seeds(out: str | Path) -> list[int]:
    """The seeds ``<out>/sweep.json`` records ([] when there is none or it is unreadable)."""
    try:
        return [int(seed) for seed in json.loads((Path(out).expanduser() / SWEEP_FILE).read_text())["seeds"]]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def _run_sweep(plan: SweepPlan, echo: Callable[[str], Any]) -> pd.DataFrame:
    record = plan.to_dict()
    before = recorded_seeds(plan.root)  # a sweep run seed by seed: sweep.json names every seed it has run
    record["seeds"] = sorted({*before, *record["seeds"]})
    write_atomic(plan.root / SWEEP_FILE, json.dumps(record, indent=2) + "\n")
    manifest = Manifest(plan.root, plan.runs)
    todo, finished_before = _check_runs(plan, manifest)
    reused = adopt_finished(todo, plan.reuse, plan.runtime) if plan.reuse else []
    for run, source in reused:
        manifest.reused(run, source)
        todo.remove(run)
    manifest.save()
    invalid = [r for r in manifest.records.values() if r.status == "invalid"]
    echo(
        f"sweep {plan.sweep.name}: {len(plan.runs)} runs ({len(todo)} to run, {finished_before} finished before, "
        f"{len(reused)} reused, {len(invalid)} invalid) in {plan.out}; "
        f"{plan.executor} executor, {plan.jobs} job(s) × {plan.threads} thread(s)"
    )
    for record in invalid:  # every cell was validated (its model built on the meta device) before any runs
        echo(f"{record.name}: invalid, not run ({record.error})")
    EXECUTE[plan.executor](plan, todo, _finisher(plan, manifest, echo))
    table = manifest.save()
    counts = table["status"].value_counts().to_dict()
    echo(f"sweep {plan.sweep.name}: " + ", ".join(f"{n} {s}" for s, n in counts.items()) + f"; {plan.out / MANIFEST}")
    return table


def _check_runs(plan: SweepPlan, manifest: Manifest) -> tuple[list[Run], int]:
    """Check every run before any trains; returns the runs to train and how many an earlier invocation finished.

    A run whose config is refused, or whose directory holds a run of another config, is recorded invalid;
    a finished one keeps its earlier record.
    """
    todo, finished_before = [], 0
    for run in plan.runs:
        try:
            check_not_stale(run.run_dir, run.config(plan.runtime))
        except (ValueError, TypeError, FileNotFoundError) as error:
            manifest.invalid(run, error)
        else:
            if run.finished():
                manifest.finished_before(run)
                finished_before += 1
            else:
                todo.append(run)
    return todo, finished_before


def _finisher(plan: SweepPlan, manifest: Manifest, echo: Callable[[str], Any]) -> Finish:
    """The executors' callback: record an attempt at a run and say how it went; True to try it again."""

    def finish(run: Run, ok: bool, seconds: float, error: str) -> bool:
        record = manifest.attempt(run, ok and run.finished(), seconds, error, plan.retries)
        if record.status == "done":
            outcome = f"top-1 {record.top1:.2%}"
        else:
            outcome = f"{record.status} ({record.error.splitlines()[-1]})"
        echo(f"{run.name}: {outcome} [attempt {record.attempts}, {seconds:.0f} s]")
        return record.status == "pending"

    return finish
