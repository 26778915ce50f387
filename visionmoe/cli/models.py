"""``visionmoe profile`` and ``export``: a model built by name (with ``--kwargs`` checked against its
constructor), counted or exported."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import visionmoe
from visionmoe.analysis.profile import profile_model
from visionmoe.cli.args import one_line, positive_float, positive_int, user_errors
from visionmoe.export import export_and_check
from visionmoe.models.registry import check_model_kwargs


def add_commands(sub: argparse._SubParsersAction) -> None:
    """The parsers of profile and export."""
    prof = sub.add_parser("profile", help="FLOPs, rho and active parameters of a model, as a Markdown table")
    prof.add_argument("model", help="a visionmoe (or timm) model name")
    prof.add_argument("--img-size", type=positive_int, default=32)
    prof.add_argument("--batch", type=positive_int, default=1)
    prof.add_argument("--kwargs", default="", help='model arguments as JSON, e.g. \'{"moe_stages": "all"}\'')
    prof.set_defaults(func=_profile)
    export = sub.add_parser(
        "export",
        help="torch.export a model (eval mode) to a .pt2 program, and ONNX, checked against eager",
        description="Export a model for inference: MODEL.pt2 (torch.export, dynamic batch size) and MODEL.onnx "
        "where the ONNX exporter is installed, each reloaded and compared with the eager model on a random batch.",
    )
    export.add_argument("model", help="a visionmoe (or timm) model name")
    export.add_argument("--kwargs", default="", help="model arguments as JSON, e.g. '{\"width\": 16}'")
    export.add_argument(
        "--weights", default=None, help="a state dict, a training checkpoint, or the run directory holding it, to load"
    )
    export.add_argument(
        "--img-size", type=positive_int, default=None, help="default: the model's pretrained_cfg input size"
    )
    export.add_argument(
        "--batch-size", type=positive_int, default=2, help="of the example batch (>= 2 for a dynamic batch)"
    )
    export.add_argument("--static-batch", action="store_true", help="fix the batch size in the program")
    export.add_argument("--out", default="exported", help="the directory to write to")
    export.add_argument("--atol", type=positive_float, default=1e-5, help="the largest |exported - eager| accepted")
    export.add_argument("--no-onnx", action="store_true", help="write the .pt2 program only")
    export.add_argument("--seed", type=int, default=0, help="of the random example batch")
    export.set_defaults(func=_export)


def _model_kwargs(args: argparse.Namespace, command: str) -> dict:
    """``--kwargs`` (a JSON object) checked against ``args.model``'s constructor: timm would drop a null
    silently and build the default model."""
    try:
        overrides = json.loads(args.kwargs) if args.kwargs else {}
    except json.JSONDecodeError as e:
        raise SystemExit(f"--kwargs must be a JSON object, got {args.kwargs!r} ({e.msg})") from None
    if not isinstance(overrides, dict):
        raise SystemExit(f"--kwargs must be a JSON object, got {args.kwargs!r}")
    try:
        check_model_kwargs(args.model, overrides)
    except ValueError as error:
        raise SystemExit(f"visionmoe {command}: {error}") from None
    return overrides


def _build(args: argparse.Namespace, overrides: dict) -> torch.nn.Module:
    """``args.model`` built from ``overrides``; what its constructor (or torch) refuses names ``--kwargs``."""
    try:
        return visionmoe.create_model(args.model, **overrides)
    except (ValueError, TypeError, RuntimeError, AssertionError) as error:
        given = f"--kwargs {args.kwargs!r}" if args.kwargs else "its defaults"
        raise ValueError(f"{args.model} cannot be built from {given}: {one_line(error)}") from None


@user_errors("profile", AssertionError)  # timm asserts the input size it was built for
def _profile(args: argparse.Namespace) -> int:
    model = _build(args, _model_kwargs(args, "profile"))
    x = torch.randn(args.batch, 3, args.img_size, args.img_size)
    print(profile_model(model, x).table())
    return 0


@user_errors("export", AssertionError)  # the input size, and export_and_check's comparison
def _export(args: argparse.Namespace) -> int:
    model = _build(args, _model_kwargs(args, "export"))
    if args.weights:
        from visionmoe.train.checkpoint import check_model_matches  # the training stack: only with --weights

        state = _state_dict(args.weights)
        check_model_matches(state, model, f"--weights {args.weights!r}")
        model.load_state_dict(state)
    _, height, width = (
        model.pretrained_cfg["input_size"] if args.img_size is None else (3, args.img_size, args.img_size)
    )
    if not args.static_batch and args.batch_size < 2:
        raise ValueError(
            f"dynamic_batch needs an example of at least 2 samples, got --batch-size {args.batch_size}; "
            "expected >= 2 (or --static-batch)"
        )
    torch.manual_seed(args.seed)
    example = torch.randn(args.batch_size, model.pretrained_cfg["input_size"][0], height, width)
    with torch.no_grad():  # a shape the model cannot take fails here, in eager, before anything is written
        model.eval()(example)
    report = export_and_check(
        model,
        example,
        args.out,
        args.model,
        onnx=not args.no_onnx,
        atol=args.atol,
        dynamic_batch=not args.static_batch,
    )
    error = report.pt2_max_abs_error
    print(f"wrote {report.pt2_path}: max |exported - eager| = {error:.3g} on a batch of {args.batch_size}")
    if report.onnx_path is not None:
        onnx_error = report.onnx_max_abs_error
        shown = "not run (no onnxruntime)" if onnx_error is None else f"{onnx_error:.3g}"
        print(f"wrote {report.onnx_path}: max |onnx - eager| = {shown}")
    elif report.onnx_skipped is not None:
        print(f"no ONNX file: {report.onnx_skipped}")
    return 0


def _state_dict(path: str) -> dict:
    """A state dict from ``path``: a plain one, or the ``model`` entry of a training checkpoint (weights_only),
    or of the checkpoint in a run directory."""
    if Path(path).is_dir():
        from visionmoe.train.checkpoint import load_checkpoint

        try:
            return load_checkpoint(path)["model"]
        except (FileNotFoundError, ValueError) as error:
            raise ValueError(f"--weights {path!r} is a directory: {error}") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"--weights {path!r}: no such file") from None
    except Exception as error:  # torch raises several types for truncated or foreign files (as load_checkpoint)
        reason = f"{type(error).__name__}: {one_line(error)}"
        raise ValueError(f"--weights {path!r} cannot be loaded as a state dict ({reason})") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise ValueError(f"--weights {path!r} holds a {type(state).__name__}, expected a state dict")
    return state
