"""Vision Transformers with MoE MLPs (V-MoE, Riquelme et al. 2021; Videau et al. 2025).

Each model is timm's ``VisionTransformer`` (:class:`VisionTransformerMoE`, whose ``no_weight_decay`` also names
the experts' biases) with the MLPs of the chosen blocks replaced by MoE layers
through :func:`visionmoe.moeify`, so it keeps timm's whole model API. Defaults follow V-MoE:
E = 8 experts, top-k with k = 2, placement "last-2" (blocks 9 and 11 of 12), tokens routed per image.

    name                          input  patch  width  depth  heads  (V-MoE / DeiT size)
    vit_moe_tiny_patch4_32        32     4      192    12     3      Ti, 64 tokens (CIFAR)
    vit_moe_small_patch4_32       32     4      384    12     6      S,  64 tokens (CIFAR)
    vit_moe_small_patch16_224     224    16     384    12     6      V-MoE-S/16 (ImageNet-1K)
    vit_moe_base_patch16_224      224    16     768    12     12     V-MoE-B/16 (ImageNet-1K)

For Tiny-ImageNet pass ``img_size=64`` (S/16 then sees 16 tokens; ``patch_size=8`` gives 64).
Keyword arguments: ``placement``, ``moe`` (an :class:`MoEConfig` or dict, merged over the defaults
by :meth:`MoEConfig.merged`), ``pretrained_file`` (a dense timm ViT checkpoint of the same shape,
upcycled into the MoE: see :func:`visionmoe.models.registry.build_moe_model`) and anything timm's
``VisionTransformer`` takes (``num_classes``, ``drop_path_rate``, ...). Built by timm's ``build_model_with_cfg``, so
``features_only=True`` (block outputs as NCHW maps, timm's getter) and ``forward_intermediates`` work.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.models import generate_default_cfgs
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from visionmoe.layers.experts import expert_bias_names
from visionmoe.layers.moe import MoEConfig
from visionmoe.models.registry import build_moe_model, cifar_cfg, imagenet_cfg, register_model

VIT_MOE_DEFAULT = MoEConfig(num_experts=8, router="topk", k=2)


class VisionTransformerMoE(VisionTransformer):
    """timm's VisionTransformer whose ``no_weight_decay`` also names the experts' biases."""

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        # timm's (pos_embed, cls_token, ...) plus the experts' stacked (E, H) / (E, D) biases, which
        # an optimiser excluding by rank (ndim <= 1) would decay where a dense MLP's biases are not
        return set(super().no_weight_decay()) | expert_bias_names(self)


_VIT = {"first_conv": "patch_embed.proj", "classifier": "head", "pool_size": None, "fixed_input_size": True}
default_cfgs = generate_default_cfgs(
    {
        "vit_moe_tiny_patch4_32": cifar_cfg(**_VIT),
        "vit_moe_small_patch4_32": cifar_cfg(**_VIT),
        "vit_moe_small_patch16_224": imagenet_cfg(**_VIT),
        "vit_moe_base_patch16_224": imagenet_cfg(**_VIT),
    }
)


def _vit_moe(name: str, pretrained: bool, kwargs: dict[str, Any], **arch: Any) -> VisionTransformer:
    # timm's own ViT features: the block outputs through forward_intermediates (the "getter"), last 3 by default
    features = {"out_indices": kwargs.pop("out_indices", 3), "feature_cls": "getter"}
    return build_moe_model(
        VisionTransformerMoE,
        name,
        pretrained,
        kwargs,
        moe_default=VIT_MOE_DEFAULT,
        feature_cfg=features,
        checkpoint_filter=checkpoint_filter_fn,
        **arch,
    )


@register_model
def vit_moe_tiny_patch4_32(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-Ti/4 for 32×32 images (CIFAR) with V-MoE MLPs."""
    arch = {"img_size": 32, "patch_size": 4, "embed_dim": 192, "depth": 12, "num_heads": 3, "num_classes": 10}
    return _vit_moe("vit_moe_tiny_patch4_32", pretrained, kwargs, **arch)


@register_model
def vit_moe_small_patch4_32(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-S/4 for 32×32 images (CIFAR) with V-MoE MLPs."""
    arch = {"img_size": 32, "patch_size": 4, "embed_dim": 384, "depth": 12, "num_heads": 6, "num_classes": 10}
    return _vit_moe("vit_moe_small_patch4_32", pretrained, kwargs, **arch)


@register_model
def vit_moe_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """V-MoE-S/16 (ImageNet-1K; ``img_size=64`` for Tiny-ImageNet)."""
    arch = {"img_size": 224, "patch_size": 16, "embed_dim": 384, "depth": 12, "num_heads": 6}
    return _vit_moe("vit_moe_small_patch16_224", pretrained, kwargs, **arch)


@register_model
def vit_moe_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """V-MoE-B/16 (ImageNet-1K)."""
    arch = {"img_size": 224, "patch_size": 16, "embed_dim": 768, "depth": 12, "num_heads": 12}
    return _vit_moe("vit_moe_base_patch16_224", pretrained, kwargs, **arch)
