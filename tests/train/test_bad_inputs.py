"""Bad inputs a user meets fail at once in one line naming the value (issue 18): config values, YAML."""

import pytest

from visionmoe.train.config import load_config


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
    ],
)
def test_settings_the_run_would_ignore_are_errors(overrides, words):
    with pytest.raises(ValueError) as e:
        load_config(None, overrides)
    message = one_line(e)
    for word in words:
        assert word in message, message
    assert load_config(None, ["optim.schedule=step", "optim.milestones=[5]"]).optim.milestones == (5.0,)
