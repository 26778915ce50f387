"""Multi-seed sweeps: a preset × a grid of override axes × seeds, every MoE configuration with its dense twin.

    sweep = Sweep("topk", "cifar10_moe", grids=[{"model.moe.k": [1, 2]}], seeds=(0, 1, 2))
    manifest = run_sweep(sweep, "runs/topk", jobs=2)          # -> runs/topk/k=1-s0/, k=1,twin=flops-s0/, ...

**Axes.** A grid maps an axis to its values. A config key (``"model.moe.k": [1, 2]``) sets that
key; a named axis maps labels to override bundles (``"backbone": {"standard": ["model.name=..."],
"depthwise": [...]}``), for settings that move together. A sweep may hold several grids (one factor
at a time, as ablations are usually run): their runs are pooled, and an axis a grid does not vary
takes its *default*, the first value it is listed with, so a configuration shared by two grids is
trained once. An axis is named by its key's last part (``k``), or by the whole key where two keys
end alike.

**Run directories** are ``<out>/<key>-s<seed>``, the key naming the configuration by its axis
values in the sweep's axis order: ``backbone=depthwise,width=16-s0`` and its dense twin
``backbone=depthwise,width=16,twin=flops-s0`` (characters other than letters, digits and ``._+-``
become ``-``; a key over 100 characters is cut and ends in a hash of the whole). Each run directory
also holds ``sweep_run.json`` (study, axes, seed, pairing), so ``visionmoe report`` needs nothing else.

**Matched pairs by construction.** With ``twins=True`` every configuration gets a second run with
``model.dense_twin=flops`` under the same seed. What the pair shares, from how
:class:`~visionmoe.train.Trainer` seeds a run:

- *data*: the same training subset, batches and augmentation (the loader's batches are a function
  of (seed, epoch, step)), the same test set; mixup/cutmix are seeded per step;
- *initialisation*: ``torch.manual_seed(seed)`` precedes model construction, and the twin is a deep
  copy of the MoE model with each MoE layer swapped for a dense FFN, so every non-MoE weight (stem,
  convs, norms, attention, classifier) starts identical; a data-dependent init
  (``init_from_data``) sees the same images;
- *not shared*: the dense FFN that replaces an MoE layer is freshly initialised (from the RNG after
  the MoE model's construction), so it matches no expert; and the training RNG, reseeded with the
  seed before step 1, drifts apart once the MoE draws random numbers the twin does not (router
  noise), so dropout / drop-path masks differ after the first noisy routing step.

Studies without a dense twin (Rokah et al.'s heads) name a ``baseline`` instead, an axis value whose
configuration is the reference of the others under the same seed.

**Execution and resume.** Runs go to ``jobs`` worker processes (``executor="local"``, each a fresh
``python -m visionmoe.studies.worker`` logging to ``<run>/sweep.log``) with ``train.threads`` = cores
// jobs; ``"inline"`` runs them one by one in this process (tests, debugging); ``"slurm"`` submits
them through submitit (``pip install 'visionmoe[slurm]'``). A run with ``summary.json`` (and, if the
sweep analyses runs, ``analysis.json``) is skipped; one with a checkpoint is resumed; one that fails
is retried ``retries`` times (resuming from its last checkpoint), then recorded as failed. An
invalid grid cell (a bad override) is recorded without being run. Nothing a run does reaches
another run's directory, so a failure costs no other run its result. ``<out>/manifest.json`` and
``manifest.csv`` list every run with its status, attempts, time and error; a run finished by an
earlier invocation keeps what that one recorded (or, with no manifest, what its ``summary.json``
says), so the manifest of a sweep run in several sittings is that of the whole sweep. One sweep at a
time per directory (:mod:`visionmoe.studies.lock`): a second stops at once, naming the first;
:func:`visionmoe.studies.status.sweep_status` (``visionmoe sweep --status``) says where one stands.

**Reuse.** ``reuse=[dirs]`` (``visionmoe sweep --reuse DIR``) copies in a finished run of another
sweep whose config equals a pending run's up to where it lives and settings that change no result
(:func:`adopt`), so studies that share a configuration train it once.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from visionmoe.studies.lock import sweep_lock

TWIN = "flops"  # the twin of a pair: equal active FLOPs
RUN_FILE = "sweep_run.json"
SWEEP_FILE = "sweep.json"
MANIFEST = "manifest.json"
EXECUTORS = ("local", "inline", "slurm")
MAX_KEY = 100


# ---- axes and runs -----------------------------------------------------------------------------


def parse_axis(text: str) -> tuple[str, list[Any]] | None:
    """``"model.moe.k=1,2"`` -> ``("model.moe.k", [1, 2])``; None for an override with one value.

    Values split at commas outside brackets and quotes, each parsed as YAML, so
    ``model.kwargs.moe_stages=-1,[1, 2],all`` has three values and ``model.kwargs.depths=[2,2,2]`` one.
    """
    key, sep, values = text.partition("=")
    if not sep or not key:
        raise ValueError(f"override {text!r} is not key=value (e.g. model.moe.k=1,2)")
    parts, depth, quote, start = [], 0, "", 0
    for i, char in enumerate(values):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(values[start:i])
            start = i + 1
    parts.append(values[start:])
    if len(parts) == 1:
        return None
    return key, [yaml.safe_load(p) for p in parts]


def parse_seeds(text: str) -> tuple[int, ...]:
    """``"0-4"`` -> (0, 1, 2, 3, 4); ``"0,2,5"`` -> (0, 2, 5); ranges and lists mix (``"0-2,7"``)."""
    seeds: list[int] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        lo, dash, hi = part.partition("-")
        try:
            seeds += list(range(int(lo), int(hi) + 1)) if dash else [int(lo)]
        except ValueError:
            raise ValueError(f"seeds must look like 0-4 or 0,1,2, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ValueError(f"seeds must be distinct ints >= 0, got {text!r}")
    return tuple(seeds)


def _label(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _slug(text: str) -> str:
    """Filesystem-safe: brackets, quotes and spaces dropped, other runs of unsafe characters -> '-'."""
    text = re.sub(r"[\[\]{}()'\" ]", "", text)  # [1, 2] -> 1,2 ; a leading '-' (a negative number) stays
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text) or "_"


def _values(axis: str, values: Any) -> dict[str, tuple[str, ...]]:
    """label -> overrides of one axis: a key's values, or a named axis's bundles."""
    if isinstance(values, Mapping):
        if "." in axis or "=" in axis or "," in axis:
            raise ValueError(f"a named axis needs a plain name (no '.', '=' or ','), got {axis!r}")
        return {str(label): tuple(bundle) for label, bundle in values.items()}
    if isinstance(values, str) or not isinstance(values, Sequence) or not values:
        raise ValueError(f"axis {axis!r} needs a non-empty list of values (or a mapping of named bundles)")
    if "." not in axis:
        raise ValueError(f"axis {axis!r} with a list of values must be a config key such as model.moe.k")
    return {_label(v): (f"{axis}={json.dumps(v)}",) for v in values}


@dataclass
class Run:
    """One training run of a sweep: a configuration (axis values) under one seed."""

    study: str
    preset: str
    key: str  # the configuration, without the seed
    seed: int
    axes: dict[str, str]  # axis name -> value label
    overrides: tuple[str, ...]  # everything that defines the run (seed, directory included)
    out_dir: str
    twin: str | None = None  # "flops" for the dense twin of a pair
    reference: str | None = None  # key of the configuration this one is compared against
    analyze: dict[str, Any] | None = None  # keyword arguments of analysis.trained_run.analyze_run, after training

    @property
    def name(self) -> str:
        return f"{self.key}-s{self.seed}"

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name

    def config(self, runtime: Sequence[str] = ()):
        """The validated config; ``runtime`` overrides change no result (threads, progress bar)."""
        from visionmoe.train.config import load_config

        return load_config(self.preset, [*self.overrides, *runtime])

    def finished(self) -> bool:
        done = (self.run_dir / "summary.json").is_file()
        return done and (not self.analyze or (self.run_dir / "analysis.json").is_file())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Run:
        values = dict(values)
        values["overrides"] = tuple(values["overrides"])
        return cls(**values)


@dataclass
class Sweep:
    """A preset, grids of override axes, seeds, and how runs are paired.

    Args:
        name: the study's name (a column of the report's tables).
        preset: a config preset (``configs/<name>.yaml``) or a YAML path.
        grids: one or more mappings of axis -> values (see the module docstring); ``({},)`` is
            the preset alone.
        overrides: ``key=value`` strings applied to every run, before the axes.
        seeds: the seeds every configuration is trained under.
        twins: also train each configuration's dense twin of equal active FLOPs, as its reference.
        baseline: instead of twins, ``{axis: value}``: that configuration is the reference of the
            configurations that differ from it on this axis only.
        analyze: keyword arguments of :func:`visionmoe.analysis.trained_run.analyze_run` to run on each trained
            run (e.g. ``{"what": ["hessian", "landscape"]}``); None for no analysis.
    """

    name: str
    preset: str
    grids: Sequence[Mapping[str, Any]] = ({},)
    overrides: Sequence[str] = ()
    seeds: Sequence[int] = (0,)
    twins: bool = True
    baseline: Mapping[str, Any] | None = None
    analyze: Mapping[str, Any] | None = None
    notes: str = ""

    def __post_init__(self) -> None:
        if self.twins and self.baseline:
            raise ValueError("a sweep pairs runs with their dense twins or with a baseline, not both")

    def axis_names(self) -> dict[str, str]:
        """grid key -> axis name: the key's last part, or the whole key where two keys end alike."""
        keys = list(dict.fromkeys(k for grid in self.grids for k in grid))
        short = {k: k.rsplit(".", 1)[-1] for k in keys}
        return {k: k if sum(s == short[k] for s in short.values()) > 1 else short[k] for k in keys}

    def axes(self) -> dict[str, dict[str, tuple[str, ...]]]:
        """axis name -> (label -> overrides), in order of first appearance; first label = default."""
        names = self.axis_names()
        axes: dict[str, dict[str, tuple[str, ...]]] = {}
        for grid in self.grids:
            for key, values in grid.items():
                for label, bundle in _values(key, values).items():
                    axes.setdefault(names[key], {}).setdefault(label, bundle)
        return axes

    def configurations(self) -> list[dict[str, str]]:
        """Every configuration as axis name -> label, grids pooled, duplicates dropped, in grid order."""
        axes, names = self.axes(), self.axis_names()
        defaults = {name: next(iter(values)) for name, values in axes.items()}
        seen, cells = set(), []
        for grid in self.grids:
            labels = [[(names[k], label) for label in _values(k, v)] for k, v in grid.items()]
            for combo in itertools.product(*labels):
                cell = {**defaults, **dict(combo)}
                cell = {name: cell[name] for name in axes}
                if (frozen := tuple(cell.items())) not in seen:
                    seen.add(frozen)
                    cells.append(cell)
        return cells

    def runs(self, out: str | Path, seeds: Sequence[int] | None = None) -> list[Run]:
        """The runs, seed by seed (so a partial sweep holds complete seeds), each MoE run before its twin."""
        axes, cells = self.axes(), self.configurations()
        keys = {tuple(c.items()): config_key(c) for c in cells}
        if len(set(keys.values())) != len(keys):
            dupes = sorted(k for k in keys.values() if list(keys.values()).count(k) > 1)
            raise ValueError(f"axis values {dupes} give the same directory name; use labels that differ in [A-Za-z0-9]")
        baseline = {name: _label(v) for name, v in (self.baseline or {}).items()}
        if unknown := sorted(set(baseline) - set(axes)):
            raise ValueError(f"baseline axis {unknown} is not an axis of the sweep; axes: {list(axes)}")
        runs = []
        for seed in self.seeds if seeds is None else seeds:
            for cell in cells:
                key = keys[tuple(cell.items())]
                overrides = [*self.overrides, *(o for name, label in cell.items() for o in axes[name][label])]
                common = {"study": self.name, "preset": self.preset, "seed": seed, "axes": dict(cell)}
                common["out_dir"] = str(out)
                analyze = dict(self.analyze) if self.analyze else None
                reference = None
                if self.twins:
                    reference = f"{key},twin={TWIN}"
                for name, label in baseline.items():
                    if cell[name] != label:
                        ref_cell = {**cell, name: label}
                        if tuple(ref_cell.items()) not in keys:
                            raise ValueError(f"baseline {name}={label} has no configuration matching {cell}")
                        reference = keys[tuple(ref_cell.items())]
                runs.append(
                    Run(
                        key=key,
                        overrides=_finish(overrides, key, seed, out),
                        reference=reference,
                        analyze=analyze,
                        **common,
                    )
                )
                if self.twins:
                    twin_key = f"{key},twin={TWIN}"
                    twin_overrides = _finish([*overrides, f"model.dense_twin={TWIN}"], twin_key, seed, out)
                    runs.append(Run(key=twin_key, overrides=twin_overrides, twin=TWIN, analyze=analyze, **common))
        return runs

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self), default=list))


def config_key(cell: Mapping[str, str]) -> str:
    """The directory name of a configuration: ``name=value`` pairs joined by commas, filesystem-safe."""
    key = ",".join(f"{_slug(name)}={_slug(label)}" for name, label in cell.items()) or "base"
    if len(key) > MAX_KEY:
        key = f"{key[: MAX_KEY - 9]}~{hashlib.sha1(key.encode()).hexdigest()[:8]}"
    return key


def _finish(overrides: list[str], key: str, seed: int, out: str | Path) -> tuple[str, ...]:
    return (*overrides, f"train.seed={seed}", f"train.out_dir={json.dumps(str(out))}", f"train.run_name={key}-s{seed}")


# ---- one run -----------------------------------------------------------------------------------


def run_one(run: Run, runtime: Sequence[str] = ()) -> dict[str, Any]:
    """Train ``run`` (resuming its checkpoint if it has one), then analyse it if asked; returns the summary.

    A finished run is not trained again; a run whose directory holds another config is an error.
    """
    from visionmoe.train.checkpoint import CHECKPOINT
    from visionmoe.train.trainer import Trainer

    config = run.config(runtime)
    run_dir = run.run_dir
    check_not_stale(run_dir, config)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / RUN_FILE).write_text(json.dumps(run.to_dict(), indent=2) + "\n")
    if not (run_dir / "summary.json").is_file():
        Trainer(config, resume=(run_dir / CHECKPOINT).is_file()).fit()
    if run.analyze and not (run_dir / "analysis.json").is_file():
        from visionmoe.analysis.trained_run import analyze_run

        analyze_run(run_dir, **{"progress": False, **run.analyze})
    return json.loads((run_dir / "summary.json").read_text())


def _saved_config(run_dir: Path):
    from visionmoe.train.config import Config

    saved = run_dir / "config.yaml"
    return Config.from_dict(yaml.safe_load(saved.read_text()), source=str(saved))


def _config_changes(before, now, ignore: Sequence[str] = ()) -> list[str]:
    """The dotted keys in which two configs differ, leaving out those that change no result."""
    from visionmoe.train.logger import flatten
    from visionmoe.train.trainer import RESUMABLE_CHANGES

    a, b = flatten(before.to_dict()), flatten(now.to_dict())
    skip = {*RESUMABLE_CHANGES, *ignore}
    return sorted(
        k.replace("/", ".") for k in set(a) | set(b) if a.get(k) != b.get(k) and k.replace("/", ".") not in skip
    )


def check_not_stale(run_dir: Path, config) -> None:
    """Raise if ``run_dir`` holds a run of a different config (e.g. a sweep re-run with other fixed overrides)."""
    if not (run_dir / "config.yaml").is_file():
        return
    changed = _config_changes(_saved_config(run_dir), config)
    if changed:
        raise ValueError(f"{run_dir} holds a run of another config (differs in {changed}); use another --out")


# ---- reuse of finished runs from other sweeps ---------------------------------------------------

WHERE = ("train.out_dir", "train.run_name")  # where a run lives, no part of what it computes
NOT_REUSED = (RUN_FILE, "sweep.log", "analysis.json", "analysis.md", "*.png")  # the new sweep's own


def reusable_runs(sources: Sequence[str | Path]) -> list[tuple[Path, Any]]:
    """Finished runs (``summary.json``) under ``sources``, each a run directory or a folder of them, with configs."""
    found = []
    for source in map(Path, sources):
        if not source.is_dir():
            raise FileNotFoundError(f"--reuse {source}: no such directory")
        candidates = [source] if (source / "summary.json").is_file() else sorted(source.iterdir())
        for run_dir in candidates:
            if (run_dir / "summary.json").is_file() and (run_dir / "config.yaml").is_file():
                found.append((run_dir, _saved_config(run_dir)))
    return found


def adopt(run: Run, source: Path, config) -> None:
    """Copy the finished run ``source`` (trained with ``config`` up to where it lives) in as ``run``.

    CPU training is deterministic, so its results are what ``run`` would compute. The copy gets its own
    ``config.yaml`` and ``sweep_run.json``; its summary records ``reused_from``. Analyses are not copied:
    the new sweep runs its own, with its own settings.
    """
    from visionmoe.train.config import save_config

    shutil.copytree(source, run.run_dir, ignore=shutil.ignore_patterns(*NOT_REUSED))
    save_config(config, run.run_dir / "config.yaml")
    summary = json.loads((run.run_dir / "summary.json").read_text())
    summary.update(run_dir=str(run.run_dir), reused_from=str(source))
    _write(run.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    _write(run.run_dir / RUN_FILE, json.dumps(run.to_dict(), indent=2) + "\n")


# ---- the sweep ---------------------------------------------------------------------------------


@dataclass
class _Record:
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
    extra: dict[str, Any] = field(default_factory=dict, repr=False)


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


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
        reuse: sweep or run directories whose finished runs are copied in (:func:`adopt`) for every
            run not started yet that has the same config up to where it lives and what changes no
            result (threads, progress bar, data_dir...), instead of training it again: two studies
            that share a configuration (the hidden-size sweep's w=16 pair is the top-k study's k=2
            pair) train it once.
        echo: where progress lines go.
    """
    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {list(EXECUTORS)}, got {executor!r}")
    if jobs < 1 or retries < 0:
        raise ValueError(f"need jobs >= 1 and retries >= 0, got jobs={jobs}, retries={retries}")
    out = Path(out)
    runs = sweep.runs(out, seeds)
    with sweep_lock(out):  # SweepBusy when another sweep runs here
        return _run_sweep(sweep, out, runs, seeds, jobs, retries, executor, cores, slurm, reuse, echo)


def _run_sweep(sweep, out, runs, seeds, jobs, retries, executor, cores, slurm, reuse, echo) -> pd.DataFrame:
    plan = {"sweep": sweep.to_dict(), "seeds": list(seeds or sweep.seeds), "runs": [r.name for r in runs]}
    _write(out / SWEEP_FILE, json.dumps(plan, indent=2) + "\n")
    threads = max(1, (cores or available_cores()) // jobs)
    if executor == "slurm":
        threads = int((slurm or {}).get("cpus_per_task", 1))
    runtime = (f"train.threads={threads}", "train.progress=false")
    records = {r.name: _Record(r.name, r.key, r.seed, r.twin, str(r.run_dir)) for r in runs}
    before = _previous_manifest(out)
    todo, finished_before = [], 0
    for run in runs:
        record = records[run.name]
        try:
            config = run.config(runtime)
            check_not_stale(run.run_dir, config)
        except (ValueError, TypeError, FileNotFoundError) as error:
            record.status, record.error = "invalid", f"{type(error).__name__}: {error}"
            continue
        if run.finished():
            _finished_before(record, before.get(run.name), run.run_dir)
            finished_before += 1
        else:
            todo.append(run)
    reused = 0
    if reuse:
        candidates = reusable_runs(reuse)
        for run in list(todo):
            if (run.run_dir / "config.yaml").exists():
                continue  # started here: resumed, not replaced
            config = run.config(runtime)
            source = next((d for d, c in candidates if not _config_changes(c, config, ignore=WHERE)), None)
            if source is not None:
                adopt(run, source, config)
                record = records[run.name]
                record.status, record.source, record.top1 = "reused", str(source), _top1(run.run_dir)
                todo.remove(run)
                reused += 1
    _save_manifest(out, records)
    invalid = sum(r.status == "invalid" for r in records.values())
    echo(
        f"sweep {sweep.name}: {len(runs)} runs ({len(todo)} to run, {finished_before} finished before, "
        f"{reused} reused, {invalid} invalid) in {out}; "
        f"{executor} executor, {jobs} job(s) × {threads} thread(s)"
    )
    for record in records.values():  # every cell was validated (its model built on the meta device) before any runs
        if record.status == "invalid":
            echo(f"{record.name}: invalid, not run ({record.error})")

    def finish(run: Run, ok: bool, seconds: float, error: str) -> bool:
        """Record an attempt; True when the run should be tried again."""
        record = records[run.name]
        record.attempts += 1
        record.seconds += seconds
        ok = ok and run.finished()
        if ok:
            record.status, record.error, record.top1 = "done", "", _top1(run.run_dir)
        else:
            record.error = error or "the run ended without writing summary.json"
            record.status = "failed" if record.attempts > retries else "pending"
        _save_manifest(out, records)
        line = f"{run.name}: " + (
            f"top-1 {record.top1:.2%}" if ok else f"{record.status} ({record.error.splitlines()[-1]})"
        )
        echo(f"{line} [attempt {record.attempts}, {seconds:.0f} s]")
        return not ok and record.status == "pending"

    if executor == "inline":
        _execute_inline(todo, runtime, finish)
    elif executor == "local":
        _execute_local(todo, runtime, finish, jobs, threads)
    else:
        _execute_slurm(todo, runtime, finish, out, dict(slurm or {}))
    manifest = _save_manifest(out, records)
    counts = manifest["status"].value_counts().to_dict()
    echo(f"sweep {sweep.name}: " + ", ".join(f"{n} {status}" for status, n in counts.items()) + f"; {out / MANIFEST}")
    return manifest


def _execute_inline(todo: list[Run], runtime: Sequence[str], finish: Callable) -> None:
    for run in todo:
        again = True
        while again:
            start = time.perf_counter()
            try:
                run_one(run, runtime)
                ok, error = True, ""
            except Exception as exc:  # any failure of one run is recorded, never raised: the others go on
                ok, error = False, "".join(traceback.format_exception_only(type(exc), exc)).strip()
            again = finish(run, ok, time.perf_counter() - start, error)


def _execute_local(todo: list[Run], runtime: Sequence[str], finish: Callable, jobs: int, threads: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    pending, active = list(todo), {}
    try:
        while pending or active:
            while pending and len(active) < jobs:
                run = pending.pop(0)
                run.run_dir.mkdir(parents=True, exist_ok=True)
                spec = run.run_dir / RUN_FILE
                spec.write_text(json.dumps(run.to_dict(), indent=2) + "\n")
                log = (run.run_dir / "sweep.log").open("a")
                log.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} start\n")
                log.flush()
                command = [sys.executable, "-m", "visionmoe.studies.worker", str(spec), *runtime]
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
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    cause = f"worker exited with {returncode}" + (" (killed by a signal)" if returncode < 0 else "")
    tail = [line for line in lines[-15:] if not line.startswith("====")]
    errors = [line for line in tail if re.match(r"^[A-Za-z_.]*(Error|Exception|Interrupt)\b", line)]
    return "\n".join([cause, *(errors[-1:] or tail[-1:])])


def _execute_slurm(todo: list[Run], runtime: Sequence[str], finish: Callable, out: Path, params: dict) -> None:
    try:
        import submitit
    except ImportError:
        raise ImportError(
            "the slurm executor needs submitit, which is not installed: pip install 'visionmoe[slurm]'"
        ) from None
    executor = submitit.AutoExecutor(folder=str(out / "slurm" / "%j"))
    executor.update_parameters(**{"name": "visionmoe-sweep", **params})
    jobs = {}

    def submit(run: Run) -> None:
        jobs[run.name] = (run, executor.submit(run_one, run, tuple(runtime)), time.perf_counter())

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


def _previous_manifest(out: Path) -> dict[str, dict[str, Any]]:
    """The rows of an earlier invocation's manifest by run name ({} when there is none or it is unreadable)."""
    try:
        return {row["name"]: row for row in json.loads((out / MANIFEST).read_text())}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _finished_before(record: _Record, row: Mapping[str, Any] | None, run_dir: Path) -> None:
    """Fill the record of a run an earlier invocation finished: from that invocation's manifest row when
    it recorded the finish, else from the run's ``summary.json``: copied in (``reused_from``), or
    trained in (at least) one attempt taking its train + eval time."""
    record.top1 = _top1(run_dir)
    if row is not None and row.get("status") in ("done", "reused"):
        record.status, record.source = row["status"], row.get("source") or ""
        record.attempts, record.seconds = int(row.get("attempts") or 0), float(row.get("seconds") or 0.0)
        return
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        summary = {}
    record.source = str(summary.get("reused_from") or "")
    record.status = "reused" if record.source else "done"
    if not record.source:
        record.attempts = 1
        record.seconds = float(summary.get("train_seconds") or 0.0) + float(summary.get("eval_seconds") or 0.0)


def _top1(run_dir: Path) -> float | None:
    try:
        return float(json.loads((run_dir / "summary.json").read_text())["test"]["top1"])
    except (OSError, KeyError, ValueError):
        return None


def _save_manifest(out: Path, records: Mapping[str, _Record]) -> pd.DataFrame:
    rows = [{k: v for k, v in asdict(r).items() if k != "extra"} for r in records.values()]
    _write(out / MANIFEST, json.dumps(rows, indent=2) + "\n")
    frame = pd.DataFrame(rows)
    _write(out / "manifest.csv", frame.to_csv(index=False))
    return frame


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)  # atomic: a killed sweep never leaves half a manifest
