"""``model.moe``: one typed MoEConfig from the command line (or YAML, or Python) to the router."""

from pathlib import Path

import pytest
import torch
import yaml

import visionmoe
from visionmoe.layers.moe import UNSET, MoEConfig
from visionmoe.train.config import CONFIG_DIR, Config, ModelConfig, load_config, save_config
from visionmoe.train.trainer import build_model
from visionmoe.train.typed import plain

RESULTS = Path(__file__).resolve().parents[2] / "results"
NARROW = ["model.kwargs.widths=[8, 16, 16]"]  # airbench at a test's size; the MoE sits on the 7×7 map


def routed_once(model):
    """The (only) MoE layer of ``model`` after one training-mode forward of two 32×32 images."""
    torch.manual_seed(0)
    model.train()
    model(torch.randn(2, 3, 32, 32))
    [(_, moe)] = visionmoe.moe_layers(model)
    return moe


def built(cfg):
    return build_model(cfg.model, 10, torch.zeros(2, 3, 32, 32))


def test_null_capacity_factor_from_the_command_line_is_dropless_at_the_router():
    cfg = load_config("cifar10_moe", [*NARROW, "model.moe.capacity_factor=null"])
    assert cfg.model.moe.capacity_factor is None  # a value (dropless), not "the default" (1.25, issue 19's bug)
    moe = routed_once(built(cfg))
    assert moe.router.capacity_factor is None and moe.router.group_capacity(49) is None
    # 2 images × 49 positions × k=2 = 196 assignments, every one processed.
    stats = moe.last_stats
    assert int(stats.assignments) == 196 and int(stats.dropped) == 0 and int(stats.tokens_per_expert.sum()) == 196


def test_a_small_capacity_factor_drops_so_the_dropless_test_can_fail():
    # C = ceil(k·S·cf/E) = ceil(2·49·0.25/8) = 4 slots per expert and image: 2 × 8 × 4 = 64 of 196 kept.
    moe = routed_once(built(load_config("cifar10_moe", [*NARROW, "model.moe.capacity_factor=0.25"])))
    assert moe.router.capacity_factor == 0.25 and int(moe.last_stats.dropped) == 196 - 64


def test_null_capacity_factor_in_yaml_and_python_is_dropless_too(tmp_path):
    preset = tmp_path / "dropless.yaml"
    base = CONFIG_DIR / "cifar10_moe.yaml"
    preset.write_text(f"base: {base}\nmodel:\n  kwargs:\n    widths: [8, 16, 16]\n  moe:\n    capacity_factor: null\n")
    assert routed_once(built(load_config(preset))).router.capacity_factor is None
    python = Config(model=ModelConfig(kwargs={"widths": [8, 16, 16]}, moe=MoEConfig(capacity_factor=None)))
    assert routed_once(built(python)).router.capacity_factor is None
    direct = visionmoe.create_model("cifar_airbench_moe", widths=[8, 16, 16], moe=MoEConfig(capacity_factor=None))
    assert routed_once(direct).router.capacity_factor is None


def test_leaving_capacity_factor_out_keeps_the_routers_default():
    cfg = load_config("cifar10_moe", [*NARROW, "model.moe={num_experts: 4, router: topk, k: 1}"])
    assert cfg.model.moe.capacity_factor is UNSET
    assert routed_once(built(cfg)).router.capacity_factor == 1.25  # TopKRouter's own default


def test_moe_overrides_are_type_checked_and_unknown_keys_list_the_valid_ones():
    assert load_config("cifar10_moe", ["model.moe.num_experts=16"]).model.moe.num_experts == 16
    with pytest.raises(TypeError, match=r"^model\.moe\.num_experts=2\.5 has the wrong type; expected int$"):
        load_config("cifar10_moe", ["model.moe.num_experts=2.5"])
    with pytest.raises(TypeError, match=r"^model\.moe\.k='x' has the wrong type; expected int$"):
        load_config("cifar10_moe", ["model.moe.k=x"])
    with pytest.raises(
        ValueError, match=r"unknown key 'model\.moe\.dropless'.*valid keys of model\.moe: .*'capacity_factor'"
    ):
        load_config("cifar10_moe", ["model.moe.dropless=true"])  # one spelling of dropless: capacity_factor=null
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['kk'\] in model\.moe; valid keys: .*'k'"):
        Config.from_dict({"model": {"moe": {"kk": 2}}})


def test_model_kwargs_moe_is_refused_in_one_line():
    with pytest.raises(
        ValueError, match=r"^model\.kwargs\.moe=\{'k': 1\} is not read; put MoE settings in model\.moe$"
    ):
        load_config("cifar10_moe", ["model.kwargs.moe={k: 1}"])
    with pytest.raises(ValueError, match=r"model\.kwargs\.moe=.* is not read"):
        build_model(ModelConfig(kwargs={"moe": {"k": 1}}), 10, torch.empty(0))


def test_saved_config_holds_only_the_set_fields_and_round_trips(tmp_path):
    cfg = load_config("cifar10_moe", ["model.moe.capacity_factor=null"])
    save_config(cfg, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["model"]["moe"] == {
        "num_experts": 8,
        "router": "topk",
        "k": 2,
        "capacity_factor": None,
        "eval_capacity_factor": 2.0,
    }
    assert list(saved["model"]["moe"]) == ["num_experts", "router", "k", "capacity_factor", "eval_capacity_factor"]
    assert Config.from_dict(saved).validate(saved=True) == cfg


def test_a_legacy_dropless_key_still_loads():
    # Saved before capacity_factor=None was the one spelling: dropless: true overrode any factor.
    cfg = Config.from_dict({"model": {"moe": {"num_experts": 4, "capacity_factor": 1.25, "dropless": True}}})
    assert cfg.model.moe == MoEConfig(num_experts=4, capacity_factor=None)
    assert Config.from_dict({"model": {"moe": {"k": 1, "dropless": False}}}).model.moe == MoEConfig(k=1)
    with pytest.raises(TypeError, match=r"moe\.dropless='yes'.*expected bool"):
        MoEConfig.coerce({"dropless": "yes"})


def saved_configs():
    return sorted(RESULTS.glob("*/*/config.yaml"))


@pytest.mark.skipif(not saved_configs(), reason="no saved runs in results/")
def test_every_saved_run_config_loads_unchanged_and_rebuilds_its_model():
    models = {}
    for path in saved_configs():
        values = yaml.safe_load(path.read_text())
        cfg = Config.from_dict(values).validate(saved=True)
        # The model section's dict form, and so the sweep's comparisons, unchanged (other sections of older
        # runs lack fields added since, which load with their defaults).
        assert plain(cfg.to_dict())["model"] == values["model"], path
        models.setdefault(repr(cfg.model), cfg)
    for cfg in models.values():  # one build per distinct model section (the twins and seeds share them)
        torch.manual_seed(0)
        model = built(cfg)
        moe = cfg.model.moe
        if cfg.model.dense_twin is None and moe is not None and moe.is_set("num_experts"):
            assert {m.num_experts for _, m in visionmoe.moe_layers(model)} == {moe.num_experts}, cfg.model
