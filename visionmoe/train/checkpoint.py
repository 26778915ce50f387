"""Checkpoints that load with ``weights_only=True`` and resume a run bit for bit.

A checkpoint is one ``torch.save`` of plain containers and tensors: the model, optimiser and
scheduler state dicts, the loader position, every RNG state (torch CPU and CUDA, numpy, Python), the
partial epoch's running sums, the config as a dict and the code version. It is written to a
temporary file and renamed, so a run killed mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import torch

import visionmoe
from visionmoe.distributed.checkpoint import SHARDED_CHECKPOINT, is_sharded_checkpoint, read_checkpoint
from visionmoe.train.config import Config
from visionmoe.train.logger import flatten

CHECKPOINT = "checkpoint.pt"


def code_version() -> dict[str, str | None]:
    """visionmoe's version and, when run from a git checkout, its commit (``+dirty`` if modified)."""
    root = Path(visionmoe.__file__).resolve().parents[1]
    commit = None
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        commit += "+dirty" if dirty else ""
    except (OSError, subprocess.SubprocessError):
        pass
    return {"visionmoe": visionmoe.__version__, "git": commit, "torch": str(torch.__version__)}


def rng_state() -> dict[str, Any]:
    """Every global RNG state as plain types and tensors (``weights_only``-loadable)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss},
        "numpy_cached_gaussian": float(cached),
        "python": _to_lists(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], state["numpy_cached_gaussian"]))
    random.setstate(_to_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_lists(value: Any) -> Any:
    return [_to_lists(v) for v in value] if isinstance(value, tuple | list) else value


def _to_tuples(value: Any) -> Any:
    return tuple(_to_tuples(v) for v in value) if isinstance(value, list) else value


def save_checkpoint(path: Path, state: dict[str, Any]) -> Path:
    """Write ``state`` atomically (temporary file, then rename), on disk before the rename: after a crash of the
    machine the path holds the previous checkpoint or the new one, never a file the kernel had not written."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load with ``weights_only=True``; a missing or unreadable file is a one-line error naming it.

    A run trained under torchrun has a ``checkpoint.dcp`` directory instead of ``checkpoint.pt``; it is
    read whole, into the same layout (:func:`visionmoe.distributed.read_checkpoint`).
    """
    path = Path(path)
    if path.is_dir() and not is_sharded_checkpoint(path):
        path = path / CHECKPOINT
    sharded = path if is_sharded_checkpoint(path) else path.with_name(SHARDED_CHECKPOINT)
    if not path.is_file() and is_sharded_checkpoint(sharded):
        return read_checkpoint(sharded)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; expected a file written by `visionmoe train`")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises several types for truncated or foreign files
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        reason = next((line for line in lines if "Unsupported global" in line), lines[0] if lines else "")
        raise ValueError(f"cannot load checkpoint {path}: {reason or type(error).__name__}") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise ValueError(f"{path} is not a visionmoe training checkpoint (no model/config entries)")
    return state


def check_model_matches(state_dict: dict[str, torch.Tensor], model: torch.nn.Module, source: str) -> None:
    """A clear error when a checkpoint's weights are for another model (names or shapes differ)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = sorted(k for k in set(own) & set(state_dict) if own[k].shape != state_dict[k].shape)
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if shapes:
            k = shapes[0]
            saved, here = tuple(state_dict[k].shape), tuple(own[k].shape)
            parts.append(f"{len(shapes)} of another shape (e.g. {k}: {saved} vs {here})")
        raise ValueError(f"{source} holds weights of another model: {', '.join(parts)} parameters")


# Config keys that may differ between a run and its resumption (they change no result).
RESUMABLE_CHANGES = (
    "train.progress",
    "train.log_every",
    "train.threads",
    "train.keep_freed_memory",  # speed and memory only (visionmoe.allocator)
    "train.tensorboard",
    "train.time_limit_minutes",
    "train.expert_parallel",  # checkpoints reshard (visionmoe.distributed.checkpoint)
    "train.fsdp",  # so do FSDP's slices
    "train.fsdp_unit_params",
    "data.data_dir",
    "data.workers",  # batches do not depend on the number of decoding processes (visionmoe.data.stream)
    "data.prefetch",
)


def check_resumable(config: Config, saved: dict[str, Any], checkpoint: str | os.PathLike) -> None:
    """Refuse to resume ``checkpoint`` (whose config is ``saved``) with a ``config`` that would train otherwise.

    Only :data:`RESUMABLE_CHANGES` may differ: the run must continue exactly as it started.
    """
    now, before = flatten(config.to_dict()), flatten(Config.from_dict(saved).to_dict())
    changed = sorted(
        k.replace("/", ".")
        for k in set(now) | set(before)
        if now.get(k) != before.get(k) and k.replace("/", ".") not in RESUMABLE_CHANGES
    )
    if changed:
        raise ValueError(
            f"cannot resume {checkpoint}: the config differs in {changed} "
            f"(resume with the run's own config; only {', '.join(RESUMABLE_CHANGES)} may change)"
        )
