"""``moeify``: turn an existing (timm) model into an MoE model by replacing the MLPs of chosen blocks.

A block is any sub-module with an ``mlp`` attribute that is a two-layer MLP: ``fc1`` and ``fc2``
(``nn.Linear``, or 1×1 ``nn.Conv2d`` as in timm's ``conv_mlp`` ConvNeXts) around an ``act``. That
covers timm's ViT / DeiT / BEiT / EVA-style transformers (``blocks.i.mlp``), ConvNeXt
(``stages.s.blocks.b.mlp``), Swin (``layers.s.blocks.b.mlp``) and visionmoe's own CNN backbones.
Blocks are numbered in module order, so "last-2" of a ViT-Ti (12 blocks) is blocks 9 and 11, and
of ConvNeXt-atto (2+2+6+2 = 12 blocks) blocks 9 (stage 2's last) and 11 (stage 3's last).
timm's ResNets (BasicBlock / Bottleneck) have no MLP to replace; moeify says so.

Sparse upcycling (Komatsuzaki et al. 2023): with ``upcycle=True`` every expert starts as a copy of
the dense MLP f it replaces (optionally plus Gaussian noise of ``upcycle_noise`` × the weight's std).
The MoE then computes Σ_e w_e f(x) = (Σ_e w_e) f(x): the dense model's function exactly when every
token's combine weights sum to one and none of its assignments is dropped. Which settings guarantee
it (tests/models/test_upcycle.py checks each, in float64):

    router, settings                                         Σ_e w_e per token       upcycled = dense
    topk, renormalize=True, no drops, any k (k = 1 too)      1                       yes
    sinkhorn_topk, renormalize=True, no drops                1                       yes
    topk with k = E (every expert, the whole softmax)        1                       yes
    topk, renormalize=False, k < E                           < 1                     no
    any top-k with drops (capacity_factor < E / k)           0 for a dropped token   no
    expert_choice and its Sinkhorn / sparse variants         0 .. E                  no
    soft                                                     1, but a slot's input   only with one token
                                                             mixes the group's       per group (S = 1)
    soft_per_sample                                          1, slot inputs scaled   no
    dense                                                    E                       only E = 1

"No drops": ``capacity_factor=None`` (dropless), or a factor of at least E / k, since then
C = ceil(k·S·factor / E) >= S, the most one expert can receive. Router noise (training only) changes
which experts are chosen, not that renormalised weights sum to one. Exactness is to the router's
float32 gates: top-1 renormalises to w / w = 1.0 exactly; top-2's two weights sum to one within
float32 rounding (~1e-7 relative).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from visionmoe.layers.experts import expert_bias_names
from visionmoe.layers.moe import MoE, MoEConfig
from visionmoe.models.placement import Placement, resolve_placement

# Sub-modules that can hold an ``mlp`` but are not blocks of the trunk (timm's MAP pooling head).
_NOT_BLOCKS = ("head", "attn_pool")


class MoEMlp(nn.Module):
    """An :class:`MoE` standing where an MLP stood, taking the MLP's input layout.

    Token inputs (B, N, D), vectors (B, D) and NCHW maps (conv MLPs) go to the MoE as they are;
    NHWC maps (B, H, W, C), what a ConvNeXt block feeds its Linear MLP, are routed as B groups
    of H·W tokens.
    """

    def __init__(self, moe: MoE, channels_last_maps: bool, drop: nn.Module | None = None) -> None:
        super().__init__()
        self.moe = moe
        self.channels_last_maps = channels_last_maps
        self.drop = nn.Identity() if drop is None else drop  # the replaced MLP's output dropout

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 4 and self.channels_last_maps:
            B, H, W, C = x.shape
            return self.drop(self.moe(x.reshape(B, H * W, C)).reshape(B, H, W, C))
        return self.drop(self.moe(x))


def mlp_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The MoE-able blocks of ``model`` in module order: sub-modules whose ``mlp`` is a two-layer MLP."""
    return [(name, module) for name, module, why in _blocks_with_mlps(model) if why is None]


def _blocks_with_mlps(model: nn.Module) -> list[tuple[str, nn.Module, str | None]]:
    """Sub-modules whose ``mlp`` has fc1/act/fc2, each with why it cannot become experts (None: it can)."""
    found = []
    for name, module in model.named_modules():
        if name.split(".")[0] in _NOT_BLOCKS:
            continue
        mlp = getattr(module, "mlp", None)
        if isinstance(mlp, nn.Module) and _is_two_layer_mlp(mlp):
            found.append((name, module, _not_replaceable(mlp)))
    return found


def moeify(
    model: nn.Module,
    placement: Placement = "last-2",
    moe: MoEConfig | Mapping[str, Any] | None = None,
    *,
    hidden_dim: int | None = None,
    upcycle: bool = False,
    upcycle_noise: float = 0.0,
) -> nn.Module:
    """Replace the MLP of the blocks chosen by ``placement`` with MoE layers, in place; returns ``model``.

    Args:
        model: a timm ViT / ConvNeXt / Swin-style model, or any model whose blocks have an ``mlp``
            with ``fc1``/``act``/``fc2``.
        placement: see :mod:`visionmoe.models.placement` ("every-2", "last-2", "tail-2", "all",
            a block index, or a list of them).
        moe: the MoE layers' settings (an :class:`MoEConfig` or a dict of its fields); fields left
            unset take :data:`visionmoe.layers.moe.LAYER_DEFAULTS` (8 experts, top-k) and the
            router's own defaults.
        hidden_dim: each expert's hidden width; default the replaced MLP's (``fc1``'s outputs).
        upcycle: initialise every expert from the replaced MLP's weights (the settings under which the
            MoE then equals the dense model are tabled in the module docstring).
        upcycle_noise: with ``upcycle``, add N(0, (upcycle_noise · std(w))²) to each expert's
            weights independently, so experts can diverge (0 = identical experts).

    Example:
        >>> vit = timm.create_model("vit_small_patch16_224", pretrained=True)      # doctest: +SKIP
        >>> moeify(vit, "last-2", {"num_experts": 8, "k": 2}, upcycle=True)        # doctest: +SKIP
    """
    config = MoEConfig.coerce(moe)
    if upcycle_noise < 0:
        raise ValueError(f"upcycle_noise must be >= 0, got upcycle_noise={upcycle_noise}")
    candidates = _blocks_with_mlps(model)
    blocks = [(name, module) for name, module, why in candidates if why is None]
    if not blocks:
        if candidates:  # MLPs that look like fc1/act/fc2 but are more
            _, module, why = candidates[0]
            raise ValueError(f"moeify cannot replace {type(module.mlp).__name__} ({why}): only fc1 -> act -> fc2 MLPs")
        kinds = sorted({type(m).__name__ for m in model.modules() if m is not model})[:6]
        raise ValueError(
            f"moeify found no block with an MLP (an `mlp` with fc1/act/fc2) in {type(model).__name__} "
            f"(its modules include {', '.join(kinds)}); it supports ViT, ConvNeXt, Swin-style and visionmoe models"
        )
    for index in resolve_placement(placement, len(blocks)):
        _, block = blocks[index]
        block.mlp = _moe_from_mlp(block.mlp, config, hidden_dim, upcycle, upcycle_noise)
    _name_expert_biases(model)
    return model


class NoWeightDecay:
    """The ``no_weight_decay()`` that :func:`moeify` gives a model whose own does not name the experts'
    biases (a plain timm model): its names, plus the biases. A picklable callable with a fixed set, set on
    the instance (the model's class is left alone)."""

    def __init__(self, names: set[str]) -> None:
        self.names = frozenset(names)

    def __call__(self) -> set[str]:
        return set(self.names)

    def __repr__(self) -> str:
        return f"NoWeightDecay({sorted(self.names)})"


def _name_expert_biases(model: nn.Module) -> None:
    """Make ``model.no_weight_decay()`` name the experts' stacked biases, which optimisers that skip decay
    by rank or by a ``.bias`` suffix (timm's ``create_optimizer_v2``) would otherwise decay."""
    own = set(model.no_weight_decay()) if callable(getattr(model, "no_weight_decay", None)) else set()
    biases = expert_bias_names(model)
    if not biases <= own:
        model.no_weight_decay = NoWeightDecay(own | biases)


_MLP_PARTS = {"fc1", "act", "fc2", "norm", "drop", "drop1", "drop2"}
"""What timm's Mlp and ConvMlp hold; an MLP with any other child (a depthwise conv, a second norm, a gate)
computes more than fc1 -> act -> fc2, and experts made from it would silently drop that part."""


def _is_two_layer_mlp(mlp: nn.Module) -> bool:
    fc1, fc2 = getattr(mlp, "fc1", None), getattr(mlp, "fc2", None)
    return _is_pointwise(fc1) and _is_pointwise(fc2) and hasattr(mlp, "act")


def _not_replaceable(mlp: nn.Module) -> str | None:
    """Why an fc1/act/fc2 MLP cannot become experts (None if it can): extra layers, or a gated MLP."""
    extra = sorted({name for name, _ in mlp.named_children()} - _MLP_PARTS)
    if extra:
        return f"extra layers {', '.join(extra)}"
    hidden_out = mlp.fc1.out_features if isinstance(mlp.fc1, nn.Linear) else mlp.fc1.out_channels
    hidden_in = mlp.fc2.in_features if isinstance(mlp.fc2, nn.Linear) else mlp.fc2.in_channels
    if hidden_out != hidden_in:
        return f"fc1 gives {hidden_out} features but fc2 takes {hidden_in}: a gated MLP"
    return None


def _is_pointwise(layer: Any) -> bool:
    if isinstance(layer, nn.Linear):
        return True
    return isinstance(layer, nn.Conv2d) and layer.kernel_size == (1, 1) and layer.stride == (1, 1) and layer.groups == 1


def _weight(layer: nn.Module) -> Tensor:
    """(in, out) weight of a Linear or 1×1 conv, as the experts store it."""
    return layer.weight.detach().reshape(layer.weight.shape[0], -1).T


def _moe_from_mlp(
    mlp: nn.Module, config: MoEConfig, hidden_dim: int | None, upcycle: bool, upcycle_noise: float
) -> MoEMlp:
    norm = getattr(mlp, "norm", None)
    if norm is not None and not isinstance(norm, nn.Identity):
        raise ValueError(f"moeify cannot carry the MLP's hidden norm ({type(norm).__name__}) into the experts")
    w1, w2 = _weight(mlp.fc1), _weight(mlp.fc2)  # (D, H), (H, D)
    dim, dense_hidden = w1.shape
    hidden = dense_hidden if hidden_dim is None else hidden_dim
    if upcycle and hidden != dense_hidden:
        raise ValueError(f"upcycling copies the MLP, so hidden_dim must be its width {dense_hidden}, got {hidden}")
    bias = mlp.fc1.bias is not None
    if bias != (mlp.fc2.bias is not None):
        raise ValueError("moeify needs fc1 and fc2 both with or both without bias (the experts share one bias flag)")
    # timm's Mlp drops after the activation (drop1; ConvMlp's drop) and after fc2 (drop2): the experts
    # drop their hidden units likewise, the layer its output
    activation = copy.deepcopy(mlp.act)
    hidden_drop = getattr(mlp, "drop1", getattr(mlp, "drop", None))
    if _drops(hidden_drop):
        activation = nn.Sequential(activation, copy.deepcopy(hidden_drop))
    out_drop = getattr(mlp, "drop2", None)
    layer = config.build(dim, hidden, activation=activation, bias=bias, device=w1.device, dtype=mlp.fc1.weight.dtype)
    if upcycle:
        experts = layer.experts
        with torch.no_grad():
            pairs = [(experts.w1, w1), (experts.w2, w2)]
            if bias:
                pairs += [(experts.b1, mlp.fc1.bias.detach()), (experts.b2, mlp.fc2.bias.detach())]
            for target, source in pairs:
                target.copy_(source.expand_as(target))
                if upcycle_noise > 0:
                    target.add_(torch.randn_like(target) * upcycle_noise * source.float().std().to(target.dtype))
    return MoEMlp(
        layer,
        channels_last_maps=isinstance(mlp.fc1, nn.Linear),
        drop=copy.deepcopy(out_drop) if _drops(out_drop) else None,
    )


def _drops(module: nn.Module | None) -> bool:
    return isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0
