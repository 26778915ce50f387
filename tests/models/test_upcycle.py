"""Dense timm checkpoints into MoE models, offline: ``pretrained_file=`` and ``moeify(..., upcycle=True)``.

Every test writes its own dense checkpoint (a tiny timm ViT / ConvNeXt with random weights) to a tmp
file. The exactness claim: with every expert a copy of the dense MLP f, an MoE computes
Σ_e w_e f(x) = (Σ_e w_e) f(x), so the upcycled model equals the dense one exactly when each token's
combine weights sum to one and no assignment is dropped. Compared in float64, where the rest of the
model rounds at ~1e-16; the routers compute their gates in float32 (as V-MoE), so renormalised top-2
weights sum to one within float32's rounding (~1e-7 relative), while top-1's renormalised weight is
w / w = 1.0 exactly.
"""

import copy

import pytest
import timm
import torch
from timm.layers import Mlp
from torch import nn

from visionmoe import MoEConfig, moe_layers
from visionmoe.models import moeify

pytestmark = pytest.mark.usefixtures("one_thread")

NO_NOISE = {"noise_std": 0.0}
# Settings whose combine weights sum to one per token, with no drops (the table in moeify's docstring),
# and the largest |MoE − dense| in float64: k = 1 exactly, the rest to float32's rounding of the gates.
EXACT = {
    "topk k=1 renormalised, dropless": MoEConfig(
        num_experts=4, router="topk", k=1, capacity_factor=None, router_options={**NO_NOISE, "renormalize": True}
    ),
    "topk k=2 renormalised, dropless": MoEConfig(
        num_experts=4, router="topk", k=2, capacity_factor=None, router_options={**NO_NOISE, "renormalize": True}
    ),
    # capacity_factor = E / k = 2: C = ceil(2·S·2/4) = S, the most one expert can receive: nothing dropped
    "topk k=2 renormalised, capacity factor E/k": MoEConfig(
        num_experts=4, router="topk", k=2, capacity_factor=2.0, router_options={**NO_NOISE, "renormalize": True}
    ),
    "topk k=E (the whole softmax), dropless": MoEConfig(
        num_experts=4, router="topk", k=4, capacity_factor=None, router_options=NO_NOISE
    ),
    "sinkhorn_topk k=2 renormalised, dropless": MoEConfig(
        num_experts=4, router="sinkhorn_topk", k=2, capacity_factor=None, router_options={"renormalize": True}
    ),
}
# Settings that do not guarantee it (so the equality test can fail, and does for these).
NOT_EXACT = {
    "topk k=2 not renormalised": MoEConfig(
        num_experts=4, router="topk", k=2, capacity_factor=None, router_options=NO_NOISE
    ),
    "topk k=1 renormalised, capacity factor 1": MoEConfig(
        num_experts=4, router="topk", k=1, capacity_factor=1.0, router_options={**NO_NOISE, "renormalize": True}
    ),
    "expert_choice": MoEConfig(num_experts=4, router="expert_choice"),
    "soft (slots mix tokens)": MoEConfig(num_experts=4, router="soft"),
}
VIT = {"img_size": 32, "patch_size": 4, "embed_dim": 64, "depth": 4, "num_heads": 2, "num_classes": 10}


def dense_vit_file(tmp_path):
    torch.manual_seed(0)
    dense = timm.create_model("vit_tiny_patch16_224", **VIT).eval()
    path = tmp_path / "vit_dense.pth"
    torch.save(dense.state_dict(), path)
    return dense, path


def max_error(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((a.double().eval()(x.double()) - b.double().eval()(x.double())).abs().max())


@pytest.mark.parametrize("setting", list(EXACT))
def test_vit_moe_from_a_dense_file_equals_the_dense_model(tmp_path, setting):
    dense, path = dense_vit_file(tmp_path)
    arch = {k: VIT[k] for k in ("embed_dim", "depth", "num_heads")}
    moe = timm.create_model("vit_moe_tiny_patch4_32", pretrained_file=path, moe=EXACT[setting], **arch)
    assert [n for n, _ in moe_layers(moe)] == ["blocks.1.mlp.moe", "blocks.3.mlp.moe"]  # last-2 of 4
    assert moe.pretrained_cfg["file"] == str(path)
    bound = 1e-12 if "k=1" in setting else 1e-6
    assert max_error(moe, dense, torch.randn(3, 3, 32, 32)) < bound


@pytest.mark.parametrize("setting", list(NOT_EXACT))
def test_settings_without_the_guarantee_differ(tmp_path, setting):
    dense, path = dense_vit_file(tmp_path)
    arch = {k: VIT[k] for k in ("embed_dim", "depth", "num_heads")}
    moe = timm.create_model("vit_moe_tiny_patch4_32", pretrained_file=path, moe=NOT_EXACT[setting], **arch)
    assert max_error(moe, dense, torch.randn(3, 3, 32, 32)) > 1e-4  # measured 1e-3 to 0.25


@pytest.mark.parametrize(
    ("dense_name", "moe_name", "depths"),
    [
        ("convnext_atto", "convnext_moe_atto", (1, 1, 2, 1)),  # 1×1-conv MLPs on NCHW maps
        ("convnext_tiny", "convnext_moe_tiny", (1, 1, 1, 1)),  # Linear MLPs on NHWC maps
    ],
)
def test_convnext_moe_from_a_dense_file(tmp_path, dense_name, moe_name, depths):
    torch.manual_seed(0)
    dense = timm.create_model(dense_name, depths=depths).eval()  # 1000 ImageNet classes
    path = tmp_path / f"{dense_name}.safetensors"
    from safetensors.torch import save_file

    save_file(dense.state_dict(), path)
    k1 = EXACT["topk k=1 renormalised, dropless"]
    moe = timm.create_model(
        moe_name, depths=depths, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, moe=k1
    )
    x = torch.randn(2, 3, 32, 32)
    assert max_error(moe, dense, x) < 1e-12
    # Another label set: the dense model's classifier is left out, the rest is upcycled all the same.
    ten = timm.create_model(moe_name, depths=depths, pretrained_file=path, moe=k1, num_classes=10).double().eval()
    with torch.no_grad():
        torch.testing.assert_close(ten.forward_features(x.double()), dense.double().forward_features(x.double()))
    assert ten.get_classifier().out_features == 10


def test_moeify_upcycles_a_dense_model_loaded_from_a_local_file(tmp_path):
    # timm's own way to a local checkpoint, then moeify: the same exactness. (The overlay states the file's
    # 10 classes: timm drops a checkpoint's classifier when the cfg's num_classes differs from the model's.)
    dense, path = dense_vit_file(tmp_path)
    overlay = {"file": str(path), "num_classes": 10}
    loaded = timm.create_model("vit_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=overlay, **VIT)
    moe = moeify(loaded, "every-2", EXACT["topk k=1 renormalised, dropless"], upcycle=True)
    assert len(moe_layers(moe)) == 2
    assert max_error(moe, dense, torch.randn(2, 3, 32, 32)) < 1e-12


def upcycled_mlp(router: str) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    block = nn.Module()
    block.mlp = Mlp(16, 32)
    dense = copy.deepcopy(block.mlp).double()
    moeify(block, "all", {"num_experts": 4, "router": router}, upcycle=True)
    return block.mlp.double(), dense


def test_soft_moe_is_exact_on_one_token_groups_only():
    # Soft MoE: slot p's input is Σ_s D[s, p] x_s with D a softmax over the group's tokens, and the combine
    # sums to one per token. With one token per group (a head on (B, D) vectors) D = 1, every slot's input
    # is that token, and the upcycled layer is the MLP. With 6 tokens the slots mix tokens, and a nonlinear
    # expert gives f(Σ_s D_s x_s) ≠ Σ_s D_s f(x_s).
    moe, dense = upcycled_mlp("soft")
    with torch.no_grad():
        vectors = torch.randn(5, 16, dtype=torch.float64)
        assert float((moe(vectors) - dense(vectors)).abs().max()) < 1e-6  # gates in float32
        tokens = torch.randn(5, 6, 16, dtype=torch.float64)
        assert float((moe(tokens) - dense(tokens)).abs().max()) > 1e-4
    # Per-sample Soft MoE's dispatch is a softmax over the token's slots instead: each slot sees D[s, p] · x,
    # a scaled token, so even one token per group is not the MLP.
    moe, dense = upcycled_mlp("soft_per_sample")
    with torch.no_grad():
        assert float((moe(vectors) - dense(vectors)).abs().max()) > 1e-4


def test_a_standard_vit_checkpoint_loads_into_the_cifar_moe(tmp_path):
    # A 224-px /16 dense ViT into the 32-px /4 MoE: timm's filter resamples the patch and position embeddings.
    torch.manual_seed(0)
    arch = {"embed_dim": 64, "depth": 2, "num_heads": 2}
    dense = timm.create_model("vit_tiny_patch16_224", **arch)
    torch.save({"state_dict": dense.state_dict()}, tmp_path / "in1k.pth")
    moe = timm.create_model("vit_moe_tiny_patch4_32", pretrained_file=tmp_path / "in1k.pth", placement="tail-2", **arch)
    assert moe.patch_embed.proj.weight.shape[-2:] == (4, 4) and moe.pos_embed.shape[1] == 1 + 64
    experts = moe.blocks[1].mlp.moe.experts
    assert torch.equal(experts.w1[2], dense.blocks[1].mlp.fc1.weight.T)  # every expert a copy
    assert torch.equal(moe.blocks[0].attn.qkv.weight, dense.blocks[0].attn.qkv.weight)


def test_weight_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"pretrained_file='.*nowhere.pth' is not a file"):
        timm.create_model("vit_moe_tiny_patch4_32", pretrained_file=tmp_path / "nowhere.pth")
    with pytest.raises(ValueError, match="no pretrained weights to download; pass pretrained_file=PATH") as e:
        timm.create_model("convnext_moe_atto", pretrained=True)
    assert "\n" not in str(e.value)
    torch.manual_seed(0)
    torch.save(timm.create_model("vit_tiny_patch16_224", **{**VIT, "embed_dim": 32}).state_dict(), tmp_path / "w.pth")
    with pytest.raises(RuntimeError, match="size mismatch"):  # another width: torch's strict load names the keys
        timm.create_model(
            "vit_moe_tiny_patch4_32", pretrained_file=tmp_path / "w.pth", embed_dim=64, depth=4, num_heads=2
        )


def test_cnn_models_load_their_own_weights_file(tmp_path):
    # The CNN families have no dense counterpart to upcycle from: pretrained_file loads the model's own weights.
    torch.manual_seed(0)
    trained = timm.create_model("resnet18_cifar_sparse_head", width=8)
    torch.save(trained.state_dict(), tmp_path / "head.pth")
    torch.manual_seed(1)
    loaded = timm.create_model("resnet18_cifar_sparse_head", width=8, pretrained_file=tmp_path / "head.pth")
    for (name, a), (_, b) in zip(trained.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_a_weights_file_with_another_class_count_than_the_cfg_loads_whole_and_strictly(tmp_path):
    # timm judged the head by the pretrained_cfg's num_classes (10 here): a 100-class model's own file
    # lost its classifier to a fresh init, and any model with num_classes != the cfg's loaded non-strictly.
    torch.manual_seed(0)
    trained = timm.create_model("cnn_resnet_cifar_moe", width=8, num_classes=100).eval()
    torch.save(trained.state_dict(), tmp_path / "cnn100.pt")
    torch.manual_seed(1)
    loaded = timm.create_model("cnn_resnet_cifar_moe", width=8, num_classes=100, pretrained_file=tmp_path / "cnn100.pt")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(trained(x), loaded.eval()(x))
    # a dense ViT of depth 2 into an MoE of depth 4 with 10 classes: blocks 2-3 are missing from the file
    dense = timm.create_model("vit_tiny_patch16_224", **{**VIT, "depth": 2})
    torch.save(dense.state_dict(), tmp_path / "depth2.pth")
    with pytest.raises(RuntimeError, match="Missing key"):
        timm.create_model("vit_moe_tiny_patch4_32", pretrained_file=tmp_path / "depth2.pth", **VIT)
