"""Checkpoints through ``torch.distributed.checkpoint`` (DCP) that load on any number of processes.

A checkpoint is a directory: DCP's files for every tensor (model weights and optimiser state), plus
``extra.pt``, a ``weights_only`` file that rank 0 writes with the rest of the training state (step,
loader position, schedule, running sums, config, each rank's RNG state, and the optimiser's param
groups with parameter *names* instead of indices).

Why DTensor for the expert shards, rather than gathering them or writing (offset, shard) pairs by
hand: DCP stores a DTensor as its pieces, each tagged with its offset in the logical tensor, and
loading into *any* other layout reads the overlapping pieces. So an expert weight is saved as what it
is logically — the full stacked (E, D, H) tensor — described as ``[Replicate(), Shard(0)]`` on the
``("replica", "ep")`` mesh: each shard written once (replicas are deduplicated), nothing gathered on
one rank (the memory of a big model is never needed in one place), and the resharding logic is
DCP's, not ours. Dense tensors are plain tensors, identical on every rank, written once — or, with
FSDP (:mod:`visionmoe.distributed.fsdp`), the DTensors FSDP made of them, written as each rank's slice
and loaded into whatever slices the loading ranks hold.

The guarantee, tested: a checkpoint saved by W processes with expert parallelism P loads on W'
processes with any P' (that divides E), including one process with no process group
(:func:`read_checkpoint`, which also gives the ``checkpoint.pt`` layout that ``visionmoe eval`` and
``analyze`` read), and a single-process ``checkpoint.pt`` loads on W' processes (:func:`localize`).
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from visionmoe.distributed.env import ParallelEnv
from visionmoe.distributed.expert_parallel import ExpertShard, expert_shards
from visionmoe.safeload import RefusedPickle, restricted_load

SHARDED_CHECKPOINT = "checkpoint.dcp"
EXTRA = "extra.pt"


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory written by :func:`save_sharded`."""
    return (Path(path) / EXTRA).is_file() and (Path(path) / ".metadata").is_file()


def read_extra(path: str | os.PathLike) -> dict[str, Any]:
    """The non-tensor part of a sharded checkpoint (config, step, ...), without reading any tensor."""
    file = Path(path) / EXTRA
    try:
        return torch.load(file, weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"no {EXTRA} in {path}; expected a directory written by save_sharded") from None
    except Exception as error:  # truncated files, foreign pickles (weights_only refuses their globals)
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        reason = next((line for line in lines if "Unsupported global" in line), lines[0] if lines else "")
        raise ValueError(f"cannot load {file}: {reason or type(error).__name__}") from None


# ---- reading DCP without running its pickles -------------------------------------------------------
#
# torch's FileSystemReader unpickles ``.metadata`` with plain ``pickle`` and its planner reads
# non-tensor entries with ``torch.load(weights_only=False)``: a crafted run directory would run code
# on ``visionmoe eval`` or ``train --resume``. The metadata is read here admitting only the classes
# torch writes into it, and non-tensor entries (visionmoe writes none: they go to extra.pt) are refused.

_METADATA_CLASSES = frozenset(
    [
        *(
            ("torch.distributed.checkpoint.metadata", name)
            for name in (
                "Metadata",
                "TensorStorageMetadata",
                "BytesStorageMetadata",
                "TensorProperties",
                "ChunkStorageMetadata",
                "MetadataIndex",
                "StorageMeta",
                "_MEM_FORMAT_ENCODING",
            )
        ),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),  # a layout by name (torch.strided)
        ("collections", "OrderedDict"),
        *(("pathlib", name) for name in ("Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath")),
    ]
)


def _admits_metadata(module: str, name: str) -> bool:
    if (module, name) in _METADATA_CLASSES:
        return True
    return module == "torch" and isinstance(getattr(torch, name, None), torch.dtype | torch.layout)


def read_metadata(path: str | os.PathLike) -> Metadata:
    """A DCP directory's ``.metadata``, unpickled admitting only the classes torch writes there.

    Anything else (a global that could run code) is a one-line ``ValueError`` naming the file.
    """
    return _read_metadata_file(Path(path) / ".metadata")


def _read_metadata_file(file: Path) -> Metadata:
    try:
        with open(file, "rb") as f:
            metadata = restricted_load(f, _admits_metadata, source=str(file), what="DCP checkpoint metadata")
    except FileNotFoundError:
        raise FileNotFoundError(f"no checkpoint metadata at {file}; expected a directory written by DCP") from None
    except RefusedPickle as error:
        raise ValueError(str(error)) from None
    except Exception as error:  # truncated or foreign files fail in several ways
        raise ValueError(f"cannot read checkpoint metadata {file}: {type(error).__name__}: {error}") from None
    if not isinstance(metadata, Metadata):
        raise ValueError(f"{file} holds a {type(metadata).__name__}, not DCP checkpoint metadata")
    return metadata


class _SafeReader(dcp.FileSystemReader):
    """torch's FileSystemReader, reading ``.metadata`` as :func:`read_metadata` does."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = _read_metadata_file(Path(self._get_metadata_path(kwargs.get("rank"))))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _TensorsOnlyPlanner(DefaultLoadPlanner):
    """The default planner, refusing non-tensor entries (torch reads those with ``weights_only=False``)."""

    def load_bytes(self, read_item: Any, value: Any) -> None:
        raise ValueError(
            f"checkpoint entry {read_item.dest_index.fqn!r} is a pickled object; visionmoe reads tensors only"
        )


def _dcp_load(tensors: dict[str, Tensor], path: Path, *, no_dist: bool) -> None:
    dcp.load(tensors, storage_reader=_SafeReader(path), planner=_TensorsOnlyPlanner(), no_dist=no_dist)


def optimizer_names(optimizer: torch.optim.Optimizer, model: nn.Module) -> list[list[str]]:
    """Each param group's parameters by qualified name (the order that numbers them in ``state_dict``)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]


def save_sharded(
    path: str | os.PathLike,
    state: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    env: ParallelEnv | None,
) -> Path:
    """Write ``state`` (``model``: this rank's state dict, ``optimizer``: its ``state_dict()``, anything else).

    Called by every rank with its own state (``env`` None: one process, no process group). Written to
    ``<path>.tmp`` and renamed by rank 0 once every rank has finished, so an interrupted save leaves
    the previous checkpoint whole.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    main = env is None or env.is_main
    if main and tmp.exists():
        shutil.rmtree(tmp)
    _barrier(env)
    tensors, extra = _split(state, model, optimizer, env)
    with warnings.catch_warnings():  # one process without a process group is a supported case, not a mistake
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(tensors, checkpoint_id=tmp, no_dist=env is None)
    if env is not None:
        ranks: list[Any] = [None] * env.world_size
        dist.all_gather_object(ranks, state.get("rng"))
        extra["rng_per_rank"] = ranks
    if main:
        torch.save(extra, tmp / EXTRA)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    _barrier(env)
    return path


def _split(state, model, optimizer, env) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """DCP's tensors (expert shards as DTensors) and the rest of ``state``."""
    shards = expert_shards(model)
    names = optimizer_names(optimizer, model)
    flat_names = [n for group in names for n in group]
    tensors = {f"model.{k}": _logical(v, shards.get(k), env) for k, v in state["model"].items()}
    opt = state["optimizer"]
    other: dict[str, dict[str, Any]] = {}
    for index, values in opt["state"].items():
        name = flat_names[index]
        for key, value in values.items():
            if isinstance(value, Tensor):
                tensors[f"optim.{name}.{key}"] = _logical(value, shards.get(name) if value.dim() else None, env)
            else:
                other.setdefault(name, {})[key] = value
    groups = [{**g, "params": n} for g, n in zip(opt["param_groups"], names, strict=True)]
    extra = {k: v for k, v in state.items() if k not in ("model", "optimizer")}
    extra["optimizer"] = {"param_groups": groups, "other_state": other}
    return tensors, extra


def _logical(tensor: Tensor, shard: ExpertShard | None, env: ParallelEnv | None) -> Tensor:
    if shard is None or env is None or isinstance(tensor, DTensor):  # FSDP's DTensors are logical already
        return tensor
    return DTensor.from_local(tensor, env.mesh, [Replicate(), Shard(0)], run_check=False)


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The whole checkpoint in one process, in the layout of a single-process ``checkpoint.pt``.

    Needs no process group; every tensor is read at its full logical size.
    """
    path = Path(path)
    metadata = read_metadata(path).state_dict_metadata
    tensors = {
        key: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in metadata.items()
        if isinstance(meta, TensorStorageMetadata)
    }
    with warnings.catch_warnings():  # loading in one process is the point
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        _dcp_load(tensors, path, no_dist=True)
    return _join(tensors, read_extra(path))


def load_sharded(path: str | os.PathLike, model: nn.Module, env: ParallelEnv | None) -> dict[str, Any]:
    """This rank's part of a checkpoint saved on any number of processes, in ``Trainer.state_dict`` layout.

    ``model`` says what this rank holds (its expert shards, its FSDP slices); its weights are not
    changed here. Only what this rank holds is read: expert shards come back as plain local tensors,
    FSDP-sharded weights and their optimiser state as DTensors like the model's own. RNG states: this
    rank's own when the checkpoint was written by as many processes, else rank 0's.
    """
    path = Path(path)
    metadata = read_metadata(path).state_dict_metadata
    shards = expert_shards(model)
    weights, params = model.state_dict(), dict(model.named_parameters())
    tensors: dict[str, Tensor] = {}
    fsdp: set[str] = set()  # keys that stay DTensors
    for key, meta in metadata.items():
        if not isinstance(meta, TensorStorageMetadata):
            continue
        kind, rest = key.split(".", 1)
        name = rest if kind == "model" else rest.rsplit(".", 1)[0]
        like = weights.get(name) if kind == "model" else params.get(name)
        size, dtype = tuple(meta.size), meta.properties.dtype
        if isinstance(like, DTensor) and tuple(like.shape) == size:  # an FSDP slice: read into one like it
            local = torch.empty(like.to_local().shape, dtype=dtype, device=like.device)
            tensors[key] = DTensor.from_local(
                local, like.device_mesh, like.placements, shape=like.shape, stride=like.stride(), run_check=False
            )
            fsdp.add(key)
        elif name in shards and size:  # an expert shard: only this rank's experts
            shard = shards[name]
            tensors[key] = _logical(torch.empty((shard.num_experts, *size[1:]), dtype=dtype), shard, env)
        else:
            tensors[key] = torch.empty(size, dtype=dtype)
    _dcp_load(tensors, path, no_dist=env is None)
    local = {k: v.to_local() if isinstance(v, DTensor) and k not in fsdp else v for k, v in tensors.items()}
    extra = read_extra(path)
    ranks = extra.pop("rng_per_rank", None)
    if env is not None and ranks is not None and len(ranks) == env.world_size:
        extra["rng"] = ranks[env.rank]
    return _join(local, extra)


def _slice(full: Tensor, shard: ExpertShard | None) -> Tensor:
    return full if shard is None else full[shard.offset : shard.offset + shard.num_experts]


def _join(tensors: dict[str, Tensor], extra: dict[str, Any]) -> dict[str, Any]:
    """DCP tensors + extra -> ``{"model": state_dict, "optimizer": index-based state_dict, ...}``."""
    opt = extra.pop("optimizer")
    index = {name: i for i, name in enumerate(n for g in opt["param_groups"] for n in g["params"])}
    state: dict[int, dict[str, Any]] = {}
    for name, values in opt["other_state"].items():
        state.setdefault(index[name], {}).update(values)
    model = {}
    for key, value in tensors.items():
        if key.startswith("model."):
            model[key[len("model.") :]] = value
        else:
            name, field = key[len("optim.") :].rsplit(".", 1)
            state.setdefault(index[name], {})[field] = value
    groups, start = [], 0
    for g in opt["param_groups"]:
        groups.append({**g, "params": list(range(start, start + len(g["params"])))})
        start += len(g["params"])
    return {**extra, "model": model, "optimizer": {"state": dict(sorted(state.items())), "param_groups": groups}}


def localize(state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """A full single-process state (``checkpoint.pt``) cut down to what this rank holds: its expert
    shards, and its slices (DTensors) of FSDP-sharded weights and their optimiser state."""
    shards = expert_shards(model)
    own, params = model.state_dict(), dict(model.named_parameters())
    if not shards and not any(isinstance(v, DTensor) for v in own.values()):
        return state
    flat = [n for group in optimizer_names(optimizer, model) for n in group]

    def cut(value: Any, name: str, like: Tensor | None) -> Any:
        if not isinstance(value, Tensor) or not value.dim():
            return value
        if isinstance(like, DTensor) and like.shape == value.shape:  # every rank has the whole: no traffic
            return distribute_tensor(value.to(like.device), like.device_mesh, like.placements, src_data_rank=None)
        return _slice(value, shards.get(name))

    weights = {k: cut(v, k, own.get(k)) for k, v in state["model"].items()}
    opt_state = {
        i: {k: cut(v, flat[i], params.get(flat[i])) for k, v in s.items()}
        for i, s in state["optimizer"]["state"].items()
    }
    return {**state, "model": weights, "optimizer": {**state["optimizer"], "state": opt_state}}


def _barrier(env: ParallelEnv | None) -> None:
    if env is not None:
        dist.barrier()
