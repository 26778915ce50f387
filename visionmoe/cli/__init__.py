"""``visionmoe`` command line: train, eval, analyze, sweep, report, demo, bench, profile, export."""

from __future__ import annotations

import argparse

from visionmoe.cli import models, runs, studies, tools

# One module per group of commands, each holding its parsers beside the code they call:
#   runs     train, eval, analyze   one run made or read back
#   tools    demo, bench, shards    the router demo, the layer benchmark, tar shards of an image folder
#   models   profile, export        a model built by name, counted or exported
#   studies  sweep, report          many runs, and their tables and plots
GROUPS = (runs, tools, models, studies)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="visionmoe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
