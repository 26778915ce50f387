"""Every registered visionmoe model at its default settings: parameters, active parameters, FLOPs, ρ.

    python benchmarks/models_table.py               # the Markdown table used in README.md
    python benchmarks/models_table.py --rho-sweep   # ρ of the CNN backbones as moe_stages grows

FLOPs are counted by ``visionmoe.analysis.profile`` (torch's FlopCounterMode, forward, eval mode,
one random image at the model's native resolution); ρ is the fraction of them done by experts on that
image (dropped assignments cost nothing), ρ nominal the fraction with no assignment dropped (a property
of the architecture and its routers' k and capacity, not of the weights).
"""

from __future__ import annotations

import argparse

import torch

import visionmoe
from visionmoe.analysis import profile_model


def native_size(name: str) -> int:
    if name.endswith("_224") or name.startswith("convnext"):
        return 224
    return 32


def fmt(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=None, help="default: every visionmoe model")
    parser.add_argument("--rho-sweep", action="store_true", help="ρ of the CNN backbones per moe_stages")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.rho_sweep:
        rho_sweep()
        return
    print("| model | input | MoE layers | params | active params | FLOPs / image | ρ | ρ nominal |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name in args.models or visionmoe.list_models():
        size = native_size(name)
        model = visionmoe.create_model(name)
        p = profile_model(model, torch.randn(1, 3, size, size))
        layers = len(visionmoe.moe_layers(model))
        print(
            f"| `{name}` | {size}² | {layers} | {fmt(p.total_params)} | {fmt(p.active_params)} | "
            f"{fmt(p.total_flops)} | {p.rho:.3f} | {p.rho_nominal:.3f} |"
        )


def rho_sweep() -> None:
    print("| model | moe_stages | params | active params | FLOPs / image | ρ | ρ nominal |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name in ("cnn_resnet_cifar_moe", "cnn_dw_cifar_moe"):
        for stages in ("none", (2,), (1, 2), "all"):
            model = visionmoe.create_model(name, moe_stages=stages)
            p = profile_model(model, torch.randn(1, 3, 32, 32))
            print(
                f"| `{name}` | {stages} | {fmt(p.total_params)} | {fmt(p.active_params)} | "
                f"{fmt(p.total_flops)} | {p.rho:.3f} | {p.rho_nominal:.3f} |"
            )


if __name__ == "__main__":
    main()
