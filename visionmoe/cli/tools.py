"""``visionmoe demo``, ``bench`` and ``shards``: the router demo, the MoE layer benchmark, and tar shards
written from an image folder."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields

import torch
from rich.console import Console
from rich.table import Table

from visionmoe.analysis.speed import QUICK_SHAPE, TARGET_SHAPE, fmt, layer_benchmark, machine_info
from visionmoe.cli.args import positive_float, positive_int, user_errors
from visionmoe.data.datasets import list_image_folder
from visionmoe.data.stream import ImageFiles, check_shard_target, write_shards
from visionmoe.demo import DemoConfig, run


def add_commands(sub: argparse._SubParsersAction) -> None:
    """The parsers of demo, bench and shards."""
    demo = sub.add_parser("demo", help="route one batch through every router and print loads and speed")
    defaults = DemoConfig()
    for f in fields(DemoConfig):  # sizes and counts >= 1; the seed any int
        kind = positive_float if f.name == "capacity_factor" else int if f.name == "seed" else positive_int
        demo.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=getattr(defaults, f.name))
    demo.set_defaults(func=_demo)
    bench = sub.add_parser("bench", help="time the MoE layer against dense, einsum and peer packages")
    bench.add_argument("--quick", action="store_true", help="a tiny shape: checks that everything runs")
    bench.add_argument(
        "--threads", type=positive_int, default=None, help="default: torch's thread count (1 with --quick)"
    )
    bench.add_argument("--repeats", type=positive_int, default=5)
    bench.add_argument("--mode", choices=("fwd", "fwdbwd"), default="fwdbwd")
    bench.set_defaults(func=_bench)
    shards = sub.add_parser(
        "shards", help="write an ImageFolder split as tar shards (WebDataset layout) for data.dataset=shards"
    )
    shards.add_argument("folder", help="an ImageFolder split: <folder>/<class>/<image>")
    shards.add_argument("out", help="the shard folder, e.g. <data_dir>/train for data.train_split=train")
    shards.add_argument("--shard-size", type=int, default=1000, help="images per shard")
    shards.set_defaults(func=_shards)


@user_errors("demo")
def _demo(args: argparse.Namespace) -> int:
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


@user_errors("bench")
def _bench(args: argparse.Namespace) -> int:
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
    try:
        check_shard_target(args.out, args.shard_size)  # before listing a folder of a million images
        files = ImageFiles.from_files(*list_image_folder(args.folder))
        shards = write_shards(files, args.out, args.shard_size)
    except (ValueError, FileNotFoundError, ImportError) as error:
        raise SystemExit(f"visionmoe shards: {error}") from None
    print(f"{len(files)} images of {len(files.classes)} classes -> {len(shards)} shards in {args.out}")
    return 0
