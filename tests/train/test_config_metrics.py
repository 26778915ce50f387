"""Configs (typed, presets with bases, overrides), the classification meter and the LR schedule."""

import math
from pathlib import Path

import pytest
import torch

from visionmoe.layers.moe import MoEConfig
from visionmoe.train.build import Schedule, param_groups
from visionmoe.train.config import CONFIG_DIR, Config, apply_overrides, load_config, preset_names
from visionmoe.train.metrics import ClassificationMeter


def one_line(exc_info):
    message = str(exc_info.value)
    assert "\n" not in message, message
    return message


def test_overrides_are_typed_and_nested():
    cfg = apply_overrides(
        Config(),
        ["optim.lr=0.05", "train.epochs=2", "optim.milestones=[1, 2.5]", "model.moe.k=1", "model.kwargs.width=16"],
    )
    assert cfg.optim.lr == 0.05 and cfg.train.epochs == 2.0 and isinstance(cfg.train.epochs, float)
    assert cfg.optim.milestones == (1.0, 2.5)
    assert cfg.model.moe == MoEConfig(k=1) and cfg.model.kwargs == {"width": 16}
    assert apply_overrides(cfg, ["optim.grad_clip=null"]).optim.grad_clip is None
    assert apply_overrides(cfg, ["data.data_dir=/x/y"]).data.data_dir == "/x/y"


@pytest.mark.parametrize(
    ("override", "error", "words"),
    [
        ("optim.lrr=0.1", ValueError, ["optim.lrr", "valid keys", "'lr'"]),
        ("optimiser.lr=0.1", ValueError, ["optimiser", "valid keys", "'optim'"]),
        ("optim.lr=fast", TypeError, ["optim.lr='fast'", "float"]),
        ("train.epochs=true", TypeError, ["train.epochs=True"]),
        ("data.batch_size=1.5", TypeError, ["data.batch_size=1.5", "int"]),
        ("optim.lr=-1", ValueError, ["optim.lr=-1.0", "> 0"]),
        ("optim.schedule=exp", ValueError, ["optim.schedule='exp'", "cosine"]),
        ("data.dataset=mnist", ValueError, ["data.dataset='mnist'", "cifar10"]),
        ("optim.betas=[0.9]", TypeError, ["optim.betas"]),
        ("lr", ValueError, ["key=value"]),
        ("optim.milestones=[3, 1]", ValueError, ["increasing"]),
    ],
)
def test_bad_overrides_fail_before_anything_runs(override, error, words):
    with pytest.raises(error) as e:
        load_config(None, [override])
    message = one_line(e)
    for word in words:
        assert word in message, message


def test_presets_load_and_name_themselves(tmp_path):
    names = preset_names()
    assert {"cifar10_moe", "cifar10_dense"} <= set(names)
    for name in names:
        cfg = load_config(name)
        assert cfg.name == name
        header = (CONFIG_DIR / f"{name}.yaml").read_text().splitlines()[:6]
        assert any("visionmoe train --config" in line for line in header), f"{name}: no command in its header"
        assert any("Expect" in line or "expect" in line for line in header), f"{name}: no expected result"
    with pytest.raises(FileNotFoundError) as e:
        load_config("no_such_preset")
    assert "cifar10_moe" in one_line(e)
    # a preset with a base overrides the base section by section
    (tmp_path / "child.yaml").write_text(f"base: {CONFIG_DIR / 'cifar10_moe.yaml'}\noptim:\n  lr: 0.123\n")
    child, parent = load_config(tmp_path / "child.yaml"), load_config("cifar10_moe")
    assert child.optim.lr == 0.123 and child.optim.momentum == parent.optim.momentum
    assert child.model == parent.model and child.name == "child"
    (tmp_path / "loop.yaml").write_text(f"base: {tmp_path / 'loop.yaml'}\n")
    with pytest.raises(ValueError, match="its own base"):
        load_config(tmp_path / "loop.yaml")
    (tmp_path / "bad.yaml").write_text("optim:\n  learning_rate: 1\n")
    with pytest.raises(ValueError) as e:
        load_config(tmp_path / "bad.yaml")
    assert "learning_rate" in one_line(e) and "'lr'" in one_line(e)


def test_a_base_outside_the_presets_folder_finds_the_packaged_presets(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # files named as a user would: relative, so messages name them so too
    (tmp_path / "cf" / "sub").mkdir(parents=True)
    # README: "base: lets one preset extend another"; a bare name not next to the file is a packaged preset
    Path("cf/based.yaml").write_text("base: cifar10_moe\noptim:\n  lr: 0.123\n")
    child, parent = load_config("cf/based.yaml"), load_config("cifar10_moe")
    assert child.optim.lr == 0.123 and child.model == parent.model and child.name == "based"
    # a path is relative to the file that names it, not to the working directory
    Path("cf/sub/kid.yaml").write_text("base: ../based.yaml\ntrain:\n  epochs: 3\n")
    kid = load_config("cf/sub/kid.yaml")
    assert kid.optim.lr == 0.123 and kid.train.epochs == 3 and kid.model == parent.model
    Path("cf/cwd.yaml").write_text("base: cf/based.yaml\n")
    with pytest.raises(FileNotFoundError) as e:
        load_config("cf/cwd.yaml")
    assert all(w in one_line(e) for w in ("cf/cwd.yaml", "cf/cf/based.yaml", "relative to the file")), one_line(e)
    # a preset next to the file comes first
    Path("cf/cifar10_moe.yaml").write_text("optim:\n  lr: 0.7\n")
    assert load_config("cf/based.yaml").optim.lr == 0.123 and load_config("cf/sub/kid.yaml").optim.lr == 0.123
    Path("cf/local.yaml").write_text("base: cifar10_moe.yaml\n")
    assert load_config("cf/local.yaml").optim.lr == 0.7
    # a file named as a packaged preset may extend it: its own name is not its own base
    Path("cf/cifar10_moe.yaml").write_text("base: cifar10_moe\noptim:\n  lr: 0.7\n")
    mine = load_config("cf/cifar10_moe.yaml")
    assert mine.optim.lr == 0.7 and mine.model == parent.model and mine.name == "cifar10_moe"
    Path("cf/loop.yaml").write_text("base: ./loop.yaml\n")
    with pytest.raises(ValueError, match=r"preset cf/loop.yaml is its own base \(via \['cf/loop.yaml'\]\)"):
        load_config("cf/loop.yaml")
    Path("cf/nope.yaml").write_text("base: no_such_preset\n")
    with pytest.raises(FileNotFoundError) as e:
        load_config("cf/nope.yaml")
    assert all(w in one_line(e) for w in ("cf/nope.yaml", "no_such_preset", "cifar10_moe")), one_line(e)
    assert str(CONFIG_DIR) not in one_line(e) and str(tmp_path) not in one_line(e)


@pytest.mark.parametrize("base", ["3", "[cifar10_moe]", "''", "{a: 1}"])
def test_a_base_that_is_not_a_name_is_refused_in_one_line(tmp_path, monkeypatch, base):
    monkeypatch.chdir(tmp_path)
    Path("bad.yaml").write_text(f"base: {base}\n")
    with pytest.raises(ValueError) as e:
        load_config("bad.yaml")
    message = one_line(e)
    assert message.startswith("bad.yaml: base=") and "expected a preset name or a path" in message, message


def test_config_errors_do_not_name_this_machines_path_to_the_presets():
    with pytest.raises(FileNotFoundError) as e:
        load_config("no_such_preset")
    assert str(CONFIG_DIR) not in one_line(e) and "presets in configs:" in one_line(e)


def test_classification_meter_by_hand():
    # 3 samples, 3 classes. Sample 0: logits [2, 0, 0], label 0 -> correct, p = e²/(e²+2) = 0.7870.
    # Sample 1: [0, 0, 0], label 2 -> argmax is class 0 (first of ties): wrong, p(label) = 1/3, conf 1/3.
    # Sample 2: [0, 3, 0], label 1 -> correct, p = e³/(e³+2) = 0.9094.
    logits = torch.tensor([[2.0, 0, 0], [0, 0, 0], [0, 3.0, 0]])
    labels = torch.tensor([0, 2, 1])
    meter = ClassificationMeter(3, bins=10)
    meter.update(logits[:2], labels[:2])
    meter.update(logits[2:], labels[2:])
    m = meter.compute()
    p0, p2 = math.exp(2) / (math.exp(2) + 2), math.exp(3) / (math.exp(3) + 2)
    assert m["top1"] == pytest.approx(2 / 3) and m["top5"] == 1.0 and m["samples"] == 3
    assert m["nll"] == pytest.approx(-(math.log(p0) + math.log(1 / 3) + math.log(p2)) / 3, rel=1e-6)
    # bins of width 0.1: 0.787 -> bin 7 (acc 1), 1/3 -> bin 3 (acc 0), 0.909 -> bin 9 (acc 1)
    ece = ((1 - p0) + (1 / 3 - 0) + (1 - p2)) / 3
    assert m["ece"] == pytest.approx(ece, rel=1e-6)
    assert m["per_class_accuracy"] == pytest.approx([1.0, 1.0, 0.0])
    empty = ClassificationMeter(4)
    empty.update(logits.new_zeros(1, 4), torch.tensor([0]))
    assert math.isnan(empty.compute()["per_class_accuracy"][3])
    with pytest.raises(ValueError, match=r"\(B, 3\)"):
        meter.update(torch.zeros(2, 4), torch.tensor([0, 1]))


def test_schedule_by_hand():
    # 10 steps, 2 warm-up steps: 1/2, 2/2, then cosine over the remaining 8 from 1 to min 0.1.
    s = Schedule("cosine", total_steps=10, warmup_steps=2, steps_per_epoch=5, min_lr_ratio=0.1)
    assert [s(0), s(1)] == [0.5, 1.0]
    assert s(2) == pytest.approx(1.0)
    assert s(6) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 4 / 8)))  # halfway: 0.55
    assert s(10) == pytest.approx(0.1)
    step = Schedule("step", total_steps=30, warmup_steps=0, steps_per_epoch=10, milestones=(1, 2), gamma=0.5)
    assert [step(9), step(10), step(25)] == [1.0, 0.5, 0.25]
    linear = Schedule("linear", total_steps=4, warmup_steps=0, steps_per_epoch=4)
    assert [linear(0), linear(2), linear(4)] == [1.0, 0.5, 0.0]


def test_weight_decay_skips_biases_norms_and_expert_biases():
    import visionmoe

    model = visionmoe.create_model("cnn_resnet_cifar_moe", width=8)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    undecayed = {names[id(p)] for p in no_decay["params"]}
    decayed = {names[id(p)] for p in decay["params"]}
    assert any(n.endswith("experts.b1") for n in undecayed) and any(n.endswith("experts.b2") for n in undecayed)
    assert any(n.endswith("norm.weight") for n in undecayed)
    assert any(n.endswith("experts.w1") for n in decayed) and "fc.weight" in decayed
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0


def test_augment_and_mixup_are_reproducible_and_leave_the_global_rng_alone():
    from visionmoe.train.data import Augment, BatchMixer

    images = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    augment = Augment(padding=2, flip=True, randaugment=9)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = augment(images, torch.Generator().manual_seed(7))
    assert torch.equal(torch.get_rng_state(), before)  # RandAugment drew from a forked RNG
    b = augment(images, torch.Generator().manual_seed(7))
    c = augment(images, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c) and a.dtype == torch.uint8 and a.shape == images.shape

    import numpy as np

    mixer = BatchMixer(0.8, 1.0, 0.1, num_classes=4)
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    state = np.random.get_state()[1].copy()
    (x1, t1), (x2, t2) = mixer(x.clone(), y, seed=5), mixer(x.clone(), y, seed=5)
    (x3, _) = mixer(x.clone(), y, seed=6)
    assert not torch.equal(x1, x3)  # another step, another mix
    assert torch.equal(x1, x2) and torch.equal(t1, t2)
    assert np.array_equal(np.random.get_state()[1], state)
    assert torch.allclose(t1.sum(dim=1), torch.ones(4))  # soft targets are distributions
