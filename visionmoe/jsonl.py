"""JSON Lines that a crash cannot tear in the middle: one ``write`` per record, read back leniently at the end.

A record is appended with a single unbuffered ``write`` of the whole line and ``fsync``-ed, so
every earlier line is complete on disk before the next is started. Power loss or a full disk can
still cut the *last* line short; :func:`read_jsonl` drops such a final line with a warning (it is
the record of an epoch whose checkpoint, written after it, does not exist either). A bad line
anywhere else is not something a crash makes, and is an error naming the file and line.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def append_jsonl(path: str | os.PathLike, record: Any) -> None:
    """Append ``record`` as one line, in one write, flushed to disk."""
    data = (json.dumps(record) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(data)
        while view:  # a regular file takes it in one write; loop only in case it does not
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def write_jsonl(path: str | os.PathLike, records: list[Any]) -> None:
    """Replace the file with ``records``, atomically (a temporary file, then a rename)."""
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in records))


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: a reader sees the old file or the new."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_jsonl(path: str | os.PathLike) -> list[Any]:
    """Every record of ``path``; an incomplete final line (a torn write) is dropped with a warning."""
    path = Path(path)
    lines = path.read_text().split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError as error:
            last = number == len(lines) or all(not rest.strip() for rest in lines[number:])
            if not last:
                raise ValueError(f"{path}:{number} is not a JSON record ({error}); the file is damaged") from None
            log.warning("%s: dropping its incomplete last line %d (a write cut short): %.60r", path, number, line)
    return records
