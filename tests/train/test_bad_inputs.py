"""Bad inputs a user meets fail at once in one line naming the value (issue 18): config values, YAML, devices."""

import pytest
import torch

from visionmoe.cli import main
from visionmoe.train.config import Config, ModelConfig, load_config, parse_device


def one_line(exc_info):
    message = str(exc_info.value)
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("optim.lr=inf", ["optim.lr='inf'", "finite"]),  # YAML reads "inf" as a string, float() takes it
        ("optim.lr=.inf", ["optim.lr=inf", "finite"]),
        ("optim.lr=.nan", ["optim.lr=nan", "finite"]),
        ("train.epochs=.inf", ["train.epochs=inf", "finite"]),
        ("optim.grad_clip=.inf", ["optim.grad_clip=inf", "finite"]),  # float | None: not "wrong type"
        ("optim.betas=[0.9, .nan]", ["optim.betas[1]=nan", "finite"]),
        ("train.time_limit_minutes=.inf", ["train.time_limit_minutes=inf", "finite"]),
    ],
)
def test_float_fields_refuse_inf_and_nan(override, words):
    with pytest.raises(ValueError) as e:
        load_config(None, [override])
    message = one_line(e)
    for word in words:
        assert word in message, message


def test_malformed_yaml_names_line_and_column(tmp_path):
    # Line 3 holds the unclosed "[sgd"; the parser stops at line 4, column 6 (the ':' after "epochs").
    (tmp_path / "bad.yaml").write_text("optim:\n  lr: 0.1\n  name: [sgd\ntrain:\n  epochs: 1\n")
    with pytest.raises(ValueError) as e:
        load_config(tmp_path / "bad.yaml")
    message = one_line(e)
    assert "bad.yaml" in message and "line 4, column 6" in message, message
    with pytest.raises(ValueError) as e:
        load_config(None, ["optim.milestones=[1, 2"])
    assert "line 1, column 6" in one_line(e)  # the end of the 5 characters "[1, 2"


def test_a_key_given_twice_in_yaml_is_an_error_not_the_last_one_silently(tmp_path):
    # PyYAML keeps the second "optim" and drops lr=0.01 without a word.
    (tmp_path / "dup.yaml").write_text("optim:\n  lr: 0.01\ntrain:\n  epochs: 1\noptim:\n  name: adamw\n")
    with pytest.raises(ValueError) as e:
        load_config(tmp_path / "dup.yaml")
    message = one_line(e)
    assert "'optim' appears twice" in message and "line 5, column 1" in message, message
    with pytest.raises(ValueError, match="'width' appears twice"):
        load_config(None, ["model.kwargs={width: 8, width: 16}"])


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        # No space after the colon: YAML reads one key "width:8" with the value None, which timm drops.
        (["model.kwargs={width:8}"], ["'width:8'", "None", "'widths'"]),
        (["model.kwargs={nosuchkwarg: null}"], ["'nosuchkwarg'", "None", "'widths'"]),
        (["model.kwargs.width=8"], ["unknown model.kwargs ['width']", "cifar_airbench_moe takes", "'widths'"]),
        (["model.name=vit_moe_tiny_patch4_32", "model.kwargs.depht=2"], ["'depht'", "'depth'", "'placement'"]),
        (["model.moe.capacity_factor=0"], ["capacity_factor=0", "cifar_airbench_moe"]),  # issue 18's sweep cell
        (["model.moe.router_options={epsilon: 0.5}"], ["'topk' does not take epsilon"]),
        (["model.name=resnet18", "model.moe=null", "model.kwargs.nosuch=1"], ["'nosuch'", "'drop_rate'"]),  # timm
    ],
)
def test_model_settings_are_checked_against_the_constructor_before_anything_is_built(overrides, words):
    with pytest.raises(ValueError) as e:
        load_config("cifar10_moe", overrides)
    message = one_line(e)
    for word in words:
        assert word in message, message


def test_valid_model_settings_pass():
    assert load_config("cifar10_moe", ["model.kwargs.widths=[8, 16, 16]"]).model.kwargs == {"widths": [8, 16, 16]}
    vit = ["model.name=vit_moe_tiny_patch4_32", "model.moe=null", "model.kwargs={placement: every-2, depth: 2}"]
    assert load_config("cifar10_moe", vit).model.kwargs["placement"] == "every-2"
    assert load_config("cifar10_moe", ["model.name=resnet18", "model.moe=null"]).model.name == "resnet18"


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (["data.image_size=64"], ["data.image_size=64", "ignored", "'cifar10'"]),  # CIFAR is never resized
        (["data.dataset=tiny-imagenet", "data.download=true"], ["data.download=True", "ignored"]),
        (["data.test_split=val"], ["data.test_split='val'", "ignored"]),  # only ImageFolder has split folders
        (["optim.milestones=[5]"], ["optim.milestones=[5.0]", "optim.schedule='cosine'"]),  # only "step" reads them
        # the step schedule's milestones past the run's end: never reached, silently
        (["optim.schedule=step", "optim.milestones=[50]", "train.epochs=5"], ["optim.milestones=[50.0]", "epochs=5.0"]),
        (["optim.schedule=step", "optim.milestones=[2, 5]", "train.epochs=5"], ["[5.0] never reached"]),
        (["optim.min_lr_ratio=0.1", "optim.schedule=constant"], ["optim.min_lr_ratio=0.1", "'constant'", "ignored"]),
        (["optim.min_lr_ratio=0.1", "optim.schedule=step"], ["optim.min_lr_ratio=0.1", "'step'", "ignored"]),
        (["optim.gamma=0.5"], ["optim.gamma=0.5", "optim.schedule='cosine'", "ignored"]),
        (["optim.gamma=0.5", "optim.schedule=linear"], ["optim.gamma=0.5", "'linear'", "ignored"]),
    ],
)
def test_settings_the_run_would_ignore_are_errors(overrides, words):
    with pytest.raises(ValueError) as e:
        load_config(None, overrides)
    message = one_line(e)
    for word in words:
        assert word in message, message
    assert load_config(None, ["optim.schedule=step", "optim.milestones=[5]"]).optim.milestones == (5.0,)


@pytest.mark.parametrize(
    ("preset", "overrides", "words"),
    [
        # train.epochs is checked before the warm-up it bounds (the preset warms up for 1 epoch)
        ("cifar10_moe", ["train.epochs=-1"], ["train.epochs=-1.0", "> 0"]),
        (None, ["train.device=cudax"], ["train.device='cudax'", "'cuda[:N]'"]),  # startswith("cuda") let it by
        (None, ["train.device=cuda:-1"], ["train.device='cuda:-1'", "'cuda[:N]'"]),
        (None, ["train.device=mps"], ["train.device='mps'", "'cuda[:N]'"]),
        (None, ["optim.name=adamw", "optim.betas=[2, 3]"], ["optim.betas=(2.0, 3.0)", "[0, 1)"]),
        (None, ["optim.name=adamw", "optim.betas=[0.9, 1]"], ["optim.betas=(0.9, 1.0)", "[0, 1)"]),
        (None, ["data.num_classes=0"], ["data.num_classes=0", ">= 1 or null"]),  # was "from the dataset"
        # timm's Mixup needs an even batch: refused here, not once the data has loaded
        (None, ["data.mixup_alpha=0.2", "data.batch_size=7"], ["data.batch_size=7", "even", "mixup_alpha=0.2"]),
        (None, ["data.cutmix_alpha=1", "data.batch_size=7"], ["data.batch_size=7", "even", "cutmix_alpha=1.0"]),
    ],
)
def test_values_refused_before_any_data_is_loaded(preset, overrides, words):
    with pytest.raises(ValueError) as e:
        load_config(preset, overrides)
    message = one_line(e)
    for word in words:
        assert word in message, message
    assert "warmup" not in message, message


def test_values_near_the_limits_pass():
    assert load_config(None, ["optim.name=adamw", "optim.betas=[0, 0.999]"]).optim.betas == (0.0, 0.999)
    assert load_config(None, ["data.num_classes=1"]).data.num_classes == 1
    assert load_config(None, ["data.mixup_alpha=0.2", "data.batch_size=8"]).data.batch_size == 8
    assert load_config(None, ["train.device=cuda:1"]).train.device == "cuda:1"  # this machine's GPUs: the Trainer's


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (["model.kwargs.width=-8"], ["model.kwargs={'width': -8}", "negative dimension -8"]),
        # the model's own check names the argument (torch's error named the derived width, -32)
        (["model.kwargs.hidden_ratio=-1"], ["model.kwargs={'hidden_ratio': -1}", "got hidden_ratio=-1 (at width 32"]),
    ],
)
def test_model_kwargs_torch_cannot_build_are_refused_by_the_meta_build(overrides, words):
    # The meta build returned silently on any error but a few types; torch's RuntimeError surfaced only
    # after the data had loaded.
    with pytest.raises(ValueError) as e:
        load_config("cifar10_moe", ["model.name=cnn_resnet_cifar_moe", *overrides])
    message = one_line(e)
    for word in words:
        assert word in message, message


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("Tensor.item() cannot be called on meta tensors"),
        NotImplementedError("Cannot copy out of meta tensor; no data!"),
        NotImplementedError("aten::_unique2: attempted to run this operator with Meta tensors"),
        TypeError("can't convert meta device type tensor to numpy. Use Tensor.cpu() to copy the tensor"),
    ],
)
def test_what_the_meta_device_cannot_do_is_left_to_the_real_build(error, monkeypatch):
    from visionmoe.train import build

    def meta_fails(*args, **kwargs):
        raise error

    monkeypatch.setattr(build, "_CHECKED_MODELS", set())
    monkeypatch.setattr(build, "build_model", meta_fails)
    build.check_model_config(ModelConfig(name="cnn_resnet_cifar_moe"), 10)  # no error: the meta device's limit

    def torch_refuses(*args, **kwargs):
        raise RuntimeError("bad\nshape")

    monkeypatch.setattr(build, "build_model", torch_refuses)
    with pytest.raises(ValueError) as e:
        build.check_model_config(ModelConfig(name="cnn_resnet_cifar_moe"), 10)
    assert "cannot be built from its defaults: bad" in one_line(e)


def test_schedule_settings_the_schedule_reads_pass():
    step = ["optim.schedule=step", "optim.milestones=[2, 4.5]", "optim.gamma=0.5", "train.epochs=5"]
    assert load_config(None, step).optim.gamma == 0.5
    assert load_config(None, ["optim.min_lr_ratio=0.1", "optim.schedule=linear"]).optim.min_lr_ratio == 0.1
    assert load_config(None, ["optim.min_lr_ratio=0.1"]).optim.schedule == "cosine"


def test_a_saved_run_keeps_values_new_runs_refuse():
    # data.num_classes=0 trained (as "from the dataset") before it was refused: its checkpoint still loads.
    saved = Config.from_dict({"data": {"num_classes": 0}, "optim": {"betas": [2, 3], "gamma": 0.5}})
    assert saved.validate(saved=True) is saved
    with pytest.raises(ValueError, match=r"data\.num_classes=0"):
        saved.validate()


def test_devices_are_parsed_and_a_missing_cuda_is_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert parse_device("cpu", "train.device") == torch.device("cpu")
    assert parse_device("auto", "train.device") == torch.device("cpu")
    assert parse_device("cuda:0", "train.device", here=False) == torch.device("cuda:0")
    with pytest.raises(ValueError) as e:
        parse_device("cuda", "train.device")
    assert "train.device='cuda', but CUDA is not available" in one_line(e)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert parse_device("cuda:1", "train.device") == torch.device("cuda:1")
    with pytest.raises(ValueError) as e:
        parse_device("cuda:2", "train.device")
    assert "train.device='cuda:2', but this machine has 2 CUDA device(s)" in one_line(e)


def test_train_on_a_missing_cuda_fails_before_the_data_loads(monkeypatch, tmp_path):
    # The data directory does not exist: the device error must come first (it came after the data, as a
    # traceback from torch's CUDA initialisation).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = ["train", "train.device=cuda", f"data.data_dir={tmp_path / 'nodata'}", f"train.out_dir={tmp_path}"]
    with pytest.raises(SystemExit) as e:
        main(argv)
    message = str(e.value.code)
    assert message.startswith("visionmoe train: train.device='cuda', but CUDA is not available"), message
    assert "\n" not in message and not any(tmp_path.iterdir())


def test_train_command_turns_a_runtime_error_of_its_setup_into_one_line(monkeypatch):
    from visionmoe.train import trainer

    def torch_refuses(self, config, **kwargs):
        raise RuntimeError("Trying to create tensor with negative dimension -8: [-8, 3, 3, 3]\n(more detail)")

    monkeypatch.setattr(trainer.Trainer, "__init__", torch_refuses)
    with pytest.raises(SystemExit) as e:
        main(["train"])
    assert e.value.code == "visionmoe train: Trying to create tensor with negative dimension -8: [-8, 3, 3, 3]"


@pytest.mark.parametrize("name", ["a/b", "../../x", "..", "."])
def test_a_run_name_that_is_not_a_directory_name_is_refused(name):
    # train.run_name=../../x put the run outside train.out_dir (a sweep's runs, or another run's files)
    with pytest.raises(ValueError) as e:
        load_config("cifar10_moe", [f"train.run_name={name}"])
    assert f"train.run_name={name!r}" in one_line(e) and "directory name" in str(e.value)
    assert load_config("cifar10_moe", ["train.run_name=k=2,twin=flops-s0"]).train.run_name == "k=2,twin=flops-s0"
