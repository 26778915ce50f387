"""Every registered model against the checks timm's own tests/test_models.py applies to timm's models.

Parametrised over ``visionmoe.list_models()``: forward/backward with a gradient for every parameter
(test_model_backward), grad checkpointing leaves the output unchanged (test_model_forward), the
default_cfg keys and the classifier / pooling API (test_model_default_cfgs), ``features_only=True``
(test_model_forward_features) and ``forward_intermediates`` (test_model_forward_intermediates), plus
the parameter count's stability. Small: every model at 32 px with its smallest depths (ViTs of 3
blocks, the last 2 MoE; ConvNeXts of one block per stage, blocks 1 and 3 MoE).

Not held to timm's TorchScript and torch.fx checks: MoE routing reads dataclass plans and takes
data-dependent shapes, which neither can trace; ``torch.export`` is the supported trace
(tests/test_export.py).
"""

import math

import pytest
import timm
import torch
from model_sizes import SMALL
from timm.data import resolve_data_config
from timm.optim import create_optimizer_v2

import visionmoe
from visionmoe.data import CIFAR_MEAN, CIFAR_STD
from visionmoe.layers import Experts
from visionmoe.train.build import param_groups

pytestmark = pytest.mark.usefixtures("one_thread")

MODELS = sorted(SMALL)
TRANSFORMERS = {n for n in MODELS if n.startswith("vit_")}  # timm's "non-standard" models: (B, N, D) features
# A head FFN after the pool, as timm's early-pool models: the ResNet-18 heads and the CNN's per-sample head.
EARLY_POOL = {n for n in MODELS if n.startswith("resnet18_cifar_") or n.endswith("_head")}
FEATURE_LEVELS = {"vit": 3, "convnext": 4, "cnn": 3, "cifar": 3, "resnet18": 4}  # default features_only levels


def create(name, **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, **{**SMALL[name][0], **kwargs})


def inputs(name, batch_size):
    size = SMALL[name][1]
    return torch.randn(batch_size, 3, size, size)


def test_every_model_is_covered():
    assert set(visionmoe.list_models()) == set(SMALL)


@pytest.mark.parametrize("name", MODELS)
def test_pretrained_cfg(name):
    model = create(name)
    cfg = model.pretrained_cfg
    assert model.default_cfg is cfg
    assert cfg["architecture"] == name and not cfg.get("url") and not cfg.get("hf_hub_id")
    data = resolve_data_config(model=model)
    if name.endswith("_224") or name.startswith("convnext"):
        assert cfg["input_size"] == (3, 224, 224) and cfg["num_classes"] == 1000
        assert data["mean"] == timm.data.IMAGENET_DEFAULT_MEAN and data["crop_pct"] == 0.875
    else:  # CIFAR: the whole 32×32 image, CIFAR-10's mean and std
        assert cfg["num_classes"] == 10 and model.num_classes == 10
        assert data["input_size"] == (3, 32, 32) and data["crop_pct"] == 1.0
        assert data["mean"] == CIFAR_MEAN and data["std"] == CIFAR_STD
    state = model.state_dict()
    assert f"{cfg['first_conv']}.weight" in state
    assert f"{cfg['classifier']}.weight" in state


@pytest.mark.parametrize("name", MODELS)
def test_backward_every_parameter_gets_a_gradient(name):
    # timm's test_model_backward: num_classes=42, train mode, batch 2, every parameter has a gradient.
    model = create(name, num_classes=42).train()
    num_params = sum(p.numel() for p in model.parameters())
    out = model(inputs(name, 2))
    assert out.shape == (2, 42) and not torch.isnan(out).any()
    (out.mean() + visionmoe.collect_aux_loss(model)).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing[:5]}"
    assert sum(p.grad.numel() for p in model.parameters()) == num_params
    # The parameter count is stable: the same model built again (on the meta device: no memory, no init
    # cost) has the same parameters, in the same order, of the same sizes.
    with torch.device("meta"):
        again = create(name, num_classes=42)
    assert [n for n, _ in again.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert sum(p.numel() for p in again.parameters()) == num_params


@pytest.mark.parametrize("name", MODELS)
def test_grad_checkpointing_keeps_the_output(name):
    # timm's test_model_forward: set_grad_checkpointing() changes nothing in eval; here also in backward.
    model = create(name).eval()
    x = inputs(name, 2)
    with torch.no_grad():
        expected = model(x)
    model.set_grad_checkpointing()
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)
    x.requires_grad_(True)
    model(x).sum().backward()  # recomputation in backward works (and gives every stage a gradient)
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("name", MODELS)
def test_default_cfg_features_head_and_pooling(name):
    # timm's test_model_default_cfgs / _non_std: forward_features, pre_logits, reset_classifier(0) and (0, '').
    model = create(name).eval()
    cfg, x = model.default_cfg, inputs(name, 1)
    assert model.num_classes >= 0 and model.num_features > 0 and model.head_hidden_size > 0
    with torch.no_grad():
        features = model.forward_features(x)
        pre_logits = model.forward_head(features, pre_logits=True)
        if name in TRANSFORMERS:
            assert features.shape[-1] == model.num_features  # (B, N, D)
        else:
            # pool_size is the final map at the cfg's input size; at ours it scales with the input
            scale = x.shape[-1] / cfg["input_size"][-1]
            expected = tuple(round(p * scale) for p in cfg["pool_size"])
            assert features.shape[1] == model.num_features and tuple(features.shape[2:]) == expected
        assert pre_logits.shape == (1, model.head_hidden_size)
        model.reset_classifier(0)
        assert model.num_classes == 0
        pooled = model(x)
        assert pooled.shape == pre_logits.shape
        torch.testing.assert_close(pooled, pre_logits)
        if name in TRANSFORMERS:
            return
        if name in EARLY_POOL:  # its head FFN works on the pooled vector: no unpooled output
            with pytest.raises(ValueError, match="global_pool") as e:
                model.reset_classifier(0, "")
            assert "\n" not in str(e.value)
            return
        model.reset_classifier(0, "")
        assert model(x).shape == features.shape
        unpooled = create(name, num_classes=0, global_pool="").eval()
        assert unpooled(x).shape == features.shape
    if not name.startswith("convnext"):
        with pytest.raises(ValueError, match=r"global_pool='' .*needs num_classes=0"):
            model.reset_classifier(10, "")
        model.reset_classifier(10)  # a classifier again, with the model's own pooling back (as timm's heads)
        assert model.num_classes == 10 and model.global_pool == model.default_pool
        with torch.no_grad():
            assert model(x).shape == (1, 10)
        with pytest.raises(ValueError, match=r"num_classes must be an int >= 0.*num_classes=-1"):
            model.reset_classifier(-1)


@pytest.mark.parametrize("name", MODELS)
def test_features_only(name):
    # timm's test_model_forward_features: channels and reductions match feature_info.
    model = create(name, features_only=True).eval()
    channels, reductions = model.feature_info.channels(), model.feature_info.reduction()
    family = name.split("_")[0]
    assert len(channels) == FEATURE_LEVELS[family] >= 3
    x = inputs(name, 1)
    with torch.no_grad():
        outputs = model(x)
    assert len(outputs) == len(channels)
    for c, r, o in zip(channels, reductions, outputs, strict=True):
        assert o.shape[0] == 1 and o.shape[1] == c  # NCHW
        assert o.shape[2] <= math.ceil(x.shape[2] / r) + 1 and o.shape[3] <= math.ceil(x.shape[3] / r) + 1
        assert not torch.isnan(o).any()
    # out_indices picks levels, as for timm's models
    two = create(name, features_only=True, out_indices=(0, -1)).eval()
    assert len(two(x)) == 2


@pytest.mark.parametrize("name", MODELS)
def test_forward_intermediates(name):
    # timm's test_model_forward_intermediates: the final output equals forward_features, also checkpointed.
    model = create(name).eval()
    info = timm.models.FeatureInfo(model.feature_info, len(model.feature_info))
    x = inputs(name, 1)
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x, output_fmt="NCHW")
        assert len(intermediates) == len(info.channels()) >= 3
        for c, o in zip(info.channels(), intermediates, strict=True):
            assert o.shape[1] == c and not torch.isnan(o).any()
        torch.testing.assert_close(final, model.forward_features(x))
        last = model.forward_intermediates(x, indices=1, intermediates_only=True)
        assert len(last) == 1
        torch.testing.assert_close(last[0], intermediates[-1])
        # stopping early after the last stage but one (the loop breaks at the last): that stage's map, un-normed
        n = len(intermediates)
        final_early, (early,) = model.forward_intermediates(x, indices=[n - 2], stop_early=True, output_fmt="NCHW")
        torch.testing.assert_close(early, intermediates[n - 2])
        if final_early.dim() == 4:  # CNN maps (a ViT's token sequence has no stage shape to compare)
            torch.testing.assert_close(final_early, early)
        model.set_grad_checkpointing()
        again, _ = model.forward_intermediates(x, output_fmt="NCHW")
        torch.testing.assert_close(again, final, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["cnn_resnet_cifar_moe", "resnet18_cifar_sparse_head", "cifar_airbench_moe"])
def test_cnn_prune_and_group_matcher(name):
    model = create(name)
    groups = timm.models.group_parameters(model, model.group_matcher())
    assert sum(len(g) for g in groups.values()) == len(list(model.parameters()))
    kept = model.prune_intermediate_layers([0, 1])
    assert kept == [0, 1] and len(model.trunk()) == 2
    assert model.num_classes == 0 and model.num_features == model.feature_info[1]["num_chs"]
    with torch.no_grad():
        assert model.forward_features(inputs(name, 1)).shape[1] == model.num_features


# One MoE model of each family (each module of entry points), for what holds per model class.
FAMILIES = {
    "visionmoe.models.vit": "vit_moe_tiny_patch4_32",
    "visionmoe.models.convnext": "convnext_moe_atto",
    "visionmoe.models.cnn": "cnn_resnet_cifar_moe",
    "visionmoe.models.cnn_head": "cnn_resnet_cifar_head",
    "visionmoe.models.airbench": "cifar_airbench_moe",
    "visionmoe.models.cifar_resnet": "resnet18_cifar_sparse_head",
}


def test_families_cover_the_registry():
    assert {timm.models.model_entrypoint(n).__module__ for n in visionmoe.list_models()} == set(FAMILIES)


@pytest.mark.parametrize("name", sorted(FAMILIES.values()))
def test_no_weight_decay_names_the_expert_biases(name):
    # The experts' biases are stacked (E, H) / (E, D) tensors: timm's rank rule (ndim <= 1 or ".bias")
    # misses them, so no_weight_decay() must name them, or timm's optimiser decays them where it
    # leaves a dense MLP's biases alone.
    model = create(name)
    names = {id(p): n for n, p in model.named_parameters()}
    biases = {
        f"{prefix}.{leaf}" for prefix, m in model.named_modules() if isinstance(m, Experts) for leaf in ("b1", "b2")
    }
    assert biases and biases <= model.no_weight_decay()
    if name.startswith("vit_"):  # timm's own names stay
        assert {"pos_embed", "cls_token"} <= model.no_weight_decay()
    optimizer = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)
    undecayed = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert biases <= undecayed, sorted(biases - undecayed)
    # ... the same split as visionmoe's own trainer makes.
    _, no_decay = param_groups(model, 0.05)
    assert undecayed == {names[id(p)] for p in no_decay["params"]}
