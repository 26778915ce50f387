"""What the command groups share: argument types that refuse a bad number at parsing, and the wrapper
that turns a user's mistake found later into one line (``visionmoe <command>: <message>``), not a
traceback."""

from __future__ import annotations

import argparse
import functools
import math
from collections.abc import Callable

USER_ERRORS = (ValueError, TypeError, FileNotFoundError, RuntimeError)
"""What a command's body raises for bad input: a value it refuses, a file that is not there, and torch's
RuntimeError for shapes it cannot make (a batch of -1, an image smaller than the kernel)."""


def positive_int(text: str) -> int:
    """An argparse type: an int >= 1 (a size or a count); argparse names the option in its error."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}; expected an int >= 1") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is out of range; expected an int >= 1")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a finite float > 0 (a tolerance, a factor)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}; expected a number > 0") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{value} is out of range; expected a finite number > 0")
    return value


def one_line(error: BaseException) -> str:
    """``error``'s message in one line: its first (and, where that ends in ':', its second) non-empty line,
    as torch's messages run on over many; its type's name where it has none."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    return " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]


Command = Callable[[argparse.Namespace], int]


def user_errors(command: str, *also: type[Exception]) -> Callable[[Command], Command]:
    """Decorate a command's function: :data:`USER_ERRORS` (and ``also``) become one line,
    ``SystemExit("visionmoe <command>: ...")``."""
    caught = (*USER_ERRORS, *also)

    def decorate(func: Command) -> Command:
        @functools.wraps(func)
        def run(args: argparse.Namespace) -> int:
            try:
                return func(args)
            except caught as error:
                raise SystemExit(f"visionmoe {command}: {one_line(error)}") from None

        return run

    return decorate
