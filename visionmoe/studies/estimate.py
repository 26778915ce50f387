"""How long a sweep will take here, before it runs: training steps timed per configuration.

    visionmoe sweep --preset hidden --estimate data.dataset=imagefolder data.data_dir=...
    estimate = estimate_sweep(sweep, jobs=1, steps=3)      # a DataFrame, one row per configuration

Each distinct configuration (seed 0's runs: the MoE model and its twin) is built as its run would
build it — a :class:`~visionmoe.train.trainer.Trainer` of the same config, with ``train.threads`` =
cores // jobs — and trained with the Trainer's own step for ``steps`` timed steps on one batch of its
own training images after one untimed warm-up step; the median step time × the run's steps is its
training time. Evaluation is timed the same way
(a forward pass in eval mode, per image) × test images × evaluations (one per ``eval_every`` epochs
and one at the end; twice with flip TTA). Data loading and augmentation are left out: they are a small
share of a step for the in-memory CIFAR pipeline (``data_share`` in a run's metrics says how small).

Seeds cost alike, so the sweep's time is the per-seed total × seeds, divided by ``jobs`` (the ideal;
jobs that share cores also share memory bandwidth). The figure is for this machine in its current
state: time a sweep on a quiet machine, as its runs would be. On a busy one, read the CPU columns: the
process's CPU time (all its threads) counts only while it runs, so it moves far less with other
people's load. With one thread per run (``--jobs 2`` on 2 cores) a run's CPU minutes are about its
minutes on a quiet core; with more threads they are the sum over its threads.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import pandas as pd
import torch

from visionmoe.studies.sweep import Sweep, available_cores


def _time(fn, repeats: int) -> tuple[float, float]:
    """Median (wall, CPU) seconds of ``fn``; CPU time is the process's, summed over its threads."""
    fn()  # warm-up: allocator, oneDNN primitive caches
    walls, cpus = [], []
    for _ in range(repeats):
        start, cpu = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def estimate_run(config, splits, steps: int = 3) -> dict[str, Any]:
    """Seconds per training step and per evaluated image of ``config``'s model, and the run's minutes.

    The step timed is the run's own (:meth:`Trainer.train_step`: forward, loss, backward, clipping,
    optimiser and schedule, mixup when configured), on a :class:`Trainer` built as the run builds it;
    building a Trainer writes nothing.
    """
    from visionmoe.train.trainer import Trainer

    t = config.train
    trainer = Trainer(config, splits=splits)
    batch = min(config.data.batch_size, len(splits.train))
    memory = torch.channels_last if t.channels_last else torch.contiguous_format
    x = splits.first_batch(batch).contiguous(memory_format=memory)  # (B, 3, H, W), unaugmented
    y = splits.train.labels[:batch]
    sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)

    def train_step() -> None:
        trainer.train_step(x, y)
        sync()

    trainer.model.train()
    step_seconds, step_cpu = _time(train_step, steps)
    model, x = trainer.eval_forward, x.to(trainer.device)
    model.eval()
    with torch.no_grad():
        eval_seconds, eval_cpu = (t / batch for t in _time(lambda: (model(x), sync()), steps))  # per image
        # eval.batch_sizes: the test set once more per size, at that size's cost per image
        sized = [
            tuple(t / min(b, batch) for t in _time(lambda b=b: (model(x[:b]), sync()), steps))
            for b in config.eval.batch_sizes
        ]

    total_steps, steps_per_epoch = trainer.total_steps, trainer.steps_per_epoch
    epochs = -(-total_steps // steps_per_epoch)
    evaluations = epochs // t.eval_every + (epochs % t.eval_every != 0)  # every eval_every epochs, and the last
    flips = 2 if config.eval.tta_flip else 1
    eval_images = len(splits.test) * evaluations * flips
    train_minutes = step_seconds * total_steps / 60
    eval_minutes = (eval_seconds * eval_images + sum(w for w, _ in sized) * len(splits.test) * flips) / 60
    cpu_minutes = (
        step_cpu * total_steps + eval_cpu * eval_images + sum(c for _, c in sized) * len(splits.test) * flips
    ) / 60
    return {
        "seconds_per_step": step_seconds,
        "cpu_seconds_per_step": step_cpu,
        "steps": total_steps,
        "train_minutes": train_minutes,
        "eval_minutes": eval_minutes,
        "minutes": train_minutes + eval_minutes,
        "cpu_minutes": cpu_minutes,
    }


def estimate_sweep(
    sweep: Sweep,
    *,
    seeds: Sequence[int] | None = None,
    jobs: int = 1,
    cores: int | None = None,
    steps: int = 3,
    out: str = "runs/estimate",
    echo=print,
) -> pd.DataFrame:
    """One row per configuration of ``sweep``: step time, steps, minutes; ``attrs`` hold the totals.

    ``attrs``: ``threads`` per run, ``minutes_per_seed`` (one seed's runs end to end), ``seeds``,
    ``jobs`` and ``hours`` = minutes_per_seed × seeds / jobs / 60.
    """
    from visionmoe.train.data import load_splits

    if steps < 1 or jobs < 1:
        raise ValueError(f"need steps >= 1 and jobs >= 1, got steps={steps}, jobs={jobs}")
    threads = max(1, (cores or available_cores()) // jobs)
    seeds = tuple(seeds or sweep.seeds)
    runs = [run for run in sweep.runs(out, seeds[:1])]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    splits_by_data: dict[str, Any] = {}
    rows = []
    scratch = tempfile.TemporaryDirectory(prefix="visionmoe-estimate-")  # not the sweep's own run directories
    try:
        for run in runs:
            runtime = (f"train.threads={threads}", "train.progress=false", f"train.out_dir={scratch.name}")
            config = run.config(runtime)
            key = repr(config.data)
            if key not in splits_by_data:
                splits_by_data[key] = load_splits(config.data)
            row = {"config": run.key, "twin": run.twin or "", **estimate_run(config, splits_by_data[key], steps)}
            echo(
                f"{run.key}: {row['seconds_per_step']:.2f} s/step × {row['steps']} steps ≈ {row['minutes']:.1f} min "
                f"(CPU {row['cpu_seconds_per_step']:.2f} s/step, {row['cpu_minutes']:.1f} min)"
            )
            rows.append(row)
    finally:
        torch.set_num_threads(previous)
        scratch.cleanup()
    table = pd.DataFrame(rows)
    per_seed, cpu_per_seed = float(table["minutes"].sum()), float(table["cpu_minutes"].sum())
    table.attrs.update(
        threads=threads, minutes_per_seed=per_seed, seeds=len(seeds), jobs=jobs, hours=per_seed * len(seeds) / jobs / 60
    )
    table.attrs.update(cpu_minutes_per_seed=cpu_per_seed, cpu_hours=cpu_per_seed * len(seeds) / jobs / 60)
    return table


def estimate_markdown(table: pd.DataFrame, name: str) -> str:
    a = table.attrs
    lines = [
        "| configuration | s / step | CPU s / step | steps | train min | eval min | min per run | CPU min per run |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in table.itertuples(index=False):
        lines.append(
            f"| {r.config} | {r.seconds_per_step:.2f} | {r.cpu_seconds_per_step:.2f} | {r.steps} | "
            f"{r.train_minutes:.1f} | {r.eval_minutes:.1f} | {r.minutes:.1f} | {r.cpu_minutes:.1f} |"
        )
    lines.append("")
    lines.append(
        f"{name}: {a['minutes_per_seed']:.0f} min per seed × {a['seeds']} seed(s) / {a['jobs']} job(s) "
        f"× {a['threads']} thread(s) ≈ {a['hours']:.1f} h; in CPU time {a['cpu_minutes_per_seed']:.0f} min per "
        f"seed ≈ {a['cpu_hours']:.1f} h"
    )
    return "\n".join(lines)
