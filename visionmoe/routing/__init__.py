"""Pure routing maths: router logits in, routing plans and auxiliary losses out. No parameters."""

from visionmoe.routing.capacity import expert_capacity
from visionmoe.routing.expert_choice import expert_choice
from visionmoe.routing.losses import (
    AUX_LOSSES,
    balance_kl_loss,
    importance_loss,
    load_loss,
    switch_loss,
    z_loss,
)
from visionmoe.routing.plan import (
    DenseRouting,
    Plan,
    Routing,
    SoftRouting,
    positions_in_expert,
    softmax_experts,
    stable_topk,
)
from visionmoe.routing.sinkhorn import sinkhorn
from visionmoe.routing.soft import soft_per_sample_routing, soft_routing
from visionmoe.routing.sparse_ot import sparse_ot_plan, sparse_simplex_projection
from visionmoe.routing.token_choice import token_choice

__all__ = [
    "AUX_LOSSES",
    "DenseRouting",
    "Plan",
    "Routing",
    "SoftRouting",
    "balance_kl_loss",
    "expert_capacity",
    "expert_choice",
    "importance_loss",
    "load_loss",
    "positions_in_expert",
    "sinkhorn",
    "soft_per_sample_routing",
    "soft_routing",
    "softmax_experts",
    "sparse_ot_plan",
    "sparse_simplex_projection",
    "stable_topk",
    "switch_loss",
    "token_choice",
    "z_loss",
]
