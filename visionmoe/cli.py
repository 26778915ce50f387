"""``visionmoe`` command line: train, eval, analyze, sweep, report, demo, bench, profile, export."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from visionmoe.demo import DemoConfig


def _demo(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console
    from rich.table import Table

    from visionmoe.demo import run

    cfg = DemoConfig(**{f.name: getattr(args, f.name) for f in fields(DemoConfig)})
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    console = Console(width=None if sys.stdout.isatty() else 120)
    console.print(
        f"[bold]visionmoe demo[/]: {cfg.batch} images × {cfg.tokens} tokens, d={cfg.dim}, "
        f"E={cfg.num_experts}, expert width {cfg.hidden_dim}, k={cfg.k} experts' compute per token, "
        f"capacity factor {cfg.capacity_factor}, groups per image, {torch.get_num_threads()} threads"
    )
    rows = run(cfg)
    table = Table(title="one training step per router (same tokens, same initial weights)")
    columns = ("router", "load min/mean/max", "load CV", "dropped", "unrouted", "entropy", "fwd+bwd ms", "× dense")
    for col in columns:
        table.add_column(col, justify="left" if col == "router" else "right", no_wrap=True)
    for r in rows:
        load = r["tokens_per_expert"]
        table.add_row(
            r["router"],
            f"{min(load)} / {sum(load) / len(load):.0f} / {max(load)}",
            f"{r['load_cv']:.2f}",
            f"{r['dropped']:.1%}",
            f"{r['unrouted']:.1%}",
            "—" if r["entropy"] != r["entropy"] else f"{r['entropy']:.2f}",
            f"{r['seconds'] * 1e3:.1f} ± {r['iqr'] * 1e3:.1f}",
            f"{r['vs_dense']:.2f}",
        )
    console.print(table)
    console.print(
        "load = tokens per expert over the batch (Soft MoE: combine mass). dense = one FFN of k × the expert "
        f"width (equal active FLOPs). Time: median ± IQR of {cfg.repeats} repeats."
    )
    return 0


def _bench(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console
    from rich.table import Table

    from visionmoe.analysis.speed import QUICK_SHAPE, TARGET_SHAPE, fmt, layer_benchmark, machine_info

    shape = QUICK_SHAPE if args.quick else TARGET_SHAPE
    # --quick checks that everything runs: 1 thread, so a shared CPU can't stall OpenMP barriers.
    threads = args.threads or (1 if args.quick else torch.get_num_threads())
    images, tokens, d, E, k, cf = shape
    info = machine_info(threads)
    console = Console(width=None if sys.stdout.isatty() else 140)
    console.print(
        f"[bold]visionmoe bench[/]: {images} images × {tokens} tokens, d={d}, E={E} experts of width {4 * d}, "
        f"k={k}, capacity factor {cf}, groups per image, {args.mode}; {info['cpu']}, {info['cores']} cores, "
        f"torch {info['torch']}, threads={threads}"
    )
    rows = layer_benchmark([shape], threads=threads, repeats=args.repeats, mode=args.mode)
    table = Table(title="one MoE layer, same input, timed in one run")
    columns = ("implementation", "ms", "× dense", "assignments", "expert rows", "C", "per assignment × dense", "note")
    for col in columns:
        table.add_column(col, justify="left" if col in ("implementation", "note") else "right", no_wrap=col != "note")
    for r in rows:
        ms = "—" if r["median"] is None else f"{r['median'] * 1e3:.2f} ± {r['iqr'] * 1e3:.2f}"
        table.add_row(
            r["implementation"],
            ms,
            fmt(r["vs_dense"], ".2f"),
            fmt(r["assignments"]),
            fmt(r["expert_rows"]),
            fmt(r["capacity"]),
            fmt(r["per_assignment_vs_dense"], ".2f"),
            r["note"],
        )
    console.print(table)
    console.print(
        f"ms: median ± IQR of {args.repeats} repeats. dense = one FFN of k × the expert width (equal active FLOPs). "
        "assignments: kept token-expert assignments (Soft MoE: slots); expert rows: what the expert GEMMs execute, "
        "padding included. Peers that are not installed are skipped (pip install visionmoe\\[bench])."
    )
    return 0


def _shards(args: argparse.Namespace) -> int:
    from visionmoe.data.datasets import list_image_folder
    from visionmoe.data.stream import ImageFiles, write_shards

    files = ImageFiles.from_files(*list_image_folder(args.folder))
    shards = write_shards(files, args.out, args.shard_size)
    print(f"{len(files)} images of {len(files.classes)} classes -> {len(shards)} shards in {args.out}")
    return 0


def _model_kwargs(args: argparse.Namespace, command: str) -> dict:
    """``--kwargs`` (a JSON object) checked against ``args.model``'s constructor: timm would drop a null
    silently and build the default model."""
    import json

    from visionmoe.models.registry import check_model_kwargs

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
    import torch

    import visionmoe
    from visionmoe.analysis import profile_model

    model = visionmoe.create_model(args.model, **_model_kwargs(args, "profile"))
    x = torch.randn(args.batch, 3, args.img_size, args.img_size)
    print(profile_model(model, x).table())
    return 0


def _export(args: argparse.Namespace) -> int:
    import torch

    import visionmoe
    from visionmoe.export import export_and_check

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
    except AssertionError as error:
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
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"--weights {path!r}: no such file") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise ValueError(f"--weights {path!r} holds a {type(state).__name__}, expected a state dict")
    return state


def _train(args: argparse.Namespace) -> int:
    from visionmoe.train.config import load_config
    from visionmoe.train.trainer import Trainer

    try:
        config = load_config(args.config, args.overrides)
        trainer = Trainer(config, resume=args.resume)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError) as error:
        raise SystemExit(f"visionmoe train: {error}") from None
    summary = trainer.fit()
    if trainer.parallel_env is not None and not trainer.parallel_env.is_main:
        return 0  # under torchrun, rank 0 reports for every rank
    t = summary["test"]
    print(
        f"{summary['name']}: test top-1 {t['top1']:.2%} (top-5 {t['top5']:.2%}, NLL {t['nll']:.3f}, "
        f"ECE {t['ece']:.3f}) after {summary['epochs']:g} epochs, {summary['train_seconds'] / 60:.1f} min of "
        f"training, {summary['images_per_s']:.0f} images/s; summary in {summary['run_dir']}/summary.json"
    )
    return 0


def _eval(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from rich.console import Console
    from rich.table import Table

    from visionmoe.train.trainer import evaluate_checkpoint

    try:
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
    out = Path(args.out) if args.out else Path(args.checkpoint).parent / f"eval_{args.split}.json"
    if Path(args.checkpoint).is_dir():
        out = Path(args.out) if args.out else Path(args.checkpoint) / f"eval_{args.split}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {out}")
    return 0


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


def _sweep(args: argparse.Namespace) -> int:
    from visionmoe.studies import STUDIES, Sweep, get_study, parse_seeds, run_sweep
    from visionmoe.studies.lock import SweepBusy
    from visionmoe.studies.presets import extend

    try:
        slurm = dict(_key_values(args.slurm))
        seeds = parse_seeds(args.seeds) if args.seeds else None
        if args.preset in STUDIES:
            sweep = get_study(args.preset).build(tiny=args.tiny, overrides=args.overrides, seeds=seeds)
        elif args.tiny:
            raise ValueError(f"--tiny is for the study presets ({', '.join(STUDIES)}), not {args.preset!r}")
        else:  # a training preset with axes from the overrides
            sweep = extend(
                Sweep(args.preset, args.preset, seeds=seeds or (0,), twins=not args.no_twins), args.overrides
            )
        out = args.out or f"runs/{sweep.name}{'-tiny' if args.tiny else ''}"
        if args.estimate:
            from visionmoe.studies.estimate import estimate_markdown, estimate_sweep

            table = estimate_sweep(sweep, seeds=seeds, jobs=args.jobs, steps=args.estimate_steps, out=out)
            print(estimate_markdown(table, f"sweep {sweep.name}"))
            return 0
        if args.status:
            from visionmoe.studies.status import status_markdown, sweep_status

            print(status_markdown(sweep_status(sweep, out, seeds), f"sweep {sweep.name} in {out}"))
            return 0
        manifest = run_sweep(
            sweep, out, jobs=args.jobs, retries=args.retries, executor=args.executor, slurm=slurm, reuse=args.reuse
        )
    except (ValueError, TypeError, FileNotFoundError, ImportError, SweepBusy) as error:
        raise SystemExit(f"visionmoe sweep: {error}") from None
    return int(manifest["status"].isin(["failed", "invalid"]).any())


def _key_values(items: list[str]):
    import yaml

    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--slurm takes key=value, got {item!r}")
        yield key, yaml.safe_load(value)


def _contrast(text: str) -> tuple[str, str]:
    config, sep, reference = text.partition(":")
    if not (sep and config and reference):
        raise SystemExit(f"visionmoe report: --contrast {text!r}: expected CONFIG:REFERENCE, e.g. k=2:k=1")
    return config, reference


def _report(args: argparse.Namespace) -> int:
    from visionmoe.studies import write_report

    try:
        contrasts = [_contrast(text) for text in args.contrast]
        files = write_report(args.runs, args.out, metric=args.metric, contrasts=contrasts)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"visionmoe report: {error}") from None
    print(
        f"wrote {files['markdown']}, {len(files['csv'])} CSV tables, {files['latex']} and {len(files['plots'])} plots"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="visionmoe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
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
    evaluate.add_argument("--batch-size", type=int, default=None)
    evaluate.add_argument("--tta-flip", action=argparse.BooleanOptionalAction, default=None)
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument("--out", default=None, help="where to write the JSON (default: next to the checkpoint)")
    evaluate.set_defaults(func=_eval)
    analyze = sub.add_parser("analyze", help="routing, Hessian sharpness, loss surface and efficiency of a trained run")
    analyze.add_argument("--checkpoint", required=True, help="checkpoint.pt, or the run directory holding it")
    analyze.add_argument("--what", default="routing,hessian,landscape,efficiency", help="comma-separated sections")
    analyze.add_argument("--samples", type=int, default=1000, help="images in each of the train and test subsets")
    analyze.add_argument(
        "--params", default="all", help="Hessian/landscape parameters: all, router, experts, backbone, head"
    )
    analyze.add_argument("--top-k", type=int, default=3, help="Hessian eigenvalues to compute")
    analyze.add_argument("--trace-probes", type=int, default=50)
    analyze.add_argument("--tol", type=float, default=1e-3, help="Lanczos relative accuracy of the eigenvalues")
    analyze.add_argument("--density-steps", type=int, default=0, help="> 0: SLQ spectral density with that many steps")
    analyze.add_argument(
        "--directions", default="random", help="1D perturbation directions, comma-separated: random, hessian"
    )
    analyze.add_argument("--plane", type=int, default=0, help="> 0: a 2D random plane on a PLANE × PLANE grid")
    analyze.add_argument("--seed", type=int, default=0)
    analyze.add_argument("--data-dir", default=None)
    analyze.add_argument("--out", default=None, help="default: the run directory")
    analyze.set_defaults(func=_analyze)
    demo = sub.add_parser("demo", help="route one batch through every router and print loads and speed")
    defaults = DemoConfig()
    for f in fields(DemoConfig):
        kind = float if f.name == "capacity_factor" else int
        demo.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=getattr(defaults, f.name))
    demo.set_defaults(func=_demo)
    bench = sub.add_parser("bench", help="time the MoE layer against dense, einsum and peer packages")
    bench.add_argument("--quick", action="store_true", help="a tiny shape: checks that everything runs")
    bench.add_argument("--threads", type=int, default=None, help="default: torch's thread count (1 with --quick)")
    bench.add_argument("--repeats", type=int, default=5)
    bench.add_argument("--mode", choices=("fwd", "fwdbwd"), default="fwdbwd")
    bench.set_defaults(func=_bench)
    shards = sub.add_parser(
        "shards", help="write an ImageFolder split as tar shards (WebDataset layout) for data.dataset=shards"
    )
    shards.add_argument("folder", help="an ImageFolder split: <folder>/<class>/<image>")
    shards.add_argument("out", help="the shard folder, e.g. <data_dir>/train for data.train_split=train")
    shards.add_argument("--shard-size", type=int, default=1000, help="images per shard")
    shards.set_defaults(func=_shards)
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
    sweep = sub.add_parser(
        "sweep",
        help="a study preset (or training preset × key=a,b axes) × seeds, each with its dense twin; resumable",
        description="Run a sweep. Overrides are key=value; key=a,b,c makes an axis of the grid. Finished runs are "
        "skipped, killed ones resumed. Study presets: rho, hidden, topk, soft, heads, placement, routers.",
    )
    sweep.add_argument("--preset", required=True, help="a study preset, or a training preset in configs/")
    sweep.add_argument("--seeds", default=None, help="e.g. 0-4 or 0,1,2 (default: the preset's)")
    sweep.add_argument("--jobs", type=int, default=1, help="runs at once; each gets cores // jobs threads")
    sweep.add_argument("--retries", type=int, default=1, help="further attempts of a failed run")
    sweep.add_argument("--tiny", action="store_true", help="the study's tiny form: minutes on 2 CPU cores")
    sweep.add_argument("--out", default=None, help="the sweep directory (default: runs/<preset>[-tiny])")
    sweep.add_argument("--executor", choices=("local", "inline", "slurm"), default="local")
    sweep.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE", help="submitit parameter")
    sweep.add_argument("--no-twins", action="store_true", help="training presets: no dense twins")
    sweep.add_argument(
        "--estimate",
        action="store_true",
        help="train nothing: time a few steps of each configuration and print how long the sweep takes here",
    )
    sweep.add_argument("--estimate-steps", type=int, default=3, help="timed training steps per configuration")
    sweep.add_argument(
        "--status",
        action="store_true",
        help="train nothing: print each run's state, the time left by the finished seeds, and whether a sweep runs",
    )
    sweep.add_argument(
        "--reuse",
        action="append",
        default=[],
        metavar="DIR",
        help="a sweep (or run) directory whose finished runs of the same config are copied in, not retrained",
    )
    sweep.add_argument("overrides", nargs="*", metavar="key=value")
    sweep.set_defaults(func=_sweep)
    report = sub.add_parser("report", help="tables (Markdown, CSV, LaTeX) and plots of sweeps or runs")
    report.add_argument("runs", nargs="+", help="sweep directories or run directories")
    report.add_argument("--out", default="report", help="where the report goes")
    report.add_argument("--metric", default="top1", help="a column of the runs table: top1, top5, nll, ece, ...")
    report.add_argument(
        "--contrast",
        action="append",
        default=[],
        metavar="CONFIG:REFERENCE",
        help="also compare two configurations of a study seed by seed, e.g. k=2:k=1 (repeatable)",
    )
    report.set_defaults(func=_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
