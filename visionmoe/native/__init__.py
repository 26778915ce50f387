"""Native CPU kernels: the noisy top-k router in one pass forward and one backward.

On CNN feature maps a token is 8-64 channels wide, so the router's (tokens, E) tensors are as large as
the feature map itself, and the V-MoE router (noise, softmax, top-k, capacity positions, importance and
load losses) runs some thirty ATen passes over them, forward and backward: more time than the dense
FFN it stands beside (BENCHMARKS.md, issue 22). ``router.c`` does that work in one pass forward and one
backward. It is plain C, compiled on first use with the system's C compiler (``$CC``, else ``cc``;
about a second) into a per-user cache (``$VISIONMOE_CACHE``, else ``$XDG_CACHE_HOME/visionmoe``, else
``~/.cache/visionmoe``), keyed by the source, the compiler and this CPU (``-march=native``), and called
through ctypes. :class:`visionmoe.layers.TopKRouter` takes it where it applies (see
:meth:`~visionmoe.layers.TopKRouter.fused`); the layer's dispatch and experts are unchanged.

Everything here is optional: without a C compiler, with ``VISIONMOE_NATIVE=0`` in the environment, or
inside :func:`disabled`, :func:`available` is False and the router runs its ATen path. The two agree to
float rounding, not bit for bit (the kernel's exp and erfc are its own polynomials; the noisy logits
and the plan's integer parts are the same). The kernel takes float32 CPU tensors; other dtypes and
devices, ``torch.compile`` and ``torch.export`` take the ATen path. Gradients of gradients (the Hessian
analysis) are those of the ATen formula, recomputed in the backward pass when it builds a graph.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("router.c")
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fPIC", "-shared", "-pthread")
"""``-ffp-contract=off``: no fused multiply-adds, so products and sums round as ATen's do."""
ABI_VERSION = 1
MAX_K = 64
LANES = 8
"""The kernel holds 8 experts of a token in one vector: E must be a multiple of it."""

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_enabled = True
_error: str | None = None


def cache_dir() -> Path:
    """Where the compiled library is kept."""
    if root := os.environ.get("VISIONMOE_CACHE"):
        return Path(root).expanduser() / "native"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "visionmoe" / "native"


def _cpu_signature() -> str:
    """What -march=native compiles for: the CPU's model and feature flags (Linux), else the platform."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() + platform.machine()
    lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags", "Features"))]
    return "\n".join(dict.fromkeys(lines))  # each distinct line once (every core repeats them)


def _compiler() -> str | None:
    cc = os.environ.get("CC", "cc")
    return shutil.which(cc)


def _build() -> ctypes.CDLL:
    cc = _compiler()
    if cc is None:
        raise RuntimeError(f"no C compiler found (CC={os.environ.get('CC', 'cc')!r})")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=False).stdout
    key = hashlib.sha256(
        "\0".join([SOURCE.read_text(), cc, version, " ".join(FLAGS), _cpu_signature()]).encode()
    ).hexdigest()[:16]
    target = cache_dir() / f"vmoe-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            done = subprocess.run(
                [cc, *FLAGS, str(SOURCE), "-o", str(built)], capture_output=True, text=True, check=False
            )
            if done.returncode != 0:
                raise RuntimeError(f"{cc} failed: {done.stderr.strip().splitlines()[-1:] or done.returncode}")
            os.replace(built, target)  # atomic: a concurrent build's rename is as good as ours
    lib = ctypes.CDLL(str(target))
    if lib.vmoe_abi_version() != ABI_VERSION:
        raise RuntimeError(f"{target} has ABI {lib.vmoe_abi_version()}, expected {ABI_VERSION}")
    i64, ptr, cint = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    f32 = ctypes.c_float
    signatures = {
        "vmoe_router_forward": [ptr, ptr, f32, f32, i64, i64, i64, i64, i64, *[ptr] * 9, cint],
        "vmoe_router_backward": [ptr, ptr, ptr, f32, ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, ptr, cint],
    }
    for name, args in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, None
    return lib


def _library() -> ctypes.CDLL | None:
    global _lib, _tried, _error
    if _tried:
        return _lib
    with _lock:
        if not _tried:
            if os.environ.get("VISIONMOE_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
                _error = "disabled by VISIONMOE_NATIVE"
            else:
                try:
                    _lib = _build()
                except (OSError, RuntimeError, subprocess.SubprocessError) as err:
                    _error = str(err)
                    log.warning("visionmoe native kernels unavailable, using the ATen path: %s", err)
            _tried = True
    return _lib


def available() -> bool:
    """Whether the native kernels can run (built, and not switched off)."""
    return _enabled and _library() is not None


def unavailable_reason() -> str | None:
    """Why :func:`available` is False (None when it is True)."""
    if not _enabled:
        return "switched off by visionmoe.native.disabled()"
    return None if _library() is not None else _error


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Run the ATen path inside this block (to compare, or to rule the kernels out)."""
    global _enabled
    before, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = before


def usable(*tensors: Tensor) -> bool:
    """Whether these tensors can take the native path: float32 on the CPU, outside compile and export."""
    if not _enabled or torch.compiler.is_compiling():
        return False
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    if is_exporting is not None and is_exporting():
        return False
    if not all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors):
        return False
    return available()


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class _TopKRouter(torch.autograd.Function):
    """(logits, noise) -> gates, kept gate weights, importance and load sums; and the plan's integers."""

    @staticmethod
    def forward(ctx, logits, noise, sigma, k, capacity, load):
        G, S, E = logits.shape
        lib = _library()
        logits_c = logits.detach().contiguous()
        noise_c = None if noise is None else noise.contiguous()
        gates = torch.empty(G, S, E)
        threshold = torch.empty(G * S) if load else None
        expert, position = torch.empty(G, k * S, dtype=torch.int64), torch.empty(G, k * S, dtype=torch.int64)
        kept, weight = torch.empty(G, k * S, dtype=torch.bool), torch.empty(G, k * S)
        offered = torch.empty(G, E, dtype=torch.int64)
        importance = torch.empty(G, E, dtype=torch.float64)
        load_sums = torch.empty(G, E, dtype=torch.float64) if load else None
        lib.vmoe_router_forward(
            *(_ptr(t) for t in (logits_c, noise_c)),
            sigma,
            sigma if load else 0.0,
            G,
            S,
            E,
            k,
            -1 if capacity is None else capacity,
            *(_ptr(t) for t in (gates, threshold, expert, position, kept, weight, offered, importance, load_sums)),
            torch.get_num_threads(),
        )
        importance = importance.sum(0, keepdim=True).float()  # (1, E): over every token of the batch
        load_sums = load_sums.sum(0, keepdim=True).float() if load else torch.zeros(1, E)
        ctx.save_for_backward(logits, noise, gates, threshold, expert, kept)
        ctx.sigma, ctx.load, ctx.k = sigma, load, k
        ctx.mark_non_differentiable(expert, position, kept)
        ctx.set_materialize_grads(False)
        return gates, weight, importance, load_sums, expert, position, kept

    @staticmethod
    def backward(ctx, d_gates, d_weight, d_importance, d_load, *_):
        logits, noise, gates, threshold, expert, kept = ctx.saved_tensors
        if not ctx.load:
            d_load = None
        if torch.is_grad_enabled():  # a graph of the gradient is wanted (double backward): the ATen formula's
            return _aten_backward(ctx, logits, noise, threshold, expert, kept, d_gates, d_weight, d_importance, d_load)
        G, S, E = gates.shape
        grads = [None if g is None else g.contiguous() for g in (d_gates, d_weight, d_importance, d_load)]
        d_logits = torch.empty(G, S, E)
        _library().vmoe_router_backward(
            *(_ptr(t) for t in (gates, logits.detach().contiguous(), threshold)),
            ctx.sigma,
            *(_ptr(t) for t in (expert, kept, *grads)),
            G,
            S,
            E,
            ctx.k,
            _ptr(d_logits),
            torch.get_num_threads(),
        )
        return d_logits, None, None, None, None, None


def _aten_backward(ctx, logits, noise, threshold, expert, kept, d_gates, d_weight, d_importance, d_load):
    """The logits' gradient as a differentiable function: the forward's maths in ATen operators."""
    from visionmoe.routing.plan import softmax_experts

    G, S, E = logits.shape
    noisy = logits if noise is None else logits + ctx.sigma * noise
    gates = softmax_experts(noisy)
    outputs, grads = [], []
    if d_gates is not None:
        outputs.append(gates)
        grads.append(d_gates)
    if d_weight is not None:
        token = torch.arange(S).repeat(G, ctx.k)
        outputs.append(gates.reshape(G, S * E).gather(1, token * E + expert) * kept)
        grads.append(d_weight)
    if d_importance is not None:
        outputs.append(gates.reshape(1, G * S, E).sum(1))
        grads.append(d_importance)
    if d_load is not None:
        q = (threshold.reshape(G, S, 1) - logits) / ctx.sigma
        outputs.append((0.5 * torch.erfc(q / math.sqrt(2.0))).reshape(1, G * S, E).sum(1))
        grads.append(d_load)
    if not outputs:
        return None, None, None, None, None, None
    (d_logits,) = torch.autograd.grad(outputs, logits, grads, create_graph=True)
    return d_logits, None, None, None, None, None


def topk_router(
    logits: Tensor, noise: Tensor | None, sigma: float, k: int, capacity: int | None, load: bool
) -> tuple[Tensor, ...]:
    """V-MoE's noisy top-``k`` token choice on (G, S, E) float32 ``logits``, fused.

    ``noise``: standard normal (G, S, E) draws (None: none), added as ``logits + sigma * noise``.
    ``capacity``: slots per expert and group (None: every assignment kept). ``load``: compute the load
    loss's per-expert sums (needs ``sigma`` > 0). Returns ``gates`` (G, S, E), ``weight`` (G, K·S) the kept
    gate values in the plan's choice-major layout, ``importance`` and ``load`` (1, E) per-expert sums over
    every token (zeros unless ``load``), all differentiable in ``logits``; and ``expert``, ``position``,
    ``kept`` (G, K·S), as :func:`visionmoe.routing.token_choice` gives them.
    """
    if not 1 <= k <= min(logits.shape[-1], MAX_K) or logits.shape[-1] % LANES:
        raise ValueError(
            f"the fused router needs E a multiple of {LANES} and 1 <= k <= min(E, {MAX_K}), "
            f"got k={k}, E={logits.shape[-1]}"
        )
    if load and not sigma > 0:
        raise ValueError(f"the load loss needs router noise, got sigma={sigma}")
    return _TopKRouter.apply(logits, noise, float(sigma), k, capacity, load)
