"""Where a sweep's runs train: worker processes here, this process, or a slurm cluster.

Each executor takes the plan, the runs to train and a ``finish(run, ok, seconds, error)`` callback, calls
it once per attempt, and tries a run again while the callback says so (each retry resumes from the run's
last checkpoint). A failure of one run is recorded through the callback, never raised: the others go on.
Each attempt is :func:`run_one`: train (or resume) the run, then analyse it if the sweep asks.

- ``local``: ``jobs`` worker processes at once, each a fresh ``python -m visionmoe.studies.worker`` with
  ``train.threads`` (and OMP/MKL threads) = its share of the cores, logging to ``<run>/sweep.log``; a fresh
  process per run, so nothing one run does (threads, caches, a crash) reaches another.
- ``inline``: one by one in this process (tests, debugging).
- ``slurm``: submitted through submitit (``pip install 'visionmoe[slurm]'``), one job per run.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from visionmoe.jsonl import write_atomic
from visionmoe.studies.grid import Run, ended_as_asked
from visionmoe.studies.plan import EXECUTORS, SweepPlan
from visionmoe.studies.reuse import check_not_stale

Finish = Callable[[Run, bool, float, str], bool]  # (run, ok, seconds, error) -> try it again?


def run_one(run: Run, runtime: Sequence[str] = ()) -> dict[str, Any]:
    """Train ``run`` (resuming its checkpoint if it has one), then analyse it if asked; returns the summary.

    A finished run (:func:`~visionmoe.studies.grid.ended_as_asked`) is not trained again; a run whose directory
    holds another config is an error.
    """
    from visionmoe.train.checkpoint import CHECKPOINT
    from visionmoe.train.trainer import Trainer

    config = run.config(runtime)
    run_dir = run.run_dir
    check_not_stale(run_dir, config)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(run.spec_file, run.to_json())
    if not ended_as_asked(run_dir, lambda: config.train.time_limit_minutes):  # trained, or stopped by another limit
        Trainer(config, resume=(run_dir / CHECKPOINT).is_file()).fit()
    if run.analyze and not (run_dir / "analysis.json").is_file():
        from visionmoe.analysis.trained_run import analyze_run

        analyze_run(run_dir, **{"progress": False, **run.analyze})
    return json.loads((run_dir / "summary.json").read_text())


def execute_inline(plan: SweepPlan, todo: Sequence[Run], finish: Finish) -> None:
    """Each run in turn, in this process, until it finishes or runs out of retries."""
    for run in todo:
        again = True
        while again:
            start = time.perf_counter()
            try:
                run_one(run, plan.runtime)
                ok, error = True, ""
            except Exception as exc:  # any failure of one run is recorded, never raised: the others go on
                ok, error = False, "".join(traceback.format_exception_only(type(exc), exc)).strip()
            again = finish(run, ok, time.perf_counter() - start, error)


def execute_local(plan: SweepPlan, todo: Sequence[Run], finish: Finish) -> None:
    """``plan.jobs`` worker processes at once; a retried run goes to the back of the queue."""
    threads = str(plan.threads)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    pending, active = list(todo), {}
    try:
        while pending or active:
            while pending and len(active) < plan.jobs:
                run = pending.pop(0)
                run.run_dir.mkdir(parents=True, exist_ok=True)
                write_atomic(run.spec_file, run.to_json())
                log = (run.run_dir / "sweep.log").open("a")
                log.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} start\n")
                log.flush()
                command = [sys.executable, "-m", "visionmoe.studies.worker", str(run.spec_file), *plan.runtime]
                process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
                active[process] = (run, log, time.perf_counter())
            time.sleep(0.2)
            for process in [p for p in active if p.poll() is not None]:
                run, log, start = active.pop(process)
                log.close()
                error = "" if process.returncode == 0 else _log_error(run.run_dir / "sweep.log", process.returncode)
                if finish(run, process.returncode == 0, time.perf_counter() - start, error):
                    pending.append(run)
    finally:  # interrupted: stop our workers; their runs resume from their checkpoints next time
        for process, (_, log, _) in active.items():
            process.terminate()
            process.wait()
            log.close()


def _log_error(log: Path, returncode: int) -> str:
    """Why a worker failed, from its exit status and the last error line of its log."""
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    cause = f"worker exited with {returncode}" + (" (killed by a signal)" if returncode < 0 else "")
    tail = [line for line in lines[-15:] if not line.startswith("====")]
    errors = [line for line in tail if re.match(r"^[A-Za-z_.]*(Error|Exception|Interrupt)\b", line)]
    return "\n".join([cause, *(errors[-1:] or tail[-1:])])


def execute_slurm(plan: SweepPlan, todo: Sequence[Run], finish: Finish) -> None:
    """Every run submitted at once as a submitit job, polled every 5 s; a retried run is submitted again."""
    try:
        import submitit
    except ImportError:
        raise ImportError(
            "the slurm executor needs submitit, which is not installed: pip install 'visionmoe[slurm]'"
        ) from None
    executor = submitit.AutoExecutor(folder=str(plan.root / "slurm" / "%j"))
    executor.update_parameters(**{"name": "visionmoe-sweep", **plan.slurm})
    jobs = {}

    def submit(run: Run) -> None:
        jobs[run.name] = (run, executor.submit(run_one, run, tuple(plan.runtime)), time.perf_counter())

    for run in todo:
        submit(run)
    while jobs:
        for name in [n for n, (_, job, _) in jobs.items() if job.done()]:
            run, job, start = jobs.pop(name)
            try:
                job.result()
                ok, error = True, ""
            except Exception as exc:
                ok, error = False, f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1:]}"
            if finish(run, ok, time.perf_counter() - start, error):
                submit(run)
        if jobs:
            time.sleep(5)


# executor name -> how it runs (EXECUTORS, the names run_sweep accepts, in order; zip fails on a name without one)
EXECUTE: dict[str, Callable[[SweepPlan, Sequence[Run], Finish], None]] = dict(
    zip(EXECUTORS, (execute_local, execute_inline, execute_slurm), strict=True)
)
