"""visionmoe: Mixture-of-Experts for image classification.

>>> import torch, visionmoe
>>> moe = visionmoe.MoE(64, num_experts=8, hidden_dim=128, router="expert_choice")
>>> y = moe(torch.randn(2, 64, 8, 8))         # feature map: the 8x8 positions are the tokens
>>> aux = visionmoe.collect_aux_loss(moe)     # add to the task loss
"""

from visionmoe.layers import (
    ROUTERS,
    Experts,
    MoE,
    MoEConfig,
    Router,
    RoutingStats,
    RoutingStatsAccumulator,
    collect_aux_loss,
    collect_routing_stats,
    moe_layers,
)

__version__ = "0.1.0"

_LAZY = {"create_model", "list_models", "moeify"}  # from visionmoe.models, which imports timm (~2 s)


def __getattr__(name: str):
    if name in _LAZY:
        import visionmoe.models

        return getattr(visionmoe.models, name)
    raise AttributeError(f"module 'visionmoe' has no attribute {name!r}")


__all__ = [
    "ROUTERS",
    "Experts",
    "MoE",
    "MoEConfig",
    "Router",
    "RoutingStats",
    "RoutingStatsAccumulator",
    "__version__",
    "collect_aux_loss",
    "collect_routing_stats",
    "create_model",
    "list_models",
    "moe_layers",
    "moeify",
]
