"""ConvNeXt with MoE MLPs (Videau et al. 2025).

timm's ``ConvNeXt`` with the MLPs of the chosen blocks replaced through :func:`visionmoe.moeify`;
each MoE routes the H·W positions of one image as its tokens. Defaults: E = 8, top-k with k = 2,
placement "last-2" over the flat list of blocks (ConvNeXt-atto, 2+2+6+2 blocks: blocks 9 and 11,
the last of stages 2 and 3; "tail-2" puts both in stage 3).

    name                 depths          dims                  (timm's ConvNeXt sizes)
    convnext_moe_atto    2, 2, 6, 2      40, 80, 160, 320
    convnext_moe_femto   2, 2, 6, 2      48, 96, 192, 384
    convnext_moe_pico    2, 2, 6, 2      64, 128, 256, 512
    convnext_moe_nano    2, 2, 8, 2      80, 160, 320, 640
    convnext_moe_tiny    3, 3, 9, 3      96, 192, 384, 768

The atto..nano sizes use 1×1-conv MLPs (``conv_mlp=True``) as timm does; tiny uses Linear MLPs
on channels-last maps. For 32×32 or 64×64 inputs pass ``patch_size=1`` or ``2`` (the stem's
stride), so the last stage still sees a few positions. ``pretrained_file`` takes a dense timm
ConvNeXt checkpoint of the same shape and upcycles it (see
:func:`visionmoe.models.registry.build_moe_model`); ``features_only=True`` gives the four stage maps.
"""

from __future__ import annotations

from typing import Any

from timm.models import generate_default_cfgs
from timm.models.convnext import ConvNeXt, checkpoint_filter_fn

from visionmoe.layers.experts import expert_bias_names
from visionmoe.layers.moe import MoEConfig
from visionmoe.models.registry import build_moe_model, imagenet_cfg, register_model

CONVNEXT_MOE_DEFAULT = MoEConfig(num_experts=8, router="topk", k=2)


class ConvNeXtMoE(ConvNeXt):
    """timm's ConvNeXt plus the one piece of timm's model API it lacks, ``no_weight_decay`` (the experts' biases)."""

    def no_weight_decay(self) -> set[str]:
        # Beyond norms and biases (which the optimiser excludes by their rank), the experts' biases:
        # stacked (E, H) / (E, D), so a rank rule misses them. The routers' weights are matrices and
        # are decayed like any Linear, as in V-MoE.
        return expert_bias_names(self)


_CONVNEXT = {"first_conv": "stem.0", "classifier": "head.fc", "pool_size": (7, 7)}
default_cfgs = generate_default_cfgs(
    {f"convnext_moe_{size}": imagenet_cfg(**_CONVNEXT) for size in ("atto", "femto", "pico", "nano", "tiny")}
)


def _convnext_moe(name: str, pretrained: bool, kwargs: dict[str, Any], **arch: Any) -> ConvNeXt:
    # timm's own ConvNeXt features: the four stage outputs, walked as a flattened module list
    features = {"out_indices": (0, 1, 2, 3), "flatten_sequential": True}
    return build_moe_model(
        ConvNeXtMoE,
        name,
        pretrained,
        kwargs,
        moe_default=CONVNEXT_MOE_DEFAULT,
        feature_cfg=features,
        checkpoint_filter=checkpoint_filter_fn,
        **arch,
    )


@register_model
def convnext_moe_atto(pretrained: bool = False, **kwargs: Any) -> ConvNeXt:
    arch = {"depths": (2, 2, 6, 2), "dims": (40, 80, 160, 320), "conv_mlp": True}
    return _convnext_moe("convnext_moe_atto", pretrained, kwargs, **arch)


@register_model
def convnext_moe_femto(pretrained: bool = False, **kwargs: Any) -> ConvNeXt:
    arch = {"depths": (2, 2, 6, 2), "dims": (48, 96, 192, 384), "conv_mlp": True}
    return _convnext_moe("convnext_moe_femto", pretrained, kwargs, **arch)


@register_model
def convnext_moe_pico(pretrained: bool = False, **kwargs: Any) -> ConvNeXt:
    arch = {"depths": (2, 2, 6, 2), "dims": (64, 128, 256, 512), "conv_mlp": True}
    return _convnext_moe("convnext_moe_pico", pretrained, kwargs, **arch)


@register_model
def convnext_moe_nano(pretrained: bool = False, **kwargs: Any) -> ConvNeXt:
    arch = {"depths": (2, 2, 8, 2), "dims": (80, 160, 320, 640), "conv_mlp": True}
    return _convnext_moe("convnext_moe_nano", pretrained, kwargs, **arch)


@register_model
def convnext_moe_tiny(pretrained: bool = False, **kwargs: Any) -> ConvNeXt:
    arch = {"depths": (3, 3, 9, 3), "dims": (96, 192, 384, 768)}
    return _convnext_moe("convnext_moe_tiny", pretrained, kwargs, **arch)
