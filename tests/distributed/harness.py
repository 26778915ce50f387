"""Run a function of workers.py on N local processes, as torchrun would, and never hang.

Each worker gets torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and
one thread. The harness polls them: the first worker that exits non-zero has the others killed and its
stderr reported; a run past ``timeout`` has them all killed. Either way no process is left behind.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

WORKERS = Path(__file__).with_name("workers.py")


class WorkerFailed(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(name: str, nprocs: int, *args, timeout: float = 60.0) -> list[subprocess.Popen]:
    """Run ``workers.<name>(*args)`` on ``nprocs`` processes; returns them once all exited 0."""
    port = free_port()
    procs = []
    for rank in range(nprocs):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(nprocs),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
        }
        if nprocs == 1:
            env["WORLD_SIZE"] = "1"
        command = [sys.executable, str(WORKERS), name, json.dumps([str(a) if isinstance(a, Path) else a for a in args])]
        procs.append(
            subprocess.Popen(
                command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
            )
        )
    deadline = time.monotonic() + timeout
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                rank = failed[0]
                tail = "\n".join(procs[rank].stderr.read().strip().splitlines()[-15:])
                raise WorkerFailed(f"worker {rank} of {nprocs} ({name}) exited with {codes[rank]}:\n{tail}")
            if all(c == 0 for c in codes):
                return procs
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} on {nprocs} processes still running after {timeout:.0f} s; killed")
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            p.stdout.close()
            p.stderr.close()
