"""A fast CIFAR-10 CNN after Keller Jordan's airbench94, dense and with an MoE FFN.

The network is airbench94's: a 2×2 patch-whitening stem conv (3 → 24 channels, no padding, with
bias) and GELU, then three conv groups ``conv3×3 → MaxPool(2) → BN → GELU → conv3×3 → BN → GELU``
of widths 64, 256, 256, a global max pool (airbench's ``MaxPool2d(3)`` over the final 3×3 map) and
a bias-free Linear whose logits are scaled by 1/9. On 32×32 images the maps are 31×31 after the
stem, then 15×15, 7×7 and 3×3 after the three groups. About 236 MFLOPs per image (forward).

The conv groups (airbench's name for its stages; the setting is ``moe_stages``, as in every CNN
here) listed in ``moe_stages`` add a residual pointwise FFN, ``x = x + ffn(x)``, after their
second conv (after its BN and GELU). In the MoE model ``ffn`` is an :class:`~visionmoe.MoE` of E
experts, each ``hidden_ratio · dim`` wide, that routes the H·W positions of each image as one group
of tokens (``groups="sample"``); in the dense twin it is one :class:`ConvFFN` k times as wide, which
does the FFN FLOPs of top-k routing: the twins have the same active FLOPs (to the router's 0.1%).

Where the FFN goes decides ρ, the fraction of the FLOPs that goes through experts (D→2D→D experts,
top-2, every assignment processed (dropless), counted by :func:`visionmoe.analysis.profile.profile_model` on
the default widths)::

    moe_stages   map    tokens / image   expert FLOPs / image   ρ
    0            15×15  225               14.7 M                0.059
    1 (default)  7×7    49                51.4 M                0.179
    2 (last)     3×3    9                 9.4 M                 0.038

The last group sees a 3×3 map: 9 tokens per image over 8 experts (a capacity of 3 slots each at
factor 1.25) and ρ of 4%, too little compute for routing to matter. The middle group's 7×7 map
gives 49 tokens per image and ρ of 18%, so the default is ``moe_stages=1``; ``moe_stages=-1``
puts it after the last group, ``"none"`` gives airbench94's network itself.

    name                 stem                      widths         FFN after group 1 (7×7)        MoE
    cifar_airbench       2×2 whitening conv, 24ch  64, 256, 256   dense, 4·dim (= k · 2·dim)     none
    cifar_airbench_moe   as above                  64, 256, 256   MoE, experts 2·dim             E=8, top-2

Keyword arguments of both entry points: ``num_classes`` (10), ``in_chans`` (3), ``widths``
((64, 256, 256)), ``hidden_ratio`` (2.0, the expert width over dim), ``moe_stages`` (1), ``moe``
(an :class:`MoEConfig` or a dict of its fields, merged over the default by
:meth:`MoEConfig.merged`; the dense twin asks its router how many experts a token uses), ``drop_rate``.

Training (what airbench does beyond the network is the trainer's business): call
``model.init_from_data(images)`` once with ~5000 normalised training images before training, to
set the stem to the data's patch-whitening filters. Seeded alike, ``cifar_airbench`` and
``cifar_airbench_moe`` start from the same weights everywhere but the FFN (the FFNs are built last).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.models import generate_default_cfgs
from torch import Tensor, nn

from visionmoe.layers.moe import MoE, MoEConfig
from visionmoe.models.cifar_classifier import CNN_FEATURES, CifarClassifier
from visionmoe.models.cnn import CNN_MOE_DEFAULT
from visionmoe.models.conv_blocks import ConvFFN, MoEStages, resolve_stages
from visionmoe.models.registry import build_model, cifar_cfg, register_model

BN_MOMENTUM = 0.4
"""BatchNorm running-stat momentum (PyTorch's convention: running = 0.6·running + 0.4·batch).

airbench's value (its 0.6 is the weight of the old running average). A fast schedule (~10 epochs
at a high learning rate) changes the weights a lot per step, so running statistics must follow the
last few batches or eval mode normalises with stale ones; and the statistics of one batch are
already precise (a mean over B·H·W values: 512·9 = 4608 even on the last 3×3 map), so averaging
over only ~2.5 batches adds little noise. For long, slow schedules 0.1 (PyTorch's default) works too.
"""

BN_EPS = 1e-5
"""BatchNorm eps: PyTorch's default. airbench uses 1e-12 (no eps in effect); its inputs have
variance O(1), so 1e-5 changes nothing there, and it bounds 1/sqrt(var + eps) for a channel
whose variance collapses (a dead channel), which 1e-12 would let reach 1e6."""

LOGIT_SCALE = 1 / 9
"""airbench's logit scale: with a bias-free head in default init, logits start near zero (a
near-uniform softmax), and the head's effective learning rate is lowered relative to the body's."""

WHITEN_EPS = 5e-4
"""Added to each patch-covariance eigenvalue before the 1/sqrt: caps the gain of the weakest
directions (airbench's value, on per-channel normalised images)."""

DEFAULT_WIDTHS = (64, 256, 256)


def whitening_filters(images: Tensor, kernel_size: int = 2, eps: float = WHITEN_EPS) -> tuple[Tensor, Tensor]:
    """Patch-whitening conv filters from data: ±eigenvectors / sqrt(eigenvalue + eps) of the patch covariance.

    With d = C·k·k patch dimensions, Σ = V diag(λ) Vᵀ the covariance of every k×k patch of
    ``images`` (no padding, stride 1) and μ their mean, filter i (i < d, by decreasing λ_i) is
    ``w_i = v_i / sqrt(λ_i + eps)`` and filter d + i is ``-w_i``; the bias is ``-w·μ``, so the
    outputs are zero-mean on ``images``. Filters 0..d-1 map patches to coordinates of covariance
    ``diag(λ / (λ + eps))`` ≈ I: whitened patches. The negated copy keeps both signs of each
    direction through the GELU that follows.

    Args:
        images: (B, C, H, W) float images, normalised as the training inputs are.
        kernel_size: k.
        eps: added to the eigenvalues.

    Returns:
        weight (2d, C, k, k) and bias (2d,), float32, on the images' device.
    """
    if not (images.dim() == 4 and images.is_floating_point()):
        raise ValueError(f"need a float (B, C, H, W) batch of images, got shape {tuple(images.shape)}, {images.dtype}")
    C, H, W = images.shape[1:]
    if min(H, W) < kernel_size:
        raise ValueError(f"images of size {H}×{W} have no {kernel_size}×{kernel_size} patches")
    d = C * kernel_size * kernel_size
    total = torch.zeros(d, dtype=torch.float64, device=images.device)  # Σ x
    second = torch.zeros(d, d, dtype=torch.float64, device=images.device)  # Σ x xᵀ
    n = 0
    for chunk in images.split(256):  # unfold copies each pixel k² times: bound the memory
        patches = F.unfold(chunk.double(), kernel_size)  # (b, d, L): d in (c, kh, kw) order, as conv weights
        patches = patches.transpose(1, 2).reshape(-1, d)  # (b·L, d)
        total += patches.sum(0)
        second += patches.T @ patches
        n += patches.shape[0]
    mean = total / n  # (d,)
    cov = second / n - torch.outer(mean, mean)  # (d, d)
    eigenvalues, eigenvectors = torch.linalg.eigh(cov)  # ascending; eigenvectors are the columns
    eigenvalues, eigenvectors = eigenvalues.flip(0).clamp_min(0), eigenvectors.flip(1)  # decreasing λ
    w = eigenvectors.T / (eigenvalues + eps).sqrt()[:, None]  # (d, d): row i = v_i / sqrt(λ_i + eps)
    w = torch.cat([w, -w])  # (2d, d)
    bias = -(w @ mean)  # (2d,)
    return w.reshape(2 * d, C, kernel_size, kernel_size).float(), bias.float()


class WhiteningConv(nn.Conv2d):
    """k×k conv (no padding, with bias) of 2·C·k·k filters that :meth:`init_from_data` sets to patch whitening.

    Until then it has PyTorch's default conv init. After it, the weights stay trainable (airbench
    freezes them, and trains the bias for the first epochs only; we keep it simple: the optimiser
    decides).

    Shape:
        (B, C, H, W) -> (B, 2·C·k·k, H - k + 1, W - k + 1)
    """

    def __init__(
        self,
        in_chans: int = 3,
        kernel_size: int = 2,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        out_chans = 2 * in_chans * kernel_size * kernel_size  # every patch direction, with both signs
        super().__init__(in_chans, out_chans, kernel_size, bias=True, device=device, dtype=dtype)

    @torch.no_grad()
    def init_from_data(self, images: Tensor, eps: float = WHITEN_EPS) -> None:
        """Set the filters to :func:`whitening_filters` of ``images`` (B, C, H, W), e.g. 5000 training images."""
        if images.dim() != 4 or images.shape[1] != self.in_channels:
            raise ValueError(
                f"init_from_data needs (B, {self.in_channels}, H, W) images, got shape {tuple(images.shape)}"
            )
        weight, bias = whitening_filters(images.to(self.weight.device), self.kernel_size[0], eps)
        self.weight.copy_(weight)
        self.bias.copy_(bias)


class ConvGroup(nn.Module):
    """airbench's conv group, with an optional residual pointwise FFN (dense or MoE) at its end.

    ``conv3×3 → MaxPool(2) → BN → GELU → conv3×3 → BN → GELU``, then ``x + mlp(x)`` if the group
    has an FFN. The convs have no bias (BN follows) and pad by 1.

    Shape:
        (B, in_dim, H, W) -> (B, dim, H // 2, W // 2)
    """

    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_dim, dim, 3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = nn.BatchNorm2d(dim, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.act1 = nn.GELU()
        self.conv2 = nn.Conv2d(dim, dim, 3, padding=1, bias=False)
        self.norm2 = nn.BatchNorm2d(dim, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.act2 = nn.GELU()
        self.mlp: nn.Module | None = None  # set by the model, after every other weight

    def reset_parameters(self) -> None:
        """airbench's dirac init: PyTorch's default conv init, then the first min(in, out) filters made identities.

        conv2 (square) starts as the identity map and conv1 passes its inputs through on its first
        channels, so at init every group carries its input forward and the signal reaches the head
        undistorted however deep the stack; the other filters keep the default (random) init.
        """
        for conv in (self.conv1, self.conv2):
            conv.reset_parameters()
            with torch.no_grad():
                nn.init.dirac_(conv.weight[: min(conv.in_channels, conv.out_channels)])

    def forward(self, x: Tensor) -> Tensor:
        x = self.act1(self.norm1(self.pool(self.conv1(x))))  # (B, dim, H/2, W/2)
        x = self.act2(self.norm2(self.conv2(x)))
        return x if self.mlp is None else x + self.mlp(x)  # the FFN's tokens are the H/2·W/2 positions


class CifarAirbench(CifarClassifier):
    """airbench94's CIFAR network with a residual pointwise FFN (MoE or dense) after chosen conv groups.

    Stem :class:`WhiteningConv` (2×2, 24 channels for RGB) → GELU, then one :class:`ConvGroup` per
    width, global max pooling, dropout and a bias-free Linear whose logits are scaled by 1/9.

    Args:
        num_classes: classes; 0 for no classifier (the model returns pooled features, unscaled).
        in_chans: input channels.
        widths: the conv groups' widths.
        hidden_ratio: each expert is ``hidden_ratio · dim`` wide.
        moe_stages: groups that end in an FFN: "all", "none", a group index or a tuple of them.
        moe: the MoE layers' settings (an :class:`MoEConfig` or a dict of its fields).
        dense: the dense twin: each FFN is a :class:`ConvFFN` of width (experts per token of
            ``moe``) · ``hidden_ratio · dim``, the same FLOPs as the MoE's experts.
        drop_rate: dropout before the classifier.

        global_pool: "max", or "" for none (with ``num_classes=0``: the model returns the map).

    Shape:
        (B, in_chans, 32, 32) -> (B, num_classes); ``forward_features`` gives the final
        (B, widths[-1], 3, 3) map (before pooling); ``forward_intermediates`` /
        ``features_only=True`` give each conv group's map (15×15, 7×7, 3×3 for 32×32 inputs).

    Example:
        >>> model = CifarAirbench(10)
        >>> model.init_from_data(train_images[:5000])  # normalised (B, 3, 32, 32) floats
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 3,
        *,
        widths: Sequence[int] = DEFAULT_WIDTHS,
        hidden_ratio: float = 2.0,
        moe_stages: MoEStages = 1,
        moe: MoEConfig | Mapping[str, Any] | None = CNN_MOE_DEFAULT,
        dense: bool = False,
        drop_rate: float = 0.0,
        global_pool: str = "max",
    ) -> None:
        super().__init__()
        if not (isinstance(widths, Sequence) and widths and all(isinstance(w, int) and w >= 1 for w in widths)):
            raise ValueError(f"widths must be a non-empty sequence of ints >= 1 (one per conv group), got {widths!r}")
        if not hidden_ratio > 0:
            raise ValueError(f"hidden_ratio must be > 0, got hidden_ratio={hidden_ratio!r}")
        config = MoEConfig.coerce(moe)
        self.moe_stages = _resolve_groups(moe_stages, len(widths))
        self.dense = dense
        self.stem = WhiteningConv(in_chans)
        self.stem_act = nn.GELU()
        groups, in_dim = [], self.stem.out_channels
        for dim in widths:
            groups.append(ConvGroup(in_dim, dim))
            in_dim = dim
        self.groups = nn.Sequential(*groups)
        for group in self.groups:
            group.reset_parameters()
        self.norm = nn.Identity()  # each group ends in BN → GELU
        # a 32-px image is 31×31 after the 2×2 stem, then 15, 7, 3 after the groups: reductions 2, 4, 8 (floored)
        self.feature_info = [
            {"num_chs": w, "reduction": 2 ** (i + 1), "module": f"groups.{i}"} for i, w in enumerate(widths)
        ]
        self._init_head(in_dim, num_classes, drop_rate, global_pool)
        for i in self.moe_stages:  # last, so that dense and MoE twins seeded alike share every other weight
            dim = widths[i]
            hidden = max(1, round(hidden_ratio * dim))
            if dense:  # the MoE it twins, on the meta device (no memory), tells the active width
                active = _experts_per_token(config.build(dim, hidden, activation=nn.GELU, device="meta"))
                self.groups[i].mlp = ConvFFN(dim, max(1, round(active * hidden)), act_layer=nn.GELU)
            else:
                self.groups[i].mlp = config.build(dim, hidden, activation=nn.GELU)

    @torch.no_grad()
    def init_from_data(self, images: Tensor, eps: float = WHITEN_EPS) -> None:
        """Set the stem to the patch-whitening filters of ``images`` (see :func:`whitening_filters`).

        ``images``: (B, C, H, W) float training images, normalised as the model's inputs (airbench
        uses the first 5000). Call it once, before training; the filters stay trainable.
        """
        self.stem.init_from_data(images, eps)

    default_pool = "max"  # airbench's MaxPool2d(3) over the final 3×3 map, at any input size

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the final bias-free Linear (``num_classes=0``: none, the model returns pooled features)."""
        super().reset_classifier(num_classes, global_pool)
        self.fc = nn.Linear(self.num_features, num_classes, bias=False) if num_classes > 0 else nn.Identity()

    def forward_stem(self, x: Tensor) -> Tensor:
        return self.stem_act(self.stem(x))  # (B, 24, H - 1, W - 1)

    def trunk(self) -> nn.Sequential:
        return self.groups

    def _set_trunk(self, stages: nn.Sequential) -> None:
        self.groups = stages

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return {"stem": r"^stem", "blocks": r"^groups\.(\d+)"}

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.head_drop(self.pool(x))  # (B, C)
        if pre_logits or self.num_classes == 0:
            return x
        return self.fc(x) * LOGIT_SCALE


def _experts_per_token(moe: MoE) -> float:
    """The router's nominal experts per token (its answer needs no group size), or a one-line error."""
    try:
        return moe.router.experts_per_token()
    except ValueError as error:
        raise ValueError(
            f"cannot size a dense twin for router {moe.router.name!r}: {error}; "
            "use visionmoe.analysis.dense_twin(model, example_input=...)"
        ) from None


def _resolve_groups(moe_stages: MoEStages, num_groups: int) -> tuple[int, ...]:
    try:
        return resolve_stages(moe_stages, num_groups)
    except ValueError:
        raise ValueError(
            f"invalid moe_stages={moe_stages!r} for a model of {num_groups} conv groups; choose 'all', 'none', "
            f"or group indices in {-num_groups}..{num_groups - 1} (an int or a tuple of ints)"
        ) from None


_AIRBENCH = {"first_conv": "stem", "classifier": "fc", "pool_size": (3, 3)}
default_cfgs = generate_default_cfgs(
    {name: cifar_cfg(**_AIRBENCH) for name in ("cifar_airbench_moe", "cifar_airbench")}
)


def _create(name: str, pretrained: bool, kwargs: dict[str, Any], **defaults: Any) -> CifarAirbench:
    kwargs = {**defaults, **kwargs}
    kwargs["moe"] = CNN_MOE_DEFAULT.merged(kwargs.get("moe"))
    features = {**CNN_FEATURES, "out_indices": tuple(range(len(kwargs.get("widths", DEFAULT_WIDTHS))))}
    return build_model(CifarAirbench, name, pretrained, kwargs, feature_cfg=features)


@register_model
def cifar_airbench_moe(pretrained: bool = False, **kwargs: Any) -> CifarAirbench:
    """airbench94's CIFAR CNN with an MoE FFN (E=8, top-2, experts 2·dim) after the middle conv group (7×7)."""
    return _create("cifar_airbench_moe", pretrained, kwargs)


@register_model
def cifar_airbench(pretrained: bool = False, **kwargs: Any) -> CifarAirbench:
    """The dense twin of :func:`cifar_airbench_moe`, of equal active FLOPs: a k·2·dim dense FFN instead."""
    return _create("cifar_airbench", pretrained, kwargs, dense=True)


__all__ = [
    "BN_EPS",
    "BN_MOMENTUM",
    "LOGIT_SCALE",
    "CifarAirbench",
    "ConvGroup",
    "WhiteningConv",
    "whitening_filters",
]
