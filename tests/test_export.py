"""Inference export: every registered model through torch.export equals eager; the static-shape path
routes exactly as the normal one; `visionmoe export` writes and checks the program."""

import importlib.util
from pathlib import Path

import pytest
import timm
import torch
from model_sizes import SMALL

import visionmoe
from visionmoe.cli import main
from visionmoe.export import export_and_check, export_model, max_abs_error, static_shapes
from visionmoe.layers.routers import TopKRouter

pytestmark = pytest.mark.usefixtures("one_thread")


def test_static_dropless_capacity_keeps_the_plan():
    # Dropless top-2 of E=4 over S=6 tokens: normally C = the largest load (read from the data);
    # static C = S = 6 (a token picks an expert at most once, so no load exceeds 6). Every assignment
    # is kept either way, so tokens, experts, positions and weights are identical.
    torch.manual_seed(0)
    router = TopKRouter(8, 4, k=2, capacity_factor=None, noise_std=0.0).eval()
    x = torch.randn(3, 6, 8)
    normal = router(x).plan
    router.static_shapes = True
    static = router(x).plan
    loads = torch.stack([torch.bincount(e, minlength=4) for e in normal.expert])  # (G, E)
    assert normal.capacity == int(loads.max()) < 6 and static.capacity == 6
    for field in ("token", "expert", "position", "weight", "kept"):
        assert torch.equal(getattr(normal, field), getattr(static, field)), field
    assert bool(normal.kept.all())


def test_static_shapes_is_scoped():
    model = timm.create_model("resnet18_cifar_sparse_head", width=8).eval()
    ((_, moe),) = visionmoe.moe_layers(model)
    with static_shapes(model):
        assert moe.backend == "padded" and moe.router.static_shapes
    assert moe.backend == "auto" and not moe.router.static_shapes


@pytest.mark.parametrize("name", sorted(SMALL))
def test_export_equals_eager(name):
    # Every model, sparse ones included, in eval mode: the exported program (static path) against the
    # eager model on its normal path, on a batch of 2.
    kwargs, size = SMALL[name]
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs).eval()
    x = torch.randn(2, 3, size, size)
    program = export_model(model, x, dynamic_batch=False)
    assert max_abs_error(program, model, x) <= 1e-5
    with static_shapes(model), torch.no_grad():  # the static path in eager mode: the same function
        torch.testing.assert_close(model(x), program.module()(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["resnet18_cifar_sparse_head", "vit_moe_tiny_patch4_32"])
def test_export_dynamic_batch(name):
    kwargs, size = SMALL[name]
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs).eval()
    program = export_model(model, torch.randn(2, 3, size, size))
    for batch in (1, 5):
        assert max_abs_error(program, model, torch.randn(batch, 3, size, size)) <= 1e-5


@pytest.mark.parametrize("router", ["topk", "expert_choice"])
def test_dynamic_batch_refuses_a_capacity_shared_by_the_batch(router):
    # groups="batch": one group of B tokens (one per image in this head), so C = ceil(k·B·factor/E)
    # changes with B. Refused up front in one line naming the layer and the way out, which works.
    torch.manual_seed(0)
    moe = {"num_experts": 4, "router": router, "groups": "batch"}
    model = timm.create_model("cnn_resnet_cifar_head", width=8, head_hidden=16, moe=moe)
    x = torch.randn(4, 3, 32, 32)
    message = rf"MoE layer 'head_ffn' routes groups='batch' with router '{router}' .* depends on the batch size; "
    with pytest.raises(ValueError, match=message + r"pass dynamic_batch=False .* batch size 4") as e:
        export_model(model, x)
    assert "\n" not in str(e.value)
    assert max_abs_error(export_model(model, x, dynamic_batch=False), model, x) <= 1e-5


@pytest.mark.parametrize(
    "moe",
    [
        {"router": "soft", "groups": "batch"},  # slots, no capacity
        {"router": "topk", "k": 2, "capacity_factor": None, "groups": "batch"},  # dropless: C = S on the static path
        {"router": "topk", "router_options": {"capacity": 3}, "groups": "batch"},  # a fixed C
        {"router": "expert_choice", "groups": 2},  # groups within an image (4 tokens)
    ],
)
def test_dynamic_batch_keeps_batch_free_capacities(moe):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), visionmoe.MoE(8, 4, 16, **moe)).eval()
    program = export_model(model, torch.randn(4, 3, 2, 2))
    for batch in (1, 5):
        assert max_abs_error(program, model, torch.randn(batch, 3, 2, 2)) <= 1e-5


def test_dynamic_batch_refuses_groups_spanning_images_in_one_line():
    # groups=2 over one token per image: a group spans two images, so B must be even; torch.export's
    # several-line constraint report becomes one line saying what to do.
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), visionmoe.MoE(8, 4, 16, router="soft", groups=2))
    x = torch.randn(4, 3, 1, 1)
    with pytest.raises(ValueError, match=r"shapes that depend on the batch size .* pass dynamic_batch=False") as e:
        export_model(model, x)
    assert "\n" not in str(e.value)
    assert max_abs_error(export_model(model, x, dynamic_batch=False), model, x) <= 1e-5


def test_export_rejects_bad_examples():
    model = timm.create_model("cnn_resnet_cifar", width=8)
    with pytest.raises(ValueError, match=r"export needs an example image batch \(B, C, H, W\), got \(3, 32, 32\)"):
        export_model(model, torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="dynamic_batch needs an example of at least 2 samples, got batch size 1"):
        export_model(model, torch.randn(1, 3, 32, 32))


def test_export_command_writes_a_checked_program(tmp_path, capsys):
    argv = ["export", "resnet18_cifar_sparse_head", "--kwargs", '{"width": 8}', "--out", str(tmp_path), "--no-onnx"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    error = float(out.split("max |exported - eager| = ")[1].split()[0])
    assert error <= 1e-5 and "on a batch of 2" in out
    program = torch.export.load(tmp_path / "resnet18_cifar_sparse_head.pt2")
    assert program.module()(torch.randn(3, 3, 32, 32)).shape == (3, 10)  # the batch size is dynamic
    with pytest.raises(SystemExit, match="--kwargs must be a JSON object"):
        main(["export", "cnn_resnet_cifar", "--kwargs", "[1]"])
    one = ["export", "cnn_resnet_cifar", "--kwargs", '{"width": 8}', "--batch-size", "1", "--out", str(tmp_path)]
    with pytest.raises(SystemExit, match="visionmoe export: dynamic_batch needs an example of at least 2 samples"):
        main(one)  # export_model's ValueError, as one line


@pytest.mark.parametrize("weights", ["checkpoint.pt", "."])  # the file, or the run directory holding it
def test_export_command_loads_weights(weights, tmp_path, capsys):
    torch.manual_seed(1)
    trained = timm.create_model("cnn_resnet_cifar_moe", width=8)
    torch.save({"model": trained.state_dict(), "config": {}}, tmp_path / "checkpoint.pt")  # as training writes
    argv = ["export", "cnn_resnet_cifar_moe", "--kwargs", '{"width": 8}', "--out", str(tmp_path), "--no-onnx"]
    assert main([*argv, "--weights", str(tmp_path / weights), "--static-batch"]) == 0
    program = torch.export.load(tmp_path / "cnn_resnet_cifar_moe.pt2")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), trained.eval()(x), rtol=0, atol=1e-5)


@pytest.mark.skipif(importlib.util.find_spec("onnxscript") is None, reason="needs visionmoe[onnx]")
def test_onnx_where_the_exporter_supports_it(tmp_path):
    # A Soft MoE layer on (B, D, H, W) maps converts (and matches eager through onnxruntime); a sparse
    # router's stable sort does not, which is reported in one line and leaves the .pt2.
    torch.manual_seed(0)
    x = torch.randn(2, 8, 4, 4)
    soft = visionmoe.MoE(8, 4, 16, router="soft_per_sample")
    report = export_and_check(soft, x, tmp_path, "soft")
    assert report.onnx_path is not None and Path(report.onnx_path).is_file()
    assert report.onnx_max_abs_error is None or report.onnx_max_abs_error <= 1e-5
    sparse = visionmoe.MoE(8, 4, 16, router="topk", k=2)
    report = export_and_check(sparse, x, tmp_path, "sparse")
    assert Path(report.pt2_path).is_file() and report.onnx_path is None
    assert "aten.sort" in report.onnx_skipped and "\n" not in report.onnx_skipped
