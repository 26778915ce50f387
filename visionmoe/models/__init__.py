"""Models: MoE vision backbones registered with timm, ``moeify`` for existing models, placement."""

from visionmoe.models import airbench, cifar_resnet, cnn, cnn_head, convnext, vit  # noqa: F401  (registers the models with timm)
from visionmoe.models.moeify import MoEMlp, mlp_blocks, moeify
from visionmoe.models.placement import PLACEMENTS, resolve_placement
from visionmoe.models.registry import create_model, list_models, register_model

__all__ = [
    "PLACEMENTS",
    "MoEMlp",
    "create_model",
    "list_models",
    "mlp_blocks",
    "moeify",
    "register_model",
    "resolve_placement",
]
