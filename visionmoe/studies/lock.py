"""One sweep at a time per directory: ``<out>/.sweep.lock``, an advisory ``flock`` held while it runs.

Two ``visionmoe sweep`` processes on one directory would train the same pending runs into the same
run directories and overwrite each other's checkpoints. :func:`sweep_lock` makes the second one stop
at once with a line naming the first (pid, host, start time). The kernel drops the lock when its
holder exits, however it exits (``kill -9`` too), so a stale lock never blocks a restart; the file
itself stays. ``flock`` is local to a machine: on a network file system shared by several hosts it
may not exclude them (NFS without lock support), so start one sweep per directory there by hand.
Where ``fcntl`` does not exist (Windows) there is no lock.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

LOCK_FILE = ".sweep.lock"


class SweepBusy(RuntimeError):
    """Another sweep holds the directory's lock."""


@contextmanager
def sweep_lock(out: str | Path) -> Iterator[None]:
    """Hold ``<out>/.sweep.lock`` for the ``with`` block; :class:`SweepBusy` if another process holds it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield
        return
    handle = (out / LOCK_FILE).open("a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "holder unknown"
            raise SweepBusy(
                f"{out} is in use by another visionmoe sweep ({holder}); let it finish or stop it"
            ) from None
        handle.seek(0)
        handle.truncate()
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {started}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
    finally:
        handle.close()


def lock_holder(out: str | Path) -> str | None:
    """Who holds ``out``'s sweep lock now ("pid … on … since …"), or None when no sweep runs there."""
    path = Path(out) / LOCK_FILE
    if fcntl is None or not path.is_file():
        return None
    with path.open("r") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return handle.read().strip() or "holder unknown"
        fcntl.flock(handle, fcntl.LOCK_UN)
    return None
