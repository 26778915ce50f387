"""The (x, y) batches of the Hessian and of the loss surface, held on the model's device.

Both take "one (x, y) pair, or an iterable of them" and make many passes over the same batches, so
both move them to the parameters' device once, up front; :func:`device_batches` is that rule, once.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

Batches = Iterable[tuple[Tensor, Tensor]] | tuple[Tensor, Tensor]


def device_batches(batches: Batches, device: torch.device, what: str) -> list[tuple[Tensor, Tensor]]:
    """``batches`` (one (x, y) pair, or an iterable of them, read once) as a list of pairs on ``device``.

    ``what`` names the caller in the error raised when there is no batch at all.
    """
    if isinstance(batches, tuple) and len(batches) == 2 and isinstance(batches[0], Tensor):
        batches = [batches]
    moved = [(x.to(device), y.to(device)) for x, y in batches]
    if not moved:
        raise ValueError(f"{what} needs at least one (x, y) batch")
    return moved
