"""Run a model in eval mode for a measurement, and give every module its own training flag back."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model.eval()`` inside the block; afterwards each module's flag as it was (not one flag for all).

    Analyses need eval mode (no router noise, running BatchNorm statistics, deterministic routing),
    but must not change a model that was, say, half frozen in eval mode by its owner.
    """
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes.items():
            m.training = training
