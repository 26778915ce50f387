"""The seed studies as sweep presets, each at CIFAR scale with a ``--tiny`` form for a quick check.

    visionmoe sweep --preset topk --seeds 0-2 data.dataset=imagefolder data.data_dir=../shared/data/cifar10-jpeg
    visionmoe sweep --preset topk --tiny --out runs/topk-tiny ...        # minutes on 2 CPU cores

Every CIFAR CNN study but ``heads`` (which uses ``configs/rokah_dense_head.yaml``, the standard
ResNet-18 recipe; ``benchmarks/rokah_heads.py`` is its CPU-budget form) trains by the recipe of
``configs/cifar10_moe.yaml`` (SGD + Nesterov, batch
512, lr 0.4 with a 1-epoch warm-up and linear decay, label smoothing 0.2, crop ±2 and flip, flip
TTA, 5 epochs); only the model changes. MoE layers default to that preset's E = 8, top-2, capacity
factor 1.25 (2.0 at test). The tiny forms train each run for one epoch on 256 images at small widths:
they check that a study runs end to end through the report, not its result.

    #  name         study                                                  runs per seed
    1  rho          ρ by placement: last block / stage / 2 stages / all      8
    2  hidden       expert hidden size at width 8, standard and depthwise    20
    3  hidden_long  hidden's highest-ρ depthwise pair at 15 epochs, 2 seeds  2
    4  width        backbone width 8/16/32, standard and depthwise           12
    5  topk         k = 1 vs 2, same architecture and initialisation         4
    6  soft         dense / batch-axis Soft MoE / per-sample Soft MoE /      4
                    top-2 on the pooled feature (one token per sample)
    7  heads        ResNet-18 dense / mixture / sparse heads + sharpness       3
    8  placement    ViT / ConvNeXt: Last-2, Every-2, all; E = 4, 8, 16;        24
                    linear vs MLP router gate
    9  routers      six routers at equal active FLOPs and a dense reference    7

How long each full form takes on 2 CPU cores (measured, or by ``--estimate``, which times a few real
steps of every configuration) is in README's study table and BENCHMARKS.md ("Studies: how long they
take on 2 cores", "Planned: issue 23", which also has the launch commands); heads and placement are
GPU jobs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from visionmoe.studies.grid import axis_keys, refuse_per_run
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
    """``sweep`` with more fixed overrides, and ``key=a,b`` overrides as a further axis of every grid.

    An override the sweep would silently replace is refused: a key one of its axes sets (the axis values
    are applied after the fixed overrides), a key the sweep sets per run
    (:func:`~visionmoe.studies.grid.refuse_per_run`), and ``model.dense_twin`` in a sweep with twins (its MoE
    runs would train the twin).
    """
    fixed, axes = [], {}
    by_axes = axis_keys(sweep.grids)
    for item in overrides:
        axis = parse_axis(item)
        key = (axis[0] if axis else item.partition("=")[0]).strip()
        refuse_per_run(item)
        if key == "model.dense_twin" and sweep.twins:
            raise ValueError(f"{item}: this sweep pairs each configuration with its dense twin, which sets {key}")
        if key in by_axes:
            raise ValueError(f"{item}: {key} is set by this sweep's axis {by_axes[key]!r}, which would replace it")
        if axis is None:
            fixed.append(item)
        else:
            axes[axis[0]] = axis[1]
    grids = [{**grid, **axes} for grid in sweep.grids] if axes else list(sweep.grids)
    return replace(sweep, overrides=(*sweep.overrides, *fixed), grids=grids)


def _cnn(width: int) -> tuple[str, ...]:
    return ("model.name=cnn_resnet_cifar_moe", f"model.kwargs.width={width}")


STUDY_WIDTH = 8  # backbone width w of hidden, hidden_long and rho: what fits their runs in ~24 h on 2 cores
BACKBONES = {"standard": ["model.name=cnn_resnet_cifar_moe"], "depthwise": ["model.name=cnn_dw_cifar_moe"]}
STAGES = {"1-2": ["model.kwargs.moe_stages=[1, 2]"], "all": ["model.kwargs.moe_stages=all"]}

HIDDEN_POINTS: dict[tuple[str, str, float], float] = {
    # (backbone, MoE stages, hidden ratio r) -> nominal ρ at width 8: the experts' share of the FLOPs with
    # every top-2 assignment processed (visionmoe.analysis.profile; tests/studies/test_presets.py checks it).
    # Each expert is r·dim wide, the dense twin's FFN 2·r·dim (equal active FLOPs).
    ("standard", "1-2", 0.5): 0.131,
    ("standard", "1-2", 1): 0.226,
    ("standard", "1-2", 2): 0.352,
    ("standard", "1-2", 4): 0.489,
    ("standard", "1-2", 8): 0.607,
    ("depthwise", "1-2", 0.25): 0.224,
    ("depthwise", "1-2", 1): 0.488,
    ("depthwise", "1-2", 4): 0.690,  # the probe (MoE 65.15% vs twin 70.77%, seed 0)
    ("depthwise", "all", 2): 0.764,
    ("depthwise", "all", 4): 0.866,
}
LONG_EPOCHS = 15  # hidden_long: 3 × the recipe's 5 epochs


def _hidden_grids(points, **extra: list[Any]) -> list[dict[str, Any]]:
    """One grid per (backbone, stages) of ``points``, its hidden ratios as the ``hidden_ratio`` axis."""
    groups: dict[tuple[str, str], list[float]] = {}
    for backbone, stages, ratio in points:
        groups.setdefault((backbone, stages), []).append(ratio)
    return [
        {
            "backbone": {backbone: BACKBONES[backbone]},
            "stages": {stages: STAGES[stages]},
            "model.kwargs.hidden_ratio": ratios,
            **extra,
        }
        for (backbone, stages), ratios in groups.items()
    ]


def _rho_table() -> str:
    return "\n".join(f"    {b:9s}  {s:4s}  r={r:<4g}  ρ={rho:.3f}" for (b, s, r), rho in HIDDEN_POINTS.items())


# Soft MoE on the pooled feature (one token per sample), every head at A = 2·D = 128 active hidden units per
# sample (D = 4w = 64 at w = 16): dense FFN of width A; top-2 of 8 experts of width A/2; per-sample Soft MoE,
# 8 experts × 1 slot, each A/8 wide (a token runs every slot); Soft MoE over the batch, 8 experts × 64
# slots of width A, so at the training batch of 512 there is one slot per sample (E·P = B, the original
# Soft MoE's slots = tokens) and each sample costs one expert: A. SOFT_SLOTS must equal data.batch_size / 8.
SOFT_WIDTH, SOFT_ACTIVE, SOFT_SLOTS = 16, 128, 64
SOFT_EVAL_BATCH_SIZES = "eval.batch_sizes=[1, 32, 512]"


def _soft_arms(active: int, slots: int) -> dict[str, list[str]]:
    return {
        "dense": ["model.moe={num_experts: 1, router: dense}", f"model.kwargs.head_hidden={active}"],
        "soft_batch": [
            f"model.moe={{num_experts: 8, router: soft, groups: batch, router_options: {{slots_per_expert: {slots}}}}}",
            f"model.kwargs.head_hidden={active}",
        ],
        "soft_per_sample": [
            "model.moe={num_experts: 8, router: soft_per_sample, router_options: {slots_per_expert: 1}}",
            f"model.kwargs.head_hidden={active // 8}",
        ],
        "top2": [
            "model.moe={num_experts: 8, router: topk, k: 2, capacity_factor: 1.25, eval_capacity_factor: 2.0}",
            f"model.kwargs.head_hidden={active // 2}",
        ],
    }


SOFT_PER_SAMPLE = "model.moe={num_experts: 8, router: soft_per_sample, router_options: {slots_per_expert: %d}}"

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
            overrides=("model.name=cnn_resnet_cifar", f"model.kwargs.width={STUDY_WIDTH}"),
        ),
        notes=f"The standard CIFAR CNN (w={STUDY_WIDTH}, hidden's width) made MoE by moeify in its last block "
        "(tail-1), last stage (tail-2), last two stages (tail-4) or every block: ρ grows from a few % to most of "
        "the network. The CNN has no classifier-head MoE, so its last block stands in for 'head only'.",
    )
)

_add(
    Study(
        2,
        "hidden",
        "hidden-size sweep at fixed width, standard and depthwise: where the gap changes sign (Sun et al.)",
        Sweep(
            "hidden",
            BASE,
            grids=_hidden_grids(HIDDEN_POINTS),
            overrides=(f"model.kwargs.width={STUDY_WIDTH}",),
        ),
        tiny_grids=_hidden_grids([("standard", "1-2", 1), ("depthwise", "all", 2)]),
        notes=f"Width {STUDY_WIDTH} fixed; the hidden size of the MoE blocks' experts (hidden_ratio r: each expert "
        "r·dim wide, E=8, top-2) is swept, the dense twin's FFNs at 2·r·dim (equal active FLOPs). MoE in stages "
        "1-2 (standard: all five points; depthwise: the three lower points) or in every stage (depthwise: the two "
        "highest), so nominal ρ spans 0.13-0.61 (standard) and 0.22-0.87 (depthwise):\n" + _rho_table(),
    )
)

LONG_POINT = max((p for p in HIDDEN_POINTS if p[0] == "depthwise"), key=HIDDEN_POINTS.__getitem__)
_add(
    Study(
        3,
        "hidden_long",
        f"budget control: hidden's highest-ρ depthwise pair at {LONG_EPOCHS} epochs (3× the budget)",
        Sweep(
            "hidden_long",
            BASE,
            grids=_hidden_grids([LONG_POINT], **{"train.epochs": [LONG_EPOCHS]}),
            overrides=(f"model.kwargs.width={STUDY_WIDTH}",),
        ),
        seeds=(0, 1),
        tiny_grids=_hidden_grids([("depthwise", "all", 2)], **{"train.epochs": [2]}),
        notes=f"hidden's highest-ρ depthwise pair ({LONG_POINT[1]} stages, r={LONG_POINT[2]:g}, nominal ρ "
        f"{HIDDEN_POINTS[LONG_POINT]:.3f}) trained {LONG_EPOCHS} epochs instead of 5 (same recipe, warm-up 1 "
        "epoch, linear decay over the whole run), seeds 0-1: does the sign of MoE − twin depend on the budget?",
    )
)

_add(
    Study(
        4,
        "width",
        "width sweep (backbone width 8/16/32) on standard and depthwise backbones (Sun et al.)",
        Sweep(
            "width",
            BASE,
            grids=[{"backbone": BACKBONES, "model.kwargs.width": [8, 16, 32]}],
        ),
        tiny_grids=[{"backbone": BACKBONES, "model.kwargs.width": [8, 16]}],
        notes="The backbone width w is swept (stages w, 2w, 4w; FFN and expert width hidden_ratio·dim scale with "
        "it), so nominal ρ stays nearly flat (0.20 standard, 0.42-0.46 depthwise). MoE in the last stage, E=8, "
        "top-2; each against its dense twin of equal active FLOPs. (Run as 'hidden' in issue 7.)",
    )
)

_add(
    Study(
        5,
        "topk",
        "top-k ablation: k = 1 vs k = 2 with architecture and initialisation fixed (Sun et al.)",
        Sweep("topk", BASE, grids=[{"model.moe.k": [1, 2]}], overrides=_cnn(16)),
        tiny_overrides=("model.kwargs.width=8",),
        notes="Same E=8 experts of the same width in the same (last) stage, so under one seed k=1 and k=2 start from "
        "identical weights; only the tokens' number of experts changes. ρ (the experts' nominal FLOP share) "
        "follows k, so each k is judged against its own dense twin of equal active FLOPs (width k·H).",
    )
)

_add(
    Study(
        6,
        "soft",
        "per-sample vs batch-axis Soft MoE vs top-2 vs dense on the pooled feature, one token per sample (Sun et al.)",
        Sweep(
            "soft",
            BASE,
            grids=[{"head": _soft_arms(SOFT_ACTIVE, SOFT_SLOTS)}],
            overrides=(
                "model.name=cnn_resnet_cifar_head",
                f"model.kwargs.width={SOFT_WIDTH}",
                "data.eval_batch_size=512",
                SOFT_EVAL_BATCH_SIZES,
            ),
            twins=False,
            baseline={"head": "dense"},
        ),
        tiny_overrides=("model.kwargs.width=8", "data.eval_batch_size=64"),
        tiny_grids=[{"head": _soft_arms(64, 8)}],  # batch 64: 8 experts × 8 slots, one per sample
        notes=f"The standard CIFAR CNN (w={SOFT_WIDTH}, every block dense) with its pooled 64-d feature through a "
        f"head of {SOFT_ACTIVE} active hidden units per sample: dense FFN; Soft MoE with batch-axis dispatch (8 "
        f"experts × {SOFT_SLOTS} slots of width {SOFT_ACTIVE}: at batch 512 one slot per sample, each slot a "
        f"softmax mixture of the batch's samples); per-sample Soft MoE (8 experts × 1 slot of width "
        f"{SOFT_ACTIVE // 8}, softmax over a sample's own slots); top-2 of 8 experts of width {SOFT_ACTIVE // 2}. "
        "Under one seed all four start from the same backbone and classifier. Evaluation: the test set in fixed, "
        "unshuffled batches of the training batch size (512, the last one 272 images on CIFAR-10's 10,000), so "
        "the batch-axis arm sees test batches like its training ones; then again in batches of 1, 32 and 512 "
        "(eval.batch_sizes), for every arm. CIFAR-100 where present: data.dataset=cifar100.",
    )
)
HEADS = {
    "dense": ["model.name=resnet18_cifar_dense_head"],
    "mixture": ["model.name=resnet18_cifar_mixture_head"],
    "sparse": ["model.name=resnet18_cifar_sparse_head"],
}
_add(
    Study(
        7,
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
        "After training, visionmoe analyze computes λmax, the top eigenvalues and tr(H) of the loss on train and "
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
        8,
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
        9,
        "routers",
        "six routers head to head at equal active FLOPs (Liu et al.)",
        Sweep(
            "routers", BASE, grids=[{"router": ROUTERS}], overrides=_cnn(16), twins=False, baseline={"router": "dense"}
        ),
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
