"""Compute accounting of a model with MoE layers: FLOPs, the expert fraction ρ, total and active parameters.

Sun et al. (2026) compare MoE placements by ρ, the fraction of a model's FLOPs that goes through
experts: an MoE layer can only help as much as the compute it controls. :func:`profile` measures
everything from one forward pass with :class:`torch.utils.flop_counter.FlopCounterMode`, so the
numbers are those of the code that actually runs (no per-layer formulas to keep in sync).

Counting conventions are FlopCounterMode's: a multiply-add is 2 FLOPs; matmuls, convolutions and
attention are counted; biases, activations, norms, softmaxes and gathers/scatters are not.

Axes as in :mod:`visionmoe.routing.plan`: G groups, S tokens per group, E experts, C capacity.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from visionmoe.analysis.modes import eval_mode
from visionmoe.layers.experts import Experts
from visionmoe.layers.moe import MoE, moe_layers
from visionmoe.routing.plan import Routing, SoftRouting


def _grouped_mm_flops(a_shape, b_shape, *args: Any, out_shape=None, **kwargs: Any) -> int:
    """FLOPs of ``aten._grouped_mm`` (torch has no formula for it, so it would count as 0).

    2D × 3D (the MoE forward: rows of all experts @ each expert's (K, N)) and 3D × 3D (batched) are
    2·|out|·K with K = a's last dim; 2D × 2D (the weight gradient: (N, M) @ (M, K) split along M into
    G groups, out (G, N, K)) is 2·N·K·M.
    """
    if len(a_shape) == 2 and len(b_shape) == 2:
        return 2 * out_shape[-2] * out_shape[-1] * a_shape[-1]
    return 2 * math.prod(out_shape) * a_shape[-1]


if hasattr(torch.ops.aten, "_grouped_mm") and torch.ops.aten._grouped_mm.default not in flop_counter.flop_registry:
    flop_counter.register_flop_formula(torch.ops.aten._grouped_mm)(_grouped_mm_flops)

_Flops = Callable[[str], float]  # per-sample FLOPs of the module with a given FQN


@dataclass(frozen=True)
class ModuleRow:
    """One row of :meth:`ComputeProfile.table`: a top-level child module or an MoE layer.

    ``flops`` is per sample and includes the module's children; ``share`` = flops / total FLOPs.
    """

    name: str
    kind: str  # "module" (a top-level child), "moe" (an MoE layer), "other" (FLOPs outside every child)
    flops: float
    share: float
    params: int


@dataclass(frozen=True)
class MoELayerProfile:
    """The accounting of one MoE layer; FLOPs are per sample (see :func:`profile` for definitions)."""

    name: str
    router: str
    routed: bool  # False for the dense router: its FLOPs are not routed and stay out of ρ
    num_experts: int
    experts_per_token: float  # average experts that process a token (Soft MoE and dense: E)
    expert_flops: float  # useful
    expert_flops_padded: float
    expert_flops_executed: float  # counted on the kernels that ran (the padded backend includes padding)
    expert_flops_nominal: float  # every offered assignment processed: no capacity drops
    router_flops: float
    dispatch_flops: float  # FLOPs of the layer outside its experts and router (Soft MoE's two bmm's)
    params: int
    expert_params: int
    active_params: float


@dataclass(frozen=True)
class ComputeProfile:
    """What :func:`profile` measured. FLOPs are per sample; parameters are counts.

    Attributes:
        batch_size: samples in the profiled batch (FLOPs were divided by it).
        total_flops: every counted FLOP of the forward pass.
        expert_flops: useful expert FLOPs, what the experts computed.
        expert_flops_padded: expert FLOPs of a capacity-padded implementation.
        expert_flops_nominal: expert FLOPs with no assignment dropped (see :func:`profile`).
        router_flops: FLOPs of the routers.
        dispatch_flops: FLOPs inside MoE layers outside experts and routers (Soft MoE dispatch/combine).
        rho: ρ = expert FLOPs of *routed* layers / total_flops: 0 without MoE layers, and layers
            with the ``dense`` router (a dense FFN in MoE clothing, as in a dense twin) count as dense.
        rho_nominal: ρ with nominal expert FLOPs (in the total too): a property of the architecture,
            not of where the routers sent this batch's tokens.
        total_params: all parameters of the model.
        active_params: parameters used by an average sample (see :func:`profile`).
        layers: one :class:`MoELayerProfile` per MoE layer.
        rows: the per-module table, one :class:`ModuleRow` per top-level child (children with neither
            FLOPs nor parameters left out) and per MoE layer, plus "(other)" for FLOPs of the
            model's own forward outside every child.
    """

    batch_size: int
    total_flops: float
    expert_flops: float
    expert_flops_padded: float
    expert_flops_nominal: float
    router_flops: float
    dispatch_flops: float
    rho: float
    rho_nominal: float
    total_params: int
    active_params: float
    layers: list[MoELayerProfile] = field(default_factory=list)
    rows: list[ModuleRow] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain Python values (JSON-ready)."""
        return asdict(self)

    def table(self) -> str:
        """The per-module table in Markdown, with a total row, to paste into a paper or a README."""
        lines = ["| Module | Kind | FLOPs / sample | Share | Params |", "|---|---|---:|---:|---:|"]
        for row in self.rows:
            lines.append(f"| {row.name} | {row.kind} | {_si(row.flops)} | {100 * row.share:.1f}% | {_si(row.params)} |")
        lines.append(f"| **total** |  | {_si(self.total_flops)} | 100.0% | {_si(self.total_params)} |")
        lines.append("")
        lines.append(
            f"ρ = {self.rho:.3f}, nominal {self.rho_nominal:.3f} (expert FLOPs {_si(self.expert_flops)} useful, "
            f"{_si(self.expert_flops_nominal)} nominal, {_si(self.expert_flops_padded)} padded; router "
            f"{_si(self.router_flops)}); active params {_si(self.active_params)} "
            f"of {_si(self.total_params)}"
        )
        return "\n".join(lines)


def profile_model(model: nn.Module, example_input: Tensor | Sequence[Tensor]) -> ComputeProfile:
    """Count the FLOPs and parameters of ``model`` on one batch, and split them between experts and the rest.

    One forward pass runs in eval mode (training flags are restored afterwards) under
    ``torch.no_grad()``, with attention forced through the math SDPA kernel, whose matmuls
    FlopCounterMode counts (fused kernels may go uncounted). Every FLOP figure is the batch's
    count divided by the batch size (dim 0 of ``example_input``, or of its first tensor when it is
    a sequence of positional inputs). Eval mode matters: routers add no noise and use their eval
    capacity factor. The MoE layers' ``last_stats`` and ``aux_loss`` are those of this forward.

    Definitions, per MoE layer, summed over layers:

    - **useful expert FLOPs**: the work the experts had to do. For sparse plans: the token-expert
      assignments actually processed × the FLOPs of one assignment through one expert (measured
      with FlopCounterMode on ``Experts.forward_batched``), so the figure does not depend on the
      backend that ran it (dropped assignments cost nothing). For Soft MoE (the E·P slots of every
      group) and the dense router (one width-E·H FFN on every token): the FLOPs FlopCounterMode
      counts on the ``experts`` sub-module. Per layer, ``expert_flops_executed`` is always that
      kernel count (the ``padded`` backend's includes its padding; ``grouped_mm`` is counted
      through a formula this module registers, since torch has none).
    - **padded expert FLOPs**: what a capacity-padded implementation (the (G, S, E, C) einsum form)
      executes. For a sparse plan with a capacity: G × E × C slots × the FLOPs of one slot through
      one expert (measured with FlopCounterMode on ``Experts.forward_batched``), empty slots
      included. For dropless sparse routers (whose C is only the largest load), Soft MoE and dense:
      equal to the useful FLOPs.
    - **nominal expert FLOPs**: every offered assignment processed, none dropped: K·S per group for
      token choice, E·C for expert choice (× one assignment's FLOPs); for Soft MoE and dense, the
      useful FLOPs. It depends on the architecture and the routers' k and capacity, not on the weights
      or the batch, which the useful figure does (at initialisation a top-1 router may drop most of
      its tokens). ``rho_nominal`` is ρ computed with it, in the total too; it is the ρ of Sun et
      al.'s compute-leverage argument (the share of FLOPs an MoE layer controls).
    - **router FLOPs**: the FLOPs of the layer's ``router`` sub-module (logits, Sinkhorn, slots).
      The FLOPs of the layer outside its experts and router (Soft MoE's dispatch and combine
      bmm's) are reported as ``dispatch_flops``; they count in the total, not in ρ.
    - **ρ** = useful expert FLOPs / total FLOPs.
    - **active parameters**: all parameters minus, for every MoE layer, the expert parameters an
      average token does not use: ``non-expert params + Σ_layers (expert params / E) × a``, where
      ``a`` = sum(``last_stats.tokens_per_expert``) / ``last_stats.tokens`` from this forward (the
      average experts per token: k for dropless top-k, less when assignments are dropped, E for the
      dense router), except Soft MoE, where every token mixes with every expert's slots and
      ``a`` = E. Router parameters are non-expert parameters, always active. A layer called several
      times is averaged over its calls; a layer not called has ``a`` = 0.

    Args:
        model: any ``nn.Module``; it may hold no MoE layer (then ρ = 0 and expert FLOPs are 0).
        example_input: a batch on the model's device, or a sequence of positional inputs.

    Example:
        >>> p = profile_model(model, torch.randn(8, 3, 32, 32))
        >>> print(p.table())
    """
    inputs = (example_input,) if isinstance(example_input, Tensor) else tuple(example_input)
    if not inputs or not isinstance(inputs[0], Tensor) or inputs[0].dim() == 0:
        raise ValueError(f"example_input must be a batched tensor or a sequence of them, got {type(example_input)}")
    batch = inputs[0].shape[0]
    if batch < 1:
        raise ValueError(f"example_input must hold at least one sample, got batch size {batch}")

    layers = moe_layers(model)
    calls: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in layers}
    handles = []
    for name, moe in layers:
        handles.append(moe.router.register_forward_hook(_router_hook(moe, calls[name])))
        handles.append(moe.register_forward_hook(_stats_hook(calls[name])))

    counter = FlopCounterMode(display=False)
    try:
        with eval_mode(model), torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()

    counts = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    root = type(model).__name__

    def flops(name: str) -> float:  # per sample, of the module with this FQN (children included)
        return counts.get(root if name == "" else f"{root}.{name}", 0) / batch

    total = counts.get("Global", 0) / batch
    moe_profiles = [_layer_profile(name, moe, calls[name], flops, batch) for name, moe in layers]
    total_params = sum(p.numel() for p in model.parameters())
    expert_params = sum(layer.expert_params for layer in moe_profiles)
    expert_active = sum(layer.active_params - (layer.params - layer.expert_params) for layer in moe_profiles)
    expert_flops = sum(layer.expert_flops for layer in moe_profiles)
    nominal = sum(layer.expert_flops_nominal for layer in moe_profiles)
    total_nominal = total - sum(layer.expert_flops_executed for layer in moe_profiles) + nominal
    routed_nominal = sum(layer.expert_flops_nominal for layer in moe_profiles if layer.routed)
    return ComputeProfile(
        batch_size=batch,
        total_flops=total,
        expert_flops=expert_flops,
        expert_flops_padded=sum(layer.expert_flops_padded for layer in moe_profiles),
        expert_flops_nominal=nominal,
        router_flops=sum(layer.router_flops for layer in moe_profiles),
        dispatch_flops=sum(layer.dispatch_flops for layer in moe_profiles),
        rho=sum(layer.expert_flops for layer in moe_profiles if layer.routed) / total if total > 0 else 0.0,
        rho_nominal=routed_nominal / total_nominal if total_nominal > 0 else 0.0,
        total_params=total_params,
        active_params=total_params - expert_params + expert_active,
        layers=moe_profiles,
        rows=_rows(model, layers, flops, total),
    )


def _router_hook(moe: MoE, calls: list[dict[str, Any]]) -> Any:
    """Records, per call, the group shape and plan, and whether the plan pads to a capacity."""

    def hook(router: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        G, S = args[0].shape[:2]
        plan = output.plan
        padded = isinstance(plan, Routing) and router.group_capacity(S) is not None  # a fixed C buffer
        calls.append({"groups": G, "tokens": S, "plan": plan, "padded": padded})

    return hook


def _stats_hook(calls: list[dict[str, Any]]) -> Any:
    def hook(moe: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if calls:
            calls[-1]["stats"] = moe.last_stats

    return hook


def _layer_profile(name: str, moe: MoE, calls: list[dict[str, Any]], flops: _Flops, batch: int) -> MoELayerProfile:
    E = moe.num_experts
    prefix = f"{name}." if name else ""
    layer_flops, router_flops = flops(name), flops(f"{prefix}router")
    executed = flops(f"{prefix}experts")  # what the kernels ran: the padded backend includes padding
    expert_flops = executed
    sparse = bool(calls) and all(isinstance(c["plan"], Routing) and "stats" in c for c in calls)
    nominal = expert_flops
    if sparse:  # useful work, whatever backend ran it: processed assignments × one assignment's FLOPs
        per_slot = _flops_per_slot(moe.experts)
        expert_flops = sum(float(c["stats"].tokens_per_expert.sum()) for c in calls) * per_slot / batch
        nominal = sum(float(c["stats"].assignments) for c in calls) * per_slot / batch
    padded = expert_flops
    if any(call["padded"] for call in calls):
        per_slot = _flops_per_slot(moe.experts)
        padded = 0.0
        for call in calls:
            if call["padded"]:
                padded += call["groups"] * E * call["plan"].capacity * per_slot / batch
            else:  # a dropless call of the same layer: what it processed
                padded += float(call["stats"].tokens_per_expert.sum()) * per_slot / batch
    assigned = sum(float(c["stats"].tokens_per_expert.sum()) for c in calls if "stats" in c)
    tokens = sum(float(c["stats"].tokens) for c in calls if "stats" in c)
    per_token = assigned / tokens if tokens > 0 else 0.0
    if any(isinstance(c["plan"], SoftRouting) for c in calls):
        per_token = float(E)  # every token mixes with every expert's slots
    params = sum(p.numel() for p in moe.parameters())
    expert_params = sum(p.numel() for p in moe.experts.parameters())
    return MoELayerProfile(
        name=name,
        router=moe.router.name,
        routed=moe.router.routed,
        num_experts=E,
        experts_per_token=per_token,
        expert_flops=expert_flops,
        expert_flops_padded=padded,
        expert_flops_executed=executed,
        expert_flops_nominal=nominal,
        router_flops=router_flops,
        dispatch_flops=layer_flops - executed - router_flops,
        params=params,
        expert_params=expert_params,
        active_params=params - expert_params + expert_params / E * per_token,
    )


def _flops_per_slot(experts: Experts) -> float:
    """FLOPs of one token through one expert, as a padded buffer executes it (measured, not derived)."""
    w = experts.w1
    slots = torch.zeros(experts.num_experts, 1, experts.dim, dtype=w.dtype, device=w.device)  # (E, 1, D)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        experts.forward_batched(slots)
    return counter.get_total_flops() / experts.num_experts


def _rows(model: nn.Module, layers: list[tuple[str, MoE]], flops: _Flops, total: float) -> list[ModuleRow]:
    """A row per top-level child (those with FLOPs or parameters), each followed by its MoE layers' rows."""

    def row(name: str, module: nn.Module, kind: str) -> ModuleRow:
        f = flops(name)
        return ModuleRow(name or "(model)", kind, f, f / total if total else 0.0, _count(module))

    rows, covered = [], 0.0
    if any(name == "" for name, _ in layers):  # the model itself is an MoE layer
        return [row("", model, "moe")]
    for child_name, child in model.named_children():
        covered += flops(child_name)
        if flops(child_name) == 0 and _count(child) == 0:
            continue  # Identity, Dropout, pooling: nothing to report
        rows.append(row(child_name, child, "moe" if isinstance(child, MoE) else "module"))
        rows += [row(n, m, "moe") for n, m in layers if n.startswith(f"{child_name}.")]
    if not math.isclose(covered, total, rel_tol=1e-9, abs_tol=1e-9):  # FLOPs of the model's own forward
        rows.append(ModuleRow("(other)", "other", total - covered, (total - covered) / total if total else 0.0, 0))
    return rows


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _si(value: float) -> str:
    """3 significant digits with an SI suffix: 18304 -> '18.3 K'."""
    for threshold, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= threshold:
            return f"{value / threshold:.3g} {suffix}"
    return f"{value:.3g}" if value != int(value) else str(int(value))
