"""What one invocation of :func:`visionmoe.studies.sweep.run_sweep` does: which runs, where, and how.

Built and checked once (:meth:`SweepPlan.make`), before the sweep takes its directory's lock, then handed,
frozen, to every step that needs part of it: the executors read ``jobs``, ``threads`` and ``runtime``, the
slurm executor its parameters, the reuse step its sources; ``sweep.json`` is its :meth:`~SweepPlan.to_dict`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from visionmoe.studies.grid import Run, Sweep

EXECUTORS = ("local", "inline", "slurm")


def available_cores() -> int:
    """The cores this process may use (its CPU affinity where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


@dataclass(frozen=True)
class SweepPlan:
    """A sweep expanded into runs in ``out``, and how to run them (see :func:`~visionmoe.studies.sweep.run_sweep`)."""

    sweep: Sweep
    out: Path
    runs: tuple[Run, ...]
    seeds: tuple[int, ...]  # as sweep.json records them
    executor: str = "local"  # one of EXECUTORS
    jobs: int = 1  # runs at once (local executor)
    threads: int = 1  # train.threads of each run
    retries: int = 1  # further attempts of a failed run
    slurm: Mapping[str, Any] = field(default_factory=dict)  # submitit parameters (slurm executor)
    reuse: tuple[Path, ...] = ()  # where finished runs may be copied in from

    @classmethod
    def make(
        cls,
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
    ) -> SweepPlan:
        """Check the arguments of ``run_sweep`` and expand the sweep; ``cores`` are shared by the ``jobs``."""
        if executor not in EXECUTORS:
            raise ValueError(f"executor must be one of {list(EXECUTORS)}, got {executor!r}")
        if jobs < 1 or retries < 0:
            raise ValueError(f"need jobs >= 1 and retries >= 0, got jobs={jobs}, retries={retries}")
        if seeds is not None and not seeds:
            raise ValueError(f"seeds must name at least one seed (or be None for the sweep's), got {seeds!r}")
        out = Path(out)
        runs = tuple(sweep.runs(out, seeds))
        slurm = dict(slurm or {})
        if executor == "slurm":
            threads = int(slurm.get("cpus_per_task", 1))
        else:
            threads = max(1, (cores or available_cores()) // jobs)
        return cls(
            sweep=sweep,
            out=out,
            runs=runs,
            seeds=tuple(sweep.seeds if seeds is None else seeds),
            executor=executor,
            jobs=jobs,
            threads=threads,
            retries=retries,
            slurm=slurm,
            reuse=tuple(map(Path, reuse)),
        )

    @property
    def root(self) -> Path:
        """Where the sweep's files go: ``out`` as given (recorded so), with a ``~`` expanded."""
        return self.out.expanduser()

    @property
    def runtime(self) -> tuple[str, ...]:
        """Overrides every run gets that change no result: its share of the cores, no progress bar."""
        return (f"train.threads={self.threads}", "train.progress=false")

    def to_dict(self) -> dict[str, Any]:
        """What ``sweep.json`` holds: the sweep, its seeds and its runs' names."""
        return {"sweep": self.sweep.to_dict(), "seeds": list(self.seeds), "runs": [r.name for r in self.runs]}
