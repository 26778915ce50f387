"""The command line: `visionmoe demo` runs every router and prints its table."""

import subprocess
import sys

import pytest

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
