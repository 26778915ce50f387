"""CIFAR CNN models: ResNet-18 with dense / MoE heads (Rokah et al.) and MoE-in-block backbones (Sun et al.).

Tiny sizes throughout: ResNet-18 on 8×8 inputs (a 1×1 final map), backbones with width 8 and one
block per stage on 8×8 inputs (a 2×2 final map, 4 tokens per image).
"""

import copy

import pytest
import timm
import torch
from grads import assert_every_parameter_learns
from torch import nn

import visionmoe
import visionmoe.models.cifar_resnet
import visionmoe.models.cnn
from visionmoe.layers.moe import MoEConfig
from visionmoe.models.moeify import mlp_blocks, moeify
from visionmoe.models.registry import create_model, list_models

HEADS = [
    "resnet18_cifar_dense_head",
    "resnet18_cifar_mixture_head",
    "resnet18_cifar_sparse_head",
    "resnet18_cifar_soft_head",
]
BACKBONES = ["cnn_resnet_cifar_moe", "cnn_dw_cifar_moe", "cnn_resnet_cifar", "cnn_dw_cifar"]
ALL = HEADS + BACKBONES
SPARSE = ("resnet18_cifar_sparse_head", "cnn_resnet_cifar_moe", "cnn_dw_cifar_moe")  # top-k: some experts per token
TINY_BACKBONE = {"width": 8, "depths": (1, 1, 1)}


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=7, **(TINY_BACKBONE if name in BACKBONES else {}), **kwargs)


def images(batch: int = 4, size: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_every_model_is_registered():
    assert set(ALL) <= set(list_models())


@pytest.mark.parametrize("name", ALL)
def test_create_forward_backward(name):
    model = tiny(name)
    torch.manual_seed(0)
    twin = create_model(name, num_classes=7, **(TINY_BACKBONE if name in BACKBONES else {}))
    assert type(twin) is type(model)
    assert model.num_classes == 7 and model.head_hidden_size == model.num_features

    model.train()
    x = images(8)
    out = model(x)
    assert out.shape == (8, 7)
    assert torch.isfinite(out).all()
    (out.sum() + visionmoe.collect_aux_loss(model)).backward()
    assert_every_parameter_learns(model)


def test_sparse_head_routes_two_of_four_dropless():
    # 8 samples × top-2 = 16 assignments over 4 experts, none dropped (dropless).
    model = tiny("resnet18_cifar_sparse_head").train()
    model(images(8)).sum().backward()
    [(_, moe)] = visionmoe.moe_layers(model)
    assert moe.router.k == 2 and moe.router.capacity_factor is None and moe.router.noise_std == 0.25
    loads = moe.last_stats.tokens_per_expert
    assert loads.sum().item() == 16 and moe.last_stats.dropped.item() == 0
    unused = (loads == 0).nonzero().flatten().tolist()
    for e in unused:  # an expert no sample chose still has a gradient tensor: exactly zero
        assert moe.experts.w1.grad[e].abs().sum() == 0


@pytest.mark.parametrize("name", ALL)
def test_reset_classifier(name):
    model = tiny(name).eval()
    x = images()
    with torch.no_grad():
        pre_logits = model.forward_head(model.forward_features(x), pre_logits=True)
    assert pre_logits.shape == (4, model.num_features)
    model.reset_classifier(3)
    assert model.num_classes == 3 and model(x).shape == (4, 3)
    model.reset_classifier(0)
    assert isinstance(model.get_classifier(), nn.Identity)
    with torch.no_grad():
        assert torch.equal(model(x), pre_logits)
    with pytest.raises(ValueError, match="global_pool='max'"):
        model.reset_classifier(3, global_pool="max")
    experts_biases = {n for n, _ in model.named_parameters() if n.endswith((".experts.b1", ".experts.b2"))}
    assert model.no_weight_decay() == experts_biases  # stacked (E, H) / (E, D): not caught by rank; none if dense


def test_heads_have_matched_capacity():
    # experts × expert width = 512 for every head: 1 × 512 (dense) and 4 × 128 (the MoE heads).
    expected = {
        "resnet18_cifar_dense_head": (1, 512, "dense"),
        "resnet18_cifar_mixture_head": (4, 128, "topk"),
        "resnet18_cifar_sparse_head": (4, 128, "topk"),
        "resnet18_cifar_soft_head": (4, 128, "soft_per_sample"),
    }
    for name, (experts, width, router) in expected.items():
        model = tiny(name)
        [(lname, moe)] = visionmoe.moe_layers(model)
        assert lname == "head_ffn" and moe.groups == "sample"
        assert (moe.num_experts, moe.hidden_dim, moe.router.name) == (experts, width, router), name
        assert moe.num_experts * moe.hidden_dim == 512
        assert moe.experts.w1.shape == (experts, 512, width)
        assert model.num_features == 512


@pytest.mark.parametrize("train", [True, False])
def test_mixture_head_runs_every_expert_on_every_sample(train):
    model = tiny("resnet18_cifar_mixture_head").train(train)
    [(_, moe)] = visionmoe.moe_layers(model)
    assert moe.router.k == 4 and moe.router.noise_std == 0 and moe.router.capacity_factor is None
    with torch.no_grad():
        model(images(6))
    assert moe.last_stats.tokens_per_expert.tolist() == [6, 6, 6, 6]
    assert moe.last_stats.dropped.item() == 0


@pytest.mark.parametrize("name", ALL)
def test_samples_are_independent_in_eval(name):
    # Per-sample routing (groups="sample") and BN in eval mode: changing samples 1.. of the batch
    # must leave sample 0's output unchanged: bit-identical for the per-sample Soft MoE head.
    model = tiny(name).eval()
    x = images(4)
    changed = x.clone()
    changed[1:] = images(3, seed=2)
    with torch.no_grad():
        before, after = model(x)[0], model(changed)[0]
    if name in SPARSE:
        # Same routing for sample 0, but the sort-based dispatch stacks each expert's rows from the
        # whole batch, so the GEMM sizes (and the float summation blocking) follow the other samples.
        torch.testing.assert_close(after, before, atol=1e-6, rtol=0)
    else:
        assert torch.equal(after, before)


@pytest.mark.parametrize("name", ALL)
def test_channels_last(name):
    model = tiny(name).eval()
    x = images()
    with torch.no_grad():
        expected = model(x)
        model = model.to(memory_format=torch.channels_last)
        x_cl = x.to(memory_format=torch.channels_last)
        torch.testing.assert_close(model(x_cl), expected, atol=1e-5, rtol=1e-5)
        if name in BACKBONES:  # the feature maps, MoE ones included, stay channels-last
            assert model.forward_features(x_cl).is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("name", ["cnn_resnet_cifar_moe", "cnn_dw_cifar_moe"])
def test_moe_stages_puts_moe_exactly_where_asked(name):
    depths = (1, 2, 1)
    cases = {"none": [], (2,): [2], -1: [2], (0, 1): [0, 1, 1], "all": [0, 1, 1, 2]}  # stage of each MoE block
    for moe_stages, stages in cases.items():
        model = timm.create_model(name, width=8, depths=depths, moe_stages=moe_stages)
        layers = visionmoe.moe_layers(model)
        assert [int(lname.split(".")[1]) for lname, _ in layers] == stages, moe_stages
        assert len(layers) == sum(depths[s] for s in set(stages))
    # default: the last stage only, E=8, top-2, per-image groups of H·W tokens
    model = timm.create_model(name, width=8, depths=depths)
    assert [lname for lname, _ in visionmoe.moe_layers(model)] == ["stages.2.blocks.0.mlp"]
    moe = model.stages[2].blocks[0].mlp
    assert (moe.num_experts, moe.router.name, moe.router.k, moe.groups) == (8, "topk", 2, "sample")


@pytest.mark.parametrize("name", ["cnn_resnet_cifar", "cnn_dw_cifar"])
def test_dense_twins(name):
    dense = timm.create_model(name, width=8, depths=(1, 1, 1))
    assert visionmoe.moe_layers(dense) == []
    moe = timm.create_model(name + "_moe", width=8, depths=(1, 1, 1))
    # each expert is as wide as the dense FFN it replaces
    assert moe.stages[2].blocks[0].mlp.hidden_dim == dense.stages[2].blocks[0].mlp.fc1.out_channels
    assert len(visionmoe.moe_layers(timm.create_model(name, width=8, depths=(1, 1, 1), moe_stages="all"))) == 3


@pytest.mark.parametrize("bad", [5, -4, "some", (0, 7), (1.5,), True])
@pytest.mark.parametrize("name", ["cnn_resnet_cifar_moe", "cnn_dw_cifar"])
def test_bad_moe_stages(name, bad):
    with pytest.raises(ValueError) as error:
        timm.create_model(name, width=8, depths=(1, 1, 1), moe_stages=bad)
    message = str(error.value)
    assert "\n" not in message
    assert f"moe_stages={bad!r}" in message
    assert "'all', 'none'" in message and "-3..2" in message


@pytest.mark.parametrize("bad", [0, -1, 0.05, "2"])
@pytest.mark.parametrize("name", ["cnn_resnet_cifar_moe", "cnn_dw_cifar", "cnn_dw_cifar_moe"])
def test_bad_hidden_ratio(name, bad):
    # 0.05 · 8 rounds down to no hidden unit in the first stage: refused, not a zero-channel FFN
    with pytest.raises(ValueError) as error:
        timm.create_model(name, width=8, depths=(1, 1, 1), hidden_ratio=bad)
    message = str(error.value)
    assert "\n" not in message and f"hidden_ratio={bad!r}" in message and "at width 8" in message


def test_moe_overrides_merge_with_the_head_defaults():
    model = tiny("resnet18_cifar_sparse_head", moe={"num_experts": 8})
    [(_, moe)] = visionmoe.moe_layers(model)
    # E=8 keeps the matched width (8 × 64 = 512) and the head's k=2 and dropless routing
    assert (moe.num_experts, moe.hidden_dim, moe.router.k, moe.router.capacity_factor) == (8, 64, 2, None)
    model = tiny("cnn_dw_cifar_moe", moe=MoEConfig(num_experts=2, router="soft_per_sample"))  # replaces
    assert {m.router.name for _, m in visionmoe.moe_layers(model)} == {"soft_per_sample"}
    with pytest.raises(ValueError, match="unknown MoE config keys"):
        tiny("resnet18_cifar_soft_head", moe={"experts": 4})
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model("cnn_resnet_cifar", pretrained=True)


def test_dense_backbone_upcycles_exactly_with_moeify():
    # The dense FFNs are fc1/act/fc2 1×1 convs, so moeify finds one per block; upcycled with k=1 and
    # renormalised gates, every token gets weight 1 on a copy of its FFN: the same function.
    dense = tiny("cnn_dw_cifar").eval()
    assert len(mlp_blocks(dense)) == 3
    config = {"num_experts": 2, "k": 1, "capacity_factor": None, "router_options": {"renormalize": True}}
    upcycled = moeify(copy.deepcopy(dense), "all", config, upcycle=True).eval()
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(upcycled(x), dense(x), atol=1e-5, rtol=1e-5)


def test_speed_settings_come_from_the_config():
    # backend and deterministic change speed, not results: settable as model.moe keys, kept when the router
    # changes, and passed to every MoE layer.
    from visionmoe.train.config import Config, apply_overrides
    from visionmoe.train.trainer import build_model

    cfg = apply_overrides(Config(), ["model.name=cnn_dw_cifar_moe", "model.kwargs.width=8", "model.moe.backend=padded"])
    cfg = apply_overrides(cfg, ["model.moe.deterministic=true", "model.moe.router=expert_choice"])
    model = build_model(cfg.model, 10, torch.randn(2, 3, 32, 32))
    layers = [m for _, m in visionmoe.moe_layers(model)]
    assert layers and all(
        (m.backend, m.deterministic, m.router.name) == ("padded", True, "expert_choice") for m in layers
    )
    with pytest.raises(ValueError, match="unknown MoE backend 'fast'"):
        tiny("cnn_dw_cifar_moe", moe={"backend": "fast"})
