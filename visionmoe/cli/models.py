"""``visionmoe profile`` and ``export``: a model built by name (with ``--kwargs`` checked against its
constructor), counted or exported."""

from __future__ import annotations

import argparse
import json

import torch

import visionmoe
from visionmoe.analysis.profile import profile_model
from visionmoe.export import export_and_check
from visionmoe.models.registry import check_model_kwargs


def add_commands(sub: argparse._SubParsersAction) -> None:
    """The parsers of profile and export."""
    prof = sub.add_parser("profile", help="FLOPs, rho and active parameters of a model, as a Markdown table")
    prof.add_argument("model", help="a visionmoe (or timm) model name")
    prof.add_argument("--img-size", type=int, default=32)
    prof.add_argument("--batch", type=int, default=1)
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
    export.add_argument("--weights", default=None, help="a state dict (or a training checkpoint) to load first")
    export.add_argument("--img-size", type=int, default=None, help="default: the model's pretrained_cfg input size")
    export.add_argument("--batch-size", type=int, default=2, help="of the example batch (>= 2 for a dynamic batch)")
    export.add_argument("--static-batch", action="store_true", help="fix the batch size in the program")
    export.add_argument("--out", default="exported", help="the directory to write to")
    export.add_argument("--atol", type=float, default=1e-5, help="the largest |exported - eager| accepted")
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


def _profile(args: argparse.Namespace) -> int:
    model = visionmoe.create_model(args.model, **_model_kwargs(args, "profile"))
    x = torch.randn(args.batch, 3, args.img_size, args.img_size)
    print(profile_model(model, x).table())
    return 0


def _export(args: argparse.Namespace) -> int:
    overrides = _model_kwargs(args, "export")
    try:
        model = visionmoe.create_model(args.model, **overrides)
        if args.weights:
            model.load_state_dict(_state_dict(args.weights))
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as error:
        raise SystemExit(f"visionmoe export: {error}") from None
    _, height, width = (
        model.pretrained_cfg["input_size"] if args.img_size is None else (3, args.img_size, args.img_size)
    )
    torch.manual_seed(args.seed)
    example = torch.randn(args.batch_size, model.pretrained_cfg["input_size"][0], height, width)
    try:
        report = export_and_check(
            model,
            example,
            args.out,
            args.model,
            onnx=not args.no_onnx,
            atol=args.atol,
            dynamic_batch=not args.static_batch,
        )
    except (AssertionError, ValueError) as error:  # a bad example or batch-dependent shapes: one line
        raise SystemExit(f"visionmoe export: {error}") from None
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
    """A state dict from ``path``: a plain one, or the ``model`` entry of a training checkpoint (weights_only)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"--weights {path!r}: no such file") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise ValueError(f"--weights {path!r} holds a {type(state).__name__}, expected a state dict")
    return state
