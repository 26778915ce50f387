"""visionmoe's models in timm's registry, built the way timm builds its own.

Every entry point goes through timm's ``build_model_with_cfg``, so each model carries a
``pretrained_cfg`` (input size, mean/std, crop, first conv and classifier names; what
``timm.data.resolve_data_config(model=m)`` reads), ``features_only=True`` wraps it as a backbone,
and ``timm.create_model`` and :func:`create_model` both work.

Pretrained weights: visionmoe publishes none. ``pretrained_file=PATH`` (or timm's
``pretrained=True, pretrained_cfg_overlay={"file": PATH}``) loads a local checkpoint through timm's
loader (``weights_only=True``): for the ViT / ConvNeXt MoE models a *dense* timm checkpoint of the
same architecture, whose MLPs are upcycled into the experts (see :func:`build_moe_model`); for the
CNN models a checkpoint of the model itself.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Mapping
from functools import cache
from typing import Any

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, load_pretrained, resolve_pretrained_cfg
from timm.models import register_model as _timm_register_model
from torch import nn

from visionmoe.data.augment import CIFAR_MEAN, CIFAR_STD
from visionmoe.layers.moe import MoEConfig
from visionmoe.models.moeify import moeify

_MODELS: list[str] = []


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a model entry point with timm and remember it as a visionmoe model.

    The entry point's module must define ``default_cfgs`` (``timm.models.generate_default_cfgs``)
    before the decorator runs, as timm's own model files do: timm files the model's pretrained_cfg
    from it.
    """
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
    if name in _MODELS:
        names.add("pretrained_file")  # a local dense checkpoint, upcycled (visionmoe.models.registry.build_model)
    return tuple(sorted(names))


def check_model_kwargs(name: str, kwargs: dict[str, Any]) -> None:
    """One-line errors for an unknown model, ``moe`` (whose one place is ``model.moe``), a None-valued
    kwarg (timm drops those silently) and, for visionmoe's models, a kwarg the constructor does not
    take; each lists the valid keys."""
    if name not in _MODELS and not timm.is_model(name):
        raise ValueError(f"unknown model {name!r}; visionmoe models: {', '.join(list_models())}")
    if "moe" in kwargs:
        raise ValueError(f"model.kwargs.moe={kwargs['moe']!r} is not read; put MoE settings in model.moe")
    valid = model_kwargs(name)
    if valid is not None:
        valid = tuple(k for k in valid if k != "moe")  # model.moe's place, never model.kwargs'
    takes = f"{name} takes {list(valid)}" if valid is not None else f"{name} takes its constructor's arguments"
    if nones := sorted(k for k, v in kwargs.items() if v is None):
        hint = " (YAML reads {width:8}, without a space, as the key 'width:8')" if any(":" in k for k in nones) else ""
        raise ValueError(f"model.kwargs {nones} set to None, which timm would drop silently{hint}; {takes}")
    if name in _MODELS and valid is not None and (unknown := sorted(set(kwargs) - set(valid))):
        raise ValueError(f"unknown model.kwargs {unknown}; {takes}")


def cifar_cfg(*, pool_size: tuple[int, int], first_conv: str, classifier: str, **overrides: Any) -> dict[str, Any]:
    """pretrained_cfg of a 32-px CIFAR model: 10 classes, CIFAR-10 mean/std, no crop (the whole 32×32 image)."""
    return {
        "num_classes": 10,
        "input_size": (3, 32, 32),
        "pool_size": pool_size,
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": CIFAR_MEAN,
        "std": CIFAR_STD,
        "first_conv": first_conv,
        "classifier": classifier,
        "license": "mit",
        **overrides,
    }


def imagenet_cfg(*, pool_size: tuple[int, int] | None, first_conv: str, classifier: str, **overrides) -> dict[str, Any]:
    """pretrained_cfg of a 224-px ImageNet-1K model: timm's defaults (crop 0.875, bicubic, ImageNet mean/std)."""
    return {
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": pool_size,
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": first_conv,
        "classifier": classifier,
        "license": "mit",
        **overrides,
    }


def _weights_source(pretrained: bool, kwargs: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
    """(load weights?, the pretrained_cfg overlay) from an entry point's ``pretrained`` and kwargs.

    ``pretrained_file`` becomes timm's ``pretrained_cfg_overlay={"file": ...}``; ``pretrained=True``
    without a local source is refused (visionmoe has no weights to download).
    """
    overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {})
    path = kwargs.pop("pretrained_file", None)
    if path is not None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"pretrained_file={str(path)!r} is not a file")
        overlay["file"] = os.fspath(path)
        pretrained = True
    if pretrained and not (overlay.get("file") or overlay.get("state_dict")):
        raise ValueError(
            "visionmoe models have no pretrained weights to download; pass pretrained_file=PATH (a local "
            "checkpoint), or build with pretrained=False"
        )
    return pretrained, overlay


def build_model(
    cls: Callable[..., nn.Module],
    name: str,
    pretrained: bool,
    kwargs: dict[str, Any],
    *,
    feature_cfg: Mapping[str, Any],
    **defaults: Any,
) -> nn.Module:
    """A visionmoe model through timm's ``build_model_with_cfg`` (pretrained_cfg, features_only, weights)."""
    kwargs = {**defaults, **kwargs}
    pretrained, overlay = _weights_source(pretrained, kwargs)
    extra = {}
    if pretrained:  # the file's classifier is judged by its shape (_keep_own_classifier), not the cfg's class count
        cfg = resolve_pretrained_cfg(name, kwargs.get("pretrained_cfg"), overlay).to_dict()
        overlay = {**overlay, "num_classes": kwargs.get("num_classes", cfg["num_classes"])}
        extra["pretrained_filter_fn"] = _keep_own_classifier(None, cfg.get("classifier"))
    return build_model_with_cfg(
        cls, name, pretrained, pretrained_cfg_overlay=overlay, feature_cfg=dict(feature_cfg), **extra, **kwargs
    )


def build_moe_model(
    dense_cls: type[nn.Module],
    name: str,
    pretrained: bool,
    kwargs: dict[str, Any],
    *,
    moe_default: MoEConfig,
    feature_cfg: Mapping[str, Any],
    checkpoint_filter: Callable[[dict, nn.Module], dict] | None = None,
    **arch: Any,
) -> nn.Module:
    """A timm dense model (ViT, ConvNeXt) made MoE by :func:`moeify`, through ``build_model_with_cfg``.

    With a weight file (``pretrained_file=``), the dense model is built first and loaded by timm's
    ``load_pretrained`` (its ``checkpoint_filter`` resizes position embeddings, reshapes conv-MLP
    weights, ...; a classifier whose shape differs from the model's, e.g. 1000 ImageNet classes
    into a 10-class model, keeps its fresh init), then every replaced MLP is upcycled: each expert
    starts as a copy of it (``moeify(..., upcycle=True)``). The routers keep their init.
    """
    kwargs = {**arch, **kwargs}
    placement = kwargs.pop("placement", "last-2")
    config = moe_default.merged(kwargs.pop("moe", None))
    pretrained, overlay = _weights_source(pretrained, kwargs)
    cfg = resolve_pretrained_cfg(name, kwargs.get("pretrained_cfg"), overlay).to_dict()

    def make(**model_kwargs: Any) -> nn.Module:
        model = dense_cls(**model_kwargs)
        if pretrained:
            load_pretrained(
                model,
                # the local file's classifier is judged by its shape (_keep_own_classifier), not by the
                # cfg's num_classes, so timm neither drops a matching head nor loads non-strictly
                pretrained_cfg={**cfg, "num_classes": model.num_classes},
                num_classes=model.num_classes,
                in_chans=model_kwargs.get("in_chans", 3),
                filter_fn=_keep_own_classifier(checkpoint_filter, cfg.get("classifier")),
            )
        return moeify(model, placement, config, upcycle=pretrained)

    return build_model_with_cfg(
        make, name, False, pretrained_cfg_overlay=overlay, feature_cfg=dict(feature_cfg), **kwargs
    )


def _keep_own_classifier(
    checkpoint_filter: Callable[[dict, nn.Module], dict] | None, classifier: str | None
) -> Callable[[dict, nn.Module], dict]:
    """The family's checkpoint filter, then: classifier tensors of another shape give way to the model's own."""

    def filter_fn(state_dict: dict, model: nn.Module) -> dict:
        if checkpoint_filter is not None:
            state_dict = checkpoint_filter(state_dict, model)
        own = model.state_dict()
        for key in (f"{classifier}.weight", f"{classifier}.bias") if classifier else ():
            if key in state_dict and key in own and state_dict[key].shape != own[key].shape:
                state_dict[key] = own[key]  # another label set: a fresh classifier, as timm does for num_classes
        return state_dict

    return filter_fn
