"""CIFAR CNN backbones with MoE inside the blocks (Sun et al. 2026): spatial positions as tokens.

Every block ends in a pointwise FFN (1×1 convs, dim → hidden → dim). In the stages listed in
``moe_stages`` that FFN is an :class:`~visionmoe.MoE` instead, which takes the (B, C, H, W) map
and routes the H·W positions of each image as one group of tokens (``groups="sample"``), so no
image's routing depends on another image of the batch. Sweeping ``moe_stages`` from "none" to
"all" moves ρ, the fraction of the network's FLOPs that goes through experts, from 0 to most of
the network; ``width`` and ``hidden_ratio`` sweep the FFN size.

Each expert is as wide as the dense FFN it replaces (expert width = hidden = hidden_ratio · dim),
as in V-MoE: a token routed to k experts costs k dense FFNs, and the MoE layer holds E times the
dense FFN's parameters.

    name                   block                              widths (w, 2w, 4w)  hidden  MoE
    cnn_resnet_cifar       3×3 conv-BN-ReLU, ReLU FFN         32, 64, 128         2·dim   none
    cnn_resnet_cifar_moe   as above                           32, 64, 128         2·dim   last stage, E=8, top-2
    cnn_dw_cifar           depthwise 3×3 conv-BN, GELU FFN    48, 96, 192         4·dim   none
    cnn_dw_cifar_moe       as above                           48, 96, 192         4·dim   last stage, E=8, top-2

Keyword arguments of every entry point: ``num_classes`` (10), ``in_chans`` (3), ``width``,
``depths`` ((2, 2, 2)), ``hidden_ratio``, ``moe_stages``, ``moe`` (an :class:`MoEConfig` or a dict of
its fields, merged over the default by :meth:`MoEConfig.merged`), ``drop_rate``; ``kernel_size`` (3)
for the depthwise models.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from timm.models import generate_default_cfgs
from timm.models._features import feature_take_indices
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from visionmoe.layers.moe import MoEConfig
from visionmoe.models.registry import build_model, cifar_cfg, register_model

CNN_MOE_DEFAULT = MoEConfig(num_experts=8, router="topk", k=2)
"""Default MoE of the CNN backbones: 8 experts, noisy top-2 token choice (capacity factor 1.25)."""

MoEStages = str | int | Sequence[int]


def resolve_stages(moe_stages: MoEStages, num_stages: int) -> tuple[int, ...]:
    """Sorted stage indices for ``moe_stages``: "all", "none", a stage index or a sequence of them.

    Negative indices count from the end (-1 is the last stage).
    """
    valid = f"'all', 'none', or stage indices in {-num_stages}..{num_stages - 1} (an int or a tuple of ints)"
    if isinstance(moe_stages, str):
        if moe_stages in ("all", "none"):
            return tuple(range(num_stages)) if moe_stages == "all" else ()
        raise ValueError(f"unknown moe_stages={moe_stages!r} for a model of {num_stages} stages; choose {valid}")
    indices = [moe_stages] if isinstance(moe_stages, int) else moe_stages
    if not isinstance(indices, Sequence) or not all(
        isinstance(i, int) and not isinstance(i, bool) and -num_stages <= i < num_stages for i in indices
    ):
        raise ValueError(f"invalid moe_stages={moe_stages!r} for a model of {num_stages} stages; choose {valid}")
    return tuple(sorted({i % num_stages for i in indices}))


def _check_depths(depths: Sequence[int]) -> None:
    if not (isinstance(depths, Sequence) and depths and all(isinstance(d, int) and d >= 1 for d in depths)):
        raise ValueError(f"depths must be a non-empty sequence of ints >= 1 (blocks per stage), got {depths!r}")


class ConvFFN(nn.Module):
    """Pointwise FFN on feature maps: 1×1 conv dim → hidden, activation, 1×1 conv hidden → dim.

    The dense twin of one MoE expert, with timm's ``fc1``/``act``/``fc2`` names so that
    :func:`visionmoe.moeify` can replace (or upcycle) it. Both convs keep PyTorch's default init,
    uniform in ±1/sqrt(fan_in), the init of every :class:`~visionmoe.Experts` expert: a dense
    model and its MoE twin start from the same weight distribution.

    Args:
        dim: input and output channels.
        hidden_dim: hidden channels.
        act_layer: activation class.
        bias: whether both convs have a bias.

    Shape:
        (B, dim, H, W) -> (B, dim, H, W), any memory format.
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        *,
        act_layer: type[nn.Module] = nn.GELU,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.dim, self.hidden_dim = dim, hidden_dim
        self.fc1 = nn.Conv2d(dim, hidden_dim, 1, bias=bias, **kw)
        self.act = act_layer()
        self.fc2 = nn.Conv2d(hidden_dim, dim, 1, bias=bias, **kw)

    def reset_parameters(self) -> None:
        self.fc1.reset_parameters()
        self.fc2.reset_parameters()

    def extra_repr(self) -> str:
        return f"dim={self.dim}, hidden_dim={self.hidden_dim}"

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))  # (B, C, H, W)


def _ffn(dim: int, hidden_dim: int, act_layer: type[nn.Module], moe: MoEConfig | None) -> nn.Module:
    """The block's FFN: dense, or an MoE whose experts are each as wide as the dense FFN."""
    if moe is None:
        return ConvFFN(dim, hidden_dim, act_layer=act_layer)
    return moe.build(dim, hidden_dim, activation=act_layer)


class ConvBlock(nn.Module):
    """Standard block: 3×3 conv → BN → ReLU → pointwise FFN (or MoE), one residual around both.

    ``out = shortcut(x) + mlp(relu(bn(conv3x3(x))))``. The first block of a stage changes width
    and stride in its 3×3 conv, and its shortcut is a strided 1×1 conv + BN, as in ResNet.

    Shape:
        (B, in_dim, H, W) -> (B, dim, H / stride, W / stride)
    """

    def __init__(
        self,
        in_dim: int,
        dim: int,
        hidden_dim: int,
        *,
        stride: int = 1,
        act_layer: type[nn.Module] = nn.ReLU,
        moe: MoEConfig | None = None,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_dim, dim, 3, stride=stride, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(dim)
        self.act = act_layer()
        self.mlp = _ffn(dim, hidden_dim, act_layer, moe)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_dim != dim:
            self.shortcut = nn.Sequential(nn.Conv2d(in_dim, dim, 1, stride=stride, bias=False), nn.BatchNorm2d(dim))

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.norm(self.conv(x)))  # (B, dim, H', W')
        return self.shortcut(x) + self.mlp(h)


class DepthwiseBlock(nn.Module):
    """Depthwise-separable block (MobileNet / ConvNeXt style, with BatchNorm).

    ``out = x + mlp(bn(dwconv(x)))``: a depthwise k×k conv mixes space, the pointwise FFN (or MoE)
    mixes channels. Width and resolution are constant; stages downsample between blocks.

    Shape:
        (B, dim, H, W) -> (B, dim, H, W)
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        *,
        kernel_size: int = 3,
        act_layer: type[nn.Module] = nn.GELU,
        moe: MoEConfig | None = None,
    ) -> None:
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim, bias=False)
        self.norm = nn.BatchNorm2d(dim)
        self.mlp = _ffn(dim, hidden_dim, act_layer, moe)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.mlp(self.norm(self.conv_dw(x)))  # (B, C, H, W)


class Stage(nn.Module):
    """One resolution of a backbone: an optional downsampling layer, then its blocks."""

    def __init__(self, blocks: Sequence[nn.Module], downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.downsample = downsample if downsample is not None else nn.Identity()
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(self.downsample(x))


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

        ``global_pool``: None keeps the current pooling; the model's own ("avg" or "max"), or ""
        for none (the model then returns the (B, C, H, W) map, so it needs ``num_classes=0``).
        """
        if global_pool is None:
            global_pool = getattr(self, "global_pool", self.default_pool)
        allowed = (self.default_pool, "") if self.unpooled_ok else (self.default_pool,)
        if global_pool not in allowed:
            raise ValueError(f"{type(self).__name__} takes global_pool in {allowed}; got global_pool={global_pool!r}")
        if global_pool == "" and num_classes > 0:
            raise ValueError(f"global_pool='' (no pooling) needs num_classes=0, got num_classes={num_classes}")
        self.num_classes, self.global_pool = num_classes, global_pool
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def no_weight_decay(self) -> set[str]:
        return set()  # norms and biases are excluded by the trainer

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
        for i, stage in enumerate(stages):
            if stop_early and i > max_index:
                break
            x = self._stage(stage, x)
            if i in take:
                intermediates.append(self.norm(x) if norm and i == last else x)
        if intermediates_only:
            return intermediates
        return (self.norm(x) if i == last else x), intermediates

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


class CifarResNetMoE(CifarClassifier):
    """Standard ResNet-style CIFAR backbone with MoE FFNs in chosen stages (Sun et al. 2026).

    Stem 3×3 conv (stride 1) → BN → ReLU, then 3 stages of :class:`ConvBlock` of widths
    w, 2w, 4w and strides 1, 2, 2, then BN → ReLU, average pooling and a Linear classifier.

    Args:
        num_classes: classes; 0 for no classifier (the model returns pooled features).
        in_chans: input channels.
        width: w, the first stage's width.
        depths: blocks per stage.
        hidden_ratio: the FFN hidden width is ``hidden_ratio · dim``; each expert is that wide too.
        moe_stages: stages whose blocks get an MoE FFN: "all", "none", an index or a tuple of them.
        moe: the MoE layers' settings (an :class:`MoEConfig` or a dict of its fields).
        drop_rate: dropout before the classifier.
        global_pool: "avg", or "" for none (with ``num_classes=0``: the model returns the map).

    Shape:
        (B, in_chans, H, W) -> (B, num_classes); ``forward_features`` gives the final
        (B, 4w, H/4, W/4) map (before pooling); the stage maps are (B, w, H, W), (B, 2w, H/2, W/2)
        and (B, 4w, H/4, W/4) (``forward_intermediates``, ``features_only=True``).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 3,
        *,
        width: int = 32,
        depths: Sequence[int] = (2, 2, 2),
        hidden_ratio: float = 2.0,
        moe_stages: MoEStages = -1,
        moe: MoEConfig | Mapping[str, Any] | None = CNN_MOE_DEFAULT,
        drop_rate: float = 0.0,
        global_pool: str = "avg",
    ) -> None:
        super().__init__()
        config = MoEConfig.coerce(moe)
        _check_depths(depths)
        self.moe_stages = resolve_stages(moe_stages, len(depths))
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        stages, in_dim = [], width
        for i, depth in enumerate(depths):
            dim = width * 2**i  # w, 2w, 4w
            blocks = []
            for b in range(depth):
                stride = 2 if i > 0 and b == 0 else 1
                stage_moe = config if i in self.moe_stages else None
                blocks.append(ConvBlock(in_dim, dim, int(hidden_ratio * dim), stride=stride, moe=stage_moe))
                in_dim = dim
            stages.append(Stage(blocks))
        self.stages = nn.Sequential(*stages)
        self.norm = nn.Sequential(nn.BatchNorm2d(in_dim), nn.ReLU())  # the residual stream is unnormalised
        self.feature_info = stage_info([width * 2**i for i in range(len(depths))], [2**i for i in range(len(depths))])
        self._init_head(in_dim, num_classes, drop_rate, global_pool)
        self._init_convs()


class CifarDepthwiseMoE(CifarClassifier):
    """Depthwise-separable CIFAR backbone with MoE FFNs in chosen stages (Sun et al. 2026).

    Stem 3×3 conv (stride 1) → BN, then 3 stages of :class:`DepthwiseBlock` of widths w, 2w, 4w;
    between stages BN → 2×2 stride-2 conv (ConvNeXt's downsampling, with BatchNorm), then a final
    BN, average pooling and a Linear classifier.

    Args:
        num_classes, in_chans, width, depths, moe_stages, moe, drop_rate, global_pool: as :class:`CifarResNetMoE`.
        hidden_ratio: the FFN hidden width is ``hidden_ratio · dim``; each expert is that wide too.
        kernel_size: of the depthwise convs (3, or 7 as ConvNeXt).

    Shape:
        (B, in_chans, H, W) -> (B, num_classes); ``forward_features`` gives the final
        (B, 4w, H/4, W/4) map (before pooling).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 3,
        *,
        width: int = 48,
        depths: Sequence[int] = (2, 2, 2),
        hidden_ratio: float = 4.0,
        kernel_size: int = 3,
        moe_stages: MoEStages = -1,
        moe: MoEConfig | Mapping[str, Any] | None = CNN_MOE_DEFAULT,
        drop_rate: float = 0.0,
        global_pool: str = "avg",
    ) -> None:
        super().__init__()
        if not (isinstance(kernel_size, int) and kernel_size >= 1 and kernel_size % 2 == 1):
            raise ValueError(f"kernel_size must be an odd int >= 1 (padding keeps the size), got {kernel_size!r}")
        config = MoEConfig.coerce(moe)
        _check_depths(depths)
        self.moe_stages = resolve_stages(moe_stages, len(depths))
        self.stem = nn.Sequential(nn.Conv2d(in_chans, width, 3, padding=1, bias=False), nn.BatchNorm2d(width))
        stages, in_dim = [], width
        for i, depth in enumerate(depths):
            dim = width * 2**i  # w, 2w, 4w
            downsample = None
            if i > 0:
                downsample = nn.Sequential(nn.BatchNorm2d(in_dim), nn.Conv2d(in_dim, dim, 2, stride=2))
            stage_moe = config if i in self.moe_stages else None
            hidden = int(hidden_ratio * dim)
            blocks = [DepthwiseBlock(dim, hidden, kernel_size=kernel_size, moe=stage_moe) for _ in range(depth)]
            stages.append(Stage(blocks, downsample))
            in_dim = dim
        self.stages = nn.Sequential(*stages)
        self.norm = nn.BatchNorm2d(in_dim)
        self.feature_info = stage_info([width * 2**i for i in range(len(depths))], [2**i for i in range(len(depths))])
        self._init_head(in_dim, num_classes, drop_rate, global_pool)
        self._init_convs()


_CNN = {"first_conv": "stem.0", "classifier": "fc", "pool_size": (8, 8)}  # 32 px / 4
default_cfgs = generate_default_cfgs(
    {f"cnn_{kind}_cifar{moe}": cifar_cfg(**_CNN) for kind in ("resnet", "dw") for moe in ("_moe", "")}
)
CNN_FEATURES = {"out_indices": (0, 1, 2), "feature_cls": "getter"}
"""features_only: every stage's map, through ``forward_intermediates``."""


def _create(name: str, cls: type[CifarClassifier], pretrained: bool, kwargs: dict[str, Any], **defaults: Any):
    kwargs = {**defaults, **kwargs}
    kwargs["moe"] = CNN_MOE_DEFAULT.merged(kwargs.get("moe"))
    features = {**CNN_FEATURES, "out_indices": tuple(range(len(kwargs.get("depths", (2, 2, 2)))))}
    return build_model(cls, name, pretrained, kwargs, feature_cfg=features)


@register_model
def cnn_resnet_cifar_moe(pretrained: bool = False, **kwargs: Any) -> CifarResNetMoE:
    """Standard CIFAR CNN (w=32, 2·dim FFNs) with MoE FFNs in the last stage: E=8, top-2."""
    return _create("cnn_resnet_cifar_moe", CifarResNetMoE, pretrained, kwargs)


@register_model
def cnn_resnet_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNetMoE:
    """The dense twin of :func:`cnn_resnet_cifar_moe` (``moe_stages="none"``)."""
    return _create("cnn_resnet_cifar", CifarResNetMoE, pretrained, kwargs, moe_stages="none")


@register_model
def cnn_dw_cifar_moe(pretrained: bool = False, **kwargs: Any) -> CifarDepthwiseMoE:
    """Depthwise-separable CIFAR CNN (w=48, 4·dim GELU FFNs) with MoE FFNs in the last stage: E=8, top-2."""
    return _create("cnn_dw_cifar_moe", CifarDepthwiseMoE, pretrained, kwargs)


@register_model
def cnn_dw_cifar(pretrained: bool = False, **kwargs: Any) -> CifarDepthwiseMoE:
    """The dense twin of :func:`cnn_dw_cifar_moe` (``moe_stages="none"``)."""
    return _create("cnn_dw_cifar", CifarDepthwiseMoE, pretrained, kwargs, moe_stages="none")


__all__ = [
    "CNN_MOE_DEFAULT",
    "CifarClassifier",
    "CifarDepthwiseMoE",
    "CifarResNetMoE",
    "ConvBlock",
    "ConvFFN",
    "DepthwiseBlock",
    "Stage",
    "resolve_stages",
    "stage_info",
]
