"""timm's model API for visionmoe's CIFAR CNNs: classifier, pooling, features and checkpointing.

:class:`CifarClassifier` gives any model made of a stem and a sequence of stages what timm's own
models have (``forward_features`` / ``forward_head``, ``reset_classifier``,
``forward_intermediates`` and ``features_only=True``, gradient checkpointing, ``group_matcher``),
so each backbone (:mod:`~visionmoe.models.cnn`, :mod:`~visionmoe.models.cnn_head`,
:mod:`~visionmoe.models.cifar_resnet`, :mod:`~visionmoe.models.airbench`) only builds its layers.
:class:`FFNHead` adds the FFN or MoE head on the pooled feature of the two head models.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from timm.models._features import feature_take_indices
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from visionmoe.layers.experts import expert_bias_names
from visionmoe.models.conv_blocks import ConvFFN

CNN_FEATURES = {"out_indices": (0, 1, 2), "feature_cls": "getter"}
"""features_only: every stage's map, through ``forward_intermediates``."""


class CifarClassifier(nn.Module):
    """timm's model API over a stem and a sequence of stages: classifier, features, checkpointing.

    Subclasses build ``self.stem``, ``self.stages`` (an ``nn.Sequential``, one entry per feature
    level), ``self.norm`` (the final norm, or ``nn.Identity``), set ``self.feature_info`` (one
    ``dict(num_chs, reduction, module)`` per stage) and call :meth:`_init_head`; the rest of timm's
    API follows: ``forward_features`` / ``forward_head``, ``reset_classifier`` (``global_pool=""``
    returns the unpooled map), ``forward_intermediates`` / ``prune_intermediate_layers`` (what
    ``features_only=True`` uses), ``set_grad_checkpointing`` (per stage) and ``group_matcher``.
    """

    num_classes: int
    num_features: int
    head_hidden_size: int
    feature_info: list[dict[str, Any]]
    default_pool: str = "avg"
    """The global pooling of the head: "avg" (mean over H, W) or "max"."""
    unpooled_ok: bool = True
    """Whether ``global_pool=""`` (no pooling, the map out) is allowed: not where the head has layers after the pool."""

    def _init_head(self, num_features: int, num_classes: int, drop_rate: float, global_pool: str | None = None) -> None:
        self.num_features = self.head_hidden_size = num_features
        self.head_drop = nn.Dropout(drop_rate)
        self.grad_checkpointing = False
        self.reset_classifier(num_classes, global_pool)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the final Linear (``num_classes=0``: none, the model returns pre-logit features).

        ``global_pool``: None keeps the current pooling (or, from none, restores the model's own when a
        classifier comes back); the model's own ("avg" or "max"), or "" for none (the model then returns
        the (B, C, H, W) map, so it needs ``num_classes=0``).
        """
        if not (isinstance(num_classes, int) and not isinstance(num_classes, bool) and num_classes >= 0):
            raise ValueError(f"num_classes must be an int >= 0 (0: no classifier), got num_classes={num_classes!r}")
        if global_pool is None:
            global_pool = getattr(self, "global_pool", self.default_pool)
            if global_pool == "" and num_classes > 0:  # as timm's heads: a classifier needs its pooling back
                global_pool = self.default_pool
        allowed = (self.default_pool, "") if self.unpooled_ok else (self.default_pool,)
        if global_pool not in allowed:
            raise ValueError(f"{type(self).__name__} takes global_pool in {allowed}; got global_pool={global_pool!r}")
        if global_pool == "" and num_classes > 0:
            raise ValueError(f"global_pool='' (no pooling) needs num_classes=0, got num_classes={num_classes}")
        self.num_classes, self.global_pool = num_classes, global_pool
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def no_weight_decay(self) -> set[str]:
        # norms and biases are excluded by rank; the experts' stacked (E, H) / (E, D) biases by name
        return expert_bias_names(self)

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for layer-wise decay, timm's format: the stem, then stage by stage (or block by block)."""
        blocks = r"^stages\.(\d+)" if coarse else [(r"^stages\.(\d+)\.blocks\.(\d+)", None), (r"^stages\.(\d+)", None)]
        return {"stem": r"^stem", "blocks": blocks}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each stage's activations in backward instead of storing them (per-stage checkpoints)."""
        self.grad_checkpointing = enable

    def pool(self, x: Tensor) -> Tensor:
        if self.global_pool == "":
            return x
        if self.global_pool == "max":
            return x.amax(dim=(2, 3))
        return x.mean(dim=(2, 3))  # (B, C, H, W) -> (B, C); no view, so channels-last maps are fine

    def forward_stem(self, x: Tensor) -> Tensor:
        return self.stem(x)

    def trunk(self) -> nn.Sequential:
        """The stages, one per feature level (airbench calls them ``groups``)."""
        return self.stages

    def _set_trunk(self, stages: nn.Sequential) -> None:
        self.stages = stages

    def _stage(self, stage: nn.Module, x: Tensor) -> Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(stage, x, use_reentrant=False)
        return stage(x)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.forward_stem(x)
        for stage in self.trunk():
            x = self._stage(stage, x)
        return self.norm(x)

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """The stage outputs (timm's API): ``indices`` an int takes the last n, a list those, None all.

        ``norm`` applies the final norm to the last stage's map; returns ``(forward_features(x),
        intermediates)``, or the intermediates alone with ``intermediates_only``.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"{type(self).__name__} gives NCHW feature maps only, got output_fmt={output_fmt!r}")
        stages = self.trunk()
        take, max_index = feature_take_indices(len(stages), indices)
        last = len(stages) - 1
        intermediates = []
        x = self.forward_stem(x)
        ran = -1
        for i, stage in enumerate(stages):
            if stop_early and i > max_index:
                break
            x = self._stage(stage, x)
            ran = i
            if i in take:
                intermediates.append(self.norm(x) if norm and i == last else x)
        if intermediates_only:
            return intermediates
        return (self.norm(x) if ran == last else x), intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages after the last of ``indices`` (and the final norm, the head as asked); returns those kept."""
        stages = self.trunk()
        take, max_index = feature_take_indices(len(stages), indices)
        prune_end = max_index < len(stages) - 1
        self._set_trunk(stages[: max_index + 1])
        if prune_norm or prune_end:
            self.norm = nn.Identity()
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or prune_end:
            self._drop_head()
        return take

    def _drop_head(self) -> None:
        self.reset_classifier(0, "")

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.head_drop(self.pool(x))  # (B, C)
        return x if pre_logits else self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def _init_convs(self) -> None:
        """Kaiming-normal (fan-out) spatial and shortcut convs as torchvision's ResNet; FFNs keep theirs."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for m in self.modules():
            if isinstance(m, ConvFFN):
                m.reset_parameters()  # back to the experts' init, so dense and MoE models compare like for like


def stage_info(dims: Sequence[int], reductions: Sequence[int]) -> list[dict[str, Any]]:
    """timm's ``feature_info`` for the stages ``stages.0``, ``stages.1``, ...: channels and reduction of each."""
    pairs = enumerate(zip(dims, reductions, strict=True))
    return [{"num_chs": c, "reduction": r, "module": f"stages.{i}"} for i, (c, r) in pairs]


class FFNHead:
    """A CifarClassifier whose pooled feature goes through ``self.head_ffn`` (an FFN or MoE) before
    the classifier: one token per sample. The subclass sets ``head_ffn`` in its ``__init__``.

    The head works on the pooled vector, so ``global_pool`` is the default pooling only.
    """

    unpooled_ok = False
    head_ffn: nn.Module

    def _drop_head(self) -> None:
        self.head_ffn = nn.Identity()
        self.reset_classifier(0)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.head_ffn(self.pool(x))  # (B, D): one token per sample
        x = self.head_drop(x)
        return x if pre_logits else self.fc(x)


__all__ = ["CNN_FEATURES", "CifarClassifier", "FFNHead", "stage_info"]
