"""visionmoe's models in timm's registry, so ``timm.create_model`` and ``visionmoe.create_model`` both work."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import timm
from timm.models import register_model as _timm_register_model
from torch import nn

_MODELS: list[str] = []


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a model entry point with timm and remember it as a visionmoe model."""
    _MODELS.append(fn.__name__)
    return _timm_register_model(fn)


def list_models() -> list[str]:
    """Names of every visionmoe model (each also creatable with ``timm.create_model``)."""
    return sorted(_MODELS)


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a visionmoe model by name (a thin front to ``timm.create_model``; any timm name works too)."""
    if name not in _MODELS and not timm.is_model(name):
        raise ValueError(f"unknown model {name!r}; visionmoe models: {', '.join(list_models())}")
    return timm.create_model(name, **kwargs)


_FACTORY_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def entry_kwargs(name: str, pretrained: bool, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The model's own kwargs from what ``timm.create_model`` passes an entry point.

    timm adds ``pretrained_cfg``, ``pretrained_cfg_overlay`` and ``cache_dir``; visionmoe models
    have no pretrained weights of their own (MoE weights are trained or upcycled with
    :func:`visionmoe.moeify` from a pretrained dense timm model).
    """
    if pretrained:
        raise ValueError(
            f"{name} has no pretrained weights; build it with pretrained=False, or moeify a pretrained timm model"
        )
    return {k: v for k, v in kwargs.items() if k not in _FACTORY_KWARGS}
