"""The training loop: a plain PyTorch loop over a :class:`Config`, resumable bit for bit on the CPU.

    trainer = Trainer(load_config("cifar10_moe", ["train.epochs=2"]))
    summary = trainer.fit()          # writes <out_dir>/<run_name>/{config.yaml, checkpoint.pt,
                                     #   metrics.jsonl, metrics.csv, tensorboard/, summary.json}

What makes resume exact: the loader's batches are a function of (seed, epoch, step); mixup is
seeded per step; the checkpoint holds model, optimiser, scheduler, every RNG state and the partial
epoch's running sums. A run killed at any point and resumed from its last checkpoint ends with the
same weights and metrics as an uninterrupted one (tested on the CPU).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visionmoe import distributed
from visionmoe.analysis.speed import machine_info
from visionmoe.data import TensorLoader
from visionmoe.jsonl import write_atomic
from visionmoe.layers.moe import collect_aux_loss, collect_routing_stats, moe_layers
from visionmoe.layers.stats import RoutingStats, RoutingStatsAccumulator
from visionmoe.train.checkpoint import (
    CHECKPOINT,
    check_model_matches,
    code_version,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from visionmoe.train.config import Config, ModelConfig, save_config
from visionmoe.train.data import BatchMixer, Splits, build_loaders, eval_loader, load_splits
from visionmoe.train.logger import RunLogger
from visionmoe.train.metrics import ClassificationMeter

# Config keys that may differ between a run and its resumption (they change no result).
RESUMABLE_CHANGES = (
    "train.progress",
    "train.log_every",
    "train.threads",
    "train.tensorboard",
    "train.time_limit_minutes",
    "train.expert_parallel",  # checkpoints reshard (visionmoe.distributed.checkpoint)
    "train.fsdp",  # so do FSDP's slices
    "train.fsdp_unit_params",
    "data.data_dir",
    "data.workers",  # batches do not depend on the number of decoding processes (visionmoe.data.stream)
    "data.prefetch",
)
DEVICE_SUMS = ("loss", "aux", "correct")  # running sums kept on the device (see Trainer._reset_epoch_sums)
log = logging.getLogger(__name__)
RANK_SEED_STRIDE = 1_000_003  # rank r's training RNG stream starts at seed + r·stride (rank 0: the seed)


# ---- model, optimiser, schedule ----------------------------------------------------------------


def build_model(cfg: ModelConfig, num_classes: int, example_input: Tensor) -> nn.Module:
    """The configured model: a registered (or timm) model, optionally moeified, optionally its dense twin."""
    from visionmoe.analysis.twin import dense_twin
    from visionmoe.models import create_model, moeify

    kwargs = dict(cfg.kwargs)
    if cfg.moe is not None and cfg.moeify is None:
        base = kwargs.get("moe") or {}
        kwargs["moe"] = {**base, **cfg.moe}
    model = create_model(cfg.name, num_classes=num_classes, **kwargs)
    if cfg.moeify is not None:
        options = dict(cfg.moeify)
        model = moeify(model, moe=cfg.moe, **options)
    if cfg.dense_twin is not None:
        model = dense_twin(model, match=cfg.dense_twin, example_input=example_input)
    return model


def check_model_config(cfg: ModelConfig, num_classes: int) -> None:
    """Fail now, in one line, if ``cfg`` cannot build its model: the model built on the meta device.

    Unknown and None-valued ``model.kwargs`` (:func:`visionmoe.models.registry.check_model_kwargs`),
    and whatever the constructors refuse (``model.moe.capacity_factor=0``, a router option of another
    router, ``model.moeify`` keys), are found before any data is loaded and before a sweep starts a run.
    The meta device allocates nothing; an error of the meta device itself is left to the real build.
    The dense twin, which needs an example input, is not built here.
    """
    from dataclasses import replace

    from visionmoe.models.registry import check_model_kwargs, model_kwargs

    key = repr((cfg.name, cfg.kwargs, cfg.moe, cfg.moeify, num_classes))
    if key in _CHECKED_MODELS:  # a sweep validates many cells of few models
        return
    check_model_kwargs(cfg.name, cfg.kwargs)
    if cfg.kwargs.get("pretrained"):
        return  # building it would download the weights
    try:
        with torch.device("meta"):
            build_model(replace(cfg, dense_twin=None), num_classes, torch.empty(0))
    except (TypeError, ValueError, AssertionError, KeyError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        given = ", ".join(f"model.{k}={v!r}" for k in ("kwargs", "moe", "moeify") if (v := getattr(cfg, k)))
        valid = model_kwargs(cfg.name) if isinstance(error, TypeError) else None  # a keyword it does not take
        takes = f"; {cfg.name} takes {list(valid)}" if valid is not None else ""
        raise ValueError(
            f"model {cfg.name!r} cannot be built from {given or 'its defaults'}: {reason}{takes}"
        ) from None
    except Exception:  # an operation the meta device lacks: the real build will say what is wrong
        return
    _CHECKED_MODELS.add(key)


_CHECKED_MODELS: set[str] = set()


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two groups: decayed weights, and biases / norm weights / ``no_weight_decay()`` names undecayed.

    Expert biases are 2-D stacked tensors ((E, H) ``b1``, (E, D) ``b2``), so biases are found by name
    as well as by dimension.
    """
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if p.ndim <= 1 or leaf in ("bias", "b1", "b2") or name in skip or leaf in skip:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class Schedule:
    """Learning-rate multiplier per step: linear warm-up, then cosine / linear / step / constant.

    A plain object (not a lambda), so ``LambdaLR.state_dict()`` stores it and checkpoints stay
    ``weights_only``-loadable.
    """

    def __init__(
        self,
        kind: str,
        total_steps: int,
        warmup_steps: int,
        steps_per_epoch: int,
        min_lr_ratio: float = 0.0,
        milestones: Sequence[float] = (),
        gamma: float = 0.1,
    ) -> None:
        self.kind, self.total_steps, self.warmup_steps = kind, total_steps, warmup_steps
        self.steps_per_epoch, self.min_lr_ratio = steps_per_epoch, min_lr_ratio
        self.milestones, self.gamma = [float(m) for m in milestones], gamma

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        if self.kind == "step":
            epoch = step / self.steps_per_epoch
            return self.gamma ** sum(epoch >= m for m in self.milestones)
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if self.kind == "cosine" else 1 - progress
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * shape


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    o = cfg.optim
    groups = param_groups(model, o.weight_decay)
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov and o.momentum > 0)
    return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas)


# ---- evaluation --------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: TensorLoader,
    num_classes: int,
    *,
    device: torch.device | str = "cpu",
    tta_flip: bool = False,
    bins: int = 15,
    autocast: Callable[[], Any] | None = None,
    reduce: Callable[[ClassificationMeter, dict], dict] | None = None,
) -> dict[str, Any]:
    """Top-1/top-5, NLL, calibration error, per-class accuracy and per-layer routing statistics.

    Routing statistics are those of the plain (unflipped) forward passes. The model is left in eval
    mode; the loader runs one full pass. A batch may hold more inputs than labels (a rank's stand-in
    row, :class:`visionmoe.distributed.ShardedLoader`): only the first ``len(labels)`` rows are scored.
    ``reduce(meter, routing)`` sums both across processes before the metrics are computed.
    """
    model.eval()
    meter = ClassificationMeter(num_classes, bins)
    routing: dict[str, RoutingStatsAccumulator] = {}
    loader.step = 0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast() if autocast is not None else nullcontext():
            logits = model(x).float()[: len(y)]  # (B, classes)
            for name, stats in collect_routing_stats(model).items() if len(y) else ():
                routing.setdefault(name, RoutingStatsAccumulator()).update(stats)
            if tta_flip:
                logits = (logits + model(x.flip(-1)).float()[: len(y)]) / 2
        meter.update(logits, y)
    if reduce is not None:
        routing = reduce(meter, routing)
    result: dict[str, Any] = meter.compute()
    result["routing"] = {name: acc.compute().as_dict() for name, acc in routing.items()}
    return result


# ---- the trainer -------------------------------------------------------------------------------


class Trainer:
    """Train one configured run; see the module docstring.

    Args:
        config: the run (validated here again).
        resume: continue from ``<run_dir>/checkpoint.pt``. Without it, a run directory that already
            holds a checkpoint is an error (nothing is overwritten).
        callbacks: called as ``callback(trainer)`` after every optimiser step (tests use it to
            interrupt a run; tools to watch one).

    Under ``torchrun`` (``WORLD_SIZE`` > 1) the same run is data parallel, and expert parallel with
    ``train.expert_parallel`` > 1 (:mod:`visionmoe.distributed`): each rank takes its rows of the same
    global batch, gradients and metrics are reduced across ranks, rank 0 alone writes logs and
    summaries, and checkpoints are ``checkpoint.dcp`` directories that load on any number of processes.
    """

    def __init__(self, config: Config, *, resume: bool = False, callbacks: Sequence[Callable] = ()) -> None:
        self.config = config.validate(saved=resume)  # resuming: the run's own config, as it trained
        t = config.train
        self.run_dir = Path(t.out_dir).expanduser() / (t.run_name or f"{config.name}-s{t.seed}")
        self.checkpoint_path = self.run_dir / CHECKPOINT
        self.sharded_path = self.run_dir / distributed.SHARDED_CHECKPOINT
        self.parallel_env = _init_parallel(config)  # None in one process
        state = None
        if resume:
            if self.parallel_env is not None and distributed.is_sharded_checkpoint(self.sharded_path):
                state = {"config": distributed.checkpoint.read_extra(self.sharded_path)["config"], "sharded": True}
            else:
                state = load_checkpoint(self.checkpoint_path)
            self._check_resumable(state["config"])
        elif self.checkpoint_path.exists() or self.sharded_path.exists():
            raise FileExistsError(
                f"{self.run_dir} already holds a checkpoint; pass --resume to continue it, "
                "or set train.run_name / train.out_dir for a new run"
            )
        self.callbacks = list(callbacks)
        self.code = code_version()  # at start: the code that trains, even if the checkout changes meanwhile
        if t.threads is not None:
            torch.set_num_threads(t.threads)
        if t.device == "auto":
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            self.device = torch.device(t.device)
        if self.parallel_env is not None and self.parallel_env.device.type == "cuda":
            self.device = self.parallel_env.device  # cuda:<LOCAL_RANK>
        self.use_amp = t.amp and self.device.type == "cuda"
        # Check each step's loss at once (the CPU), or without a host sync at the next log point or save.
        self.eager_finite_check = self.device.type == "cpu"

        self.splits: Splits = load_splits(config.data)
        self.train_loader, self.test_loader = build_loaders(
            config.data, self.splits, t.seed, t.channels_last and self.device.type == "cpu"
        )
        if self.parallel_env is not None:  # each rank keeps its rows of every global batch
            rank, world = self.parallel_env.rank, self.parallel_env.world_size
            self.train_loader = distributed.shard_loader(self.train_loader, rank, world)
            self.test_loader = distributed.shard_loader(self.test_loader, rank, world)
        example = self._example_batch()
        torch.manual_seed(t.seed)
        self.model = build_model(config.model, self.splits.num_classes, example)
        if hasattr(self.model, "init_from_data"):  # also on resume: the profile below sees the initial weights
            self.model.init_from_data(self._init_batch())
        memory = torch.channels_last if t.channels_last else torch.contiguous_format
        self.model.to(self.device, memory_format=memory)
        # FLOPs, ρ and active parameters count the assignments the routers make, so they are measured on
        # the initial weights (before a checkpoint is restored, and before experts are sharded): a
        # resumed run reports the same profile as an uninterrupted one.
        self.profile = self._profile(self._profile_batch(example))
        self.parallel: distributed.Parallel | None = None
        if self.parallel_env is not None:
            self.parallel = distributed.parallelize(
                self.model,
                self.parallel_env,
                fsdp=t.fsdp,
                fsdp_unit_params=t.fsdp_unit_params,
                global_aux_loss=t.global_aux_loss,
                sync_bn=t.sync_bn,
            )
        self.forward = torch.compile(self.model) if t.compile else self.model
        self.eval_forward = self.forward  # without DDP: evaluation needs no gradient hooks
        if self.parallel is not None:
            self.forward = self.parallel.wrap(self.forward)

        self.steps_per_epoch = len(self.train_loader)
        self.total_steps = max(1, round(t.epochs * self.steps_per_epoch))
        o = config.optim
        self.optimizer = build_optimizer(config, self.model)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            Schedule(
                o.schedule,
                self.total_steps,
                round(o.warmup_epochs * self.steps_per_epoch),
                self.steps_per_epoch,
                o.min_lr_ratio,
                o.milestones,
                o.gamma,
            ),
        )
        d = config.data
        self.mixer = None
        if d.mixup_alpha > 0 or d.cutmix_alpha > 0:
            if d.batch_size % 2:
                raise ValueError(f"mixup/cutmix needs an even data.batch_size, got {d.batch_size}")
            self.mixer = BatchMixer(d.mixup_alpha, d.cutmix_alpha, o.label_smoothing, self.splits.num_classes)

        self.step = 0
        self.train_seconds = 0.0
        self.eval_seconds = 0.0
        self.best_top1 = 0.0
        self._reset_epoch_sums()
        if state is not None:
            if self.parallel is not None:  # this rank's part, from a checkpoint of any number of processes
                if state.get("sharded"):
                    state = distributed.load_sharded(self.sharded_path, self.model, self.parallel_env)
                else:
                    state = distributed.localize(state, self.model, self.optimizer)
            self._restore(state)
            if self.parallel is not None and not self.parallel_env.is_main:
                self._reset_epoch_sums()  # the partial epoch's sums were folded into rank 0's
        else:
            rank = 0 if self.parallel_env is None else self.parallel_env.rank
            torch.manual_seed(t.seed + RANK_SEED_STRIDE * rank)  # the training RNG stream starts from the seed

    # -- set-up helpers

    def _example_batch(self) -> Tensor:
        return _normalize(self.splits.first_images(2), self.splits.mean, self.splits.std)

    def _init_batch(self, n: int = 5000) -> Tensor:
        return _normalize(self.splits.first_images(n), self.splits.mean, self.splits.std)

    def _profile_batch(self, example: Tensor) -> Tensor:
        """The batch FLOPs are counted on: ``example`` (two images), or a training batch where an MoE layer's
        groups span samples. Soft MoE over the batch runs its E·P slots once per group, so its FLOPs per image
        are those of the batch size it trains at, not of two images."""
        if all(moe.groups == "sample" for _, moe in moe_layers(self.model)):
            return example
        n = min(self.config.data.batch_size, len(self.splits.train))
        return _normalize(self.splits.first_images(n), self.splits.mean, self.splits.std)

    def evaluate_batch_sizes(self) -> dict[str, dict[str, float]]:
        """Test metrics with the test set in fixed, unshuffled batches of each ``eval.batch_sizes`` size.

        Same images, order and flip TTA as :meth:`evaluate`; only the batch size changes, so a model
        whose samples never meet (per-sample routing, BatchNorm in eval mode) scores the same at every
        size up to float rounding, and one whose routing mixes the batch may not.
        """
        if self.parallel is not None:
            raise ValueError("eval.batch_sizes is evaluated in one process; unset it under torchrun")
        e, results = self.config.eval, {}
        for size in e.batch_sizes:
            channels_last = self.config.train.channels_last and self.device.type == "cpu"
            loader = eval_loader(
                self.config.data, self.splits, self.splits.test, size, self.config.train.seed, channels_last
            )
            metrics = evaluate(
                self.eval_forward,
                loader,
                self.splits.num_classes,
                device=self.device,
                tta_flip=e.tta_flip,
                bins=e.calibration_bins,
                autocast=self._autocast,
            )
            results[str(size)] = {k: metrics[k] for k in ("top1", "top5", "nll", "ece") if k in metrics}
        return results

    def _profile(self, example: Tensor) -> dict[str, float]:
        from visionmoe.analysis.profile import profile_model

        p = profile_model(self.model, example.to(self.device))
        return {
            "total_params": p.total_params,
            "active_params": p.active_params,
            "flops_per_image": p.total_flops,
            "expert_flops_per_image": p.expert_flops,
            "rho": p.rho,
            "rho_nominal": p.rho_nominal,
        }

    def _check_resumable(self, saved: dict[str, Any]) -> None:
        from visionmoe.train.logger import flatten

        now, before = flatten(self.config.to_dict()), flatten(Config.from_dict(saved).to_dict())
        changed = sorted(
            k.replace("/", ".")
            for k in set(now) | set(before)
            if now.get(k) != before.get(k) and k.replace("/", ".") not in RESUMABLE_CHANGES
        )
        if changed:
            raise ValueError(
                f"cannot resume {self.checkpoint_path}: the config differs in {changed} "
                f"(resume with the run's own config; only {', '.join(RESUMABLE_CHANGES)} may change)"
            )

    # -- state

    def _reset_epoch_sums(self) -> None:
        # loss·n, aux·n and correct stay on the device (float64, summed in step order exactly as Python
        # floats would be) so a step needs no host sync; they are read at log points and epoch ends.
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        self.sums = {"seen": 0, "seconds": 0.0, "data_seconds": 0.0}
        self.sums.update({key: zero.clone() for key in DEVICE_SUMS})
        self.routing = {}
        # First step whose loss was not finite (-1: none); checked without a sync, see train_step.
        self._nonfinite_step = torch.full((), -1, dtype=torch.long, device=self.device)

    def _host_sums(self) -> dict[str, float]:
        """The running sums as Python numbers (a host sync on an accelerator)."""
        self._check_finite_loss()
        return {key: float(value) if key in DEVICE_SUMS else value for key, value in self.sums.items()}

    def _check_finite_loss(self) -> None:
        step = int(self._nonfinite_step)
        if step >= 0:
            raise FloatingPointError(
                f"loss not finite at step {step}; lower optim.lr or set optim.grad_clip "
                "(checked at log points and before each checkpoint, so no checkpoint holds the bad step)"
            )

    def state_dict(self) -> dict[str, Any]:
        from visionmoe.train.config import _plain

        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "loader": self.train_loader.state_dict(),
            "rng": rng_state(),
            "step": self.step,
            "train_seconds": self.train_seconds,
            "eval_seconds": self.eval_seconds,
            "best_top1": self.best_top1,
            "sums": self._host_sums(),
            "routing": {name: _stats_to_dict(acc.total) for name, acc in self.routing.items() if acc.total},
            "config": _plain(self.config.to_dict()),
            "code": self.code,
            "classes": list(self.splits.train.classes),  # label i is classes[i]: eval refuses data named otherwise
        }

    def _restore(self, state: dict[str, Any]) -> None:
        check_classes(state, self.splits, self.checkpoint_path, self.config.data)
        check_model_matches(state["model"], self.model, str(self.checkpoint_path))
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.train_loader.load_state_dict(state["loader"])
        self.step = int(state["step"])
        self.train_seconds, self.eval_seconds = float(state["train_seconds"]), float(state["eval_seconds"])
        self.best_top1 = float(state["best_top1"])
        self._reset_epoch_sums()
        for key, value in state["sums"].items():
            on_device = key in DEVICE_SUMS
            self.sums[key] = torch.tensor(value, dtype=torch.float64, device=self.device) if on_device else value
        self.routing = {}
        for name, values in state["routing"].items():
            acc = RoutingStatsAccumulator()
            acc.update(RoutingStats(**values))
            self.routing[name] = acc
        set_rng_state(state["rng"])

    def save(self) -> Path:
        """Write the checkpoint: ``checkpoint.pt`` in one process, ``checkpoint.dcp/`` under torchrun.

        Only the newest format is kept, so a run resumed on another number of processes reads its
        latest state.
        """
        if self.parallel is not None:
            self._fold_sums()
            path = distributed.save_sharded(
                self.sharded_path, self.state_dict(), self.model, self.optimizer, self.parallel_env
            )
            if self.parallel_env.is_main:
                self.checkpoint_path.unlink(missing_ok=True)
            return path
        path = save_checkpoint(self.checkpoint_path, self.state_dict())
        if self.sharded_path.exists():
            shutil.rmtree(self.sharded_path)
        return path

    def _fold_sums(self) -> None:
        """Sum the partial epoch's running sums over ranks into rank 0's (the others restart from zero)."""
        keys = (*DEVICE_SUMS, "seen")
        sums = self._host_sums()
        total = distributed.data.sum_across_ranks({k: sums[k] for k in keys})
        routing = distributed.data.sum_routing_across_ranks(self.routing)
        main = self.parallel_env.is_main
        for key in DEVICE_SUMS:
            self.sums[key] = torch.tensor(total[key] if main else 0.0, dtype=torch.float64, device=self.device)
        self.sums["seen"] = int(total["seen"]) if main else 0
        self.routing = routing if main else {}

    # -- the loop

    def train_step(self, x: Tensor, y: Tensor) -> None:
        o = self.config.optim
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        if self.mixer is not None and len(y) % 2:  # a streamed batch lost an unreadable image (data.skip_corrupt)
            x, y = x[:-1], y[:-1]  # mixup pairs rows: keep an even count
        target: Tensor = y
        if self.mixer is not None:
            x, target = self.mixer(x, y, seed=self.config.train.seed * 1_000_003 + self.step)
        with self._autocast():
            logits = self.forward(x).float()  # (B, classes)
            if self.mixer is not None:
                task = torch.sum(-target * logits.log_softmax(dim=-1), dim=-1).mean()  # soft targets
            else:
                task = F.cross_entropy(logits, target, label_smoothing=o.label_smoothing)
            aux = collect_aux_loss(self.model)
            loss = task + o.aux_loss_scale * aux
        finite = torch.isfinite(loss.detach())
        if self.eager_finite_check:  # free on the CPU: stop before the bad step reaches the weights
            if not finite:
                raise FloatingPointError(
                    f"loss {float(loss.detach())} at step {self.step}; lower optim.lr or set optim.grad_clip"
                )
        else:  # no host sync per step: remember the first bad step, raised at the next log point or save
            first = (self._nonfinite_step < 0) & ~finite
            self._nonfinite_step = torch.where(first, self.step, self._nonfinite_step)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.parallel is not None:
            self.parallel.reduce_gradients()  # a no-op under DDP, which reduced during backward
        if o.grad_clip is not None:
            if self.parallel is not None:
                self.parallel.clip_grad_norm_(o.grad_clip)  # the norm over every rank's expert shards
            else:
                nn.utils.clip_grad_norm_(self.model.parameters(), o.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        n = y.shape[0]
        self.sums["loss"] += task.detach().double() * n
        self.sums["aux"] += aux.detach().double() * n
        self.sums["correct"] += (logits.detach().argmax(dim=-1) == y).sum().double()
        self.sums["seen"] += n
        for name, stats in collect_routing_stats(self.model).items():
            self.routing.setdefault(name, RoutingStatsAccumulator()).update(stats)

    def _autocast(self):
        if self.use_amp:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def evaluate(self) -> dict[str, Any]:
        e = self.config.eval
        return evaluate(
            self.eval_forward,
            self.test_loader,
            self.splits.num_classes,
            device=self.device,
            tta_flip=e.tta_flip,
            bins=e.calibration_bins,
            autocast=self._autocast,
            reduce=None if self.parallel is None else _sum_eval_across_ranks,
        )

    def fit(self) -> dict[str, Any]:
        """Train to ``train.epochs`` (or the time limit), evaluating and checkpointing each epoch."""
        from rich.console import Console

        cfg, t = self.config, self.config.train
        main = self.parallel_env is None or self.parallel_env.is_main  # only rank 0 writes logs and summaries
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if main:
            save_config(cfg, self.run_dir / "config.yaml")
        console = Console(quiet=not main)
        resume_step = self.step if self.step else None
        logger = RunLogger(self.run_dir, tensorboard=t.tensorboard, resume_step=resume_step) if main else None
        p = self.profile
        console.print(
            f"[bold]{cfg.name}[/]: {cfg.model.name}"
            + (f" (dense twin, {cfg.model.dense_twin})" if cfg.model.dense_twin else "")
            + f", {p['total_params'] / 1e6:.2f}M params ({p['active_params'] / 1e6:.2f}M active), "
            f"{p['flops_per_image'] / 1e6:.1f} MFLOPs/image, ρ={p['rho']:.3f}; {len(self.splits.train)} train / "
            f"{len(self.splits.test)} test images, {self.splits.num_classes} classes; {self.total_steps} steps on "
            f"{self.device} ({torch.get_num_threads()} threads) → {self.run_dir}",
            soft_wrap=True,
        )
        stopped = "completed"
        wall_start = time.perf_counter()
        with _progress(t.progress and main) as progress:
            while self.step < self.total_steps:
                epoch = self.step // self.steps_per_epoch
                end = min(self.total_steps, (epoch + 1) * self.steps_per_epoch)
                task = progress.add_task(
                    f"epoch {epoch + 1}", total=end - epoch * self.steps_per_epoch, loss=math.nan, acc=math.nan, ips=0.0
                )
                progress.update(task, completed=self.step - epoch * self.steps_per_epoch)
                self.model.train()
                fetch = time.perf_counter()
                for x, y in self.train_loader:  # the batch is built (index, augment, normalise) here
                    start = time.perf_counter()
                    self.train_step(x, y)
                    seconds = time.perf_counter() - fetch  # training time includes building the batch
                    self.train_seconds += seconds
                    self.sums["seconds"] += seconds
                    self.sums["data_seconds"] += start - fetch
                    self.step += 1
                    if self.step % t.log_every == 0 or self.step == end:
                        s = self._host_sums()
                        progress.update(
                            task,
                            completed=self.step - epoch * self.steps_per_epoch,
                            loss=s["loss"] / s["seen"],
                            acc=s["correct"] / s["seen"],
                            ips=s["seen"] / max(s["seconds"], 1e-9),
                        )
                    if t.time_limit_minutes is not None and self._time_is_up(
                        self.train_seconds >= 60 * t.time_limit_minutes
                    ):
                        stopped = "time_limit"
                    at_end = self.step == end or stopped != "completed"
                    if t.checkpoint_every_steps and self.step % t.checkpoint_every_steps == 0 and not at_end:
                        self.save()
                    for callback in self.callbacks:
                        callback(self)
                    if at_end:
                        break
                    fetch = time.perf_counter()  # checkpoints and callbacks are not training time
                progress.remove_task(task)
                record = self._end_epoch(epoch, final=self.step == self.total_steps or stopped != "completed")
                if logger is not None:
                    logger.log(record)
                console.print(_epoch_line(record), soft_wrap=True)
                self.save()
                if stopped != "completed":
                    break
        if logger is not None:
            logger.close()
        summary = self._summary(stopped, logger.records if logger else [], time.perf_counter() - wall_start)
        if main:
            # whole or absent (a sweep takes summary.json as "finished"): a temporary file, then a rename
            write_atomic(self.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        return summary

    def _time_is_up(self, local: bool) -> bool:
        """Rank 0's clock decides for every rank (they must stop at the same step)."""
        if self.parallel_env is None:
            return local
        return distributed.data.sum_across_ranks({"up": local and self.parallel_env.is_main})["up"] > 0

    def _end_epoch(self, epoch: int, final: bool) -> dict[str, Any]:
        if self.parallel is not None:
            self._fold_sums()
        s = self._host_sums()
        record: dict[str, Any] = {
            "epoch": round(self.step / self.steps_per_epoch, 4),
            "step": self.step,
            "lr": self.optimizer.param_groups[0]["lr"],
            "train_loss": s["loss"] / max(s["seen"], 1),
            "train_top1": s["correct"] / max(s["seen"], 1),
            "aux_loss": s["aux"] / max(s["seen"], 1),
            "images_per_s": s["seen"] / max(s["seconds"], 1e-9),
            "data_share": s["data_seconds"] / max(s["seconds"], 1e-9),  # of training time spent building batches
            "train_seconds": self.train_seconds,
        }
        record["routing"] = {name: acc.compute().as_dict() for name, acc in self.routing.items()}
        if final or (epoch + 1) % self.config.train.eval_every == 0:
            start = time.perf_counter()
            result = self.evaluate()
            self.eval_seconds += time.perf_counter() - start
            self.best_top1 = max(self.best_top1, result["top1"])
            record["test"] = {k: v for k, v in result.items() if k not in ("per_class_accuracy", "routing", "samples")}
            record["test"]["routing"] = result["routing"]
            self.last_eval = result
        record["eval_seconds"] = self.eval_seconds
        self._reset_epoch_sums()
        return record

    def _summary(self, stopped: str, records: list[dict[str, Any]], wall: float) -> dict[str, Any]:
        last_eval = getattr(self, "last_eval", None) or self.evaluate()
        images = self.step * self.config.data.batch_size
        by_batch_size = {}
        if self.config.eval.batch_sizes:
            start = time.perf_counter()
            by_batch_size = self.evaluate_batch_sizes()
            self.eval_seconds += time.perf_counter() - start
        return {
            "name": self.config.name,
            "model": self.config.model.name,
            "dense_twin": self.config.model.dense_twin,
            "stopped": stopped,
            "epochs": round(self.step / self.steps_per_epoch, 4),
            "steps": self.step,
            "seed": self.config.train.seed,
            "classes": list(self.splits.train.classes),
            "test": {k: v for k, v in last_eval.items() if k != "routing"},
            "test_routing": last_eval["routing"],
            **({"test_by_batch_size": by_batch_size} if by_batch_size else {}),
            "best_top1": self.best_top1,
            "train_seconds": self.train_seconds,
            "eval_seconds": self.eval_seconds,
            "wall_seconds_this_session": wall,
            "skipped_images_this_session": self.train_loader.skipped + self.test_loader.skipped,  # data.skip_corrupt
            "images_per_s": images / max(self.train_seconds, 1e-9),
            **self.profile,
            "device": str(self.device),
            "processes": 1 if self.parallel_env is None else self.parallel_env.world_size,
            # the modules FSDP gathers one at a time, besides the root (None: not sharded with FSDP)
            "fsdp_units": self.parallel.fsdp_units if self.parallel is not None and self.parallel.fsdp else None,
            "threads": torch.get_num_threads(),
            "machine": machine_info(torch.get_num_threads())["cpu"],
            "code": self.code,
            "run_dir": str(self.run_dir),
        }


def _init_parallel(config: Config) -> distributed.ParallelEnv | None:
    """Join torchrun's process group when there is one (WORLD_SIZE > 1); None in one process."""
    t, d = config.train, config.data
    if not distributed.launched_distributed():
        if t.expert_parallel != 1:
            raise ValueError(
                f"train.expert_parallel={t.expert_parallel!r} needs as many processes (or a multiple); "
                "launch with torchrun --nproc_per_node N, or set train.expert_parallel=1"
            )
        return None
    env = distributed.init_parallel(t.expert_parallel, backend="gloo" if t.device == "cpu" else None)
    distributed.data_parallel.check_batch_size(d.batch_size, env.world_size, d.mixup_alpha > 0 or d.cutmix_alpha > 0)
    return env


def _sum_eval_across_ranks(meter: ClassificationMeter, routing: dict) -> dict:
    distributed.data.sum_meter_across_ranks(meter)
    return distributed.data.sum_routing_across_ranks(routing)


def _stats_to_dict(stats: RoutingStats) -> dict[str, Tensor]:
    from dataclasses import fields

    return {f.name: getattr(stats, f.name) for f in fields(stats)}


def _normalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    from visionmoe.data import normalize

    return normalize(images, tuple(mean), tuple(std))


def _epoch_line(record: dict[str, Any]) -> str:
    line = (
        f"epoch {record['epoch']:g} step {record['step']}: train loss {record['train_loss']:.3f} "
        f"top-1 {record['train_top1']:.1%}, {record['images_per_s']:.0f} img/s"
    )
    if "test" in record:
        t = record["test"]
        line += f" | test top-1 {t['top1']:.2%} top-5 {t['top5']:.2%} nll {t['nll']:.3f} ece {t['ece']:.3f}"
    for name, r in record["routing"].items():
        entropy = r["router_entropy"]  # NaN for a dense "router", which has no choice to make
        line += f" | {name}: drop {r['dropped_fraction']:.1%} H {'—' if math.isnan(entropy) else f'{entropy:.2f}'}"
        break  # the first layer only; every layer is in metrics.jsonl
    return line


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f} acc {task.fields[acc]:.1%} {task.fields[ips]:.0f} img/s"),
        TimeElapsedColumn(),
        disable=not enabled,
        transient=True,
    )


def check_classes(state: dict[str, Any], splits: Splits, checkpoint: str | Path, data: Any) -> None:
    """Refuse data whose classes are not those the checkpoint was trained on (its labels would be permuted).

    A checkpoint written before class names were recorded (no ``classes`` entry) cannot be checked: it
    loads, with a warning that the data's own class order is taken on trust.
    """
    from visionmoe.train.data import class_difference

    where = data.data_dir or data.dataset
    saved = state.get("classes")
    if saved is None:
        log.warning(
            "%s records no class names (written before they were): cannot check that %s has the classes "
            "it was trained on; its labels are taken in the data's own order",
            checkpoint,
            where,
        )
        return
    found = list(splits.train.classes)
    if list(saved) != found:
        raise ValueError(
            f"{where} does not have the classes {checkpoint} was trained on ({class_difference(list(saved), found)}); "
            "its labels would not mean what the model learnt"
        )


def load_run(
    checkpoint: str | Path, *, data_dir: str | None = None, device: str = "auto"
) -> tuple[Config, nn.Module, Splits, dict[str, Any]]:
    """A trained run from its checkpoint: (config, model with the weights, data splits, checkpoint state).

    The model is rebuilt from the config stored in the checkpoint and put in eval mode on ``device``
    ("auto": CUDA if available); ``data_dir`` replaces the stored data root (if the data moved).
    """
    state = load_checkpoint(checkpoint)
    config = Config.from_dict(state["config"], source=str(checkpoint))
    if data_dir is not None:
        config.data.data_dir = data_dir
    config.validate(saved=True)  # the run's own config: rebuilt as it was, even if a new run would be refused
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    splits = load_splits(config.data)
    check_classes(state, splits, checkpoint, config.data)
    example = _normalize(splits.first_images(2), splits.mean, splits.std)
    model = build_model(config.model, splits.num_classes, example)
    check_model_matches(state["model"], model, str(checkpoint))
    model.load_state_dict(state["model"])
    memory = torch.channels_last if config.train.channels_last else torch.contiguous_format
    model.to(dev, memory_format=memory).eval()
    return config, model, splits, state


def evaluate_checkpoint(
    checkpoint: str | Path,
    *,
    data_dir: str | None = None,
    split: str = "test",
    batch_size: int | None = None,
    tta_flip: bool | None = None,
    device: str = "auto",
) -> dict[str, Any]:
    """Evaluate a training checkpoint on its dataset's ``split`` ("test" or "train", no augmentation).

    The model is rebuilt from the config stored in the checkpoint, so only the checkpoint is needed
    (and the data). Returns :func:`evaluate`'s metrics plus the checkpoint's step and config name.
    """
    if split not in ("test", "train"):
        raise ValueError(f"split must be 'test' or 'train', got {split!r}")
    config, model, splits, state = load_run(checkpoint, data_dir=data_dir, device=device)
    dev = next(model.parameters()).device
    data = splits.test if split == "test" else splits.train
    channels_last = config.train.channels_last and dev.type == "cpu"
    batch_size = batch_size or config.data.eval_batch_size
    loader = eval_loader(config.data, splits, data, batch_size, config.train.seed, channels_last)
    flip = config.eval.tta_flip if tta_flip is None else tta_flip
    result = evaluate(model, loader, splits.num_classes, device=dev, tta_flip=flip, bins=config.eval.calibration_bins)
    result.update({"name": config.name, "model": config.model.name, "step": int(state["step"]), "split": split})
    result["classes"] = list(data.classes)
    result["classes_checked"] = "classes" in state  # False: a checkpoint older than recorded class names
    return result
