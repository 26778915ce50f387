"""ViT and ConvNeXt MoE models, placement, and moeify on timm models."""

import copy
import pickle

import pytest
import timm
import torch
from torch import nn

import visionmoe
from visionmoe import MoEConfig, moe_layers
from visionmoe.models import mlp_blocks, moeify, resolve_placement

# Small but real: 224-px models are built at 32 px (4 tokens for /16) to keep the suite fast.
FAMILY = {
    "vit_moe_tiny_patch4_32": {},
    "vit_moe_small_patch4_32": {"depth": 4},
    "vit_moe_small_patch16_224": {"img_size": 32, "depth": 4},
    "vit_moe_base_patch16_224": {"img_size": 32, "depth": 4},
    "convnext_moe_atto": {},
    "convnext_moe_femto": {},
    "convnext_moe_pico": {},
    "convnext_moe_nano": {},
    "convnext_moe_tiny": {"depths": (1, 1, 2, 2)},
}


def test_every_vit_convnext_model_is_covered():
    registered = {n for n in visionmoe.list_models() if n.startswith(("vit_moe", "convnext_moe"))}
    assert registered == set(FAMILY)


@pytest.mark.parametrize("name", list(FAMILY))
def test_model_forward_backward_and_timm_api(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=7, **FAMILY[name]).train()
    assert len(moe_layers(model)) == 2  # "last-2" by default
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, 7) and bool(torch.isfinite(out).all())
    aux = visionmoe.collect_aux_loss(model)
    assert bool(torch.isfinite(aux)) and float(aux.detach()) > 0
    (out.square().mean() + aux).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing[:5]}"
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())
    features = model.forward_features(x)
    assert model.forward_head(features).shape == (2, 7)
    assert model.forward_head(features, pre_logits=True).shape == (2, model.num_features)
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)
    assert isinstance(model.no_weight_decay(), set)


def test_visionmoe_create_model_and_overrides():
    model = visionmoe.create_model(
        "vit_moe_tiny_patch4_32", depth=8, placement="every-2", moe={"num_experts": 4, "router": "expert_choice"}
    )
    names = [n for n, _ in moe_layers(model)]
    assert names == [f"blocks.{i}.mlp.moe" for i in (1, 3, 5, 7)]
    assert all(m.router.name == "expert_choice" and m.num_experts == 4 for _, m in moe_layers(model))
    with pytest.raises(ValueError, match="unknown model 'vit_moe_huge'"):
        visionmoe.create_model("vit_moe_huge")
    with pytest.raises(ValueError, match="no pretrained weights"):
        visionmoe.create_model("convnext_moe_atto", pretrained=True)
    with pytest.raises(ValueError, match="unknown MoE config keys"):
        visionmoe.create_model("vit_moe_tiny_patch4_32", moe={"experts": 4})


@pytest.mark.parametrize(
    ("placement", "eight", "twelve"),
    [
        ("every-2", [1, 3, 5, 7], [1, 3, 5, 7, 9, 11]),
        ("every-3", [2, 5], [2, 5, 8, 11]),
        ("last-2", [5, 7], [9, 11]),
        ("last-3", [3, 5, 7], [7, 9, 11]),
        ("tail-2", [6, 7], [10, 11]),
        ("all", list(range(8)), list(range(12))),
        ("none", [], []),
        ([0, -1], [0, 7], [0, 11]),
    ],
)
def test_placement_indices(placement, eight, twelve):
    assert resolve_placement(placement, 8) == eight
    assert resolve_placement(placement, 12) == twelve
    # ... and the models put MoE exactly there.
    for depth, expected in ((8, eight), (12, twelve)):
        model = visionmoe.create_model("vit_moe_tiny_patch4_32", depth=depth, placement=placement)
        assert [n for n, _ in moe_layers(model)] == [f"blocks.{i}.mlp.moe" for i in expected]


def test_convnext_placement_over_stages():
    # convnext atto: stages of 2, 2, 6, 2 blocks = 12 in module order; last-2 -> 9, 11; tail-2 -> 10, 11.
    model = visionmoe.create_model("convnext_moe_atto", placement="tail-2")
    assert [n for n, _ in moe_layers(model)] == ["stages.3.blocks.0.mlp.moe", "stages.3.blocks.1.mlp.moe"]


@pytest.mark.parametrize(
    ("placement", "message"),
    [
        ("every2", "unknown placement 'every2'; choose one of: every-<n>"),
        ("last-7", "needs 7 odd blocks, the model has 6 (12 blocks)"),
        ([12], "block index 12 out of range for a model of 12 blocks"),
        ([-13], "block index -13 out of range"),
        ("every-0", "unknown placement 'every-0'"),
        ((True,), "block index True is not an int (a model of 12 blocks)"),
        ([1, False], "block index False is not an int"),
        (True, "unknown placement True; choose one of: every-<n>"),
        ([1.0], "block index 1.0 is not an int"),
        (12, "block index 12 out of range for a model of 12 blocks"),
        (1.5, "unknown placement 1.5; choose one of: every-<n>"),
    ],
)
def test_bad_placement(placement, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        resolve_placement(placement, 12)
    assert "\n" not in str(e.value)


def test_placement_plain_int():
    # A plain int is one block, as moe_stages takes one stage: placement=1 is [1], -1 the last block.
    assert resolve_placement(1, 12) == [1]
    assert resolve_placement(-1, 12) == [11]
    model = visionmoe.create_model("vit_moe_tiny_patch4_32", depth=4, placement=1)
    assert [n for n, _ in moe_layers(model)] == ["blocks.1.mlp.moe"]
    with pytest.raises(ValueError, match="block index True is not an int"):
        visionmoe.create_model("vit_moe_tiny_patch4_32", depth=4, placement=(True,))


IDENTITY_MOE = MoEConfig(
    num_experts=4, router="topk", k=2, capacity_factor=None, router_options={"renormalize": True, "noise_std": 0.0}
)


@pytest.mark.parametrize(("name", "size"), [("vit_tiny_patch16_224", 224), ("convnext_atto", 64)])
def test_moeify_upcycled_equals_original(name, size):
    # Identical experts + renormalised top-k weights (sum to 1) + no dropping: Σ_e w_e f(x) = f(x).
    torch.manual_seed(0)
    dense = timm.create_model(name, pretrained=False).eval()
    moe = moeify(copy.deepcopy(dense), "every-2", IDENTITY_MOE, upcycle=True).eval()
    assert len(moe_layers(moe)) == len(mlp_blocks(dense)) // 2
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), dense(x), rtol=1e-5, atol=1e-5)


def test_moeify_channels_last_linear_mlp_and_noise():
    # convnext with Linear MLPs on NHWC maps (conv_mlp=False): routed as H·W tokens per image.
    torch.manual_seed(0)
    dense = timm.create_model("convnext_atto", conv_mlp=False).eval()
    moe = moeify(copy.deepcopy(dense), "last-2", IDENTITY_MOE, upcycle=True).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), dense(x), rtol=1e-5, atol=1e-5)
    # With noise the experts differ from each other but stay close to the dense MLP.
    noisy = moeify(copy.deepcopy(dense), "last-2", IDENTITY_MOE, upcycle=True, upcycle_noise=0.01)
    experts = moe_layers(noisy)[0][1].experts
    assert not torch.equal(experts.w1[0], experts.w1[1])
    dense_w1 = dense.stages[2].blocks[5].mlp.fc1.weight.T
    assert (experts.w1[0] - dense_w1).abs().max() < 0.1 * dense_w1.abs().max()


def test_moeify_errors():
    resnet = timm.create_model("resnet18", pretrained=False)
    with pytest.raises(ValueError, match="found no block with an MLP") as e:
        moeify(resnet)
    assert "\n" not in str(e.value)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2)
    with pytest.raises(ValueError, match="out of range"):
        moeify(vit, [2])
    with pytest.raises(ValueError, match="hidden_dim must be its width 768"):
        moeify(vit, "all", upcycle=True, hidden_dim=100)
    with pytest.raises(ValueError, match="upcycle_noise must be >= 0"):
        moeify(vit, "all", upcycle=True, upcycle_noise=-1.0)


def test_moeify_refuses_mlps_that_are_more_than_fc1_act_fc2():
    # A gated MLP (EVA-02's GluMlp: fc1 gives 2H, fc2 takes H) or one with extra layers (PVTv2's depthwise
    # conv) would lose its gate or its extra layers inside plain experts: refused, with the reason.
    from timm.layers import GluMlp, Mlp

    def model_with(mlp):
        block = nn.Module()
        block.mlp = mlp
        return nn.Sequential(block)

    with pytest.raises(ValueError, match=r"cannot replace GluMlp .*gated MLP") as e:
        moeify(model_with(GluMlp(8, 32)))
    assert "\n" not in str(e.value)
    extra = Mlp(8, 16)
    extra.dwconv = nn.Conv2d(16, 16, 3, padding=1, groups=16)
    with pytest.raises(ValueError, match=r"cannot replace Mlp .*extra layers dwconv"):
        moeify(model_with(extra))
    assert mlp_blocks(model_with(extra)) == []  # listed as not MoE-able, not as a block to replace


def test_moeify_keeps_the_mlps_dropout():
    # timm's Mlp drops after the activation and after fc2 (proj_drop_rate): the MoE block drops too.
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, embed_dim=32, num_heads=2, proj_drop_rate=0.5)
    moeify(vit, "all", {"num_experts": 2, "router_options": {"noise_std": 0.0}})
    mlp = vit.blocks[0].mlp
    assert isinstance(mlp.drop, nn.Dropout) and mlp.drop.p == 0.5
    assert isinstance(mlp.moe.experts.act[1], nn.Dropout) and mlp.moe.experts.act[1].p == 0.5
    x = torch.randn(2, 4, 32)
    with torch.no_grad():
        assert not torch.equal(mlp.train()(x), mlp(x))  # stochastic in training
        assert torch.equal(mlp.eval()(x), mlp(x))


def test_moeify_names_the_experts_biases_for_timms_optimizer():
    # A plain timm model keeps timm's no_weight_decay(); moeify adds the experts' stacked (E, H) / (E, D)
    # biases, which timm's create_optimizer_v2 would otherwise decay (ndim > 1, no ".bias" suffix).
    from timm.optim import create_optimizer_v2

    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, embed_dim=32, num_heads=2)
    timm_names = set(vit.no_weight_decay())
    moeify(vit, "all", {"num_experts": 2})
    biases = {n for n, _ in vit.named_parameters() if n.endswith((".experts.b1", ".experts.b2"))}
    assert len(biases) == 4 and vit.no_weight_decay() == timm_names | biases
    groups = create_optimizer_v2(vit, "sgd", weight_decay=0.1).param_groups
    undecayed = next(g for g in groups if g["weight_decay"] == 0)
    assert {id(p) for n, p in vit.named_parameters() if n in biases} <= {id(p) for p in undecayed["params"]}
    for copied in (copy.deepcopy(vit), pickle.loads(pickle.dumps(vit))):
        assert copied.no_weight_decay() == vit.no_weight_decay()
    convnext = timm.create_model("convnext_atto")  # no no_weight_decay of its own
    moeify(convnext, "last-2", {"num_experts": 2})
    assert convnext.no_weight_decay() == {n for n, _ in convnext.named_parameters() if ".experts.b" in n}


def test_moeify_generic_model_with_mlp_blocks():
    # Any model whose blocks expose an `mlp` with fc1/act/fc2 works, e.g. a tiny hand-made one.
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = nn.Sequential()
            self.mlp.fc1, self.mlp.act, self.mlp.fc2 = nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)

        def forward(self, x):
            return x + self.mlp(x)  # nn.Sequential runs fc1, act, fc2 in order

    model = nn.Sequential(Block(), Block(), Block())
    moeify(model, [1], {"num_experts": 2, "k": 1})
    assert [n for n, _ in moe_layers(model)] == ["1.mlp.moe"]
    assert model(torch.randn(3, 5, 8)).shape == (3, 5, 8)


def test_import_visionmoe_registers_models_with_timm():
    # In a fresh interpreter: `import visionmoe` alone must make timm know the names.
    import subprocess
    import sys

    code = "import visionmoe, timm; m = timm.create_model('convnext_moe_atto', num_classes=3); print(m.num_classes)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "3"
