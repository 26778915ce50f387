"""The CIFAR CNN with an FFN / MoE head on its pooled feature: the soft study's four arms."""

import pytest
import torch

from visionmoe.analysis.profile import profile_model
from visionmoe.models import create_model
from visionmoe.studies.presets import _soft_arms
from visionmoe.train.config import load_config
from visionmoe.train.trainer import build_model

pytestmark = pytest.mark.usefixtures("one_thread")

# width 8: pooled feature D = 32; every head at A = 64 active hidden units per sample; training batch 64,
# so the batch-axis Soft MoE has 8 experts × 8 slots (one per sample)
WIDTH, ACTIVE, SLOTS, BATCH = 8, 64, 8, 64


def _arm(name: str, seed: int = 0):
    """The soft preset's arm ``name`` at width 8, built as the trainer builds it (config -> model kwargs)."""
    overrides = ["model.name=cnn_resnet_cifar_head", f"model.kwargs.width={WIDTH}", *_soft_arms(ACTIVE, SLOTS)[name]]
    config = load_config("cifar10_moe", overrides)
    torch.manual_seed(seed)
    return build_model(config.model, 10, torch.randn(2, 3, 32, 32)).eval()


ARMS = list(_soft_arms(ACTIVE, SLOTS))


def test_arms_share_every_weight_but_the_head():
    states = {name: _arm(name).state_dict() for name in ARMS}
    dense = states["dense"]
    for name, state in states.items():
        rest = [k for k in state if not k.startswith("head_ffn.")]
        assert rest == [k for k in dense if not k.startswith("head_ffn.")]
        assert all(torch.equal(state[k], dense[k]) for k in rest), name
        assert any(k.startswith("head_ffn.experts") for k in state), name


def test_arms_have_equal_active_flops_at_the_training_batch():
    # dense FFN 32 -> 64 -> 32: 2 matmuls × 32·64 multiply-adds × 2 = 8192 FLOPs per image. Top-2 of width 32:
    # 2 experts × 4096. Per-sample Soft MoE: 8 slots of width 8 × 1024. Batch-axis Soft MoE: 64 slots of width
    # 64 for 64 images, one expert (8192) per image.
    x = torch.randn(BATCH, 3, 32, 32)
    for name in ARMS:
        assert profile_model(_arm(name), x).expert_flops == 8192, name


@pytest.mark.parametrize("name", ARMS)
def test_every_arm_runs_at_any_batch_size(name):
    model = _arm(name)
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        for n in (1, 2, 3, 5):  # odd sizes and 1 included
            y = model(x[:n])
            assert y.shape == (n, 10) and torch.isfinite(y).all()
    model.train()
    y = model(x[:3])  # a training step at an odd batch size
    y.sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n.startswith("head_ffn.experts"))


@pytest.mark.parametrize("name", ARMS)
def test_only_batch_axis_dispatch_makes_a_prediction_depend_on_the_batch(name):
    model = _arm(name)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        alone = model(x[:1])[0]
        in_batch = model(x)[0]
    if name == "soft_batch":  # sample 0's slots are mixtures of the 4 samples' features
        assert (alone - in_batch).abs().max() > 1e-4
    else:
        torch.testing.assert_close(alone, in_batch, rtol=1e-4, atol=1e-5)


def test_head_hidden_is_checked():
    with pytest.raises(ValueError, match="head_hidden must be an int >= 1"):
        create_model("cnn_resnet_cifar_head", head_hidden=0)
