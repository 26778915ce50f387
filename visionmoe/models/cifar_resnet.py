"""CIFAR ResNet-18 with a dense or MoE classifier head, all at matched capacity (Rokah et al. 2026).

The backbone is the usual CIFAR ResNet-18: a 3×3 stride-1 stem conv with 64 channels and no
max-pool, four stages of two BasicBlocks (64, 128, 256, 512 channels; strides 1, 2, 2, 2), and
global average pooling to a 512-d feature. The head is

    feature (B, 512) → FFN or MoE, 512 → 512 hidden in all → 512 → Linear(512, num_classes)

Matched capacity: experts × expert width = 512 = the dense FFN's width, so every head holds the
same ~0.53M FFN parameters (plus a router of 4·512 for the MoE heads).

    name                          head                                      E  width  routing
    resnet18_cifar_dense_head     dense FFN                                 1  512    every token, weight 1
    resnet18_cifar_mixture_head   softmax-gated mixture ("their SoftMoE")   4  128    top-k, k=E, dropless, no noise
    resnet18_cifar_sparse_head    noisy top-k ("SparseMoE")                 4  128    top-2, noise 1/E, dropless
    resnet18_cifar_soft_head      per-sample Soft MoE (Sun et al. 2026)     4  128    soft_per_sample, 1 slot/expert

Rokah et al.'s "SoftMoE" head runs every expert and mixes them with softmax gates; it is not
Puigcerver et al.'s Soft MoE, whose slot-mixing form is the per-sample soft head here.

All heads use ``groups="sample"``: the head sees one 512-d vector per image and routes each as
a group of its own, so no sample's output depends on another sample in the batch (Soft MoE over
the batch axis would mix images in its slots). The routers' balance losses are still taken over
the whole batch (they pool the groups), so they spread the batch over the experts rather than
pushing each sample's gates towards uniform.

Keyword arguments of every entry point: ``num_classes`` (10), ``in_chans`` (3), ``moe`` (an
:class:`MoEConfig` or a dict of its fields, merged over the head's default by
:meth:`MoEConfig.merged`; the expert width stays ``head_width // num_experts``), ``head_width``
(512), ``width`` (64, the first stage's channels), ``drop_rate``, ``zero_init_residual``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from timm.models import generate_default_cfgs
from torch import Tensor, nn

from visionmoe.layers.moe import MoEConfig
from visionmoe.models.cifar_classifier import CNN_FEATURES, CifarClassifier, FFNHead, stage_info
from visionmoe.models.registry import build_model, cifar_cfg, register_model

DENSE_HEAD = MoEConfig(num_experts=1, router="dense")
MIXTURE_HEAD = MoEConfig(num_experts=4, router="topk", k=4, capacity_factor=None, router_options={"noise_std": 0.0})
SPARSE_HEAD = MoEConfig(num_experts=4, router="topk", k=2, capacity_factor=None)  # None: dropless
SOFT_HEAD = MoEConfig(num_experts=4, router="soft_per_sample", router_options={"slots_per_expert": 1})


class BasicBlock(nn.Module):
    """ResNet's two-conv block: conv3×3 → BN → ReLU → conv3×3 → BN, plus the shortcut, → ReLU.

    Shape:
        (B, in_dim, H, W) -> (B, dim, H / stride, W / stride)
    """

    def __init__(self, in_dim: int, dim: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_dim, dim, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(dim)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(dim, dim, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(dim)
        self.act2 = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_dim != dim:
            self.shortcut = nn.Sequential(nn.Conv2d(in_dim, dim, 1, stride=stride, bias=False), nn.BatchNorm2d(dim))

    def forward(self, x: Tensor) -> Tensor:
        h = self.act1(self.bn1(self.conv1(x)))  # (B, dim, H', W')
        h = self.bn2(self.conv2(h))
        return self.act2(h + self.shortcut(x))


class CifarResNet18(FFNHead, CifarClassifier):
    """CIFAR ResNet-18 whose classifier head is an FFN or MoE of total hidden width ``head_width``.

    Args:
        num_classes: classes; 0 for no final Linear (the model returns the head FFN's output).
        in_chans: input channels.
        moe: the head's MoE settings (an :class:`MoEConfig` or a dict of its fields); the default
            is the dense FFN, ``MoEConfig(num_experts=1, router="dense")``. Its ``groups`` should
            stay "sample" (the default) to keep samples independent; see the module docstring.
        head_width: total hidden width of the head; each of the E experts is ``head_width // E``
            wide, so every head has the same capacity.
        width: channels of the first stage (64 in ResNet-18); the stages have width, 2·width,
            4·width, 8·width channels and the feature is 8·width wide. Narrower backbones (16, 32)
            make the Rokah et al. protocol affordable on a CPU; the head keeps its ``head_width``.
        head_act_layer: activation inside the head's FFN / experts.
        drop_rate: dropout before the final Linear.
        zero_init_residual: zero the last BN of every block, so each block starts as the identity
            (Goyal et al. 2017).

    Shape:
        (B, in_chans, H, W) -> (B, num_classes). ``forward_features`` gives the backbone's final
        (B, 512, H/8, W/8) map before pooling; ``forward_head`` pools it to (B, 512), applies the
        head FFN / MoE (B, 512) -> (B, 512), then the Linear; ``pre_logits=True`` stops before it.
        The head's FFN works on the pooled vector, so ``global_pool`` is "avg" only (timm's
        "early pool" models). ``forward_intermediates`` / ``features_only=True`` give the four
        stage maps, at strides 1, 2, 4, 8.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 3,
        *,
        moe: MoEConfig | Mapping[str, Any] | None = DENSE_HEAD,
        head_width: int = 512,
        width: int = 64,
        head_act_layer: type[nn.Module] = nn.ReLU,
        drop_rate: float = 0.0,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        config = MoEConfig.coerce(moe)
        if head_width % config.num_experts:
            raise ValueError(
                f"head_width={head_width} must split evenly over num_experts={config.num_experts} (matched capacity)"
            )
        if width < 1:
            raise ValueError(f"need width >= 1 (channels of the first stage), got width={width}")
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        stages, in_dim = [], width
        for dim, stride in ((width, 1), (2 * width, 2), (4 * width, 2), (8 * width, 2)):
            stages.append(nn.Sequential(BasicBlock(in_dim, dim, stride), BasicBlock(dim, dim)))
            in_dim = dim
        self.stages = nn.Sequential(*stages)
        self.norm = nn.Identity()  # BasicBlocks end in BN → ReLU already
        self.feature_info = stage_info([width * 2**i for i in range(4)], [1, 2, 4, 8])
        # The head FFN is an MoE even when dense (E=1, router "dense"), so all four heads share one code path.
        self.head_ffn = config.build(in_dim, head_width // config.num_experts, activation=head_act_layer)
        self._init_head(in_dim, num_classes, drop_rate)
        self._init_convs()
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)


_RESNET = {"first_conv": "stem.0", "classifier": "fc", "pool_size": (4, 4)}  # 32 px / 8
default_cfgs = generate_default_cfgs(
    {f"resnet18_cifar_{head}_head": cifar_cfg(**_RESNET) for head in ("dense", "mixture", "sparse", "soft")}
)


def _create(name: str, head: MoEConfig, pretrained: bool, kwargs: dict[str, Any]) -> CifarResNet18:
    kwargs = dict(kwargs)
    kwargs["moe"] = head.merged(kwargs.get("moe"))
    features = {**CNN_FEATURES, "out_indices": (0, 1, 2, 3)}
    return build_model(CifarResNet18, name, pretrained, kwargs, feature_cfg=features)


@register_model
def resnet18_cifar_dense_head(pretrained: bool = False, **kwargs: Any) -> CifarResNet18:
    """CIFAR ResNet-18 with a dense FFN head, 512 → 512 → 512 (Rokah et al.'s Dense baseline)."""
    return _create("resnet18_cifar_dense_head", DENSE_HEAD, pretrained, kwargs)


@register_model
def resnet18_cifar_mixture_head(pretrained: bool = False, **kwargs: Any) -> CifarResNet18:
    """CIFAR ResNet-18 with a softmax-gated mixture of 4 experts of width 128, all run (Rokah et al.'s SoftMoE).

    Overriding ``num_experts`` through ``moe`` needs ``k`` set to it as well, to keep every expert running.
    """
    return _create("resnet18_cifar_mixture_head", MIXTURE_HEAD, pretrained, kwargs)


@register_model
def resnet18_cifar_sparse_head(pretrained: bool = False, **kwargs: Any) -> CifarResNet18:
    """CIFAR ResNet-18 with a noisy top-2 head of 4 experts of width 128, dropless (Rokah et al.'s SparseMoE)."""
    return _create("resnet18_cifar_sparse_head", SPARSE_HEAD, pretrained, kwargs)


@register_model
def resnet18_cifar_soft_head(pretrained: bool = False, **kwargs: Any) -> CifarResNet18:
    """CIFAR ResNet-18 with a per-sample Soft MoE head: 4 experts of width 128, one slot each."""
    return _create("resnet18_cifar_soft_head", SOFT_HEAD, pretrained, kwargs)


__all__ = ["DENSE_HEAD", "MIXTURE_HEAD", "SOFT_HEAD", "SPARSE_HEAD", "BasicBlock", "CifarResNet18"]
