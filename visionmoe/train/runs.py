"""Saved runs: a trained model back from its checkpoint, checked against the data it is evaluated on.

Used by ``visionmoe eval`` and the analyses of finished runs. The model is rebuilt from the config the
checkpoint stores (nanoGPT's habit), so a checkpoint alone, with its data, is a complete run.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from visionmoe.train.build import build_model
from visionmoe.train.checkpoint import check_model_matches, load_checkpoint
from visionmoe.train.config import Config, parse_device
from visionmoe.train.data import Splits, class_difference, eval_loader, load_splits
from visionmoe.train.evaluation import evaluate

log = logging.getLogger(__name__)


def check_classes(state: dict[str, Any], splits: Splits, checkpoint: str | Path, data: Any) -> None:
    """Refuse data whose classes are not those the checkpoint was trained on (its labels would be permuted).

    A checkpoint written before class names were recorded (no ``classes`` entry) cannot be checked: it
    loads, with a warning that the data's own class order is taken on trust.
    """
    where = data.data_dir or data.dataset
    saved = state.get("classes")
    if saved is None:
        log.warning(
            "%s records no class names (written before they were): cannot check that %s has the classes "
            "it was trained on; its labels are taken in the data's own order",
            checkpoint,
            where,
        )
        return
    found = list(splits.train.classes)
    if list(saved) != found:
        raise ValueError(
            f"{where} does not have the classes {checkpoint} was trained on ({class_difference(list(saved), found)}); "
            "its labels would not mean what the model learnt"
        )


def load_run(
    checkpoint: str | Path, *, data_dir: str | None = None, device: str = "auto"
) -> tuple[Config, nn.Module, Splits, dict[str, Any]]:
    """A trained run from its checkpoint: (config, model with the weights, data splits, checkpoint state).

    The model is rebuilt from the config stored in the checkpoint and put in eval mode on ``device``
    ("auto": CUDA if available); ``data_dir`` replaces the stored data root (if the data moved).
    """
    dev = parse_device(device, "device")  # a bad or absent device fails before anything is read
    state = load_checkpoint(checkpoint)
    config = Config.from_dict(state["config"], source=str(checkpoint))
    if data_dir is not None:
        config.data.data_dir = data_dir
    config.validate(saved=True)  # the run's own config: rebuilt as it was, even if a new run would be refused
    splits = load_splits(config.data)
    check_classes(state, splits, checkpoint, config.data)
    example = splits.first_batch(2)
    model = build_model(config.model, splits.num_classes, example)
    check_model_matches(state["model"], model, str(checkpoint))
    model.load_state_dict(state["model"])
    memory = torch.channels_last if config.train.channels_last else torch.contiguous_format
    model.to(dev, memory_format=memory).eval()
    return config, model, splits, state


def evaluate_checkpoint(
    checkpoint: str | Path,
    *,
    data_dir: str | None = None,
    split: str = "test",
    batch_size: int | None = None,
    tta_flip: bool | None = None,
    device: str = "auto",
) -> dict[str, Any]:
    """Evaluate a training checkpoint on its dataset's ``split`` ("test" or "train", no augmentation).

    The model is rebuilt from the config stored in the checkpoint, so only the checkpoint is needed
    (and the data). Returns :func:`evaluate`'s metrics plus the checkpoint's step and config name.
    """
    if split not in ("test", "train"):
        raise ValueError(f"split must be 'test' or 'train', got {split!r}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} is out of range; expected >= 1 (or None: the run's)")
    config, model, splits, state = load_run(checkpoint, data_dir=data_dir, device=device)
    dev = next(model.parameters()).device
    data = splits.test if split == "test" else splits.train
    channels_last = config.train.channels_last and dev.type == "cpu"
    batch_size = config.data.eval_batch_size if batch_size is None else batch_size
    loader = eval_loader(config.data, splits, data, batch_size, config.train.seed, channels_last)
    flip = config.eval.tta_flip if tta_flip is None else tta_flip
    result = evaluate(model, loader, splits.num_classes, device=dev, tta_flip=flip, bins=config.eval.calibration_bins)
    result.update({"name": config.name, "model": config.model.name, "step": int(state["step"]), "split": split})
    result["classes"] = list(data.classes)
    result["classes_checked"] = "classes" in state  # False: a checkpoint older than recorded class names
    return result
