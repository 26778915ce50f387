"""Inference export: a model in eval mode as a ``torch.export`` program (``.pt2``), and ONNX.

MoE dispatch is data-dependent in two places, and export needs static shapes:

- the backend: ``sorted`` / ``grouped`` split the tokens by the per-expert counts read on the
  host; ``padded`` fills fixed (E, G·C, D) buffers instead;
- dropless token choice (``capacity_factor=None``): C is the largest load, read from the data
  (``int(position.max()) + 1``); the static bound C = S (a token picks an expert at most once)
  keeps every assignment too.

:func:`static_shapes` switches every MoE layer of a model to that static path (``padded``
backend, C = S for dropless routers) for the duration of a ``with`` block, and :func:`export_model`
traces under it (while ``torch.export`` traces, the MoE layers skip their aux loss and statistics:
a program keeps no module state). The static path computes the same routing plan as the normal one (the same
tokens, experts and weights: tested) and runs the experts on the same rows; the sums are taken in
another order, so outputs agree to float rounding (~1e-7 in fp32), and the exported program
matches eager to 1e-5 (tested for every registered model).

A dynamic batch (``export_model``'s default) needs shapes that do not depend on the batch size.
MoE groups within a sample (``groups="sample"``, or an int that divides an image's tokens) and the
soft and dense routers give that; ``groups="batch"`` with a capacity router (top-k, expert choice
and their variants, at a capacity factor) does not, as C = ceil(k·B·N·capacity_factor/E) grows with
the batch: :func:`export_model` refuses it in one line, naming the layer (``dynamic_batch=False``
exports it for the example's batch size; a fixed ``capacity`` or dropless top-k stays dynamic).

ONNX (``pip install 'visionmoe[onnx]'``: onnx, onnxscript, and onnxruntime for the check) goes
through torch's dynamo exporter from the same program. It converts the dense models and the Soft
MoE and dense-router heads; sparse routers fail to convert with torch 2.14's exporter, which has no
ONNX function for the stable sort (``aten.sort.stable``) that token and expert choice use to keep
ties deterministic; :func:`export_and_check` then reports why and keeps the ``.pt2``.

Example:
    >>> model = visionmoe.create_model("resnet18_cifar_sparse_head").eval()
    >>> program = export_model(model, torch.randn(2, 3, 32, 32))
    >>> torch.export.save(program, "sparse_head.pt2")
    >>> torch.export.load("sparse_head.pt2").module()(images)
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from visionmoe.layers.moe import moe_layers
from visionmoe.layers.router_base import Capacity


@contextlib.contextmanager
def static_shapes(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every MoE layer of ``model`` dispatches with static shapes (restored after).

    ``padded`` backend and, for dropless token choice, capacity C = S tokens of the group.
    """
    saved = []
    for _, moe in moe_layers(model):
        router = moe.router
        saved.append((moe, moe.backend, router, getattr(router, "static_shapes", None)))
        moe.backend = "padded"
        if isinstance(router, Capacity):
            router.static_shapes = True
    try:
        yield model
    finally:
        for moe, backend, router, static in saved:
            moe.backend = backend
            if static is not None:
                router.static_shapes = static


def export_model(model: nn.Module, example: Tensor, *, dynamic_batch: bool = True) -> torch.export.ExportedProgram:
    """``torch.export`` of ``model`` in eval mode on the static-shape path.

    Args:
        model: put in eval mode (routing noise off, BatchNorm on running statistics); left so.
        example: an input batch; its image size is fixed in the program.
        dynamic_batch: let the batch size vary (needs ``example`` with at least 2 samples, as
            ``torch.export`` specialises a size of 1). Refused (ValueError) where an MoE layer's
            capacity depends on the batch: ``groups="batch"`` with a capacity factor.
    """
    if not isinstance(example, Tensor) or example.dim() != 4:
        shape = tuple(example.shape) if isinstance(example, Tensor) else type(example).__name__
        raise ValueError(f"export needs an example image batch (B, C, H, W), got {shape}")
    if dynamic_batch and example.shape[0] < 2:
        raise ValueError(f"dynamic_batch needs an example of at least 2 samples, got batch size {example.shape[0]}")
    model.eval()
    if dynamic_batch and (layer := _batch_capacity_layer(model)) is not None:
        name, router = layer
        raise ValueError(
            f"cannot export a dynamic batch: MoE layer {name!r} routes groups='batch' with router {router.name!r} "
            f"at capacity_factor={router.active_capacity_factor()}, so its expert capacity depends on the batch "
            f"size; pass dynamic_batch=False (CLI: --static-batch) for a program of batch size {example.shape[0]}"
        )
    dynamic = ({0: torch.export.Dim("batch", min=1, max=65536)},) if dynamic_batch else None
    with static_shapes(model), torch.no_grad():
        try:
            return torch.export.export(model, (example,), dynamic_shapes=dynamic)
        except Exception as error:  # torch's several-line report when a shape depends on the batch size
            if not (dynamic_batch and str(error).lstrip().startswith("Constraints violated (batch)")):
                raise
            raise ValueError(
                "cannot export a dynamic batch: torch.export found shapes that depend on the batch size (e.g. MoE "
                "groups spanning samples: groups='batch', or an int groups that does not divide the tokens of an "
                f"image); pass dynamic_batch=False (CLI: --static-batch) for a program of batch size {example.shape[0]}"
            ) from error


def _batch_capacity_layer(model: nn.Module) -> tuple[str, Capacity] | None:
    """The first MoE layer (name, router) whose capacity C depends on the batch size, if any.

    With ``groups="batch"`` a group is the whole batch, S = B·N tokens, and a capacity router's
    C = ceil(k·S·capacity_factor/E) is a rounded function of B that a program dynamic in B cannot
    keep. A fixed ``capacity`` and dropless token choice (C = S on the static path) stay exportable,
    as do per-sample groups and the soft and dense routers (no capacity).
    """
    for name, moe in moe_layers(model):
        router = moe.router
        if moe.groups != "batch" or not isinstance(router, Capacity) or router.capacity is not None:
            continue
        if router.active_capacity_factor() is not None:
            return name, router
    return None


def max_abs_error(program: torch.export.ExportedProgram, model: nn.Module, x: Tensor) -> float:
    """Largest |exported − eager| on ``x``, eager being ``model`` in eval mode on its normal path."""
    model.eval()
    with torch.no_grad():
        expected = model(x)
        got = program.module()(x)
    return float((got - expected).abs().max())


def onnx_available() -> str | None:
    """None if the ONNX exporter can run here, else why not (the packages it needs)."""
    missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
    if missing:
        return f"ONNX export needs {' and '.join(missing)}: pip install 'visionmoe[onnx]'"
    return None


def export_onnx(model: nn.Module, example: Tensor, path: str | os.PathLike) -> None:
    """Write ``model`` (eval mode, static-shape path) as ONNX through torch's dynamo exporter."""
    if (why := onnx_available()) is not None:
        raise RuntimeError(why)
    model.eval()
    with static_shapes(model), torch.no_grad():
        torch.onnx.export(model, (example,), os.fspath(path), dynamo=True, external_data=False, verbose=False)


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_and_check` wrote and how close each artefact came to eager."""

    pt2_path: str
    pt2_max_abs_error: float
    onnx_path: str | None = None
    onnx_max_abs_error: float | None = None
    onnx_skipped: str | None = None  # why no ONNX file was written


def export_and_check(
    model: nn.Module,
    example: Tensor,
    out_dir: str | os.PathLike,
    name: str,
    *,
    onnx: bool = True,
    atol: float = 1e-5,
    dynamic_batch: bool = True,
) -> ExportReport:
    """Export ``model`` to ``out_dir/name.pt2`` (and ``name.onnx``), reload each, check against eager to ``atol``.

    Raises ``AssertionError`` naming the error if a reloaded artefact differs from eager by more.
    """
    os.makedirs(out_dir, exist_ok=True)
    program = export_model(model, example, dynamic_batch=dynamic_batch)
    pt2 = os.path.join(out_dir, f"{name}.pt2")
    torch.export.save(program, pt2)
    error = max_abs_error(torch.export.load(pt2), model, example)
    if not error <= atol:
        raise AssertionError(f"exported {pt2} differs from eager by {error:.3g} > atol={atol:g}")
    report = ExportReport(pt2, error)
    if not onnx:
        return report
    if (why := onnx_available()) is not None:
        return ExportReport(pt2, error, onnx_skipped=why)
    path = os.path.join(out_dir, f"{name}.onnx")
    try:
        export_onnx(model, example, path)
    except Exception as exc:  # the exporter's coverage of ops varies by torch version: report, keep the .pt2
        return ExportReport(pt2, error, onnx_skipped=f"torch.onnx.export failed: {_root_cause(exc)}")
    onnx_error = _onnx_error(path, model, example)
    if onnx_error is not None and not onnx_error <= atol:
        raise AssertionError(f"exported {path} differs from eager by {onnx_error:.3g} > atol={atol:g}")
    return ExportReport(pt2, error, path, onnx_error)


def _root_cause(exc: BaseException) -> str:
    """The first line of the innermost exception of a chain (the ONNX exporter wraps its reason twice)."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    line = next((ln for ln in str(exc).splitlines() if ln.strip()), "")
    return f"{type(exc).__name__}: {line}"[:300]


def _onnx_error(path: str, model: nn.Module, x: Tensor) -> float | None:
    """|ONNX − eager| through onnxruntime, or None where onnxruntime is not installed (the file is still checked)."""
    import onnx

    onnx.checker.check_model(path)
    if importlib.util.find_spec("onnxruntime") is None:
        return None
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        expected = model.eval()(x)
    return float((torch.from_numpy(got) - expected).abs().max())


__all__ = ["ExportReport", "export_and_check", "export_model", "export_onnx", "max_abs_error", "static_shapes"]
