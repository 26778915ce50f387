"""The training loop: a plain PyTorch loop over a :class:`Config`, resumable bit for bit on the CPU.

    trainer = Trainer(load_config("cifar10_moe", ["train.epochs=2"]))
    summary = trainer.fit()          # writes <out_dir>/<run_name>/{config.yaml, checkpoint.pt,
                                     #   metrics.jsonl, metrics.csv, tensorboard/, summary.json}

Where the rest lives: what is built from the config (model, parameter groups, optimiser, schedule) in
:mod:`visionmoe.train.build`; evaluation in :mod:`visionmoe.train.evaluation`; loading a finished run
in :mod:`visionmoe.train.runs`; everything a torchrun rank does differently behind the
:class:`~visionmoe.train.replica.Replica` this loop calls; the seed rule in :mod:`visionmoe.seeding`.

What makes resume exact: the loader's batches are a function of (seed, epoch, step); mixup is
seeded per step; the checkpoint holds model, optimiser, scheduler, every RNG state and the partial
epoch's running sums. A run killed at any point and resumed from its last checkpoint ends with the
same weights and metrics as an uninterrupted one (tested on the CPU).
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from visionmoe.allocator import KEPT, keep_freed_memory, kept
from visionmoe.analysis.profile import profile_model
from visionmoe.analysis.speed import machine_info
from visionmoe.distributed import SHARDED_CHECKPOINT
from visionmoe.jsonl import write_atomic
from visionmoe.layers.moe import collect_aux_loss, collect_routing_stats, moe_layers
from visionmoe.seeding import rank_seed, step_seed
from visionmoe.train.build import build_model, build_optimizer, build_scheduler, check_model_config
from visionmoe.train.checkpoint import (
    CHECKPOINT,
    RESUMABLE_CHANGES,
    check_model_matches,
    check_resumable,
    code_version,
    rng_state,
    set_rng_state,
)
from visionmoe.train.config import Config, parse_device, save_config
from visionmoe.train.data import BatchMixer, Splits, build_loaders, load_splits
from visionmoe.train.evaluation import evaluate, evaluate_batch_sizes
from visionmoe.train.logger import RunLogger, epoch_line, progress_bar
from visionmoe.train.metrics import EpochSums
from visionmoe.train.replica import Replica, make_replica
from visionmoe.train.runs import check_classes, evaluate_checkpoint, load_run
from visionmoe.train.typed import plain

# Callers import these from here as well (they live in build, checkpoint and runs).
__all__ = ["RESUMABLE_CHANGES", "Trainer", "build_model", "check_model_config", "evaluate_checkpoint", "load_run"]


class Trainer:
    """Train one configured run; see the module docstring.

    Args:
        config: the run (validated here again).
        resume: continue from ``<run_dir>/checkpoint.pt``. Without it, a run directory that already
            holds a checkpoint is an error (nothing is overwritten).
        callbacks: called as ``callback(trainer)`` after every optimiser step (tests use it to
            interrupt a run; tools to watch one).
        splits: the data, when the caller has loaded it already (the estimator, for several
            configurations of one dataset); else loaded from ``config.data``.

    Building a Trainer writes nothing; :meth:`fit` creates the run directory.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) the same run is data parallel, and expert parallel with
    ``train.expert_parallel`` > 1 (:mod:`visionmoe.distributed`): each rank takes its rows of the same
    global batch, gradients and metrics are reduced across ranks, rank 0 alone writes logs and
    summaries, and checkpoints are ``checkpoint.dcp`` directories that load on any number of processes.
    """

    def __init__(
        self,
        config: Config,
        *,
        resume: bool = False,
        callbacks: Sequence[Callable] = (),
        splits: Splits | None = None,
    ) -> None:
        self.config = config.validate(saved=resume)  # resuming: the run's own config, as it trained
        t, d, o = config.train, config.data, config.optim
        self.run_dir = Path(t.out_dir).expanduser() / (t.run_name or f"{config.name}-s{t.seed}")
        self.checkpoint_path = self.run_dir / CHECKPOINT
        self.replica: Replica = make_replica(config)  # one process, or this torchrun rank
        state = None
        if resume:
            state = self.replica.read_checkpoint(self.run_dir)
            check_resumable(self.config, state["config"], self.checkpoint_path)
        elif self.checkpoint_path.exists() or (self.run_dir / SHARDED_CHECKPOINT).exists():
            raise FileExistsError(
                f"{self.run_dir} already holds a checkpoint; pass --resume to continue it, "
                "or set train.run_name / train.out_dir for a new run"
            )
        self.callbacks = list(callbacks)
        self.code = code_version()  # at start: the code that trains, even if the checkout changes meanwhile
        threads = t.threads
        asked = torch.get_num_threads() if threads is None else threads
        if state is not None and state.get("threads") not in (None, asked):
            # the thread count changes the order of the sums (GEMM and reduction splits): a resume is
            # bit-identical only with the threads the run trained with, so those win over train.threads
            warnings.warn(
                f"resuming {self.run_dir} with the {state['threads']} thread(s) it trained with, not "
                f"{asked}: another thread count would change its results",
                stacklevel=2,
            )
            threads = state["threads"]
        if threads is not None:
            torch.set_num_threads(threads)
        # what glibc does with freed memory in this process (visionmoe.allocator): it moves the step times
        if t.keep_freed_memory:
            self.malloc = keep_freed_memory()
        else:  # the setting is process-wide and cannot be undone by a later run of the same process
            self.malloc = f"{KEPT} (by an earlier run of this process)" if kept() else "allocator defaults"
        self.device = self.replica.device(parse_device(t.device, "train.device"))  # before any data is loaded
        self.use_amp = t.amp and self.device.type == "cuda"
        # Check each step's loss at once (the CPU), or without a host sync at the next log point or save.
        self.eager_finite_check = self.device.type == "cpu"

        # data: each rank keeps its rows of every global batch
        self.splits: Splits = splits if splits is not None else load_splits(d)
        train_loader, test_loader = build_loaders(d, self.splits, t.seed, t.channels_last and self.device.type == "cpu")
        self.train_loader, self.test_loader = self.replica.shard(train_loader), self.replica.shard(test_loader)

        # the model, seeded by the run's seed alone
        example = self.splits.first_batch(2)
        torch.manual_seed(t.seed)
        self.model = build_model(config.model, self.splits.num_classes, example)
        if hasattr(self.model, "init_from_data"):  # also on resume: the profile below sees the initial weights
            self.model.init_from_data(self.splits.first_batch(5000))
        memory = torch.channels_last if t.channels_last else torch.contiguous_format
        self.model.to(self.device, memory_format=memory)
        # FLOPs, ρ and active parameters count the assignments the routers make, so they are measured on
        # the initial weights (before the checkpoint is loaded): a resumed run reports the same profile
        # as an uninterrupted one.
        self.profile = self._profile(self._profile_batch(example))
        self.replica.parallelize(self.model, t)  # in place: expert shards, FSDP, SyncBatchNorm (one process: none)
        self.eval_forward = torch.compile(self.model) if t.compile else self.model
        self.forward = self.replica.wrap(self.eval_forward)  # DDP's gradient hooks: evaluation needs none

        # optimiser, schedule, mixup
        self.steps_per_epoch = len(self.train_loader)
        self.total_steps = max(1, round(t.epochs * self.steps_per_epoch))
        self.optimizer = build_optimizer(config, self.model)
        self.scheduler = build_scheduler(config, self.optimizer, self.steps_per_epoch, self.total_steps)
        self.mixer = None
        if d.mixup_alpha > 0 or d.cutmix_alpha > 0:  # an even data.batch_size: Config.validate
            self.mixer = BatchMixer(d.mixup_alpha, d.cutmix_alpha, o.label_smoothing, self.splits.num_classes)

        # where training stands: from the start, or from the checkpoint
        self.step = 0
        self.train_seconds = 0.0
        self.eval_seconds = 0.0
        self.best_top1 = 0.0
        self.sums = EpochSums(self.device)
        if state is not None:
            self._restore(self.replica.localize(state, self.run_dir, self.model, self.optimizer))
            self.replica.keep_own_sums(self.sums)
        else:
            torch.manual_seed(rank_seed(t.seed, self.replica.rank))  # the training RNG stream starts from the seed

    # -- the loop

    def fit(self) -> dict[str, Any]:
        """Train to ``train.epochs`` (or the time limit), evaluating and checkpointing each epoch."""
        t = self.config.train
        main = self.replica.is_main  # only rank 0 writes logs and summaries
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if main:
            save_config(self.config, self.run_dir / "config.yaml")
        logger = (
            RunLogger(
                self.run_dir,
                tensorboard=t.tensorboard,
                resume_step=self.step or None,
                partial=self.step % self.steps_per_epoch != 0 and self.step != self.total_steps,
            )
            if main
            else None
        )
        console = self._announce(quiet=not main)
        stopped = "completed"
        wall_start = time.perf_counter()
        with progress_bar(t.progress and main) as progress:
            while self.step < self.total_steps:
                epoch = self.step // self.steps_per_epoch
                first, end = epoch * self.steps_per_epoch, min(self.total_steps, (epoch + 1) * self.steps_per_epoch)
                bar = progress.add_task(f"epoch {epoch + 1}", total=end - first, loss=math.nan, acc=math.nan, ips=0.0)
                progress.update(bar, completed=self.step - first)
                self.model.train()
                fetch = time.perf_counter()
                for x, y in self.train_loader:  # the batch is built (index, augment, normalise) here
                    start = time.perf_counter()
                    self.train_step(x, y)
                    seconds = time.perf_counter() - fetch  # training time includes building the batch
                    self.train_seconds += seconds
                    self.sums.add_time(seconds, start - fetch)
                    self.step += 1
                    if self.step % t.log_every == 0 or self.step == end:
                        progress.update(bar, completed=self.step - first, **self._running_means())
                    if self._out_of_time():
                        stopped = "time_limit"
                    at_end = self.step == end or stopped != "completed"
                    if t.checkpoint_every_steps and self.step % t.checkpoint_every_steps == 0 and not at_end:
                        self.save()
                    for callback in self.callbacks:
                        callback(self)
                    if at_end:
                        break
                    fetch = time.perf_counter()  # checkpoints and callbacks are not training time
                if stopped == "completed" and self.step < end:
                    # the loader skipped whole batches (every image unreadable, data.skip_corrupt): steps without
                    # an update, so the schedule and the epochs stay where the loader is
                    for _ in range(end - self.step):
                        self.scheduler.step()
                    self.step = end
                progress.remove_task(bar)
                partial = self.step != end  # stopped by the time limit mid-epoch
                if partial:
                    self.save()  # with the partial epoch's sums: a resumed epoch reports all of its steps
                record = self._end_epoch(epoch, final=self.step == self.total_steps or stopped != "completed")
                if logger is not None:
                    logger.log(record)
                console.print(epoch_line(record), soft_wrap=True)
                if not partial:
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

    def _running_means(self) -> dict[str, float]:
        """The epoch so far, for the progress bar: mean loss, accuracy, images per second."""
        s = self.sums.host()
        n = s["seen"]
        return {"loss": s["loss"] / n, "acc": s["correct"] / n, "ips": n / max(s["seconds"], 1e-9)}

    def _out_of_time(self) -> bool:
        """``train.time_limit_minutes`` of training reached; under torchrun rank 0's clock decides for all."""
        limit = self.config.train.time_limit_minutes
        return limit is not None and self.replica.agree_time_is_up(self.train_seconds >= 60 * limit)

    def train_step(self, x: Tensor, y: Tensor) -> None:
        """One optimiser step on the batch (x, y): the step training takes, and the one the estimator times.

        x: (B, 3, H, W) normalised images, y: (B,) labels. Adds the batch to the epoch's running sums;
        ``self.step`` is the caller's to advance (it seeds mixup and names a non-finite loss).
        """
        o = self.config.optim
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        if self.mixer is not None and len(y) % 2:  # a streamed batch lost an unreadable image (data.skip_corrupt)
            x, y = x[:-1], y[:-1]  # mixup pairs rows: keep an even count
        if self.config.data.skip_corrupt and self.replica.agree_any(len(y) == 0):
            # no image left here (or on another rank: every rank must take the same steps, or their
            # collectives fall out of step): a step without an update, everywhere
            self.scheduler.step()
            return
        target: Tensor = y
        if self.mixer is not None:
            x, target = self.mixer(x, y, seed=step_seed(self.config.train.seed, self.step))
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
            self.sums.mark_nonfinite(finite, self.step)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.replica.reduce_gradients()
        if o.grad_clip is not None:
            self.replica.clip_grad_norm_(self.model, o.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.sums.add_step(task, aux, logits, y, collect_routing_stats(self.model))

    def _end_epoch(self, epoch: int, final: bool) -> dict[str, Any]:
        """The epoch's record for metrics.jsonl: its training sums (over every rank) and, when due, a test pass."""
        self.replica.fold(self.sums)
        s = self.sums.host()
        seen, seconds = max(s["seen"], 1), max(s["seconds"], 1e-9)
        record: dict[str, Any] = {
            "epoch": round(self.step / self.steps_per_epoch, 4),
            "step": self.step,
            "lr": self.optimizer.param_groups[0]["lr"],
            "train_loss": s["loss"] / seen,
            "train_top1": s["correct"] / seen,
            "aux_loss": s["aux"] / seen,
            "images_per_s": s["seen"] / seconds,
            "data_share": s["data_seconds"] / seconds,  # of training time spent building batches
            "train_seconds": self.train_seconds,
        }
        record["routing"] = {name: acc.compute().as_dict() for name, acc in self.sums.routing.items()}
        if final or (epoch + 1) % self.config.train.eval_every == 0:
            start = time.perf_counter()
            result = self.evaluate()
            self.eval_seconds += time.perf_counter() - start
            self.best_top1 = max(self.best_top1, result["top1"])
            record["test"] = {k: v for k, v in result.items() if k not in ("per_class_accuracy", "routing", "samples")}
            record["test"]["routing"] = result["routing"]
            self.last_eval = result
        record["eval_seconds"] = self.eval_seconds
        self.sums.reset()
        return record

    # -- evaluation

    def evaluate(self) -> dict[str, Any]:
        """Test metrics of the current weights (summed over every rank)."""
        e = self.config.eval
        return evaluate(
            self.eval_forward,
            self.test_loader,
            self.splits.num_classes,
            device=self.device,
            tta_flip=e.tta_flip,
            bins=e.calibration_bins,
            autocast=self._autocast,
            reduce=self.replica.eval_reduce(),
        )

    def evaluate_batch_sizes(self) -> dict[str, dict[str, float]]:
        """Test metrics at each ``eval.batch_sizes`` size (:func:`visionmoe.train.evaluation.evaluate_batch_sizes`)."""
        self.replica.require_one_process("eval.batch_sizes")
        e, t = self.config.eval, self.config.train
        return evaluate_batch_sizes(
            self.eval_forward,
            self.config.data,
            self.splits,
            e.batch_sizes,
            seed=t.seed,
            channels_last=t.channels_last and self.device.type == "cpu",
            device=self.device,
            tta_flip=e.tta_flip,
            bins=e.calibration_bins,
            autocast=self._autocast,
        )

    def _autocast(self):
        if self.use_amp:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    # -- checkpoint state

    def state_dict(self) -> dict[str, Any]:
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
            **self.sums.state_dict(),  # "sums" and "routing": the partial epoch
            "config": plain(self.config.to_dict()),
            "code": self.code,
            "classes": list(self.splits.train.classes),  # label i is classes[i]: eval refuses data named otherwise
            "threads": torch.get_num_threads(),  # a resume trains on with these (they order the sums)
            "data_sizes": self._data_sizes(),  # a resume on other data (same classes) is refused
        }

    def _data_sizes(self) -> dict[str, int]:
        return {"train": len(self.splits.train), "test": len(self.splits.test)}

    def _restore(self, state: dict[str, Any]) -> None:
        check_classes(state, self.splits, self.checkpoint_path, self.config.data)
        saved, found = state.get("data_sizes"), self._data_sizes()
        if saved is not None and saved != found:  # data.data_dir may move, the data may not change
            where = self.config.data.data_dir or self.config.data.dataset
            raise ValueError(
                f"cannot resume {self.checkpoint_path}: it trained on {saved['train']} train / {saved['test']} test "
                f"images, {where} holds {found['train']} / {found['test']}: other data"
            )
        check_model_matches(state["model"], self.model, str(self.checkpoint_path))
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.train_loader.load_state_dict(state["loader"])
        self.step = int(state["step"])
        self.train_seconds, self.eval_seconds = float(state["train_seconds"]), float(state["eval_seconds"])
        self.best_top1 = float(state["best_top1"])
        self.sums.load_state_dict(state)
        set_rng_state(state["rng"])

    def save(self) -> Path:
        """Write the checkpoint: ``checkpoint.pt`` in one process, ``checkpoint.dcp/`` under torchrun."""
        self.replica.fold(self.sums)
        return self.replica.save(self.run_dir, self.state_dict(), self.model, self.optimizer)

    # -- what the run reports

    def _profile_batch(self, example: Tensor) -> Tensor:
        """The batch FLOPs are counted on: ``example`` (two images), or a training batch where an MoE layer's
        groups span samples. Soft MoE over the batch runs its E·P slots once per group, so its FLOPs per image
        are those of the batch size it trains at, not of two images."""
        if all(moe.groups == "sample" for _, moe in moe_layers(self.model)):
            return example
        return self.splits.first_batch(min(self.config.data.batch_size, len(self.splits.train)))

    def _profile(self, example: Tensor) -> dict[str, float]:
        p = profile_model(self.model, example.to(self.device))
        return {
            "total_params": p.total_params,
            "active_params": p.active_params,
            "flops_per_image": p.total_flops,
            "expert_flops_per_image": p.expert_flops,
            "rho": p.rho,
            "rho_nominal": p.rho_nominal,
        }

    def _announce(self, quiet: bool):
        """The console (silent off rank 0), after printing the run's one-line description."""
        from rich.console import Console

        cfg, p, s = self.config, self.profile, self.splits
        console = Console(quiet=quiet)
        console.print(
            f"[bold]{cfg.name}[/]: {cfg.model.name}"
            + (f" (dense twin, {cfg.model.dense_twin})" if cfg.model.dense_twin else "")
            + f", {p['total_params'] / 1e6:.2f}M params ({p['active_params'] / 1e6:.2f}M active), "
            f"{p['flops_per_image'] / 1e6:.1f} MFLOPs/image, ρ={p['rho']:.3f}; {len(s.train)} train / "
            f"{len(s.test)} test images, {s.num_classes} classes; {self.total_steps} steps on "
            f"{self.device} ({torch.get_num_threads()} threads) → {self.run_dir}",
            soft_wrap=True,
        )
        return console

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
            "processes": self.replica.world_size,
            # the modules FSDP gathers one at a time, besides the root (None: not sharded with FSDP)
            "fsdp_units": self.replica.fsdp_units,
            "threads": torch.get_num_threads(),
            "malloc": self.malloc,  # what train.keep_freed_memory did: it moves the timings above
            "machine": machine_info(torch.get_num_threads())["cpu"],
            "code": self.code,
            "run_dir": str(Path(self.config.train.out_dir) / self.run_dir.name),  # as given (a "~" kept)
        }
