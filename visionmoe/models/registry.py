"""visionmoe's models in timm's registry, so ``timm.create_model`` and ``visionmoe.create_model`` both work."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import cache
from typing import Any

import timm
import torch
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


@cache
def model_kwargs(name: str) -> tuple[str, ...] | None:
    """The keyword arguments ``create_model(name, ...)`` takes, read off its constructor (None: it takes any).

    A visionmoe entry point that wraps a timm class (ViT, ConvNeXt) takes ``moe`` and ``placement``
    itself. For timm's own models the list is the class's; its entry points may take a few more.
    """
    try:
        with torch.device("meta"):  # no memory, no initialisation cost worth the name
            cls = type(timm.create_model(name))
    except Exception:  # a model the meta device cannot build: its keys are not known here
        return None
    params = inspect.signature(cls.__init__).parameters.values()
    if any(p.kind == p.VAR_KEYWORD for p in params):
        return None
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {"self"}
    if name in _MODELS and "moe" not in names:
        names |= {"moe", "placement"}
    return tuple(sorted(names))


def check_model_kwargs(name: str, kwargs: dict[str, Any]) -> None:
    """One-line errors for an unknown model, a None-valued kwarg (timm drops those silently) and, for
    visionmoe's models, a kwarg the constructor does not take; each lists the valid keys."""
    if name not in _MODELS and not timm.is_model(name):
        raise ValueError(f"unknown model {name!r}; visionmoe models: {', '.join(list_models())}")
    valid = model_kwargs(name)
    takes = f"{name} takes {list(valid)}" if valid is not None else f"{name} takes its constructor's arguments"
    if nones := sorted(k for k, v in kwargs.items() if v is None):
        hint = " (YAML reads {width:8}, without a space, as the key 'width:8')" if any(":" in k for k in nones) else ""
        raise ValueError(f"model.kwargs {nones} set to None, which timm would drop silently{hint}; {takes}")
    if name in _MODELS and valid is not None and (unknown := sorted(set(kwargs) - set(valid))):
        raise ValueError(f"unknown model.kwargs {unknown}; {takes}")


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
