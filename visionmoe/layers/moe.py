"""The MoE layer: a drop-in replacement for an MLP on tokens, per-sample vectors or feature maps."""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor, nn

from visionmoe.layers.dispatch import BACKENDS, apply_plan
from visionmoe.layers.experts import Experts
from visionmoe.layers.router_base import is_exporting
from visionmoe.layers.routers import Router, RouterOutput, router_class
from visionmoe.layers.stats import RoutingStats, routing_stats

GROUPINGS = ("sample", "batch")


class _Unset:
    """The type of :data:`UNSET`: one instance, kept by copy, deepcopy and pickle."""

    def __repr__(self) -> str:
        return "<unset>"

    def __reduce__(self) -> str:
        return "UNSET"  # copy and pickle give back the module's one instance


UNSET: Any = _Unset()
"""A setting not given here: the router's, or the model family's, default applies.

``None`` cannot say this, because ``capacity_factor=None`` means dropless routing, in Python, in
YAML (``null``) and in overrides (``model.moe.capacity_factor=null``) alike."""


class MoE(nn.Module):
    """Mixture-of-Experts MLP: a router, E stacked experts, and a sort-based dispatch.

    Args:
        dim: model width D (the channel count for feature maps).
        num_experts: E.
        hidden_dim: hidden width H of each expert.
        router: a name in :data:`visionmoe.ROUTERS` or a :class:`Router` subclass.
        k: experts per token, for token-choice routers.
        capacity_factor: for sparse routers; None = dropless (token choice only).
        eval_capacity_factor: the factor in eval mode; ``"same"`` keeps the training one.
            ``k``, ``capacity_factor`` and ``eval_capacity_factor`` left out (:data:`UNSET`) take the
            router's defaults; None is a value (dropless), never "the default".
        groups: how tokens are grouped for routing (capacity, expert choice and Soft MoE all act
            within a group):
            ``"sample"`` (default) — one group per sample: the N tokens of an image, the H·W
            positions of a feature map, or the single vector of a (B, D) input. No sample's
            routing depends on another sample.
            ``"batch"`` — one group holding every token of the batch. Capacity and expert choice
            then compete across samples, and Soft MoE mixes samples in its slots: the batch-axis
            dispatch that Sun et al. (2026) show fails on per-sample CNN features. Choose it on
            purpose (for example a sparse head whose capacity is shared by the batch).
            an int g — consecutive groups of g tokens of the flattened batch (V-MoE's
            ``group_size``); g must divide B·N, and groups span samples unless g divides N.
        activation, bias: of the experts.
        aux_loss_weights: which aux losses the router adds, by name (see the router's docstring).
        router_options: further router settings by name (``noise_std``, ``batch_priority``,
            ``slots_per_expert``, ...); unknown names are rejected with the valid list.
        backend: how sparse plans run: "auto", "sorted", "grouped", "padded" or "fused" (see
            :mod:`visionmoe.layers.dispatch`); all give the same result.
        deterministic: combine without atomic scatter-adds (bit-identical runs on CUDA).

    Shape:
        (B, N, D) -> (B, N, D); (B, D) -> (B, D); (B, D, H, W) -> (B, D, H, W) with the H·W
        positions as tokens (channels-last inputs stay channels-last).

    After a forward pass, ``aux_loss`` holds the router's weighted auxiliary loss (a scalar
    tensor) and ``last_stats`` its :class:`RoutingStats`; :func:`collect_aux_loss` sums the
    former over a model.

    Example:
        >>> moe = MoE(64, num_experts=8, hidden_dim=128, router="topk", k=2)
        >>> y = moe(torch.randn(4, 16, 64))
        >>> loss = y.square().mean() + moe.aux_loss
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        hidden_dim: int,
        *,
        router: str | type[Router] = "topk",
        k: int = UNSET,
        capacity_factor: float | None = UNSET,
        eval_capacity_factor: float | str | None = UNSET,
        groups: str | int = "sample",
        activation: type[nn.Module] | Callable[[Tensor], Tensor] = nn.GELU,
        bias: bool = True,
        aux_loss_weights: Mapping[str, float] | None = None,
        router_options: Mapping[str, Any] | None = None,
        backend: str = "auto",
        deterministic: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"unknown MoE backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
        if not (isinstance(num_experts, int) and num_experts >= 1):
            raise ValueError(f"num_experts must be an int >= 1, got num_experts={num_experts!r}")
        if not (groups in GROUPINGS or (isinstance(groups, int) and not isinstance(groups, bool) and groups >= 1)):
            raise ValueError(f"groups must be one of {GROUPINGS} or an int >= 1 (tokens per group), got {groups!r}")
        cls = router_class(router)
        options = dict(router_options or {})
        given = {"k": k, "capacity_factor": capacity_factor, "eval_capacity_factor": eval_capacity_factor}
        given = {name: value for name, value in given.items() if value is not UNSET}
        if clash := sorted(set(given) & set(options)):
            raise ValueError(f"{', '.join(clash)} given both as an argument and in router_options; give it once")
        options.update(given)
        if aux_loss_weights is not None:
            options["aux_loss_weights"] = aux_loss_weights
        _check_options(cls, options)
        if cls.per_sample and groups == "batch":
            raise ValueError(f"router {cls.name!r} routes per sample; it cannot use groups='batch'")
        self.dim, self.num_experts, self.hidden_dim, self.groups = dim, num_experts, hidden_dim, groups
        self.backend, self.deterministic = backend, deterministic
        kw = {"device": device, "dtype": dtype}
        self.router = cls(dim, num_experts, **options, **kw)
        self.experts = Experts(num_experts, dim, hidden_dim, activation=activation, bias=bias, **kw)
        self.aux_loss: Tensor | None = None
        self.last_stats: RoutingStats | None = None
        self.last_aux_losses: dict[str, Tensor] = {}

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_experts={self.num_experts}, hidden_dim={self.hidden_dim}, groups={self.groups!r}, "
            f"backend={self.backend!r}"
        )

    def forward(self, x: Tensor) -> Tensor:
        tokens, restore = self.to_tokens(x)  # (B, N, D)
        B, N, D = tokens.shape
        grouped = self.group(tokens)  # (G, S, D)
        fused = self.router.fused_layer(grouped, self.experts, self.backend)  # router and experts in one node
        if fused is not None:
            y, routed = fused
        else:
            routed: RouterOutput = self.router(grouped)
            y = apply_plan(grouped, routed.plan, self.experts, self.backend, self.deterministic)  # (G, S, D)
        if is_exporting():  # an exported program keeps no module state: no aux loss, no stats
            return restore(y.reshape(B, N, D))
        G, S = grouped.shape[:2]
        stats = routing_stats(routed.plan, routed.gates, G, S, routed.entropy_sum, routed.counts)
        # plain attributes, not parameters, buffers or modules: set without nn.Module.__setattr__'s lookups
        self.__dict__.update(aux_loss=routed.aux_loss, last_aux_losses=routed.aux_losses, last_stats=stats)
        return restore(y.reshape(B, N, D))

    def to_tokens(self, x: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
        """View any supported input as (B, N, D) tokens, and the inverse."""
        if x.dim() not in (2, 3, 4):
            raise ValueError(
                f"MoE takes (B, D), (B, N, D) or (B, D, H, W) inputs, got shape {tuple(x.shape)} ({x.dim()}-d)"
            )
        feature_axis = 1 if x.dim() == 4 else -1
        if x.shape[feature_axis] != self.dim:
            raise ValueError(
                f"MoE(dim={self.dim}) got features of size {x.shape[feature_axis]} "
                f"(axis {feature_axis} of shape {tuple(x.shape)})"
            )
        if x.dim() == 2:
            return x[:, None, :], lambda y: y[:, 0, :]
        if x.dim() == 3:
            return x, lambda y: y
        B, C, H, W = x.shape
        tokens = x.permute(0, 2, 3, 1).reshape(B, H * W, C)  # a view when x is channels-last
        return tokens, lambda y: y.reshape(B, H, W, C).permute(0, 3, 1, 2)

    def group(self, tokens: Tensor) -> Tensor:
        """(B, N, D) tokens -> (G, S, D) routing groups, as ``groups`` says."""
        B, N, D = tokens.shape
        if self.groups == "sample":
            return tokens
        if self.groups == "batch":
            return tokens.reshape(1, B * N, D)
        g = self.groups
        if (B * N) % g:
            raise ValueError(f"groups={g} tokens per group must divide the {B * N} tokens of the batch (B={B}, N={N})")
        if self.router.per_sample and N % g:
            raise ValueError(f"router {self.router.name!r} routes per sample: groups={g} must divide N={N}")
        return tokens.reshape(B * N // g, g, D)


ROUTER_SETTINGS = ("k", "capacity_factor", "eval_capacity_factor", "router_options", "aux_loss_weights")
"""The fields of :class:`MoEConfig` that belong to one router: :meth:`MoEConfig.merged` drops a
default's when the update changes the router (a ViT's k = 2 means nothing to expert choice)."""

LAYER_DEFAULTS: dict[str, Any] = {
    "num_experts": 8,
    "router": "topk",
    "groups": "sample",
    "router_options": {},
    "aux_loss_weights": None,
    "backend": "auto",
    "deterministic": False,
}
"""What :meth:`MoEConfig.build` uses for a field left unset; the router settings ``k``,
``capacity_factor`` and ``eval_capacity_factor`` left unset take the router's own defaults."""


@dataclass(frozen=True, repr=False)
class MoEConfig:
    """How to build the MoE layers of a model: everything but the widths, which the model knows.

    A *partial* value: each field is either set or :data:`UNSET` ("not set here"), and only set
    fields count. The single rule for every model: a model family has a default ``MoEConfig`` and
    builds its layers from ``default.merged(moe)`` (:meth:`merged`), where ``moe`` is what the user
    gave: the ``model.moe`` section of a run's config, an ``MoEConfig`` or a dict of its fields.
    Fields mirror :class:`MoE`. ``capacity_factor=None`` is dropless routing, as for :class:`MoE`,
    in Python, YAML and ``model.moe.capacity_factor=null`` alike; leaving it out keeps the default.
    ``backend`` and ``deterministic`` change the layer's speed, never its results
    (``model.moe.backend=padded``).

    Example:
        >>> MoEConfig(num_experts=8, router="topk", k=2).merged({"capacity_factor": None})
        MoEConfig(num_experts=8, router='topk', k=2, capacity_factor=None)
    """

    num_experts: int = UNSET
    router: str = UNSET
    k: int = UNSET
    capacity_factor: float | None = UNSET
    eval_capacity_factor: float | str | None = UNSET
    groups: str | int = UNSET
    router_options: dict[str, Any] = UNSET
    aux_loss_weights: dict[str, float] | None = UNSET
    backend: str = UNSET
    deterministic: bool = UNSET

    def __post_init__(self) -> None:
        if self.backend is not UNSET and self.backend not in BACKENDS:
            raise ValueError(f"unknown MoE backend {self.backend!r}; choose one of: {', '.join(BACKENDS)}")

    def __repr__(self) -> str:
        return f"MoEConfig({', '.join(f'{name}={value!r}' for name, value in self.to_dict().items())})"

    def to_dict(self) -> dict[str, Any]:
        """The set fields, in field order, as plain values (what a run's config.yaml holds)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return {name: copy.deepcopy(_plain_mapping(v)) for name, v in values.items() if v is not UNSET}

    @classmethod
    def coerce(cls, value: MoEConfig | Mapping[str, Any] | None) -> MoEConfig:
        """A config from a config, a dict of its fields (unknown keys rejected), or None (nothing set).

        A legacy ``dropless`` key (configs saved before ``capacity_factor=None`` was the one spelling)
        is read as :meth:`translate` says.
        """
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if not isinstance(value, Mapping):
            raise TypeError(f"moe must be an MoEConfig or a mapping of its fields, got {value!r}")
        values = cls.translate(value)
        names = [f.name for f in fields(cls)]
        if unknown := sorted(set(values) - set(names)):
            raise ValueError(f"unknown MoE config keys {unknown}; valid keys: {names}")
        return cls(**values)

    @staticmethod
    def translate(values: Mapping[str, Any]) -> dict[str, Any]:
        """``values`` in today's spelling: a legacy ``dropless: true`` is ``capacity_factor: None``
        (it overrode any factor), ``dropless: false`` is nothing."""
        values = dict(values)
        if "dropless" not in values:
            return values
        dropless = values.pop("dropless")
        if not isinstance(dropless, bool):
            raise TypeError(
                f"moe.dropless={dropless!r} has the wrong type; expected bool (legacy; use capacity_factor)"
            )
        if dropless:
            values["capacity_factor"] = None
        return values

    def is_set(self, name: str) -> bool:
        """Whether field ``name`` is given here (None counts: ``capacity_factor=None`` is dropless)."""
        return getattr(self, name) is not UNSET

    def merged(self, update: MoEConfig | Mapping[str, Any] | None) -> MoEConfig:
        """This config (a model family's default) with the set fields of ``update`` over it.

        If ``update`` sets a router other than this one's, this config's router settings
        (:data:`ROUTER_SETTINGS`: k, capacity factors, router_options, aux_loss_weights) are dropped
        first, so the new router starts from its own defaults; ``num_experts``, ``groups``,
        ``backend`` and ``deterministic`` are kept.
        """
        update = MoEConfig.coerce(update)
        base = self.to_dict()
        if update.is_set("router") and update.router != base.get("router", LAYER_DEFAULTS["router"]):
            base = {name: value for name, value in base.items() if name not in ROUTER_SETTINGS}
        return MoEConfig(**{**base, **update.to_dict()})

    def build(self, dim: int, hidden_dim: int, *, activation: Any = nn.GELU, bias: bool = True, **kw) -> MoE:
        """An :class:`MoE` of width ``dim`` whose experts are ``hidden_dim`` wide.

        Unset fields take :data:`LAYER_DEFAULTS`, unset router settings the router's defaults.
        """
        given = {**LAYER_DEFAULTS, **self.to_dict()}
        router_args = {
            name: given.pop(name) for name in ("k", "capacity_factor", "eval_capacity_factor") if name in given
        }
        return MoE(
            dim,
            given["num_experts"],
            hidden_dim,
            router=given["router"],
            groups=given["groups"],
            activation=activation,
            bias=bias,
            aux_loss_weights=given["aux_loss_weights"],
            router_options=dict(given["router_options"]),
            backend=given["backend"],
            deterministic=given["deterministic"],
            **router_args,
            **kw,
        )


def _plain_mapping(value: Any) -> Any:
    return dict(value) if isinstance(value, Mapping) else value


def _accepted_options(cls: type[Router]) -> set[str]:
    """Keyword arguments a router class accepts, following ``**kwargs`` up its bases."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(klass.__init__).parameters.values()
        names |= {p.name for p in params if p.kind == p.KEYWORD_ONLY}
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return names - {"device", "dtype"}


def _check_options(cls: type[Router], options: Mapping[str, Any]) -> None:
    unknown = sorted(set(options) - _accepted_options(cls))
    if unknown:
        valid = ", ".join(sorted(_accepted_options(cls)))
        raise ValueError(f"router {cls.name!r} does not take {', '.join(unknown)}; it takes: {valid}")


def moe_layers(model: nn.Module) -> list[tuple[str, MoE]]:
    """Every MoE layer of a model, with its qualified name."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]


def collect_aux_loss(model: nn.Module) -> Tensor:
    """Sum of the weighted aux losses of every MoE layer from its latest forward pass."""
    losses = [m.aux_loss for _, m in moe_layers(model) if m.aux_loss is not None]
    if not losses:
        param = next(model.parameters(), None)
        return torch.zeros((), device=None if param is None else param.device)
    return torch.stack([loss.float() for loss in losses]).sum()


def collect_routing_stats(model: nn.Module) -> dict[str, RoutingStats]:
    """The latest :class:`RoutingStats` of every MoE layer, by layer name."""
    return {name: m.last_stats for name, m in moe_layers(model) if m.last_stats is not None}
