"""Building a run: the model, its parameter groups, the optimiser and the learning-rate schedule.

Everything here is a function of the config (and the data's class count), with no state of its own,
so the trainer, the estimator (``visionmoe.studies.estimate``) and run loading (``visionmoe.train.runs``)
build exactly the same objects. The model is built under the caller's RNG state: the trainer seeds
it with ``train.seed`` first, so weights depend on the seed alone.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from visionmoe.analysis.twin import dense_twin
from visionmoe.models import create_model, moeify
from visionmoe.models.registry import check_model_kwargs, model_kwargs
from visionmoe.train.config import Config, ModelConfig


def build_model(cfg: ModelConfig, num_classes: int, example_input: Tensor) -> nn.Module:
    """The configured model: a registered (or timm) model, optionally moeified, optionally its dense twin."""
    if "moe" in cfg.kwargs:
        raise ValueError(f"model.kwargs.moe={cfg.kwargs['moe']!r} is not read; put MoE settings in model.moe")
    kwargs = dict(cfg.kwargs)
    if cfg.moe is not None and cfg.moeify is None:
        kwargs["moe"] = cfg.moe  # the model merges it over its family's default (MoEConfig.merged)
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
    router, ``model.moeify`` keys, a negative ``model.kwargs.width`` that torch cannot make a tensor
    of), are found before any data is loaded and before a sweep starts a run. The meta device
    allocates nothing; what it cannot do (read a value, an operator without a meta kernel:
    :func:`_meta_limit`) is left to the real build. The dense twin, which needs an example input,
    is not built here.
    """
    key = repr((cfg.name, cfg.kwargs, cfg.moe, cfg.moeify, num_classes))
    if key in _CHECKED_MODELS:  # a sweep validates many cells of few models
        return
    check_model_kwargs(cfg.name, cfg.kwargs)
    if cfg.kwargs.get("pretrained"):
        return  # building it would download the weights
    try:
        with torch.device("meta"):
            build_model(replace(cfg, dense_twin=None), num_classes, torch.empty(0))
    except Exception as error:
        if _meta_limit(error):  # an operation the meta device lacks: the real build will say what is wrong
            return
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        given = ", ".join(f"model.{k}={v!r}" for k in ("kwargs", "moe", "moeify") if (v := getattr(cfg, k)))
        valid = model_kwargs(cfg.name) if isinstance(error, TypeError) else None  # a keyword it does not take
        takes = f"; {cfg.name} takes {list(valid)}" if valid is not None else ""
        raise ValueError(
            f"model {cfg.name!r} cannot be built from {given or 'its defaults'}: {reason}{takes}"
        ) from None
    _CHECKED_MODELS.add(key)


_META_MESSAGE = re.compile(r"\bmeta (?:tensors?|device|kernel|backend)\b", re.IGNORECASE)


def _meta_limit(error: Exception) -> bool:
    """Whether ``error`` is the meta device's own limit rather than the model section's fault.

    A constructor may read a tensor's value (``Tensor.item() cannot be called on meta tensors``,
    ``.tolist()``: ``Cannot copy out of meta tensor``, ``can't convert meta device type tensor to
    numpy``) or call an operator without a meta kernel (``NotImplementedError``); any other error
    (``Trying to create tensor with negative dimension``, an assertion, a bad keyword) the real
    build would raise as well.
    """
    return isinstance(error, NotImplementedError) or bool(_META_MESSAGE.search(str(error)))


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


def build_scheduler(
    cfg: Config, optimizer: torch.optim.Optimizer, steps_per_epoch: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """``optim.schedule`` over ``total_steps``, its warm-up and milestones counted in epochs of ``steps_per_epoch``."""
    o = cfg.optim
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        Schedule(
            o.schedule,
            total_steps,
            round(o.warmup_epochs * steps_per_epoch),
            steps_per_epoch,
            o.min_lr_ratio,
            o.milestones,
            o.gamma,
        ),
    )
