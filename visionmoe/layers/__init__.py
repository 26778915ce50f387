"""nn.Modules: stacked experts, routers, the MoE layer, dispatch paths and routing statistics."""

from visionmoe.layers.dispatch import apply_plan, einsum_moe
from visionmoe.layers.experts import Experts, expert_bias_names
from visionmoe.layers.moe import MoE, MoEConfig, collect_aux_loss, collect_routing_stats, moe_layers
from visionmoe.layers.routers import (
    ROUTERS,
    SAME,
    DenseRouter,
    ExpertChoiceRouter,
    Router,
    RouterOutput,
    SinkhornExpertChoiceRouter,
    SinkhornTopKRouter,
    SoftPerSampleRouter,
    SoftRouter,
    SparseExpertChoiceRouter,
    TopKRouter,
    router_class,
    set_aux_loss_group,
)
from visionmoe.layers.stats import RoutingStats, RoutingStatsAccumulator, routing_stats

__all__ = [
    "ROUTERS",
    "SAME",
    "DenseRouter",
    "ExpertChoiceRouter",
    "Experts",
    "MoE",
    "MoEConfig",
    "Router",
    "RouterOutput",
    "RoutingStats",
    "RoutingStatsAccumulator",
    "SinkhornExpertChoiceRouter",
    "SinkhornTopKRouter",
    "SoftPerSampleRouter",
    "SoftRouter",
    "SparseExpertChoiceRouter",
    "TopKRouter",
    "apply_plan",
    "collect_aux_loss",
    "collect_routing_stats",
    "einsum_moe",
    "expert_bias_names",
    "moe_layers",
    "router_class",
    "routing_stats",
    "set_aux_loss_group",
]
