"""Training: typed configs and presets, the loop, checkpoints, metrics and logging."""

from visionmoe.train.checkpoint import load_checkpoint
from visionmoe.train.config import (
    Config,
    DataConfig,
    EvalConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    apply_overrides,
    load_config,
)
from visionmoe.train.evaluation import evaluate
from visionmoe.train.metrics import ClassificationMeter
from visionmoe.train.runs import evaluate_checkpoint
from visionmoe.train.trainer import Trainer

__all__ = [
    "ClassificationMeter",
    "Config",
    "DataConfig",
    "EvalConfig",
    "ModelConfig",
    "OptimConfig",
    "TrainConfig",
    "Trainer",
    "apply_overrides",
    "evaluate",
    "evaluate_checkpoint",
    "load_checkpoint",
    "load_config",
]
