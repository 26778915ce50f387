"""`visionmoe analyze` on tiny trained runs: every section, and a model without MoE layers."""

import json

import pytest

from visionmoe.analyze import analyze_run
from visionmoe.cli import main
from visionmoe.train import Trainer, load_config

TINY = ["model.kwargs={width: 8}", "data.batch_size=16", "data.eval_batch_size=32", "train.epochs=1"]


def trained(root, out, model):
    overrides = [*TINY, f"model.name={model}", f"data.data_dir={root}", f"train.out_dir={out}"]
    overrides += ["train.progress=false", "train.tensorboard=false", f"train.run_name={model}"]
    Trainer(load_config(None, overrides)).fit()
    return out / model


def test_analyze_every_section(cifar10_root, tmp_path):
    run = trained(cifar10_root, tmp_path, "cnn_resnet_cifar_moe")
    result = analyze_run(
        run,
        samples=20,
        batch_size=20,
        top_k=2,
        trace_probes=5,
        alphas=(-0.5, 0.0, 0.5),
        batch_sizes=(1, 4),
        progress=False,
    )
    assert result["samples"] == {"train": 20, "test": 20}
    layers = result["routing"]["test"]["layers"]
    assert set(layers) == {"stages.2.blocks.0.mlp", "stages.2.blocks.1.mlp"}
    for h in result["hessian"].values():
        assert h["lambda_max"] == h["top_eigenvalues"][0] >= h["top_eigenvalues"][1]
        assert h["trace_stderr"] >= 0 and h["num_samples"] == 20
    for land in result["landscape"].values():
        assert land["alphas"] == [-0.5, 0.0, 0.5] and land["loss"][1] == pytest.approx(land["base_loss"])
        assert land["flip_rate"][1] == 0.0
    rows = result["efficiency"]
    assert {r["against"] for r in rows} == {"dense, equal params", "dense, equal active FLOPs"}
    params_twin = [r for r in rows if r["against"] == "dense, equal params"]
    assert all(r["theoretical"] > 1 and r["realised"] > 0 for r in params_twin)  # sparsity saves FLOPs
    for name in ("analysis.json", "analysis.md", "routing_classes.png", "landscape_train.png", "landscape_test.png"):
        assert (run / name).is_file() and (run / name).stat().st_size > 0, name
    assert json.loads((run / "analysis.json").read_text())["name"] == "custom"
    assert "## Hessian" in (run / "analysis.md").read_text()


def test_analyze_a_dense_model_and_the_cli(cifar10_root, tmp_path, capsys):
    run = trained(cifar10_root, tmp_path, "cnn_resnet_cifar")
    args = ["analyze", "--checkpoint", str(run), "--samples", "20", "--trace-probes", "3", "--top-k", "1"]
    assert main([*args, "--what", "routing,hessian,efficiency"]) == 0
    result = json.loads((run / "analysis.json").read_text())
    assert result["moe_layers"] == [] and result["routing"] == "no MoE layer"
    assert "no MoE layer" in result["efficiency"] and result["hessian"]["test"]["num_samples"] == 20
    assert "λmax" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main([*args, "--what", "hessian,spectra"])
    assert "spectra" in str(e.value) and "landscape" in str(e.value)
    with pytest.raises(SystemExit) as e:
        main([*args, "--params", "router"])
    assert "router" in str(e.value)
