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

from timm.models import generate_default_cfgs
from torch import nn

from visionmoe.layers.moe import MoEConfig
from visionmoe.models.cifar_classifier import CNN_FEATURES, CifarClassifier, stage_info
from visionmoe.models.conv_blocks import (
    ConvBlock,
    ConvFFN,
    DepthwiseBlock,
    MoEStages,
    Stage,
    check_depths,
    hidden_width,
    resolve_stages,
)
from visionmoe.models.registry import build_model, cifar_cfg, register_model

CNN_MOE_DEFAULT = MoEConfig(num_experts=8, router="topk", k=2)
"""Default MoE of the CNN backbones: 8 experts, noisy top-2 token choice (capacity factor 1.25)."""


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
        check_depths(depths)
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
                blocks.append(ConvBlock(in_dim, dim, hidden_width(hidden_ratio, dim), stride=stride, moe=stage_moe))
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
        check_depths(depths)
        self.moe_stages = resolve_stages(moe_stages, len(depths))
        self.stem = nn.Sequential(nn.Conv2d(in_chans, width, 3, padding=1, bias=False), nn.BatchNorm2d(width))
        stages, in_dim = [], width
        for i, depth in enumerate(depths):
            dim = width * 2**i  # w, 2w, 4w
            downsample = None
            if i > 0:
                downsample = nn.Sequential(nn.BatchNorm2d(in_dim), nn.Conv2d(in_dim, dim, 2, stride=2))
            stage_moe = config if i in self.moe_stages else None
            hidden = hidden_width(hidden_ratio, dim)
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


__all__ = [  # the blocks and the timm API base live in conv_blocks and cifar_classifier; named here too
    "CNN_FEATURES",
    "CNN_MOE_DEFAULT",
    "CifarClassifier",
    "CifarDepthwiseMoE",
    "CifarResNetMoE",
    "ConvBlock",
    "ConvFFN",
    "DepthwiseBlock",
    "MoEStages",
    "Stage",
    "resolve_stages",
    "stage_info",
]
