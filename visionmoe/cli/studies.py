"""``visionmoe sweep`` and ``report``: many runs of a study or preset, and the tables and plots of them.

``visionmoe.studies`` loads only when one of them runs: it brings pandas and scipy, which ``--help`` and
the other commands never need (BENCHMARKS.md, "Start-up of the command line").
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

STUDY_NAMES = ("rho", "hidden", "hidden_long", "width", "topk", "soft", "heads", "placement", "routers")
"""The study presets, named here so that ``--help`` need not import :mod:`visionmoe.studies` (a test
keeps this list equal to :data:`visionmoe.studies.presets.STUDIES`)."""


def add_commands(sub: argparse._SubParsersAction) -> None:
    """The parsers of sweep and report."""
    sweep = sub.add_parser(
        "sweep",
        help="a study preset (or training preset × key=a,b axes) × seeds, each with its dense twin; resumable",
        description="Run a sweep. Overrides are key=value; key=a,b,c makes an axis of the grid. Finished runs are "
        f"skipped, killed ones resumed. Study presets: {', '.join(STUDY_NAMES)}.",
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


RUN_OPTIONS = {"--retries": ("retries", 1), "--executor": ("executor", "local"), "--slurm": ("slurm", [])}
"""Options that only change how runs are trained: ``--status`` and ``--estimate`` train nothing."""


def _refuse_run_options(args: argparse.Namespace) -> None:
    """``--status``/``--estimate`` with an option they would ignore: one line naming it (``--jobs`` counts
    for ``--estimate``, whose time left is at that many jobs; ``--reuse`` for neither)."""
    mode = "--estimate" if args.estimate else "--status"
    ignored = [flag for flag, (field, default) in RUN_OPTIONS.items() if getattr(args, field) != default]
    if args.reuse:
        ignored.append("--reuse")
    if args.status and args.jobs != 1:
        ignored.append("--jobs")
    if args.status and args.estimate:
        ignored.append("--status")
    if ignored:
        raise ValueError(f"{mode} trains nothing, so {', '.join(ignored)} would be ignored; drop it or run the sweep")


def _sweep(args: argparse.Namespace) -> int:
    from visionmoe.studies import STUDIES, Sweep, get_study, parse_seeds, run_sweep
    from visionmoe.studies.estimate import estimate_markdown, estimate_sweep
    from visionmoe.studies.lock import SweepBusy
    from visionmoe.studies.presets import extend
    from visionmoe.studies.status import status_markdown, sweep_status
    from visionmoe.studies.sweep import recorded_seeds
    from visionmoe.train.config import find_preset, preset_names

    try:
        slurm = dict(_key_values(args.slurm))
        seeds = parse_seeds(args.seeds) if args.seeds else None
        if args.preset in STUDIES:
            sweep = get_study(args.preset).build(tiny=args.tiny, overrides=args.overrides, seeds=seeds)
        elif args.tiny:
            raise ValueError(f"--tiny is for the study presets ({', '.join(STUDIES)}), not {args.preset!r}")
        else:  # a training preset with axes from the overrides
            try:
                find_preset(args.preset)
            except FileNotFoundError:
                raise ValueError(
                    f"no preset {args.preset!r}: study presets {', '.join(STUDIES)}; "
                    f"training presets {', '.join(preset_names())} (or a YAML file)"
                ) from None
            # a YAML path names the sweep by its file's stem (runs/<stem>, the report's study column)
            name = Path(args.preset).stem if Path(args.preset).suffix in (".yaml", ".yml") else args.preset
            sweep = extend(Sweep(name, args.preset, seeds=seeds or (0,), twins=not args.no_twins), args.overrides)
        out = args.out or f"runs/{sweep.name}{'-tiny' if args.tiny else ''}"
        if args.estimate or args.status:
            _refuse_run_options(args)
        if args.estimate:
            table = estimate_sweep(sweep, seeds=seeds, jobs=args.jobs, steps=args.estimate_steps, out=out)
            print(estimate_markdown(table, f"sweep {sweep.name}"))
            return 0
        if args.status:  # every seed the sweep has run, unless --seeds picks some
            seeds = seeds or recorded_seeds(out) or None
            print(status_markdown(sweep_status(sweep, out, seeds), f"sweep {sweep.name} in {out}"))
            return 0
        manifest = run_sweep(
            sweep, out, jobs=args.jobs, retries=args.retries, executor=args.executor, slurm=slurm, reuse=args.reuse
        )
    except (ValueError, TypeError, FileNotFoundError, ImportError, SweepBusy) as error:
        raise SystemExit(f"visionmoe sweep: {error}") from None
    return int(manifest["status"].isin(["failed", "invalid"]).any())


def _key_values(items: list[str]):
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--slurm takes key=value, got {item!r}")
        try:
            yield key, yaml.safe_load(value)
        except yaml.YAMLError as error:
            problem = getattr(error, "problem", None) or type(error).__name__
            raise ValueError(f"--slurm {item!r}: cannot parse {value!r} as YAML ({problem})") from None


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
