"""Batched image augmentation on uint8 tensors: whole-batch tensor ops, no per-image Python loop."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


def random_crop_flip(
    images: Tensor,
    padding: int = 4,
    *,
    flip: bool = True,
    generator: torch.Generator | None = None,
    rows: Tensor | None = None,
    batch_size: int | None = None,
) -> Tensor:
    """Random crop after zero padding, and a random horizontal flip, per image (as torchvision's
    ``RandomCrop(size, padding)`` + ``RandomHorizontalFlip()``, but for the whole batch at once).

    images: (B, C, H, W) uint8. Returns the same shape and dtype.

    ``rows`` (with ``batch_size``): ``images`` are only rows ``rows`` of a batch of ``batch_size``;
    the draws are made for the whole batch and those rows' are applied, so each row gets exactly
    what it would in the whole batch (a data-parallel rank augments only its own rows).
    """
    if (rows is None) != (batch_size is None):
        raise ValueError("rows and batch_size go together: the rows of a batch of batch_size images")
    if rows is not None and len(rows) != len(images):
        raise ValueError(f"got {len(images)} images for {len(rows)} rows")
    B, _, H, W = images.shape
    draws = B if batch_size is None else batch_size
    pick = slice(None) if rows is None else rows
    if padding > 0:
        padded = F.pad(images, (padding, padding, padding, padding))  # (B, C, H+2p, W+2p), zeros
        dy = torch.randint(0, 2 * padding + 1, (draws,), generator=generator)[pick]
        dx = torch.randint(0, 2 * padding + 1, (draws,), generator=generator)[pick]
        rows_ = (dy[:, None] + torch.arange(H))[:, :, None]  # (B, H, 1)
        cols = (dx[:, None] + torch.arange(W))[:, None, :]  # (B, 1, W)
        batch = torch.arange(B)[:, None, None]
        images = padded.permute(0, 2, 3, 1)[batch, rows_, cols].permute(0, 3, 1, 2)  # (B, C, H, W)
    if flip:
        mirror = (torch.rand(draws, generator=generator) < 0.5)[pick]
        images = torch.where(mirror[:, None, None, None], images.flip(-1), images)
    return images.contiguous()


def normalize(
    images: Tensor, mean: tuple[float, ...], std: tuple[float, ...], *, channels_last: bool = False
) -> Tensor:
    """uint8 (B, C, H, W) -> float32 normalised per channel (channels-last memory on request)."""
    x = images.float().div_(255.0)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device)[None, :, None, None]
    s = torch.tensor(std, dtype=x.dtype, device=x.device)[None, :, None, None]
    x = (x - m) / s
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x
