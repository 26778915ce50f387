"""The standard CIFAR CNN with an FFN or MoE on its pooled feature: one token per sample (Sun et al. 2026).

Sun et al.'s per-sample setting: the MoE sees one D-dimensional vector per image, as a classifier
head does, instead of the H·W positions of a feature map. There, the original Soft MoE's dispatch
softmax runs over the samples of the batch (``groups="batch"``: every slot is a mixture of the
batch's images), while the per-sample Soft MoE (``soft_per_sample``) normalises over each sample's
own slots. The backbone is :class:`~visionmoe.models.cnn.CifarResNetMoE` with every block dense:

    image → stem, 3 stages of dense ConvBlocks (w, 2w, 4w) → BN-ReLU → mean pool → (B, D = 4w)
          → head: FFN or MoE, D → hidden → D (no residual, as the CIFAR ResNet-18 heads)
          → dropout → Linear(D, num_classes)

The head is built after everything else, so under one seed every arm of a study (dense, Soft MoE
over the batch, per-sample Soft MoE, top-2) starts from the same backbone and classifier weights:
only the head's own parameters differ. ``head_hidden`` is the width of one expert (the dense head's
width with the default ``moe``, a dense FFN: ``MoEConfig(num_experts=1, router="dense")``); to
compare heads at equal active FLOPs, choose it per router (see ``visionmoe.studies.presets``,
``soft``).

    name                    head
    cnn_resnet_cifar_head   dense FFN of width head_hidden (default 128); any MoE through ``moe``
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from timm.models import generate_default_cfgs
from torch import nn

from visionmoe.layers.moe import MoEConfig
from visionmoe.models.cifar_classifier import CNN_FEATURES, FFNHead
from visionmoe.models.cnn import CifarResNetMoE
from visionmoe.models.registry import build_model, cifar_cfg, register_model

DENSE_FFN_HEAD = MoEConfig(num_experts=1, router="dense")
"""The default head: one dense FFN (an MoE of one expert with the dense router, as the ResNet-18 heads)."""


class CifarCNNHead(FFNHead, CifarResNetMoE):
    """Standard CIFAR CNN (dense blocks) whose pooled feature goes through an FFN or MoE head.

    Args:
        num_classes, in_chans, width, depths, hidden_ratio, drop_rate: as
            :class:`~visionmoe.models.cnn.CifarResNetMoE` (whose blocks are all dense here).
        head_hidden: the hidden width of the head's FFN, or of each of its experts.
        moe: the head's settings (an :class:`MoEConfig` or a dict of its fields); ``groups``
            "sample" (the default) routes each image's vector alone, "batch" routes the batch's
            vectors as one group.
        head_act_layer: activation inside the head.

    Shape:
        (B, in_chans, H, W) -> (B, num_classes); the head maps (B, 4w) -> (B, 4w), one token per
        sample; ``forward_head(x, pre_logits=True)`` returns its output.

    The head works on the pooled vector, so ``global_pool`` is "avg" only (as the ResNet-18 heads).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 3,
        *,
        width: int = 16,
        depths: Sequence[int] = (2, 2, 2),
        hidden_ratio: float = 2.0,
        head_hidden: int = 128,
        moe: MoEConfig | Mapping[str, Any] | None = DENSE_FFN_HEAD,
        head_act_layer: type[nn.Module] = nn.ReLU,
        drop_rate: float = 0.0,
        global_pool: str = "avg",
    ) -> None:
        if not (isinstance(head_hidden, int) and head_hidden >= 1):
            raise ValueError(f"head_hidden must be an int >= 1 (hidden units per expert), got {head_hidden!r}")
        super().__init__(
            num_classes,
            in_chans,
            width=width,
            depths=depths,
            hidden_ratio=hidden_ratio,
            moe_stages="none",
            drop_rate=drop_rate,
            global_pool=global_pool,
        )
        # Built last, after the backbone's and the classifier's init: every head starts from the same rest.
        self.head_ffn = MoEConfig.coerce(moe).build(self.num_features, head_hidden, activation=head_act_layer)


default_cfgs = generate_default_cfgs(
    {"cnn_resnet_cifar_head": cifar_cfg(first_conv="stem.0", classifier="fc", pool_size=(8, 8))}
)


@register_model
def cnn_resnet_cifar_head(pretrained: bool = False, **kwargs: Any) -> CifarCNNHead:
    """Standard CIFAR CNN (w=16, dense blocks) with an FFN head on the pooled feature; MoE heads via ``moe``."""
    kwargs["moe"] = DENSE_FFN_HEAD.merged(kwargs.get("moe"))
    features = {**CNN_FEATURES, "out_indices": tuple(range(len(kwargs.get("depths", (2, 2, 2)))))}
    return build_model(CifarCNNHead, "cnn_resnet_cifar_head", pretrained, kwargs, feature_cfg=features)


__all__ = ["DENSE_FFN_HEAD", "CifarCNNHead"]
