"""The blocks of visionmoe's CIFAR CNNs: a pointwise FFN that an MoE can replace, and the blocks around it.

Every block ends in a pointwise FFN (1×1 convs, dim → hidden → dim) that is either a dense
:class:`ConvFFN` or an :class:`~visionmoe.MoE` whose experts are each as wide as it; which stages
get an MoE is the models' ``moe_stages`` setting (:func:`resolve_stages`). The models built from
these blocks are in :mod:`visionmoe.models.cnn`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from visionmoe.layers.moe import MoEConfig

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


def check_depths(depths: Sequence[int]) -> None:
    if not (isinstance(depths, Sequence) and depths and all(isinstance(d, int) and d >= 1 for d in depths)):
        raise ValueError(f"depths must be a non-empty sequence of ints >= 1 (blocks per stage), got {depths!r}")


def hidden_width(hidden_ratio: float, dim: int) -> int:
    """The FFN (and expert) width ``int(hidden_ratio · dim)`` of a stage of width ``dim``; at least 1."""
    hidden = int(hidden_ratio * dim) if isinstance(hidden_ratio, (int, float)) and hidden_ratio > 0 else 0
    if hidden < 1:
        raise ValueError(
            f"hidden_ratio must be a number > 0 giving each FFN at least one hidden unit, got "
            f"hidden_ratio={hidden_ratio!r} (at width {dim}: int(hidden_ratio · {dim}) must be >= 1)"
        )
    return hidden


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


def conv_ffn(dim: int, hidden_dim: int, act_layer: type[nn.Module], moe: MoEConfig | None) -> nn.Module:
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
        self.mlp = conv_ffn(dim, hidden_dim, act_layer, moe)
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
        self.mlp = conv_ffn(dim, hidden_dim, act_layer, moe)

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


__all__ = ["ConvBlock", "ConvFFN", "DepthwiseBlock", "MoEStages", "Stage", "check_depths", "conv_ffn", "resolve_stages"]
