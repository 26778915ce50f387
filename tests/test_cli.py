"""The command line: `visionmoe demo` runs every router and prints its table; bad arguments fail in one line."""

import json
import re
import subprocess
import sys

import pytest
import torch

from visionmoe.cli import main
from visionmoe.demo import DemoConfig, clustered_tokens, run
from visionmoe.layers import ROUTERS


def test_demo_rows_cover_every_router():
    cfg = DemoConfig(batch=2, tokens=16, dim=8, num_experts=4, hidden_dim=8, repeats=1, threads=1)
    rows = run(cfg)
    assert [r["router"] for r in rows] == list(ROUTERS)
    for r in rows:
        # k=2 experts' worth per token: top-k and expert choice process at most 2·2·16 = 64 pairs.
        if r["router"] not in ("soft", "soft_per_sample", "dense"):
            assert sum(r["tokens_per_expert"]) <= 64
        assert r["seconds"] > 0 and 0 <= r["dropped"] <= 1
    assert next(r for r in rows if r["router"] == "dense")["vs_dense"] == 1.0
    # Expert choice fills every expert exactly: C = ceil(16·2/4) = 8 per image, 2 images.
    assert next(r for r in rows if r["router"] == "expert_choice")["tokens_per_expert"] == [16] * 4


def test_clustered_tokens_are_seeded():
    a, b = clustered_tokens(DemoConfig(seed=3)), clustered_tokens(DemoConfig(seed=3))
    assert a.shape == (8, 256, 128) and bool((a == b).all())


def test_demo_command_prints_the_table(capsys):
    argv = ["demo", "--batch", "2", "--tokens", "16", "--dim", "8", "--hidden-dim", "8", "--num-experts", "4"]
    assert main([*argv, "--repeats", "1", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ROUTERS) and "× dense" in out


def test_unknown_command_is_rejected():
    with pytest.raises(SystemExit):
        main(["fly"])


def test_profile_command_prints_a_markdown_table(capsys):
    assert main(["profile", "cnn_resnet_cifar_moe", "--img-size", "16", "--kwargs", '{"width": 8}']) == 0
    out = capsys.readouterr().out
    assert out.startswith("| Module |") and "ρ =" in out
    with pytest.raises(SystemExit, match="--kwargs must be a JSON object"):
        main(["profile", "cnn_resnet_cifar_moe", "--kwargs", "[1, 2]"])


@pytest.mark.parametrize("command", ["profile", "export"])
def test_model_commands_refuse_kwargs_the_model_would_drop_or_not_take(command, tmp_path):
    # timm drops None-valued kwargs: {"width": null} profiled (or exported) the default-width model
    # without a word. Both commands check --kwargs before building anything.
    tail = ["--out", str(tmp_path)] if command == "export" else []
    with pytest.raises(SystemExit, match=rf"visionmoe {command}: .*\['width'\] set to None.*'depths'"):
        main([command, "cnn_resnet_cifar_moe", "--kwargs", '{"width": null}', *tail])
    with pytest.raises(SystemExit, match=r"unknown model.kwargs \['widht'\]"):
        main([command, "cnn_resnet_cifar_moe", "--kwargs", '{"widht": 8}', *tail])
    assert not any(tmp_path.iterdir())  # nothing written


def test_python_m_runs_the_command_line_without_the_heavy_stacks():
    # torchrun launches `-m visionmoe.cli`: the package's __main__ must run main(). --help lists all ten
    # commands and loads none of the stacks only a running command needs (pandas, scipy, matplotlib and
    # setuptools via torch.utils.benchmark; the training and study code): each is imported lazily.
    code = (
        "import runpy, sys\n"
        "sys.argv = ['visionmoe', '--help']\n"
        "try:\n"
        "    runpy.run_module('visionmoe.cli', run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
        "heavy = {'pandas', 'scipy', 'matplotlib', 'setuptools', 'visionmoe.train.trainer', 'visionmoe.studies'}\n"
        "print('loaded:', sorted(heavy & set(sys.modules)))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    commands = "train,eval,analyze,demo,bench,shards,profile,export,sweep,report"
    assert "{" + commands + "}" in result.stdout.replace(" ", "").replace("\n", "")
    assert result.stdout.rstrip().endswith("loaded: []"), result.stdout[-500:]


def test_sweep_help_names_every_study_preset(capsys):
    # The list is spelled out in the CLI (so --help imports no study code); it must stay the registry's.
    from visionmoe.cli.studies import STUDY_NAMES
    from visionmoe.studies.presets import STUDIES

    assert list(STUDY_NAMES) == list(STUDIES)
    with pytest.raises(SystemExit):
        main(["sweep", "--help"])
    assert f"Study presets: {', '.join(STUDIES)}." in " ".join(capsys.readouterr().out.split())


def refusal(argv, capsys) -> str:
    """The one line a command refuses ``argv`` with: its SystemExit message, or argparse's error line."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    if isinstance(e.value.code, str):
        message = e.value.code
    else:  # argparse: usage, then "visionmoe <cmd>: error: argument --x: ..." on stderr, exit status 2
        assert e.value.code == 2
        message = capsys.readouterr().err.strip().splitlines()[-1]
    assert "\n" not in message and "Traceback" not in message, message
    return message


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["profile", "cnn_resnet_cifar_moe", "--batch", "0"], ["argument --batch: 0", ">= 1"]),
        (["profile", "cnn_resnet_cifar_moe", "--batch", "-1"], ["argument --batch: -1", ">= 1"]),
        (["profile", "cnn_resnet_cifar_moe", "--img-size", "0"], ["argument --img-size: 0", ">= 1"]),
        (["profile", "cnn_resnet_cifar_moe", "--kwargs", '{"width": -4}'], ["profile:", "--kwargs", "dimension -4"]),
        (["export", "cnn_resnet_cifar_moe", "--kwargs", '{"width": -4}'], ["export:", "--kwargs", "dimension -4"]),
        (["profile", "vit_moe_tiny_patch4_32", "--img-size", "16"], ["visionmoe profile:", "Input height (16)"]),
        (["demo", "--repeats", "0"], ["argument --repeats: 0", ">= 1"]),
        (["demo", "--batch", "0"], ["argument --batch: 0", ">= 1"]),
        (["demo", "--num-experts", "0"], ["argument --num-experts: 0", ">= 1"]),
        (["demo", "--k", "99"], ["visionmoe demo:", "k=99", "num_experts=8"]),
        (["demo", "--capacity-factor", "0"], ["argument --capacity-factor: 0.0", "> 0"]),
        (["bench", "--quick", "--repeats", "0"], ["argument --repeats: 0", ">= 1"]),
        (["export", "cnn_resnet_cifar_moe", "--img-size", "0"], ["argument --img-size: 0", ">= 1"]),
        (["export", "cnn_resnet_cifar_moe", "--batch-size", "0"], ["argument --batch-size: 0", ">= 1"]),
        (["export", "cnn_resnet_cifar_moe", "--batch-size", "1"], ["visionmoe export:", "--batch-size 1", ">= 2"]),
        (["eval", "--checkpoint", "nowhere", "--batch-size", "0"], ["argument --batch-size: 0", ">= 1"]),
        (["analyze", "--checkpoint", "nowhere", "--samples", "-5"], ["argument --samples: -5", ">= 1"]),
        (["analyze", "--checkpoint", "nowhere", "--samples", "0"], ["argument --samples: 0", ">= 1"]),
        (["analyze", "--checkpoint", "nowhere", "--tol", "-1"], ["argument --tol: -1.0", "> 0"]),
        # the device is checked before the checkpoint is read (here: before "no checkpoint at nowhere")
        (["eval", "--checkpoint", "nowhere", "--device", "bogus"], ["visionmoe eval:", "device='bogus'", "'cuda[:N]'"]),
        (["sweep", "--preset", "cifar10_moe", "--slurm", "a=[1", "--status"], ["visionmoe sweep:", "--slurm 'a=[1'"]),
        (["sweep", "--preset", "cifar10_moe", "model.moe.k=1,:", "--status"], ["'model.moe.k=1,:'", "value ':'"]),
    ],
)
def test_bad_arguments_are_refused_in_one_line(argv, words, capsys, tmp_path):
    tail = ["--out", str(tmp_path / "out")] if argv[0] in ("export", "sweep") else []
    message = refusal([*argv, *tail], capsys)
    for word in words:
        assert word in message, message
    assert not (tmp_path / "out").exists()  # nothing written


def test_eval_on_cuda_without_cuda_is_one_line_before_anything_is_read(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    message = refusal(["eval", "--checkpoint", "nowhere", "--device", "cuda"], capsys)
    assert message.startswith("visionmoe eval: device='cuda', but CUDA is not available"), message


def test_library_calls_refuse_counts_below_one_before_reading_the_run(tmp_path):
    from visionmoe.analysis.trained_run import analyze_run
    from visionmoe.train.runs import evaluate_checkpoint

    with pytest.raises(ValueError, match=r"batch_size=0 is out of range"):  # was: the run's eval batch size
        evaluate_checkpoint(tmp_path / "nowhere", batch_size=0)
    for bad, words in [({"samples": 0}, "samples=0"), ({"samples": -5}, "samples=-5"), ({"tol": -1.0}, "tol=-1.0")]:
        with pytest.raises(ValueError, match=re.escape(words)):
            analyze_run(tmp_path / "nowhere", ("routing",), out=tmp_path / "out", progress=False, **bad)
    assert not (tmp_path / "out").exists()


def test_report_refuses_an_unknown_metric_and_lists_the_valid_ones(tmp_path, capsys):
    run = tmp_path / "runs" / "a-s0"
    run.mkdir(parents=True)
    test = {"top1": 0.8, "top5": 0.9, "nll": 0.5, "ece": 0.1}
    run.joinpath("summary.json").write_text(json.dumps({"name": "a", "model": "m", "seed": 0, "test": test}))
    argv = ["report", str(tmp_path / "runs"), "--out", str(tmp_path / "report"), "--metric", "bogus"]
    message = refusal(argv, capsys)
    assert message.startswith("visionmoe report: metric 'bogus' is not a numeric column"), message
    assert "'top1', 'top5', 'nll', 'ece'" in message and "'seed'" not in message, message
    assert not (tmp_path / "report").exists()


def test_export_refuses_weights_that_are_not_a_state_dict(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "text.pt").write_text("not a checkpoint\n")
    out = ["--out", str(tmp_path / "out"), "--no-onnx"]
    message = refusal(["export", "cnn_resnet_cifar_moe", "--weights", str(tmp_path / "run"), *out], capsys)
    assert "--weights" in message and "is a directory: no checkpoint at" in message, message
    message = refusal(["export", "cnn_resnet_cifar_moe", "--weights", str(tmp_path / "text.pt"), *out], capsys)
    assert "cannot be loaded as a state dict" in message, message
    assert not (tmp_path / "out").exists()


def _fake_evaluation(checkpoint, **kwargs):
    return {
        "name": "run", "model": "m", "step": 1, "split": "test", "samples": 2, "top1": 0.5, "top5": 1.0,
        "nll": 0.7, "ece": 0.1, "classes": ["a", "b"], "per_class_accuracy": [0.0, 1.0], "routing": {},
    }  # fmt: skip


def test_eval_out_makes_its_directory_or_is_refused_before_the_evaluation(monkeypatch, tmp_path, capsys):
    from visionmoe.train import trainer

    monkeypatch.setattr(trainer, "evaluate_checkpoint", _fake_evaluation)
    out = tmp_path / "missing" / "dir" / "e.json"  # was: FileNotFoundError after the whole evaluation
    assert main(["eval", "--checkpoint", str(tmp_path), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["top1"] == 0.5

    def must_not_run(checkpoint, **kwargs):
        raise AssertionError("evaluated although --out cannot be written")

    monkeypatch.setattr(trainer, "evaluate_checkpoint", must_not_run)
    (tmp_path / "file").write_text("")
    message = refusal(["eval", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "file" / "e.json")], capsys)
    assert "--out" in message and "a file; expected a directory" in message, message
    message = refusal(["eval", "--checkpoint", str(tmp_path), "--out", str(tmp_path)], capsys)
    assert "is a directory; expected a file path" in message, message
