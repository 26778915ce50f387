"""The seed studies as sweep presets, each at CIFAR scale with a ``--tiny`` form for a quick check.

    visionmoe sweep --preset topk --seeds 0-2 data.dataset=imagefolder data.data_dir=../shared/data/cifar10-jpeg
    visionmoe sweep --preset topk --tiny --out runs/topk-tiny ...        # minutes on 2 CPU cores

Every CIFAR CNN study but ``heads`` (which uses ``configs/rokah_dense_head.yaml``, the standard
ResNet-18 recipe; ``benchmarks/rokah_heads.py`` is its CPU-budget form) trains by the recipe of
``configs/cifar10_moe.yaml`` (SGD + Nesterov, batch
512, lr 0.4 with a 1-epoch warm-up and linear decay, label smoothing 0.2, crop ±2 and flip, flip
TTA, 5 epochs); only the model changes. MoE layers default to that preset's E = 8, top-2, capacity
factor 1.25 (2.0 at test). The full forms' times are for 2 CPU cores (one job, 2 threads): topk
measured, hidden by ``--estimate``, the others from the training throughput of each model measured
on this machine (a shared 2-core VM); a GPU needs minutes per run. The tiny forms train each run for
one epoch on 256 images at small widths: they check that a study runs end to end through the report, not its result.

    #  name       study                                                   runs per seed  2-core estimate
    1  rho        ρ sweep: MoE in the last block / stage / 2 stages / all  8             ~6 h per seed
    2  hidden     width 8/16/32, standard and depthwise backbones          12            ~3.1 h per seed
    3  topk       k = 1 vs 2, same architecture and initialisation         4             35 min per seed
    4  soft       per-sample vs batch-axis Soft MoE vs dense, CIFAR-100    4             ~2 h per seed
    5  heads      ResNet-18 dense / mixture / sparse heads + sharpness     3             GPU (~40 h per run)
    6  placement  ViT / ConvNeXt: Last-2, Every-2, all; E = 4, 8, 16;      24            GPU (~days on CPU)
                  linear vs MLP router gate
    7  routers    six routers at equal active FLOPs and a dense reference  7             ~3 h per seed
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from visionmoe.studies.sweep import Sweep, parse_axis

BASE = "cifar10_moe"  # the recipe every CIFAR study trains by
TINY = (  # one epoch on 256 images, tested in CI on stand-in data
    "data.train_subset=256",
    "data.test_subset=128",
    "data.batch_size=64",
    "data.eval_batch_size=128",
    "train.epochs=1",
    "optim.warmup_epochs=0",
    "train.checkpoint_every_steps=null",
    "train.tensorboard=false",
    "eval.tta_flip=false",
)


@dataclass(frozen=True)
class Study:
    """A seed study as a sweep: its full form, and a tiny form that runs in minutes on 2 CPU cores.

    ``tiny_overrides`` are applied after the full form's; ``tiny_grids`` (if given) replace its grids.
    """

    number: int
    name: str
    title: str
    sweep: Sweep
    full_time: str
    tiny_overrides: Sequence[str] = ()
    tiny_grids: Sequence[Mapping[str, Any]] | None = None
    tiny_analyze: Mapping[str, Any] | None = None
    notes: str = ""
    seeds: Sequence[int] = (0, 1, 2)
    tiny_seeds: Sequence[int] = (0,)

    def build(self, *, tiny: bool = False, overrides: Sequence[str] = (), seeds: Sequence[int] | None = None) -> Sweep:
        """The sweep to run: the full or tiny form, extra ``key=value`` overrides (``key=a,b`` adds an axis)."""
        sweep = replace(self.sweep, seeds=tuple(self.seeds))
        if tiny:
            sweep = replace(
                sweep,
                overrides=(*sweep.overrides, *TINY, *self.tiny_overrides),
                grids=self.tiny_grids if self.tiny_grids is not None else sweep.grids,
                analyze=self.tiny_analyze if self.tiny_analyze is not None else sweep.analyze,
                seeds=self.tiny_seeds,
            )
        sweep = extend(sweep, overrides)
        return replace(sweep, seeds=tuple(seeds)) if seeds is not None else sweep


def extend(sweep: Sweep, overrides: Sequence[str]) -> Sweep:
    """``sweep`` with more fixed overrides, and ``key=a,b`` overrides as a further axis of every grid."""
    fixed, axes = [], {}
    for item in overrides:
        axis = parse_axis(item)
        if axis is None:
            fixed.append(item)
        else:
            axes[axis[0]] = axis[1]
    grids = [{**grid, **axes} for grid in sweep.grids] if axes else list(sweep.grids)
    return replace(sweep, overrides=(*sweep.overrides, *fixed), grids=grids)


def _cnn(width: int) -> tuple[str, ...]:
    return ("model.name=cnn_resnet_cifar_moe", f"model.kwargs.width={width}")


SOFT_PER_SAMPLE = "model.moe={num_experts: 8, router: soft_per_sample, router_options: {slots_per_expert: %d}}"
# Batch-axis Soft MoE over groups of 2 images (128 positions of the 8×8 map): the same slots per token
# as per sample (E·P = S), and groups small enough for the (S, E·P) dispatch; 128 must divide the
# tokens of every batch, so batch sizes stay even.
SOFT_BATCH = "model.moe={num_experts: 8, router: soft, groups: 128, router_options: {slots_per_expert: %d}}"

STUDIES: dict[str, Study] = {}


def _add(study: Study) -> None:
    STUDIES[study.name] = study


_add(
    Study(
        1,
        "rho",
        "ρ sweep: the MoE-dense gap against the fraction of FLOPs routed (Sun et al.)",
        Sweep(
            "rho",
            BASE,
            grids=[{"model.moeify.placement": ["tail-1", "tail-2", "tail-4", "all"]}],
            overrides=("model.name=cnn_resnet_cifar", "model.kwargs.width=16"),
        ),
        full_time="~6 h per seed (the all-blocks MoE routes 1024 positions per image in stage 1)",
        tiny_overrides=("model.kwargs.width=8",),
        notes="The standard CIFAR CNN (w=16) made MoE by moeify in its last block (tail-1), last stage (tail-2), "
        "last two stages (tail-4) or every block: ρ grows from a few % to most of the network. The CNN has no "
        "classifier-head MoE, so its last block stands in for 'head only'.",
    )
)

_add(
    Study(
        2,
        "hidden",
        "hidden-size sweep on standard and depthwise backbones: where the gap changes sign (Sun et al.)",
        Sweep(
            "hidden",
            BASE,
            grids=[
                {
                    "backbone": {
                        "standard": ["model.name=cnn_resnet_cifar_moe"],
                        "depthwise": ["model.name=cnn_dw_cifar_moe"],
                    },
                    "model.kwargs.width": [8, 16, 32],
                }
            ],
        ),
        full_time="10.3 h for 3 seeds (measured: 194 min for seed 0, the depthwise w=32 pair alone ~75 min); "
        "the standard w=16 pair is topk's k=2 pair (--reuse)",
        tiny_grids=[
            {
                "backbone": {
                    "standard": ["model.name=cnn_resnet_cifar_moe"],
                    "depthwise": ["model.name=cnn_dw_cifar_moe"],
                },
                "model.kwargs.width": [8, 16],
            }
        ],
        notes="Hidden size = the backbone width w (stages w, 2w, 4w; FFN and expert width hidden_ratio·dim scale with "
        "it). MoE in the last stage, E=8, top-2; each against its dense twin of equal active FLOPs.",
    )
)

_add(
    Study(
        3,
        "topk",
        "top-k ablation: k = 1 vs k = 2 with architecture and initialisation fixed (Sun et al.)",
        Sweep("topk", BASE, grids=[{"model.moe.k": [1, 2]}], overrides=_cnn(16)),
        full_time="35 min per seed (measured: 6.5–9.3 min per run, 1.7 h for 3 seeds, on a quiet 2-core machine)",
        tiny_overrides=("model.kwargs.width=8",),
        notes="Same E=8 experts of the same width in the same (last) stage, so under one seed k=1 and k=2 start from "
        "identical weights; only the tokens' number of experts changes. ρ (the experts' nominal FLOP share) "
        "follows k, so each k is judged against its own dense twin of equal active FLOPs (width k·H).",
    )
)

_add(
    Study(
        4,
        "soft",
        "per-sample vs batch-axis Soft MoE vs dense on CIFAR-100 (Sun et al.)",
        Sweep(
            "soft",
            BASE,
            grids=[{"router": {"soft_per_sample": [SOFT_PER_SAMPLE % 8], "soft_batch": [SOFT_BATCH % 16]}}],
            overrides=("data.dataset=cifar100", *_cnn(16)),
        ),
        full_time="~2 h per seed",
        tiny_overrides=("model.kwargs.width=8",),
        notes="Soft MoE in the last stage (8×8 map): per sample, 64 tokens into 8 experts × 8 slots; over the batch "
        "axis, groups of 2 images (128 tokens) into 8 × 16 slots, so a prediction depends on the image it is "
        "grouped with. Both do one expert's FLOPs per token; the dense twin (equal active FLOPs) is the dense "
        "model. Only CIFAR-10 is at hand here: run it with data.dataset=imagefolder "
        "data.data_dir=../shared/data/cifar10-jpeg and say so.",
    )
)

HEADS = {
    "dense": ["model.name=resnet18_cifar_dense_head"],
    "mixture": ["model.name=resnet18_cifar_mixture_head"],
    "sparse": ["model.name=resnet18_cifar_sparse_head"],
}
_add(
    Study(
        5,
        "heads",
        "dense vs mixture vs sparse heads on ResNet-18, with sharpness (Rokah et al.)",
        Sweep(
            "heads",
            "rokah_dense_head",  # the standard ResNet-18 recipe (SGD 0.1, batch 128, cosine, 100 epochs), no smoothing
            grids=[{"head": HEADS}],
            overrides=("model.moe=null",),
            twins=False,
            baseline={"head": "dense"},
            analyze={
                "what": ["hessian", "landscape"],
                "samples": 1000,
                "top_k": 3,
                "trace_probes": 50,
                "directions": ["random", "hessian"],
            },
        ),
        full_time="a GPU job: 100 epochs of ResNet-18 (0.56 GFLOPs per image) are ~40 h per run on 2 CPU cores",
        tiny_overrides=("model.kwargs.width=8", "model.kwargs.head_width=64"),
        # tiny: the Hessian of the head alone (its HVPs run on cached backbone features), on 32 images
        tiny_analyze={
            "what": ["hessian", "landscape"],
            "samples": 32,
            "batch_size": 32,
            "top_k": 1,
            "trace_probes": 2,
            "alphas": [-0.5, 0.0, 0.5],
            "params": "head",
        },
        notes="The heads hold the same FFN capacity (E × width = 512); the dense head is each seed's reference. "
        "After training, visionmoe.analyze computes λmax, the top eigenvalues and tr(H) of the loss on train and "
        "test subsets of 1000 images and a 1-D loss line: the report tabulates λmax and tr(H) per head.",
    )
)

VIDEAU = {
    "backbone": {
        "vit": ["model.name=vit_moe_tiny_patch4_32"],
        "convnext": ["model.name=convnext_moe_atto", "model.kwargs.patch_size=1"],
    },
}
TINY_VIT = [*VIDEAU["backbone"]["vit"], "model.kwargs.embed_dim=32", "model.kwargs.depth=4", "model.kwargs.num_heads=2"]
TINY_CONVNEXT = [
    *VIDEAU["backbone"]["convnext"],
    "model.kwargs.dims=[8, 8, 16, 16]",
    "model.kwargs.depths=[1, 1, 2, 2]",
]
MLP_GATE = "model.moe.router_options={mlp_hidden_dim: %d}"
ROUTER_GATES = {"linear": [], "mlp": [MLP_GATE % 128]}  # Videau et al.: the plain linear gate is best
TRANSFORMER_RECIPE = (
    "optim.name=adamw",
    "optim.lr=0.001",
    "optim.weight_decay=0.05",
    "optim.schedule=cosine",
    "optim.label_smoothing=0.1",
    "optim.grad_clip=1.0",
    "train.channels_last=false",
    "data.batch_size=256",
    "train.epochs=30",
    "optim.warmup_epochs=3",
)
_add(
    Study(
        6,
        "placement",
        "placement Last-2 / Every-2 / all and 4 / 8 / 16 experts on ViT and ConvNeXt (Videau et al.)",
        Sweep(
            "placement",
            BASE,
            grids=[
                {**VIDEAU, "model.kwargs.placement": ["last-2", "every-2", "all"]},
                {**VIDEAU, "model.moe.num_experts": [8, 4, 16]},
                {**VIDEAU, "gate": ROUTER_GATES},
            ],
            overrides=TRANSFORMER_RECIPE,
        ),
        full_time="a GPU job: 24 runs per seed of ViT-Ti/4 (0.8 GFLOPs/image) and ConvNeXt-atto at 32 px, 30 epochs; "
        "on 2 CPU cores ~2 days per run",
        tiny_grids=[
            {"backbone": {"vit": TINY_VIT}, "model.kwargs.placement": ["last-2", "all"]},
            {"backbone": {"vit": TINY_VIT}, "model.moe.num_experts": [8, 4]},
            {"backbone": {"vit": TINY_VIT}, "gate": {"linear": [], "mlp": [MLP_GATE % 16]}},
            {"backbone": {"convnext": TINY_CONVNEXT}},
        ],
        notes="One factor at a time around ViT-Ti/4 (Last-2, E=8, top-2) and ConvNeXt-atto with patch 1: "
        "placement, expert count, and the router's gate (linear, or an MLP D → 128 → E); each configuration "
        "against its dense twin of equal active FLOPs.",
    )
)

ROUTERS = {
    "topk": ["model.moe={num_experts: 8, router: topk, k: 2, capacity_factor: 1.25, eval_capacity_factor: 2.0}"],
    "expert_choice": ["model.moe={num_experts: 8, router: expert_choice, capacity_factor: 2.0}"],
    "sinkhorn_topk": [
        "model.moe={num_experts: 8, router: sinkhorn_topk, k: 2, capacity_factor: 1.25, eval_capacity_factor: 2.0}"
    ],
    "sinkhorn_expert_choice": ["model.moe={num_experts: 8, router: sinkhorn_expert_choice, capacity_factor: 2.0}"],
    "sparse_expert_choice": ["model.moe={num_experts: 8, router: sparse_expert_choice, capacity_factor: 2.0}"],
    "soft_per_sample": [SOFT_PER_SAMPLE % 16],
    "dense": ["model.moe={num_experts: 8, router: topk, k: 2}", "model.dense_twin=flops"],
}
_add(
    Study(
        7,
        "routers",
        "six routers head to head at equal active FLOPs (Liu et al.)",
        Sweep(
            "routers", BASE, grids=[{"router": ROUTERS}], overrides=_cnn(16), twins=False, baseline={"router": "dense"}
        ),
        full_time="~3 h per seed",
        tiny_overrides=("model.kwargs.width=8",),
        notes="Every router does two experts' FLOPs per token (top-2; expert choice at capacity factor 2; Soft MoE "
        "per sample with 16 slots per expert for 64 tokens): token vs expert choice, softmax vs Sinkhorn, the "
        "sparsity-constrained (sparse OT) expert choice and Soft MoE, in the last stage of the w=16 CNN. One dense "
        "reference (the top-2 model's twin, FFN of width 2H) serves all six, so it is trained once per seed.",
    )
)


def get_study(name: str) -> Study:
    if name not in STUDIES:
        raise ValueError(f"unknown study {name!r}; studies: {', '.join(STUDIES)}")
    return STUDIES[name]


def presets_table() -> str:
    """The studies as a Markdown table (number, name, what, full form's time)."""
    rows = ["| # | preset | study | full form on 2 CPU cores |", "|---|---|---|---|"]
    rows += [f"| {s.number} | `{s.name}` | {s.title} | {s.full_time} |" for s in STUDIES.values()]
    return "\n".join(rows)
