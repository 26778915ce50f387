"""`visionmoe analyze` on tiny trained runs: every section, and a model without MoE layers."""

import json

import pytest

from visionmoe.analysis.trained_run import analyze_run
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
        samples=10,
        batch_size=10,
        top_k=2,
        trace_probes=3,
        tol=1e-2,  # a double backward through convs costs ~20 forwards: keep the HVPs few
        alphas=(-0.5, 0.0, 0.5),
        batch_sizes=(1, 4),
        progress=False,
    )
    assert result["samples"] == {"train": 10, "test": 10}
    layers = result["routing"]["test"]["layers"]
    assert set(layers) == {"stages.2.blocks.0.mlp", "stages.2.blocks.1.mlp"}
    for h in result["hessian"].values():
        assert h["lambda_max"] == h["top_eigenvalues"][0] >= h["top_eigenvalues"][1]
        assert h["trace_stderr"] >= 0 and h["num_samples"] == 10
    assert result["settings"]["directions"] == ["random"] and set(result["landscape"]) == {"random"}
    for land in result["landscape"]["random"].values():
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
    args = ["analyze", "--checkpoint", str(run), "--samples", "10", "--trace-probes", "3", "--top-k", "1"]
    args += ["--tol", "1e-2"]
    assert main([*args, "--what", "routing,hessian,efficiency"]) == 0
    result = json.loads((run / "analysis.json").read_text())
    assert result["moe_layers"] == [] and result["routing"] == "no MoE layer"
    assert "no MoE layer" in result["efficiency"] and result["hessian"]["test"]["num_samples"] == 10
    assert "λmax" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main([*args, "--what", "hessian,spectra"])
    assert "spectra" in str(e.value) and "landscape" in str(e.value)
    with pytest.raises(SystemExit) as e:
        main([*args, "--params", "router"])
    assert "router" in str(e.value)


def test_analyze_head_hessian_eigenvector_plane_and_density(cifar10_root, tmp_path):
    run = trained(cifar10_root, tmp_path, "resnet18_cifar_sparse_head")
    out = tmp_path / "analysis-head"
    result = analyze_run(
        run,
        ("hessian", "landscape"),
        out=out,
        samples=16,
        batch_size=8,
        params="head",
        top_k=2,
        trace_probes=3,
        density_steps=6,
        directions=("random", "hessian"),
        plane=3,
        alphas=(-1.0, 0.0, 1.0),
        progress=False,
    )
    assert result["settings"]["params"] == "head" and result["settings"]["plane"] == 3
    for split, h in result["hessian"].items():
        assert h["cached_features"] and h["params"] == "head", split  # the backbone ran once
        assert h["num_params"] == sum(
            p.numel() for n, p in _model(run).named_parameters() if n.startswith(("head", "fc"))
        )
        d = h["density"]
        assert len(d["nodes"]) == 6 and sum(d["weights"]) == pytest.approx(1.0)
        assert 0.0 <= d["negative_mass"] <= 1.0
    land = result["landscape"]
    assert set(land) == {"random", "hessian", "plane"}
    for kind in ("random", "hessian"):
        for line in land[kind].values():
            assert line["loss"][1] == pytest.approx(line["base_loss"]) and line["flip_rate"][1] == 0.0
    # Along the top eigenvector the loss rises on both sides on the train subset: that is what λmax > 0 means
    # near a trained point, at α = ±1 in parameter units (a unit vector).
    train = land["hessian"]["train"]
    if result["hessian"]["train"]["lambda_max"] > 0:
        assert max(train["loss"][0], train["loss"][2]) > train["base_loss"]
    for plane in land["plane"].values():
        assert len(plane["loss"]) == 3 and all(len(row) == 3 for row in plane["loss"])
        assert plane["loss"][1][1] == pytest.approx(plane["base_loss"])
    names = ["landscape_train.png", "landscape_hessian_test.png", "landscape_plane_train.png"]
    names += ["hessian_density_train.png", "hessian_density_test.png", "analysis.md"]
    for name in names:
        assert (out / name).stat().st_size > 0, name
    text = (out / "analysis.md").read_text()
    assert "Hessian over head" in text and "top Hessian eigenvector" in text and "Loss plane" in text
    with pytest.raises(ValueError, match=r"unknown perturbation direction\(s\) \['sharpest'\]"):
        analyze_run(run, ("landscape",), directions=("sharpest",), progress=False)
    with pytest.raises(ValueError, match="need plane = 0 or >= 2"):
        analyze_run(run, ("landscape",), plane=1, progress=False)


def _model(run):
    from visionmoe.train.runs import load_run

    return load_run(run)[1]
