"""MoEConfig: a partial value (set fields only), one dropless spelling and one merge rule."""

import copy
import pickle

import pytest
import timm

import visionmoe
from visionmoe.layers.moe import UNSET, MoEConfig

VIT = MoEConfig(num_experts=8, router="topk", k=2, capacity_factor=1.25, groups="sample", backend="padded")


def test_unset_is_one_marker_kept_by_copies():
    assert repr(UNSET) == "<unset>" and repr(MoEConfig()) == "MoEConfig()"
    assert copy.deepcopy(UNSET) is UNSET and pickle.loads(pickle.dumps(UNSET)) is UNSET
    assert copy.deepcopy(MoEConfig(k=1)) == MoEConfig(k=1) and MoEConfig(k=1).to_dict() == {"k": 1}


def test_none_capacity_factor_is_set_and_dropless():
    config = MoEConfig(capacity_factor=None)
    assert config.is_set("capacity_factor") and config.to_dict() == {"capacity_factor": None}
    moe = config.build(8, 16)
    assert moe.router.capacity_factor is None  # MoE(capacity_factor=None) means the same
    assert visionmoe.MoE(8, 8, 16, capacity_factor=None).router.capacity_factor is None
    assert MoEConfig().build(8, 16).router.capacity_factor == 1.25  # unset: the router's default


def test_merged_sets_only_the_fields_given():
    assert VIT.merged(None) == VIT and VIT.merged({}) == VIT
    assert VIT.merged({"num_experts": 16}) == MoEConfig(
        num_experts=16, router="topk", k=2, capacity_factor=1.25, groups="sample", backend="padded"
    )
    assert VIT.merged(MoEConfig(capacity_factor=None)).capacity_factor is None
    assert VIT.merged({"router": "topk", "k": 1}).capacity_factor == 1.25  # the same router keeps its settings


def test_a_new_router_drops_the_defaults_router_settings():
    # k = 2 and capacity_factor = 1.25 belong to top-k; num_experts, groups and backend stay.
    merged = VIT.merged({"router": "expert_choice"})
    assert merged == MoEConfig(num_experts=8, router="expert_choice", groups="sample", backend="padded")
    with_options = MoEConfig(router="topk", router_options={"noise_std": 0.0}, aux_loss_weights={"z": 1.0})
    assert with_options.merged({"router": "soft"}) == MoEConfig(router="soft")


def test_merging_twice_changes_nothing():
    for update in ({"num_experts": 4}, {"router": "expert_choice", "capacity_factor": 2.0}, {"k": 1}):
        once = VIT.merged(update)
        assert VIT.merged(once) == once, update


def test_every_model_family_merges_with_the_one_rule():
    # A dict and the MoEConfig it spells give the same model; the family's k=2 survives a new num_experts.
    for name, kwargs in [
        ("cnn_resnet_cifar_moe", {"width": 8}),
        ("cnn_dw_cifar_moe", {"width": 8}),
        ("cifar_airbench_moe", {"widths": [8, 16, 16]}),
        ("vit_moe_tiny_patch4_32", {"depth": 4, "embed_dim": 32, "num_heads": 2}),
    ]:
        for moe in ({"num_experts": 4}, MoEConfig(num_experts=4)):
            model = timm.create_model(name, moe=moe, **kwargs)
            routers = [m.router for _, m in visionmoe.moe_layers(model)]
            assert routers and all((r.num_experts, r.k) == (4, 2) for r in routers), name
    ec = timm.create_model("cnn_resnet_cifar_moe", width=8, moe={"router": "expert_choice"})
    assert [m.router.name for _, m in visionmoe.moe_layers(ec)] == ["expert_choice"] * 2


def test_unknown_keys_and_bad_values_fail_in_one_line():
    with pytest.raises(ValueError, match=r"^unknown MoE config keys \['kk'\]; valid keys: \['num_experts'"):
        MoEConfig.coerce({"kk": 1})
    with pytest.raises(ValueError, match=r"^unknown MoE backend 'fast'"):
        MoEConfig(backend="fast")
    with pytest.raises(TypeError, match=r"^moe must be an MoEConfig or a mapping of its fields, got 3$"):
        MoEConfig.coerce(3)
