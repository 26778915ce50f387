"""Which run directory holds which config: a run resumed in place, or a finished one copied in from another sweep.

A sweep compares the ``config.yaml`` a run directory holds with the config a run asks for, in two places:

- *stale*: a directory holding a run of another config (a sweep re-run with other fixed overrides into
  the same ``--out``) is an error, found before anything trains (:func:`check_not_stale`). Settings that
  change no result (threads, progress bar, data_dir...: the trainer's ``RESUMABLE_CHANGES``) are not
  differences, so a run resumes under them.
- *reuse*: ``visionmoe sweep --reuse DIR`` copies in a finished run of another sweep whose config equals a
  pending run's up to where it lives (:data:`WHERE`) and the settings that change no result, so studies
  that share a configuration train it once (:func:`adopt_finished`). CPU training is deterministic, so the
  copy's results are what the run would compute — given the same data and the same thread count, which
  is why reuse, unlike resume, also compares :data:`REUSE_COMPARES`: a resumed run keeps its own data
  directory's identity (the checkpoint's class names) and its own thread count (the trainer restores it),
  a copied one has neither check. The copied run must have ended as the pending run asks (every epoch, or
  the same time limit).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from visionmoe.jsonl import write_atomic
from visionmoe.studies.grid import RUN_FILE, Run, ended_as_asked

WHERE = ("train.out_dir", "train.run_name")  # where a run lives, no part of what it computes
REUSE_COMPARES = ("data.data_dir", "train.threads")  # resumable, but the data and the sums' order for a copy
NOT_REUSED = (RUN_FILE, "sweep.log", "analysis.json", "analysis.md", "*.png")  # the new sweep's own


def saved_config(run_dir: Path):
    """The config a run directory's ``config.yaml`` holds."""
    from visionmoe.train.config import Config

    saved = run_dir / "config.yaml"
    return Config.from_dict(yaml.safe_load(saved.read_text()), source=str(saved))


def config_changes(before, now, ignore: Sequence[str] = (), compare: Sequence[str] = ()) -> list[str]:
    """The dotted keys in which two configs differ, leaving out those that change no result (but ``compare``)."""
    from visionmoe.train.logger import flatten
    from visionmoe.train.trainer import RESUMABLE_CHANGES

    a, b = flatten(before.to_dict()), flatten(now.to_dict())
    skip = ({*RESUMABLE_CHANGES} - set(compare)) | set(ignore)
    return sorted(
        k.replace("/", ".") for k in set(a) | set(b) if a.get(k) != b.get(k) and k.replace("/", ".") not in skip
    )


def check_not_stale(run_dir: Path, config) -> None:
    """Raise if ``run_dir`` holds a run of a different config (e.g. a sweep re-run with other fixed overrides)."""
    if not (run_dir / "config.yaml").is_file():
        return
    changed = config_changes(saved_config(run_dir), config)
    if changed:
        raise ValueError(f"{run_dir} holds a run of another config (differs in {changed}); use another --out")


def reusable_runs(sources: Sequence[str | Path]) -> list[tuple[Path, Any]]:
    """Finished runs (``summary.json``) under ``sources``, each a run directory or a folder of them, with configs."""
    found = []
    for source in (Path(s).expanduser() for s in sources):
        if not source.is_dir():
            raise FileNotFoundError(f"--reuse {source}: no such directory")
        candidates = [source] if (source / "summary.json").is_file() else sorted(source.iterdir())
        for run_dir in candidates:
            if (run_dir / "summary.json").is_file() and (run_dir / "config.yaml").is_file():
                found.append((run_dir, saved_config(run_dir)))
    return found


def adopt_finished(
    runs: Sequence[Run], sources: Sequence[str | Path], runtime: Sequence[str]
) -> list[tuple[Run, Path]]:
    """Copy in (:func:`adopt`), for each of ``runs`` not started yet, the first finished run under ``sources``
    whose config equals its own up to where it lives and what changes no result; returns (run, source) pairs."""
    candidates = reusable_runs(sources)
    adopted = []
    for run in runs:
        if (run.run_dir / "config.yaml").exists():
            continue  # started here: resumed, not replaced
        config = run.config(runtime)
        limit = config.train.time_limit_minutes
        source = next(
            (
                d
                for d, c in candidates
                if not config_changes(c, config, ignore=WHERE, compare=REUSE_COMPARES)
                and ended_as_asked(d, lambda limit=limit: limit)
            ),
            None,
        )
        if source is not None:
            adopt(run, source, config)
            adopted.append((run, source))
    return adopted


def adopt(run: Run, source: Path, config) -> None:
    """Copy the finished run ``source`` (trained with ``config`` up to where it lives) in as ``run``.

    The copy gets its own ``config.yaml`` and ``sweep_run.json``; its summary records ``reused_from``.
    Analyses are not copied: the new sweep runs its own, with its own settings.
    """
    from visionmoe.train.config import save_config

    # the directory may exist without a config (a run that failed before training): the copy fills it
    shutil.copytree(source, run.run_dir, ignore=shutil.ignore_patterns(*NOT_REUSED), dirs_exist_ok=True)
    save_config(config, run.run_dir / "config.yaml")
    summary = json.loads((run.run_dir / "summary.json").read_text())
    summary.update(run_dir=str(run.run_dir), reused_from=str(source))
    write_atomic(run.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    write_atomic(run.spec_file, run.to_json())
