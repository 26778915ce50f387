"""``visionmoe train``, ``eval`` and ``analyze``: the commands that make one run or read it back.

The training stack loads only when one of them runs (its imports are most of a command's start-up
beyond ``import visionmoe``: see BENCHMARKS.md, "Start-up of the command line").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from visionmoe.cli.args import one_line, positive_float, positive_int
from visionmoe.jsonl import write_atomic


def add_commands(sub: argparse._SubParsersAction) -> None:
    """The parsers of train, eval and analyze."""
    train = sub.add_parser(
        "train",
        help="train a model from a preset in configs/ (or defaults) with key=value overrides",
        description="Train a model. Overrides are section.key=value (values parsed as YAML), e.g. "
        "optim.lr=0.05 train.epochs=2 model.moe.k=1 data.data_dir=../shared/data/cifar10-jpeg.",
    )
    train.add_argument("--config", help="a preset name (configs/<name>.yaml) or a YAML file")
    train.add_argument("--resume", action="store_true", help="continue the run directory's checkpoint")
    train.add_argument("overrides", nargs="*", metavar="key=value")
    train.set_defaults(func=_train)
    evaluate = sub.add_parser("eval", help="evaluate a checkpoint: top-1/5, NLL, ECE, per class, routing")
    evaluate.add_argument("--checkpoint", required=True, help="checkpoint.pt, or the run directory holding it")
    evaluate.add_argument("--data-dir", default=None, help="the data root, if it moved since training")
    evaluate.add_argument("--split", choices=("test", "train"), default="test")
    evaluate.add_argument("--batch-size", type=positive_int, default=None, help="default: the run's eval batch size")
    evaluate.add_argument("--tta-flip", action=argparse.BooleanOptionalAction, default=None)
    evaluate.add_argument("--device", default="auto", help="auto (CUDA where available), cpu or cuda[:N]")
    evaluate.add_argument("--out", default=None, help="where to write the JSON (default: next to the checkpoint)")
    evaluate.set_defaults(func=_eval)
    analyze = sub.add_parser("analyze", help="routing, Hessian sharpness, loss surface and efficiency of a trained run")
    analyze.add_argument("--checkpoint", required=True, help="checkpoint.pt, or the run directory holding it")
    analyze.add_argument("--what", default="routing,hessian,landscape,efficiency", help="comma-separated sections")
    analyze.add_argument(
        "--samples", type=positive_int, default=1000, help="images in each of the train and test subsets"
    )
    analyze.add_argument(
        "--params", default="all", help="Hessian/landscape parameters: all, router, experts, backbone, head"
    )
    analyze.add_argument("--top-k", type=positive_int, default=3, help="Hessian eigenvalues to compute")
    analyze.add_argument("--trace-probes", type=positive_int, default=50)
    analyze.add_argument(
        "--tol", type=positive_float, default=1e-3, help="Lanczos relative accuracy of the eigenvalues"
    )
    analyze.add_argument("--density-steps", type=int, default=0, help="> 0: SLQ spectral density with that many steps")
    analyze.add_argument(
        "--directions", default="random", help="1D perturbation directions, comma-separated: random, hessian"
    )
    analyze.add_argument("--plane", type=int, default=0, help="> 0: a 2D random plane on a PLANE × PLANE grid")
    analyze.add_argument("--seed", type=int, default=0)
    analyze.add_argument("--data-dir", default=None)
    analyze.add_argument("--out", default=None, help="default: the run directory")
    analyze.set_defaults(func=_analyze)


def _train(args: argparse.Namespace) -> int:
    from visionmoe.train.config import load_config
    from visionmoe.train.trainer import Trainer

    try:
        config = load_config(args.config, args.overrides)
        trainer = Trainer(config, resume=args.resume)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, RuntimeError) as error:
        raise SystemExit(f"visionmoe train: {one_line(error)}") from None
    summary = trainer.fit()
    if not trainer.replica.is_main:
        return 0  # under torchrun, rank 0 reports for every rank
    t = summary["test"]
    print(
        f"{summary['name']}: test top-1 {t['top1']:.2%} (top-5 {t['top5']:.2%}, NLL {t['nll']:.3f}, "
        f"ECE {t['ece']:.3f}) after {summary['epochs']:g} epochs, {summary['train_seconds'] / 60:.1f} min of "
        f"training, {summary['images_per_s']:.0f} images/s; summary in {summary['run_dir']}/summary.json"
    )
    return 0


def _eval(args: argparse.Namespace) -> int:
    from visionmoe.train.trainer import evaluate_checkpoint

    checkpoint = Path(args.checkpoint)
    default = (checkpoint if checkpoint.is_dir() else checkpoint.parent) / f"eval_{args.split}.json"
    out = Path(args.out) if args.out else default
    try:
        _check_writable(out, "--out")  # now, not after the whole evaluation
        result = evaluate_checkpoint(
            args.checkpoint,
            data_dir=args.data_dir,
            split=args.split,
            batch_size=args.batch_size,
            tta_flip=args.tta_flip,
            device=args.device,
        )
    except (ValueError, TypeError, FileNotFoundError) as error:
        raise SystemExit(f"visionmoe eval: {error}") from None
    console = Console(width=None if sys.stdout.isatty() else 120)
    console.print(
        f"[bold]{result['name']}[/] ({result['model']}, step {result['step']}) on the {result['split']} split, "
        f"{result['samples']} images: top-1 {result['top1']:.2%}, top-5 {result['top5']:.2%}, "
        f"NLL {result['nll']:.4f}, ECE {result['ece']:.4f}"
    )
    per_class = Table(title="per-class accuracy")
    per_class.add_column("class")
    per_class.add_column("top-1", justify="right")
    for name, acc in zip(result["classes"], result["per_class_accuracy"], strict=True):
        per_class.add_row(name, "—" if acc != acc else f"{acc:.2%}")
    console.print(per_class)
    if result["routing"]:
        routing = Table(title="routing on this split")
        for col in ("layer", "load min/mean/max", "load CV", "dropped", "unrouted", "entropy"):
            routing.add_column(col, justify="left" if col == "layer" else "right")
        for name, r in result["routing"].items():
            load = r["tokens_per_expert"]
            routing.add_row(
                name,
                f"{min(load):.0f} / {sum(load) / len(load):.0f} / {max(load):.0f}",
                f"{r['load_cv']:.2f}",
                f"{r['dropped_fraction']:.1%}",
                f"{r['unrouted_fraction']:.1%}",
                f"{r['router_entropy']:.2f}",
            )
        console.print(routing)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {out}")
    return 0


def _check_writable(path: Path, option: str) -> None:
    """Refuse a file path that cannot be written: a directory, or under a file or a directory not writable
    (its missing parent directories are made when it is written)."""
    if path.is_dir():
        raise ValueError(f"{option} {str(path)!r} is a directory; expected a file path")
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{option} {str(path)!r} is under {str(parent)!r}, a file; expected a directory there")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {str(path)!r}: cannot write under {str(parent)!r}; expected a writable directory")


def _analyze(args: argparse.Namespace) -> int:
    from visionmoe.analysis.trained_run import analyze_run

    what = [w.strip() for w in args.what.split(",") if w.strip()]
    try:
        analyze_run(
            args.checkpoint,
            what,
            data_dir=args.data_dir,
            out=args.out,
            samples=args.samples,
            params=args.params,
            top_k=args.top_k,
            trace_probes=args.trace_probes,
            tol=args.tol,
            density_steps=args.density_steps,
            directions=[d.strip() for d in args.directions.split(",") if d.strip()],
            plane=args.plane,
            seed=args.seed,
        )
    except (ValueError, TypeError, FileNotFoundError, FloatingPointError) as error:
        raise SystemExit(f"visionmoe analyze: {error}") from None
    return 0
