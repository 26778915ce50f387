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

# Imported eagerly so that `import visionmoe` registers every model with timm's registry
# (timm.create_model("vit_moe_tiny_patch4_32") must work after it); this costs timm's import time.
from visionmoe.models import create_model, list_models, moeify

__version__ = "0.1.0"


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
