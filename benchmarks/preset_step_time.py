"""CPU time of one training step per image of a preset's model (forward, aux losses, backward, SGD).

    python benchmarks/preset_step_time.py tiny_imagenet_vit_moe tiny_imagenet_convnext_moe --batch 32

Builds each model exactly as `visionmoe train --config PRESET` does (``build_model``) at the preset's
image size, times a few steps on random images on one thread, and reports process CPU time per
image (steadier than wall time on a shared machine) and the core-hours one epoch of ``--epoch-images``
would take. No data is read: the figure is the model's cost, not the input pipeline's.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from visionmoe import collect_aux_loss
from visionmoe.train import load_config
from visionmoe.train.trainer import build_model


def cpu_ms_per_image(preset: str, batch: int, steps: int, num_classes: int | None) -> float:
    config = load_config(preset, [])
    size = config.data.image_size or 32
    classes = num_classes or config.data.num_classes or 200
    model = build_model(config.model, classes, torch.randn(2, 3, size, size)).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, classes, (batch,))

    def step() -> None:
        loss = F.cross_entropy(model(x), y) + collect_aux_loss(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step()  # warm-up
    start = time.process_time()
    for _ in range(steps):
        step()
    return (time.process_time() - start) / (steps * batch) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("presets", nargs="+")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--num-classes", type=int, default=None, help="default: the preset's, else 200")
    parser.add_argument("--epoch-images", type=int, default=100_000, help="images per epoch (Tiny-ImageNet: 100k)")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    per_epoch = f"core-hours per epoch of {args.epoch_images:,}"
    print(f"| preset | CPU ms per training image (1 thread, batch {args.batch}) | {per_epoch} |")
    print("|---|---:|---:|")
    for preset in args.presets:
        ms = cpu_ms_per_image(preset, args.batch, args.steps, args.num_classes)
        print(f"| `{preset}` | {ms:.1f} | {ms * args.epoch_images / 3.6e6:.1f} |")


if __name__ == "__main__":
    main()
