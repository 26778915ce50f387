"""Tell the C allocator to keep freed memory for reuse: the page-fault tax of CPU training (issue 22).

glibc's ``malloc`` serves every block above its mmap threshold (128 KiB, rising to at most 32 MiB) with its
own ``mmap`` and unmaps it when it is freed. A training step allocates and frees the same large activation
buffers every step, so with those defaults each step faults every page of them in again, and the kernel
zeroes each page: at batch 512 a dense CIFAR CNN spends 41% of its step there (BENCHMARKS.md, "Second
pass"). :func:`keep_freed_memory` asks glibc, through ``mallopt``, to serve every block from its heap and
never give the heap's top back, so the next step reuses the pages already mapped. The process then stays
at its peak resident memory, which a training process reaches every step anyway.

This is what ``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=...:glibc.malloc.trim_threshold=...`` does, set
from inside the process (the tunables are read only at its start), and what preloading jemalloc or
tcmalloc buys CPU PyTorch. It changes no result, only time and memory. The trainer applies it unless
``train.keep_freed_memory=false``. Outside glibc (macOS, musl, Windows) it does nothing and says so.

    >>> keep_freed_memory()  # doctest: +SKIP
    'keep freed'
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import platform

__all__ = ["KEPT", "keep_freed_memory", "kept", "mapped_bytes"]

# mallopt parameters (glibc's <malloc.h>)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1  # mallopt's value is a C int: the heap's top is trimmed only above 2 GiB free

KEPT = "keep freed"  # what keep_freed_memory returns when glibc keeps freed memory from then on
_kept = False  # whether keep_freed_memory took effect in this process


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The process's C library if it is glibc, else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") else None


def keep_freed_memory() -> str:
    """Make glibc serve every block from its heap (no per-block ``mmap``) and not trim the heap below 2 GiB
    of free top; returns :data:`KEPT`, or why nothing changed ("not glibc", "mallopt refused").

    Process-wide and not undone: it applies to every later allocation of every thread. Idempotent.
    """
    libc = _glibc()
    if libc is None:
        return "not glibc"
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    # Either setting also stops glibc from moving its thresholds dynamically.
    ok = libc.mallopt(_M_TRIM_THRESHOLD, _INT_MAX) == 1 and libc.mallopt(_M_MMAP_MAX, 0) == 1
    global _kept
    _kept = _kept or ok
    return KEPT if ok else "mallopt refused"


def kept() -> bool:
    """Whether :func:`keep_freed_memory` has taken effect in this process (it cannot be undone)."""
    return _kept


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")
    ] + [("keepcost", ctypes.c_size_t)]


def mapped_bytes() -> int | None:
    """Bytes glibc holds in blocks it mapped one by one (``mallinfo2().hblkhd``): what it unmaps again when
    they are freed; None outside glibc or before glibc 2.33 (no ``mallinfo2``)."""
    libc = _glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return None
    libc.mallinfo2.restype = _Mallinfo2
    return int(libc.mallinfo2().hblkhd)
