"""airbench-style CIFAR CNN, dense twin and MoE: shapes, gradients, channels-last, whitening init, FLOPs.

Default widths (64, 256, 256) on 32×32 images where the maps' sizes matter (31 → 15 → 7 → 3, the
FFN of group 1 on a 7×7 map, 49 tokens per image); narrow widths elsewhere, for speed.
"""

import pytest
import timm
import torch
from grads import assert_every_parameter_learns
from torch import nn

import visionmoe
from visionmoe.analysis.profile import profile_model
from visionmoe.analysis.twin import dense_twin
from visionmoe.layers.moe import MoE
from visionmoe.models.airbench import LOGIT_SCALE, CifarAirbench, whitening_filters
from visionmoe.models.cnn import ConvFFN

NAMES = ["cifar_airbench_moe", "cifar_airbench"]
NARROW = {"widths": (16, 32, 32)}


pytestmark = pytest.mark.usefixtures("one_thread")


def create(name: str, seed: int = 0, **kwargs) -> CifarAirbench:
    torch.manual_seed(seed)
    return timm.create_model(name, **kwargs)


def images(batch: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_registered_with_timm_and_visionmoe():
    # `import visionmoe` is all it takes
    assert {"cifar_airbench", "cifar_airbench_moe"} <= set(visionmoe.list_models())
    assert {"cifar_airbench", "cifar_airbench_moe"} <= set(timm.list_models("cifar_airbench*"))
    model = timm.create_model("cifar_airbench_moe", num_classes=10)
    assert isinstance(model, CifarAirbench) and model.num_classes == 10
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model("cifar_airbench", pretrained=True)


@pytest.mark.parametrize("num_classes", [10, 100])
@pytest.mark.parametrize("name", NAMES)
def test_forward_shapes(name, num_classes):
    model = create(name, num_classes=num_classes).eval()
    x = images(2)
    with torch.no_grad():
        features = model.forward_features(x)
        out = model(x)
    assert features.shape == (2, 256, 3, 3)  # 32 → 31 (2×2 stem, no padding) → 15 → 7 → 3
    assert out.shape == (2, num_classes) and torch.isfinite(out).all()
    assert model.num_features == model.head_hidden_size == 256
    assert model.stem.weight.shape == (24, 3, 2, 2) and model.fc.bias is None


def test_architecture():
    moe_model, dense = create("cifar_airbench_moe"), create("cifar_airbench")
    # the FFN is in group 1 only (7×7 map), 256 wide: 8 experts of 2·256 = 512, or one dense FFN of 2·512 = 1024
    [(lname, moe)] = visionmoe.moe_layers(moe_model)
    assert lname == "groups.1.mlp" and moe.groups == "sample"
    assert (moe.num_experts, moe.dim, moe.hidden_dim, moe.router.name, moe.router.k) == (8, 256, 512, "topk", 2)
    assert moe_model.groups[0].mlp is None and moe_model.groups[2].mlp is None
    assert visionmoe.moe_layers(dense) == []
    ffn = dense.groups[1].mlp
    assert isinstance(ffn, ConvFFN) and (ffn.dim, ffn.hidden_dim) == (256, 1024)
    # the analysis package's FLOP-matched twin of the MoE model has the same width
    assert dense_twin(moe_model, match="flops").groups[1].mlp.hidden_dim == 1024
    # airbench's dirac init: the square conv2 is the identity, conv1 passes its first min(in, out) channels
    identity = torch.zeros(256, 256, 3, 3)
    identity[torch.arange(256), torch.arange(256), 1, 1] = 1
    assert torch.equal(dense.groups[2].conv2.weight, identity)
    assert torch.equal(dense.groups[1].conv1.weight[:64], identity[:64, :64])
    assert dense.groups[1].conv1.weight[64:].abs().sum() > 0  # the rest keep a random init
    # seeded alike, the twins share every weight but the FFN's (built last)
    moe_state, dense_state = moe_model.state_dict(), dense.state_dict()
    shared = [key for key in dense_state if ".mlp." not in key]
    assert len(shared) == len([key for key in moe_state if ".mlp." not in key]) > 20
    for key in shared:
        assert torch.equal(moe_state[key], dense_state[key]), key


@pytest.mark.parametrize("name", NAMES)
def test_backward_reaches_every_parameter(name):
    model = create(name).train()
    x = images(8)  # 8 images × 49 tokens × top-2 = 784 assignments over 8 experts
    out = model(x)
    assert out.shape == (8, 10) and torch.isfinite(out).all()
    (out.sum() + visionmoe.collect_aux_loss(model)).backward()
    assert_every_parameter_learns(model)


@pytest.mark.parametrize("name", NAMES)
def test_channels_last(name):
    model = create(name, **NARROW).eval()
    x = images()
    with torch.no_grad():
        expected = model(x)
        model = model.to(memory_format=torch.channels_last)
        x_cl = x.to(memory_format=torch.channels_last)
        torch.testing.assert_close(model(x_cl), expected, atol=1e-5, rtol=1e-5)
        assert model.forward_features(x_cl).is_contiguous(memory_format=torch.channels_last)


def correlated_images(batch: int, seed: int) -> torch.Tensor:
    # Every pixel is g·(1, 1, 1) + 0.3·n: a grey level g ~ N(0, 1) shared by the 3 channels plus
    # per-channel noise n ~ N(0, I), independent across pixels.
    gen = torch.Generator().manual_seed(seed)
    grey = torch.randn(batch, 1, 32, 32, generator=gen)
    return grey.expand(-1, 3, -1, -1) + 0.3 * torch.randn(batch, 3, 32, 32, generator=gen)


def patch_cov(x: torch.Tensor) -> torch.Tensor:
    """Covariance over all positions and images of the channels of x (B, C, H, W) -> (C, C)."""
    flat = x.transpose(0, 1).reshape(x.shape[1], -1).double()  # (C, B·H·W)
    return torch.cov(flat)


def test_init_from_data_whitens_patches():
    # By hand: a pixel's covariance is 1·11ᵀ + 0.09·I (eigenvalues 3.09 along grey, 0.09 twice) and
    # pixels are independent, so a 2×2×3 patch's covariance has eigenvalues 3.09 (×4) and 0.09 (×8):
    # condition number 34, far from white. Whitened with eps = 5e-4, direction i has variance
    # λ_i / (λ_i + eps): 3.09 / 3.0905 = 0.9998 and 0.09 / 0.0905 = 0.9945, and no covariance
    # between directions, so the 12 leading filters' outputs have covariance I to within 0.006.
    x = correlated_images(64, seed=0)
    raw = torch.linalg.eigvalsh(patch_cov(torch.nn.functional.unfold(x, 2).reshape(64, 12, 31, 31)))
    torch.testing.assert_close(raw, torch.tensor([0.09] * 8 + [3.09] * 4, dtype=torch.float64), atol=0.05, rtol=0.02)

    model = create("cifar_airbench", **NARROW)
    model.init_from_data(x)
    w = model.stem.weight
    assert torch.equal(w[12:], -w[:12])  # the 12 directions with both signs
    with torch.no_grad():
        z = model.stem(x)  # (64, 24, 31, 31): whitened patches, before the GELU
        z_new = model.stem(correlated_images(64, seed=1))  # unseen images of the same distribution
    cov = patch_cov(z[:, :12])
    torch.testing.assert_close(cov, torch.eye(12, dtype=torch.float64), atol=0.01, rtol=0)
    assert cov.diagonal().min() > 0.99 and cov.diagonal().max() < 1.0  # λ / (λ + eps) < 1
    torch.testing.assert_close(patch_cov(z_new[:, :12]), torch.eye(12, dtype=torch.float64), atol=0.05, rtol=0)
    torch.testing.assert_close(z.mean(dim=(0, 2, 3)), torch.zeros(24), atol=1e-4, rtol=0)  # bias = -w·mean
    # the functional twin gives the same filters, and the first one follows the top direction (grey)
    weight, bias = whitening_filters(x)
    assert torch.equal(weight, w) and torch.equal(bias, model.stem.bias)
    assert weight[0].std(dim=0).abs().max() < 0.05 * weight[0].abs().max()  # equal across R, G, B
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model.init_from_data(torch.randn(4, 1, 32, 32))


@pytest.mark.parametrize("name", NAMES)
def test_reset_classifier(name):
    model = create(name, **NARROW).eval()
    x = images()
    with torch.no_grad():
        pre_logits = model.forward_head(model.forward_features(x), pre_logits=True)
        logits = model(x)
    assert pre_logits.shape == (4, 32)
    torch.testing.assert_close(logits, model.fc(pre_logits) * LOGIT_SCALE)  # airbench's 1/9
    model.reset_classifier(3)
    assert model.num_classes == 3 and model(x).shape == (4, 3) and model.fc.bias is None
    model.reset_classifier(0)
    assert isinstance(model.get_classifier(), nn.Identity)
    with torch.no_grad():
        assert torch.equal(model(x), pre_logits)  # features, unscaled
    model.reset_classifier(5, global_pool="max")
    with pytest.raises(ValueError, match="global_pool='avg'"):
        model.reset_classifier(3, global_pool="avg")
    experts_biases = {n for n, _ in model.named_parameters() if n.endswith((".experts.b1", ".experts.b2"))}
    assert model.no_weight_decay() == experts_biases  # stacked (E, H) / (E, D): not caught by rank; none if dense


def test_dense_twin_matches_active_flops():
    # Per image, the FFN on 49 tokens of dim 256: each token through k=2 experts of width 512 is
    # 2 · (2·256·512 + 2·512·256) = 1,048,576 FLOPs, 51,380,224 for the 49; the dense twin's 1024-wide
    # FFN does the same. The MoE adds only its router, 49 · 2·256·8 = 200,704 FLOPs (0.07%).
    # Dropless routing processes every assignment, so the MoE's executed FLOPs are its active ones.
    x = images(2)
    moe_profile = profile_model(create("cifar_airbench_moe", moe={"capacity_factor": None}), x)
    dense_profile = profile_model(create("cifar_airbench"), x)
    assert moe_profile.expert_flops == 51_380_224 and moe_profile.router_flops == 200_704
    assert dense_profile.total_flops == moe_profile.total_flops - 200_704
    assert abs(dense_profile.total_flops / moe_profile.total_flops - 1) < 0.02
    assert 0.17 < moe_profile.rho < 0.19  # 51.4 M of 287.9 M
    # With the default capacity (factor 1.25) some assignments may be dropped; the active FLOPs are
    # still those of 98 assignments per image: the executed total minus the useful expert FLOPs plus them.
    capped = profile_model(create("cifar_airbench_moe"), x)
    active = capped.total_flops - capped.expert_flops + 51_380_224
    assert abs(dense_profile.total_flops / active - 1) < 0.02


def test_moe_stages_and_twin_widths():
    cases = {"none": [], 0: [0], -1: [2], (1, 2): [1, 2], "all": [0, 1, 2]}
    for moe_stages, groups in cases.items():
        model = timm.create_model("cifar_airbench_moe", moe_stages=moe_stages, **NARROW)
        assert [int(lname.split(".")[1]) for lname, _ in visionmoe.moe_layers(model)] == groups, moe_stages
    plain = timm.create_model("cifar_airbench", moe_stages="none")
    assert all(group.mlp is None for group in plain.groups)  # airbench94's own network
    assert sum(p.numel() for p in plain.parameters()) == 1_972_792
    # the dense twin's width follows the MoE it twins: k·H for token choice, capacity_factor·H for expert choice
    k1 = timm.create_model("cifar_airbench", moe={"k": 1}, **NARROW)
    assert k1.groups[1].mlp.hidden_dim == 64  # 1 · 2 · 32
    ec = timm.create_model("cifar_airbench", moe={"router": "expert_choice", "capacity_factor": 1.5}, **NARROW)
    assert ec.groups[1].mlp.hidden_dim == 96  # 1.5 · 2 · 32
    with pytest.raises(ValueError, match="tokens per group"):
        timm.create_model("cifar_airbench", moe={"router": "soft"}, **NARROW)
    moe = timm.create_model("cifar_airbench_moe", hidden_ratio=1.0, **NARROW).groups[1].mlp
    assert isinstance(moe, MoE) and moe.hidden_dim == 32
    for bad in (3, -4, "some", (0, 7), True):
        with pytest.raises(ValueError, match=r"moe_stages=.*-3\.\.2"):
            timm.create_model("cifar_airbench_moe", moe_stages=bad, **NARROW)
    with pytest.raises(ValueError, match="widths"):
        timm.create_model("cifar_airbench", widths=())
