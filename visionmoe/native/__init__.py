"""Native CPU kernels for the token-choice MoE layer: the noisy top-k router and the row moves.

On CNN feature maps a token is 8-64 channels wide, so the router's (tokens, E) tensors are as large as
the feature map itself, and the V-MoE router (noise, softmax, top-k, capacity positions, importance and
load losses) runs some thirty ATen passes over them, forward and backward, and the dispatch and combine
a dozen more over the tokens: more time than the dense FFN they stand beside (BENCHMARKS.md, issue 22).
``moe.c`` does the router in one pass forward and one backward (:func:`topk_router`, taken by
:class:`visionmoe.layers.TopKRouter` where :meth:`~visionmoe.layers.TopKRouter.fused` says), and the
dispatch and combine of a token-choice plan as one scatter and one gated gather over a (tokens, K) slot
map, backward the same moves again (:func:`scatter_rows`, :func:`gather_rows`, :func:`rowdot`, taken by
:func:`visionmoe.layers.dispatch.native_token_choice_moe`), and the routers' logits ``x Wᵀ`` one token at
a time (:func:`router_logits`, taken by :meth:`visionmoe.layers.router_base.LinearRouter.logits`), and
the routers' noise (:func:`standard_normal`, the counter-based stream of :mod:`visionmoe.routing.noise`,
taken by :func:`visionmoe.layers.router_base.router_noise`), and a plan's counts for the routing
statistics and its token-major expert ids for the ``fused`` backend (:func:`plan_counts`,
:func:`token_major_experts`). The expert GEMMs stay in the BLAS, except
for the ``fused`` backend (:func:`expert_ffn`): small experts computed in C, dispatch and combine
included, for the narrow feature maps where the BLAS's GEMMs on 8-64-wide rows are slow: the smallest
tiled per block of tokens, larger ones tiled by expert (the kept assignments sorted by expert, a few rows
at a time through register-tiled products; no capacity padding). Where a layer takes all three (the logits,
the fused router and the fused experts), :func:`topk_moe` runs them as one autograd node, their backward
passes back to back (taken by :meth:`visionmoe.layers.TopKRouter.fused_layer`).

It is plain C, compiled on first use with the system's C compiler (``$CC``, else ``cc``; some seconds: 12 s
with gcc -O3 on 2 cores) into a per-user cache (``$VISIONMOE_CACHE``, else ``$XDG_CACHE_HOME/visionmoe``, else
``~/.cache/visionmoe``), keyed by the source, the compiler, its flags and this CPU (``-march=native``), and
called through ctypes; with ``-fopenmp`` where PyTorch runs on OpenMP, so that its threads are PyTorch's own
workers (POSIX threads raced them for the cores and lost the gain).

Everything here is optional: without a C compiler, with ``VISIONMOE_NATIVE=0`` in the environment, or
inside :func:`disabled`, :func:`available` is False and the layer runs its ATen path. The row moves give
the ATen path's output bit for bit; the router agrees with it to float rounding (its exp and erfc are
its own polynomials; given the same noise, the noisy logits and the plan's integers are the same), and so
does the noise (the same 32-bit words; log, sin and cos rounded by other polynomials). The kernels take float32
CPU tensors; other dtypes and devices, ``torch.compile`` and ``torch.export`` take the ATen path.
Gradients of gradients (the Hessian analysis) flow: the moves' backward passes are moves, and the
router's backward recomputes the ATen formula when it must build a graph.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from visionmoe.checks import check_finite
from visionmoe.routing.losses import cv_squared_of_floats
from visionmoe.routing.noise import check_stream_length

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("moe.c")
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fPIC", "-shared", "-pthread")
"""``-ffp-contract=off``: no fused multiply-adds, so products and sums round as ATen's do."""
OPENMP = "-fopenmp"
"""Added where PyTorch runs on OpenMP: the kernel's threads are then PyTorch's own (the process has one
libgomp), not POSIX threads racing PyTorch's spinning OpenMP workers for the same cores."""
ABI_VERSION = 5
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


def _flags() -> tuple[str, ...]:
    openmp = "parallel backend: OpenMP" in torch.__config__.parallel_info()
    return (*FLAGS, OPENMP) if openmp else FLAGS


_i64, _ptr_t, _int, _f32, _u32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_float, ctypes.c_uint32
SIGNATURES = {
    "vmoe_router_forward": [_ptr_t, _ptr_t, _f32, _f32, *[_i64] * 5, *[_ptr_t] * 14, _int],
    "vmoe_router_backward": [*[_ptr_t] * 3, _f32, *[_ptr_t] * 6, *[_i64] * 4, _ptr_t, _int],
    "vmoe_slots": [*[_ptr_t] * 4, *[_i64] * 4, _ptr_t, _ptr_t, _i64, _int],
    "vmoe_gather": [_ptr_t, _i64, _ptr_t, _ptr_t, _i64, _i64, _i64, _ptr_t, _int],
    "vmoe_scatter": [_ptr_t, _i64, _ptr_t, _ptr_t, _i64, _i64, _ptr_t, _i64, _int],
    "vmoe_rowdot": [_ptr_t, _i64, _ptr_t, _i64, _ptr_t, _i64, _i64, _i64, _ptr_t, _int],
    "vmoe_linear_forward": [_ptr_t, _i64, _ptr_t, *[_i64] * 3, _ptr_t, _int],
    "vmoe_linear_backward": [_ptr_t, _i64, _ptr_t, _ptr_t, *[_i64] * 4, *[_ptr_t] * 3, _int],
    "vmoe_tiled_forward": [_ptr_t, _i64, *[_ptr_t] * 6, *[_i64] * 5, _int, *[_ptr_t] * 5, _int],
    "vmoe_tiled_backward": [_ptr_t, _i64, *[_ptr_t] * 5, *[_i64] * 6, _int, _int, _int, *[_ptr_t] * 8, _int],
    "vmoe_blocked_forward": [_ptr_t, _i64, *[_ptr_t] * 6, *[_i64] * 5, _int, _i64, *[_ptr_t] * 4, _int],
    "vmoe_blocked_backward": [_ptr_t, _i64, *[_ptr_t] * 7, *[_i64] * 6, _int, _int, _i64, _i64, *[_ptr_t] * 7, _int],
    "vmoe_normal": [_u32, _u32, _i64, _ptr_t, _int],
    "vmoe_plan_counts": [_ptr_t, _ptr_t, *[_i64] * 4, *[_ptr_t] * 3, _int],
    "vmoe_token_major": [_ptr_t, _ptr_t, *[_i64] * 3, _ptr_t, _int],
}
"""moe.c's functions and their argument types (every one returns nothing)."""


def typed(lib: ctypes.CDLL) -> ctypes.CDLL:
    """``lib`` with the argument types of each of :data:`SIGNATURES`' functions it has."""
    for name, args in SIGNATURES.items():
        if hasattr(lib, name):
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, None
    return lib


def _build() -> ctypes.CDLL:
    cc = _compiler()
    if cc is None:
        raise RuntimeError(f"no C compiler found (CC={os.environ.get('CC', 'cc')!r})")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=False).stdout
    flags = _flags()
    key = hashlib.sha256(
        "\0".join([SOURCE.read_text(), cc, version, " ".join(flags), _cpu_signature()]).encode()
    ).hexdigest()[:16]
    target = cache_dir() / f"vmoe-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            done = subprocess.run([cc, *flags, str(SOURCE), "-o", str(built)], capture_output=True, text=True)
            if done.returncode != 0 and OPENMP in flags:  # no OpenMP in this compiler: POSIX threads
                done = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", str(built)], capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"{cc} failed: {done.stderr.strip().splitlines()[-1:] or done.returncode}")
            os.replace(built, target)  # atomic: a concurrent build's rename is as good as ours
    lib = ctypes.CDLL(str(target))
    if lib.vmoe_abi_version() != ABI_VERSION:
        raise RuntimeError(f"{target} has ABI {lib.vmoe_abi_version()}, expected {ABI_VERSION}")
    return typed(lib)


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


_IS_EXPORTING = getattr(torch.compiler, "is_exporting", None)  # torch < 2.5 has none: never exporting


def usable(*tensors: Tensor) -> bool:
    """Whether these tensors can take the native path: float32 on the CPU, outside compile and export.
    (Asked several times per MoE layer and step: the cheapest questions first.)"""
    if not _enabled:
        return False
    for t in tensors:
        if t.dtype is not torch.float32 or not t.is_cpu:
            return False
    if torch.compiler.is_compiling() or (_IS_EXPORTING is not None and _IS_EXPORTING()):
        return False
    return available()


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _router_forward(
    logits: Tensor, noise: Tensor | None, sigma: float, k: int, capacity: int | None, load: bool, tokens: bool = False
):
    """The router kernel's forward on (G, S, E) logits: gates, threshold, expert, position, kept, weight, the
    batch's importance and load sums (1, E) float32 (zeros without ``load``), the entropy sum and the groups'
    non-finite flags; with ``tokens`` also each token's choices for the fused experts, (G·S, K) expert ids
    (-1 where dropped) and weights, written as the kernel places them, and the routing statistics' counts
    (:func:`plan_counts`' two tensors), counted as it goes."""
    G, S, E = logits.shape
    logits_c = logits.detach().contiguous()
    noise_c = None if noise is None else noise.contiguous()
    gates = torch.empty(G, S, E)
    threshold = torch.empty(G * S) if load else None
    expert, position = torch.empty(G, k * S, dtype=torch.int64), torch.empty(G, k * S, dtype=torch.int64)
    kept, weight = torch.empty(G, k * S, dtype=torch.bool), torch.empty(G, k * S)
    importance = torch.empty(G, E, dtype=torch.float64)
    load_sums = torch.empty(G, E, dtype=torch.float64) if load else None
    entropy = torch.empty(G, dtype=torch.float64)
    nonfinite = torch.empty(G, dtype=torch.bool)
    by_token = [None] * 4  # expert_t, weight_t, counts, unrouted
    if tokens:
        by_token = [torch.empty(G * S, k, dtype=torch.int64), torch.empty(G * S, k)]
        by_token += [torch.empty(G, E, dtype=torch.int64), torch.empty(G, dtype=torch.int64)]
    _library().vmoe_router_forward(
        *(_ptr(t) for t in (logits_c, noise_c)),
        sigma,
        sigma if load else 0.0,
        G,
        S,
        E,
        k,
        -1 if capacity is None else capacity,
        *(_ptr(t) for t in (gates, threshold, expert, position, kept, weight, *by_token)),
        *(_ptr(t) for t in (importance, load_sums, entropy, nonfinite)),
        _threads(),
    )
    importance = importance.sum(0, keepdim=True).float()  # (1, E): over every token of the batch
    load_sums = load_sums.sum(0, keepdim=True).float() if load else torch.zeros(1, E)
    entropy = entropy.sum()  # Σ over every token of its gates' entropy (nats)
    outputs = gates, threshold, expert, position, kept, weight, importance, load_sums, entropy, nonfinite
    return (*outputs, *by_token) if tokens else outputs


def _weighted_cv_squared(importance: Tensor, load_sums: Tensor, aux_weights: tuple[tuple[str, float], ...]):
    """Σ w · CV²(sums) over ``aux_weights`` in Python floats: the loss (float32 scalar), the unweighted values
    (float32) and each sum's gradient of the loss by name ((1, E) rows)."""
    sums, total, values, grads = {"importance": importance, "load": load_sums}, 0.0, [], []
    for name, w in aux_weights:
        value, grad = cv_squared_of_floats(sums[name][0].tolist())
        total += w * value
        values.append(value)
        grads.append([w * g for g in grad])
    rows = torch.tensor(grads).split(1) if grads else ()  # one tensor: each row a (1, E) view
    aux_grads = dict(zip((name for name, _ in aux_weights), rows, strict=True))
    return torch.tensor(total, dtype=torch.float32), torch.tensor(values, dtype=torch.float32), aux_grads


def _router_backward(saved, sigma, k, load, d_gates, d_weight, d_importance, d_load, d_aux, aux_grads):
    """d_logits (G, S, E) from the gradients of the router's outputs; ``saved`` = (gates, logits, threshold,
    expert, kept) of the forward; ``d_aux`` the aux loss's gradient (None: none), shared out by ``aux_grads``."""
    gates, logits, threshold, expert, kept = saved
    if not load:
        d_load = None
    d_sums = {"importance": d_importance, "load": d_load}
    if d_aux is not None:  # the aux loss's share of the sums' gradients
        for name, grad in aux_grads.items():
            d_sums[name] = d_aux * grad if d_sums[name] is None else d_sums[name] + d_aux * grad
    G, S, E = gates.shape
    grads = [None if g is None else g.contiguous() for g in (d_gates, d_weight, d_sums["importance"], d_sums["load"])]
    logits = logits.detach().contiguous()  # a name: a temporary would be freed before the call
    d_logits = torch.empty(G, S, E)
    _library().vmoe_router_backward(
        *(_ptr(t) for t in (gates, logits, threshold)),
        sigma,
        *(_ptr(t) for t in (expert, kept, *grads)),
        G,
        S,
        E,
        k,
        _ptr(d_logits),
        _threads(),
    )
    return d_logits


class _TopKRouter(torch.autograd.Function):
    """(logits, noise) -> gates, kept gate weights, importance and load sums; and the plan's integers."""

    @staticmethod
    def forward(ctx, logits, noise, sigma, k, capacity, load, aux_weights):
        gates, threshold, expert, position, kept, weight, importance, load_sums, entropy, nonfinite = _router_forward(
            logits, noise, sigma, k, capacity, load
        )
        ctx.save_for_backward(logits, noise, gates, threshold, expert, kept)
        ctx.sigma, ctx.load, ctx.k, ctx.aux_weights = sigma, load, k, aux_weights
        aux = values = None
        if aux_weights is not None:  # Σ w · CV²(sums) in Python floats, and its gradient in the sums
            aux, values, ctx.aux_grads = _weighted_cv_squared(importance, load_sums, aux_weights)
        ctx.mark_non_differentiable(expert, position, kept, entropy, nonfinite, *([] if values is None else [values]))
        ctx.set_materialize_grads(False)
        return gates, weight, importance, load_sums, expert, position, kept, entropy, nonfinite, aux, values

    @staticmethod
    def backward(ctx, d_gates, d_weight, d_importance, d_load, _expert, _position, _kept, _entropy, _bad, d_aux, _):
        logits, noise, gates, threshold, expert, kept = ctx.saved_tensors
        if not ctx.load:
            d_load = None
        if ctx.aux_weights is None:
            d_aux = None
        if torch.is_grad_enabled():  # a graph of the gradient is wanted (double backward): the ATen formula's
            d_sums = (d_gates, d_weight, d_importance, d_load, d_aux)
            return _aten_backward(ctx, logits, noise, threshold, expert, kept, *d_sums)
        saved = (gates, logits, threshold, expert, kept)
        aux_grads = getattr(ctx, "aux_grads", {})
        d_sums = (d_gates, d_weight, d_importance, d_load, d_aux)
        d_logits = _router_backward(saved, ctx.sigma, ctx.k, ctx.load, *d_sums, aux_grads)
        return d_logits, None, None, None, None, None, None


def _aten_backward(ctx, logits, noise, threshold, expert, kept, d_gates, d_weight, d_importance, d_load, d_aux):
    """The logits' gradient as a differentiable function: the forward's maths in ATen operators."""
    from visionmoe.routing.losses import _cv_squared_aten, stay_probability
    from visionmoe.routing.plan import softmax_experts
    from visionmoe.routing.token_choice import gate_weights

    G, S, E = logits.shape
    noisy = logits if noise is None else logits + ctx.sigma * noise
    gates = softmax_experts(noisy)
    outputs, grads = [], []
    if d_gates is not None:
        outputs.append(gates)
        grads.append(d_gates)
    if d_weight is not None:
        outputs.append(gate_weights(gates, torch.arange(S).repeat(G, ctx.k), expert, kept))
        grads.append(d_weight)
    sums = {}
    if d_importance is not None or d_aux is not None:
        sums["importance"] = gates.reshape(1, G * S, E).sum(1)
    if ctx.load and (d_load is not None or d_aux is not None):
        sums["load"] = stay_probability(logits, threshold.reshape(G, S, 1), ctx.sigma).reshape(1, G * S, E).sum(1)
    for name, grad in (("importance", d_importance), ("load", d_load)):
        if grad is not None:
            outputs.append(sums[name])
            grads.append(grad)
    if d_aux is not None:
        outputs.append(sum(w * _cv_squared_aten(sums[name]) for name, w in ctx.aux_weights))
        grads.append(d_aux)
    if not outputs:
        return None, None, None, None, None, None, None
    (d_logits,) = torch.autograd.grad(outputs, logits, grads, create_graph=True)
    return d_logits, None, None, None, None, None, None


def topk_router(
    logits: Tensor,
    noise: Tensor | None,
    sigma: float,
    k: int,
    capacity: int | None,
    load: bool,
    what: str = "the router's logit tensor",
    aux_weights: tuple[tuple[str, float], ...] | None = None,
) -> tuple[Tensor, ...]:
    """V-MoE's noisy top-``k`` token choice on (G, S, E) float32 ``logits``, fused.

    ``noise``: standard normal (G, S, E) draws (None: none), added as ``logits + sigma * noise``.
    ``capacity``: slots per expert and group (None: every assignment kept). ``load``: compute the load
    loss's per-expert sums (needs ``sigma`` > 0). Returns ``gates`` (G, S, E), ``weight`` (G, K·S) the kept
    gate values in the plan's choice-major layout, ``importance`` and ``load`` (1, E) per-expert sums over
    every token (zeros unless ``load``), all differentiable in ``logits``; and ``expert``, ``position``,
    ``kept`` (G, K·S), as :func:`visionmoe.routing.token_choice` gives them, and ``entropy`` (float64
    scalar) the gates' entropy summed over the tokens, for :class:`visionmoe.layers.RoutingStats`.

    Raises ``FloatingPointError`` naming ``what`` (:func:`visionmoe.checks.check_finite`) if a logit is
    an infinity or a NaN: the kernel notes them as it reads the logits, so the check takes no pass of its own.

    ``aux_weights``: ``(name, weight)`` pairs, names among ``"importance"`` and ``"load"`` (the latter needs
    ``load``): then two more outputs, ``aux`` = Σ weight · CV²(the batch's sums) (a float32 scalar,
    differentiable in ``logits``: :func:`visionmoe.routing.cv_squared_loss` of ``importance`` and ``load``,
    weighted) and the unweighted losses (float32, in the pairs' order, not differentiable), formed in
    Python floats within the one autograd node: the V-MoE losses of a batch without a node of their own.
    """
    _check_router(logits.shape[-1], k, sigma, load)
    if aux_weights is not None:
        aux_weights = tuple((name, float(w)) for name, w in aux_weights)
        if bad := [name for name, _ in aux_weights if name != "importance" and (name != "load" or not load)]:
            raise ValueError(f"the fused router's aux losses are importance and load (with load=True), got {bad}")
    *outputs, nonfinite, aux, values = _TopKRouter.apply(logits, noise, float(sigma), k, capacity, load, aux_weights)
    _raise_if_nonfinite(nonfinite, logits, what)
    return tuple(outputs) if aux_weights is None else (*outputs, aux, values)


def _check_router(experts: int, k: int, sigma: float, load: bool) -> None:
    """The fused router's shape and noise requirements, as one-line errors."""
    if not 1 <= k <= min(experts, MAX_K) or experts % LANES:
        raise ValueError(
            f"the fused router needs E a multiple of {LANES} and 1 <= k <= min(E, {MAX_K}), got k={k}, E={experts}"
        )
    if load and not sigma > 0:
        raise ValueError(f"the load loss needs router noise, got sigma={sigma}")


def _raise_if_nonfinite(nonfinite: Tensor, logits: Tensor, what: str) -> None:
    """check_finite's error (with the counts of NaN and inf) where the kernel noted a non-finite logit."""
    if any(nonfinite.numpy().tobytes()):
        check_finite(logits, what)


# ---- the layer's row moves ---------------------------------------------------------------------------


def _rows(x: Tensor) -> tuple[Tensor, int]:
    """A 2-D float tensor whose rows are contiguous, and its row stride (no copy when it has one)."""
    if x.stride(-1) != 1 or (x.shape[0] > 1 and x.stride(0) < x.shape[1]):
        x = x.contiguous()
    return x, x.stride(0)


class RowMap(NamedTuple):
    """Where a token-choice plan's rows go: ``slot`` (T, K) the buffer row of each token's j-th choice (-1
    where dropped), and ``source`` (rows,) its inverse, t·K + j for the row that choice fills (-1: none)."""

    slot: Tensor
    source: Tensor


def slot_map(expert: Tensor, position: Tensor, kept: Tensor, base: Tensor, num_tokens: int, rows: int) -> RowMap:
    """The :class:`RowMap` of a plan: token s's j-th choice fills buffer row ``base[g, e] + position``.

    ``expert``, ``position``, ``kept``: (G, K·S) plan layout; ``base``: (G, E) int64 first row of each
    (group, expert) block in the experts' buffer of ``rows`` rows.
    """
    G, A = expert.shape
    S = num_tokens
    K = A // S
    E = base.shape[1]
    # bound to names: a temporary's memory would be freed before the call reads it
    expert, position, kept, base = (t.contiguous() for t in (expert, position, kept, base))
    slot = torch.empty(G * S, K, dtype=torch.int64)
    source = torch.empty(rows, dtype=torch.int64)
    _library().vmoe_slots(
        *(_ptr(t) for t in (expert, position, kept, base)), G, S, E, K, _ptr(slot), _ptr(source), rows, _threads()
    )
    return RowMap(slot, source)


def _threads() -> int:
    return torch.get_num_threads()


def _gather(h: Tensor, slot: Tensor, weight: Tensor | None) -> Tensor:
    h, stride = _rows(h)
    T, K = slot.shape
    y = torch.empty(T, h.shape[1], dtype=h.dtype)
    w = None if weight is None else weight.detach().contiguous()
    _library().vmoe_gather(_ptr(h), stride, _ptr(slot), _ptr(w), T, K, h.shape[1], _ptr(y), _threads())
    return y


def _scatter(x: Tensor, rowmap: RowMap, weight: Tensor | None) -> Tensor:
    x, stride = _rows(x)
    K, rows = rowmap.slot.shape[1], rowmap.source.shape[0]
    buf = torch.empty(rows, x.shape[1], dtype=x.dtype)
    w = None if weight is None else weight.detach().contiguous()
    _library().vmoe_scatter(_ptr(x), stride, _ptr(rowmap.source), _ptr(w), K, x.shape[1], _ptr(buf), rows, _threads())
    return buf


def _rowdot(a: Tensor, h: Tensor, slot: Tensor) -> Tensor:
    a, a_stride = _rows(a)
    h, h_stride = _rows(h)
    T, K = slot.shape
    out = torch.empty(T, K, dtype=a.dtype)
    _library().vmoe_rowdot(_ptr(a), a_stride, _ptr(h), h_stride, _ptr(slot), T, K, a.shape[1], _ptr(out), _threads())
    return out


class _Gather(torch.autograd.Function):
    """y[t] = Σ_j w[t, j] · h[slot[t, j]]; d/dh = scatter(dy; w), d/dw = rowdot(dy, h)."""

    @staticmethod
    def forward(ctx, h: Tensor, rowmap: RowMap, weight: Tensor | None) -> Tensor:
        ctx.save_for_backward(h, weight)
        ctx.rowmap = rowmap  # integer maps, no gradient
        return _gather(h.detach(), rowmap.slot, weight)

    @staticmethod
    def backward(ctx, grad: Tensor):
        h, weight = ctx.saved_tensors
        dh = scatter_rows(grad, ctx.rowmap, weight) if ctx.needs_input_grad[0] else None
        dw = rowdot(grad, h, ctx.rowmap) if weight is not None and ctx.needs_input_grad[2] else None
        return dh, None, dw


class _Scatter(torch.autograd.Function):
    """buf[slot[t, j]] = w[t, j] · x[t], other rows 0; d/dx = gather(dbuf; w), d/dw = rowdot(x, dbuf)."""

    @staticmethod
    def forward(ctx, x: Tensor, rowmap: RowMap, weight: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.rowmap = rowmap
        return _scatter(x.detach(), rowmap, weight)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        dx = gather_rows(grad, ctx.rowmap, weight) if ctx.needs_input_grad[0] else None
        dw = rowdot(x, grad, ctx.rowmap) if weight is not None and ctx.needs_input_grad[2] else None
        return dx, None, dw


class _RowDot(torch.autograd.Function):
    """r[t, j] = <a[t], h[slot[t, j]]>; d/da = gather(h; dr), d/dh = scatter(a; dr)."""

    @staticmethod
    def forward(ctx, a: Tensor, h: Tensor, rowmap: RowMap) -> Tensor:
        ctx.save_for_backward(a, h)
        ctx.rowmap = rowmap
        return _rowdot(a.detach(), h.detach(), rowmap.slot)

    @staticmethod
    def backward(ctx, grad: Tensor):
        a, h = ctx.saved_tensors
        da = gather_rows(h, ctx.rowmap, grad) if ctx.needs_input_grad[0] else None
        dh = scatter_rows(a, ctx.rowmap, grad) if ctx.needs_input_grad[1] else None
        return da, dh, None


def gather_rows(h: Tensor, rowmap: RowMap, weight: Tensor | None = None) -> Tensor:
    """(T, D): ``y[t] = Σ_j weight[t, j] · h[slot[t, j]]`` over the j with ``slot[t, j] >= 0``
    (``weight`` None: 1). ``h``: (rows, D) float32."""
    return _Gather.apply(h, rowmap, weight)


def scatter_rows(x: Tensor, rowmap: RowMap, weight: Tensor | None = None) -> Tensor:
    """(rows, D): ``buf[slot[t, j]] = weight[t, j] · x[t]``, zeros in every row no choice fills; each row
    written once, in order (by ``rowmap.source``)."""
    return _Scatter.apply(x, rowmap, weight)


def rowdot(a: Tensor, h: Tensor, rowmap: RowMap) -> Tensor:
    """(T, K): ``<a[t], h[slot[t, j]]>``, 0 where ``slot[t, j] < 0``."""
    return _RowDot.apply(a, h, rowmap)


# ---- small experts, fused with the row moves -------------------------------------------------------------

FFN_ACTIVATIONS = {"ReLU": 1, "GELU": 2}
"""The experts' activations the fused kernel computes (codes of moe.c): ``nn.ReLU`` and exact ``nn.GELU``."""
FFN_LOOPS = ("blocked", "tiled")
"""The fused experts' loops: tiled per block of tokens (each block's assignments sorted by expert, its rows
moved in token order; the weights' gradients summed per chunk of blocks), and tiled by expert over the
whole layer (one sort; each expert's weights' gradients by one thread)."""
FFN_BLOCKED_WEIGHTS = 64 * 128
"""Experts of at most this many weights per layer (D·H) take the ``blocked`` loop, larger ones ``tiled``: at
the CIFAR-CNN layer shapes the blocked loop was the faster or at par up to D·H = 64·128 (0.8-1.0 of the
tiled loop's time at D = 8-64), the tiled one at par or faster from 128·128 (0.5 of the blocked loop's at
D = 128, H = 512, where the blocked loop's per-chunk gradient buffers and few rows per expert and block
cost most) (BENCHMARKS.md, issue 22, thirteenth pass: ``cnn_moe_step.py --layer-grid --loops``)."""
FFN_BLOCK_ROWS = 64
"""The ``blocked`` loop's blocks hold this many assignments per expert on average: ceil(64·E / K) tokens,
256 for 8 experts and top-2 (its buffers, 512 rows of D, stay in the L2 cache)."""
FFN_CHUNK = 1024
"""Tokens whose weight gradients one private buffer sums, at least (fewer chunks for large experts, see
_ffn_chunk)."""
FFN_MAX_CHUNKS = 64
FFN_MAX_PARTIAL = 2**21
"""Floats of per-chunk weight gradients in all (8 MB), at most (unless one chunk needs more)."""


def ffn_activation(act: object) -> int:
    """moe.c's code of an experts' activation module (0: not one the kernel has)."""
    if type(act) is torch.nn.ReLU:
        return FFN_ACTIVATIONS["ReLU"]
    if type(act) is torch.nn.GELU and act.approximate == "none":
        return FFN_ACTIVATIONS["GELU"]
    return 0


def ffn_supported(experts: torch.nn.Module) -> bool:
    """Whether :func:`expert_ffn` can run these experts: a plain :class:`~visionmoe.layers.Experts` (not a
    subclass with its own forward, such as an expert-parallel shard, which holds some experts and exchanges
    rows), D and H multiples of 8, a ReLU or exact GELU activation, and nothing that must see the experts'
    own calls (forward hooks on them, or a dispatch mode such as ``FlopCounterMode`` counting their GEMMs)."""
    from visionmoe.layers.experts import Experts

    if type(experts) is not Experts:
        return False
    if experts.dim % LANES or experts.hidden_dim % LANES or not ffn_activation(experts.act):
        return False
    if experts._forward_hooks or experts._forward_pre_hooks:
        return False
    return torch.utils._python_dispatch._get_current_dispatch_mode() is None


def ffn_loop(dim: int, hidden: int) -> str:
    """The loop of :data:`FFN_LOOPS` that :func:`expert_ffn` takes for experts of these shapes: ``blocked``
    up to :data:`FFN_BLOCKED_WEIGHTS` weights (D·H) per layer, ``tiled`` above."""
    return "blocked" if dim * hidden <= FFN_BLOCKED_WEIGHTS else "tiled"


def ffn_block(experts: int, k: int) -> int:
    """Tokens per block of the ``blocked`` loop: :data:`FFN_BLOCK_ROWS` assignments per expert on average."""
    return max(1, -(-FFN_BLOCK_ROWS * experts // max(1, k)))


def _ffn_chunk(tokens: int, per_chunk: int, block: int = 1) -> int:
    """Blocks of ``block`` tokens per private weight-gradient buffer (of ``per_chunk`` floats): a function of
    the shapes only (not of the thread count), so the sums are the same whatever the threads."""
    units = -(-tokens // block)
    chunks = min(-(-tokens // FFN_CHUNK), FFN_MAX_CHUNKS, max(1, FFN_MAX_PARTIAL // per_chunk))
    return max(1, -(-units // max(1, chunks)))


def _ffn_forward(x, expert, weight, params, act, loop, keep):
    """The experts' kernel forward: y (T, D) and what its backward reads (``keep``: the kept choices'
    pre-activations and, tiled, their outputs; else nothing of them), as (y, saved, block)."""
    T, D = x.shape
    w1, b1, w2, b2 = params
    (E, _, H), K = w1.shape, expert.shape[1]
    xr, stride = _rows(x.detach())
    expert_c, weight_c = expert.contiguous(), weight.detach().contiguous()
    params = [None if t is None else t.detach().contiguous() for t in (w1, b1, w2, b2)]
    y = torch.empty(T, D)
    # each kept choice's pre-activation, for the backward to reuse (in the assignments' sorted order, as the
    # kernel's backward reads them), and (tiled) its unweighted output, written there before the tokens
    # add theirs (the blocked loop keeps a block's in a buffer of its own)
    hidden = torch.empty(T * K, H) if keep else None
    outputs = torch.empty(T * K, D) if loop == "tiled" else None
    args = (_ptr(xr), stride, *(_ptr(t) for t in (expert_c, weight_c, *params)), T, K, D, H, E, ffn_activation(act))
    block = ffn_block(E, K)  # blocked: tokens per block
    blocks = max(1, -(-T // block)) if loop == "blocked" else 1  # tiled: one, the whole layer
    order = torch.empty(T * K, dtype=torch.int64), torch.empty(blocks * (E + 1), dtype=torch.int64)
    if loop == "tiled":
        _library().vmoe_tiled_forward(*args, *(_ptr(t) for t in (*order, hidden, outputs, y)), _threads())
    else:
        _library().vmoe_blocked_forward(*args, block, *(_ptr(t) for t in (*order, hidden, y)), _threads())
    return y, (hidden, outputs, *order), block


def _ffn_backward(x, expert, weight, params, act, loop, block, saved, grad, need_dx, need_dweight):
    """The experts' kernel backward: (dx, dweight, dw1, db1, dw2, db2), dx and dweight None unless asked for."""
    w1, b1, w2, b2 = params
    hidden, outputs, *order = saved
    T, D = x.shape
    E, _, H = w1.shape
    K = expert.shape[1]
    xr, x_stride = _rows(x.detach())
    dy, dy_stride = _rows(grad)
    expert_c, weight_c = expert.contiguous(), weight.detach().contiguous()
    w1t, w2t = (w.detach().transpose(1, 2).contiguous() for w in (w1, w2))
    sizes = [E * D * H, E * H * D, *([E * H] if b1 is not None else []), *([E * D] if b2 is not None else [])]
    per_chunk = sum(sizes)
    grads = torch.empty(per_chunk)
    dx = torch.empty(T, D) if need_dx else None
    dweight = torch.empty(T, K) if need_dweight else None
    if loop == "blocked":
        blocks = -(-T // block)
        chunk = _ffn_chunk(T, per_chunk, block)  # blocks per private buffer
        partial = torch.empty(-(-blocks // chunk) * per_chunk)
        w2c, b2c = w2.detach().contiguous(), None if b2 is None else b2.detach().contiguous()
        _library().vmoe_blocked_backward(
            _ptr(xr), x_stride, *(_ptr(t) for t in (expert_c, weight_c, w1t, w2t, w2c, b2c, dy)), dy_stride,
            T, K, D, H, E, ffn_activation(act), b1 is not None, block, chunk,
            *(_ptr(t) for t in (*order, hidden, dx, dweight, grads, partial)), _threads(),
        )  # fmt: skip
    else:
        rows = torch.empty(T * K, D) if dx is not None else None  # each kept choice's input gradient
        _library().vmoe_tiled_backward(
            _ptr(xr), x_stride, *(_ptr(t) for t in (expert_c, weight_c, w1t, w2t, dy)), dy_stride, T, K, D, H,
            E, ffn_activation(act), b1 is not None, b2 is not None,
            *(_ptr(t) for t in (*order, hidden, outputs, rows, dx, dweight, grads)), _threads(),
        )  # fmt: skip
    parts = iter(grads.split(sizes))
    dw1, dw2 = next(parts).view(E, D, H), next(parts).view(E, H, D)
    db1 = next(parts).view(E, H) if b1 is not None else None
    db2 = next(parts).view(E, D) if b2 is not None else None
    return dx, dweight, dw1, db1, dw2, db2


def _keeps(*tensors: Tensor | None) -> bool:
    """Whether a node on these inputs will be differentiated: grad enabled and one of them requiring it (its
    forward then keeps what its backward reads; inference keeps nothing)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class _ExpertFFN(torch.autograd.Function):
    """y[t] = Σ_j w[t, j] · expert_{e[t, j]}(x[t]) over the kept choices (e >= 0), in one C pass by the
    ``loop`` of :data:`FFN_LOOPS`."""

    @staticmethod
    def forward(ctx, x, expert, weight, w1, b1, w2, b2, act, loop, keep):
        E = w1.shape[0]
        if expert.numel():
            low, high = (int(v) for v in torch.aminmax(expert))  # one pass
            if not -1 <= low <= high < E:
                raise ValueError(f"expert_ffn needs expert ids in [-1, {E}), got {low}..{high}")
        y, saved, ctx.block = _ffn_forward(x, expert, weight, (w1, b1, w2, b2), act, loop, keep)
        ctx.save_for_backward(x, expert, weight, w1, b1, w2, b2, *saved)
        ctx.act, ctx.loop = act, loop
        ctx.set_materialize_grads(False)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, expert, weight, w1, b1, w2, b2, *saved = ctx.saved_tensors
        if grad is None:
            return (None,) * 10
        if torch.is_grad_enabled():  # a graph of the gradient is wanted (double backward): the ATen formula's
            inputs = [(i, t) for i, t in enumerate((x, None, weight, w1, b1, w2, b2)) if ctx.needs_input_grad[i]]
            out = _ffn_reference(x, expert, weight, w1, b1, w2, b2, ctx.act)
            found = torch.autograd.grad(out, [t for _, t in inputs], grad, create_graph=True, allow_unused=True)
            result = [None] * 10
            for (i, _), g in zip(inputs, found, strict=True):
                result[i] = g
            return tuple(result)
        params, need = (w1, b1, w2, b2), ctx.needs_input_grad
        grads = _ffn_backward(x, expert, weight, params, ctx.act, ctx.loop, ctx.block, saved, grad, need[0], need[2])
        dx, dweight, dw1, db1, dw2, db2 = grads
        return dx, None, dweight, dw1, db1, dw2, db2, None, None, None


def _ffn_reference(x, expert, weight, w1, b1, w2, b2, act):
    """:class:`_ExpertFFN`'s forward in ATen operators (differentiable to any order): each kept choice's
    expert weights gathered per row, batched matmuls of one row, the gated rows added to their tokens."""
    T, K = expert.shape
    flat = expert.reshape(-1)
    keep = (flat >= 0).nonzero().squeeze(1)  # the kept (token, choice) pairs, t·K + j
    e, t = flat[keep], keep // K
    a = torch.bmm(x[t].unsqueeze(1), w1[e]).squeeze(1)  # (N, H)
    if b1 is not None:
        a = a + b1[e]
    o = torch.bmm(act(a).unsqueeze(1), w2[e]).squeeze(1)  # (N, D)
    if b2 is not None:
        o = o + b2[e]
    return x.new_zeros(T, x.shape[1]).index_add(0, t, o * weight.reshape(-1)[keep, None])


def expert_ffn(x: Tensor, expert: Tensor, weight: Tensor, experts: torch.nn.Module, loop: str | None = None) -> Tensor:
    """(T, D): ``y[t] = Σ_j weight[t, j] · expert_e(x[t])``, e = ``expert[t, j]``, over the j with e >= 0,
    the :class:`~visionmoe.layers.Experts` computed in C (the dispatch, the experts and the combine of a
    token-choice plan in one pass; no capacity buffers) by ``loop``, one of :data:`FFN_LOOPS` (None:
    :func:`ffn_loop`'s choice from the shapes). ``x``: (T, D) float32; ``expert`` (T, K) int64, -1 for a
    dropped choice; ``weight`` (T, K). Needs :func:`ffn_supported`. In training each kept choice's
    pre-activation is kept for the backward ((T·K, H) floats; tiled also its output, (T·K, D)); the blocked
    loop's backward computes the outputs again for the gates' gradients. Differentiable in ``x``,
    ``weight`` and the experts' parameters (double backward by the ATen formula). The loops sum in other
    orders: equal to float rounding, each deterministic and independent of the thread count."""
    if loop is None:
        loop = ffn_loop(experts.dim, experts.hidden_dim)
    elif loop not in FFN_LOOPS:
        raise ValueError(f"expert_ffn's loop must be one of {FFN_LOOPS}, got {loop!r}")
    args = (experts.w1, experts.b1, experts.w2, experts.b2, experts.act, loop)
    return _ExpertFFN.apply(x, expert, weight, *args, _keeps(x, weight, *args[:4]))


# ---- the routers' logits -----------------------------------------------------------------------------------


LOGITS_MAX_DIM = 32
"""Tokens of at most this many channels take :func:`router_logits` (CNN feature maps; forward + backward
against ``F.linear``: 0.44 at D = 8 on 65,536 tokens, 0.69-0.91 at D = 16-32, 1.08 at D = 64, and from
0.70 to 1.64 at ViT widths, D = 128-512, by shape: ``benchmarks/router_logits.py``)."""


def logits_supported(x: Tensor, weight: Tensor) -> bool:
    """Whether :func:`router_logits` computes ``x Wᵀ`` here: float32 CPU tensors with the kernel built, D and
    E multiples of 8, D at most :data:`LOGITS_MAX_DIM`, and no dispatch mode (``FlopCounterMode``) that
    must see the router's GEMM."""
    E, D = weight.shape
    if D % LANES or E % LANES or D > LOGITS_MAX_DIM or not usable(x, weight):
        return False
    return torch.utils._python_dispatch._get_current_dispatch_mode() is None


def _logits_forward(x: Tensor, weight: Tensor) -> Tensor:
    """(T, D) tokens (rows contiguous), (E, D) weight -> (T, E) logits by the C pass."""
    E, D = weight.shape
    xr, stride = _rows(x.detach())
    T = xr.shape[0]
    wt = weight.detach().t().contiguous()
    out = torch.empty(T, E)
    _library().vmoe_linear_forward(_ptr(xr), stride, _ptr(wt), T, D, E, _ptr(out), _threads())
    return out


def _logits_backward(x: Tensor, weight: Tensor, grad: Tensor, need_dx: bool) -> tuple[Tensor | None, Tensor]:
    """(dx (T, D) or None, dweight (E, D)) of :func:`_logits_forward` from the logits' gradient (T, E)."""
    E, D = weight.shape
    xr, stride = _rows(x.detach())
    T = xr.shape[0]
    dl = grad.reshape(T, E).contiguous()
    chunk = _ffn_chunk(T, E * D)
    dx = torch.empty(T, D) if need_dx else None
    dw, partial = torch.empty(E, D), torch.empty(-(-T // chunk) * E * D)
    _library().vmoe_linear_backward(
        _ptr(xr), stride, _ptr(weight.detach().contiguous()), _ptr(dl), T, D, E, chunk,
        *(_ptr(t) for t in (dx, dw, partial)), _threads(),
    )  # fmt: skip
    return dx, dw


class _Logits(torch.autograd.Function):
    """(..., D) tokens, (E, D) weight -> (..., E) logits, one C pass each way."""

    @staticmethod
    def forward(ctx, x, weight):
        E, D = weight.shape
        ctx.save_for_backward(x, weight)
        ctx.set_materialize_grads(False)
        return _logits_forward(x.reshape(-1, D), weight).reshape(*x.shape[:-1], E)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        if grad is None:
            return None, None
        E, D = weight.shape
        if torch.is_grad_enabled():  # a graph of the gradient is wanted (double backward): ATen's products
            dx = grad @ weight if ctx.needs_input_grad[0] else None
            dw = grad.reshape(-1, E).t() @ x.reshape(-1, D) if ctx.needs_input_grad[1] else None
            return dx, dw
        dx, dw = _logits_backward(x.reshape(-1, D), weight, grad, ctx.needs_input_grad[0])
        return (None if dx is None else dx.reshape(x.shape)), (dw if ctx.needs_input_grad[1] else None)


def router_logits(x: Tensor, weight: Tensor) -> Tensor:
    """``x Wᵀ`` for a bias-free router: (..., D) float32 tokens, (E, D) weight -> (..., E), in C (a
    vector-matrix product per token; backward the same, the weight's gradient summed per fixed chunk of
    tokens). Needs :func:`logits_supported`. Equal to ``F.linear`` to float rounding; double backward by
    ATen's products."""
    return _Logits.apply(x, weight)


# ---- a token-choice plan's counts --------------------------------------------------------------------------


def _plan_arrays(expert: Tensor, kept: Tensor, choices: int, what: str) -> tuple[Tensor, Tensor]:
    """A choice-major plan's ``expert`` and ``kept`` as contiguous arrays for C, checked."""
    ok = expert.dim() == 2 and kept.shape == expert.shape and (expert.dtype, kept.dtype) == (torch.int64, torch.bool)
    if not ok or choices < 1 or expert.shape[1] % choices:
        raise ValueError(
            f"{what} needs int64 expert and bool kept of one shape (G, K·S), K = {choices} dividing K·S; got "
            f"expert {tuple(expert.shape)} {expert.dtype}, kept {tuple(kept.shape)} {kept.dtype}"
        )
    return expert.detach().contiguous(), kept.detach().contiguous()


def plan_counts(expert: Tensor, kept: Tensor, choices: int, num_experts: int) -> tuple[Tensor, Tensor]:
    """Of a choice-major token-choice plan (``expert`` (G, K·S) int64, ``kept`` (G, K·S) bool, assignment
    j·S + i the j-th choice of the i-th token): the kept assignments per group and expert (G, E) and the
    tokens with no kept choice per group (G,), as int64, in one C pass (what ``scatter_add_`` and a
    per-token sum compute in several). Needs :func:`available`."""
    G, A = expert.shape
    expert_c, kept_c = _plan_arrays(expert, kept, choices, "plan_counts")
    counts, unrouted = torch.empty(G, num_experts, dtype=torch.int64), torch.empty(G, dtype=torch.int64)
    invalid = torch.empty(G, dtype=torch.int64)
    _library().vmoe_plan_counts(
        _ptr(expert_c), _ptr(kept_c), G, choices, A // choices, num_experts,
        *(_ptr(t) for t in (counts, unrouted, invalid)), _threads(),
    )  # fmt: skip
    if bad := int(invalid.sum()):
        raise ValueError(f"plan_counts needs expert ids in [0, {num_experts}), got {bad} outside")
    return counts, unrouted


def token_major_experts(expert: Tensor, kept: Tensor, choices: int) -> Tensor:
    """(G·S, K) int64: the expert of each token's j-th choice, -1 where it was dropped, from a choice-major
    plan's (G, K·S) ``expert`` and ``kept``: ``torch.where(kept, expert, -1)`` transposed to token-major, in
    one C pass. Needs :func:`available`."""
    G, A = expert.shape
    expert_c, kept_c = _plan_arrays(expert, kept, choices, "token_major_experts")
    S = A // choices
    out = torch.empty(G * S, choices, dtype=torch.int64)
    _library().vmoe_token_major(_ptr(expert_c), _ptr(kept_c), G, choices, S, _ptr(out), _threads())
    return out


# ---- the routers' noise -------------------------------------------------------------------------------------


def standard_normal(shape: Sequence[int], key: Sequence[int]) -> Tensor:
    """Draws 0 .. n - 1 of the counter-based standard normal stream keyed by ``key`` (two integers in
    [0, 2³²)) as a float32 CPU tensor of ``shape``: the draws of
    :func:`visionmoe.routing.noise.counter_normal` (the same 32-bit words; log, sin and cos rounded by
    moe.c's polynomials instead of ATen's), at any thread count. Needs :func:`available`."""
    k0, k1 = (int(k) for k in key)
    if not (0 <= k0 < 2**32 and 0 <= k1 < 2**32):
        raise ValueError(f"key must be two integers in [0, 2**32), got key={tuple(key)}")
    n = check_stream_length(shape)
    out = torch.empty(tuple(shape))
    _library().vmoe_normal(k0, k1, n, _ptr(out), _threads())
    return out


# ---- the whole token-choice layer ----------------------------------------------------------------------------


class _TopKMoE(torch.autograd.Function):
    """tokens -> (y, aux) through the router's logits, the top-k router and the experts: one autograd node
    whose backward runs the three kernels' backward passes back to back (the input's two gradients summed in
    place), instead of three nodes, their Python and the tensors passed between them."""

    @staticmethod
    def forward(
        ctx, x, router_weight, w1, b1, w2, b2, noise, sigma, k, capacity, load, aux_weights, act, loop, S, what, keep
    ):
        T, E = x.shape[0], router_weight.shape[0]
        G = T // S
        logits = _logits_forward(x, router_weight).view(G, S, E)
        routed = _router_forward(logits, noise, sigma, k, capacity, load, tokens=True)
        gates, threshold, expert, position, kept, weight, importance, load_sums, entropy, nonfinite = routed[:10]
        expert_t, weight_t, counts, unrouted = routed[10:]  # (T, K) token-major: the experts' input
        _raise_if_nonfinite(nonfinite, logits, what)
        aux, values, aux_grads = _weighted_cv_squared(importance, load_sums, aux_weights)
        params = (w1, b1, w2, b2)
        y, saved, ctx.block = _ffn_forward(x, expert_t, weight_t, params, act, loop, keep)
        router_saved = (noise, logits, gates, threshold, expert, kept, expert_t)
        ctx.save_for_backward(x, router_weight, *params, *router_saved, *saved)
        ctx.weight_t, ctx.aux_grads = weight_t, aux_grads
        ctx.config = sigma, k, capacity, load, aux_weights, act, loop, what
        ctx.mark_non_differentiable(gates, weight, expert, position, kept, entropy, values, counts, unrouted)
        ctx.set_materialize_grads(False)
        return y, aux, gates, weight, expert, position, kept, entropy, values, counts, unrouted

    @staticmethod
    def backward(ctx, dy, d_aux, *_):
        x, router_weight, w1, b1, w2, b2, noise, logits, gates, threshold, expert, kept, expert_t, *saved = (
            ctx.saved_tensors
        )
        sigma, k, capacity, load, aux_weights, act, loop, what = ctx.config
        params = (w1, b1, w2, b2)
        inputs = (x, router_weight, *params)
        needed = ctx.needs_input_grad[:6]
        if torch.is_grad_enabled():  # a graph of the gradient is wanted (double backward): the three nodes'
            G, S, E = logits.shape
            redone = router_logits(x, router_weight).view(G, S, E)
            routed = topk_router(redone, noise, sigma, k, capacity, load, what, aux_weights)
            weight_t = routed[1].view(G, k, S).transpose(1, 2).reshape(G * S, k)
            y = _ExpertFFN.apply(x, expert_t, weight_t, *params, act, loop, True)
            outputs = [(out, g) for out, g in ((y, dy), (routed[8], d_aux)) if g is not None]
            wrt = [t for t, need in zip(inputs, needed, strict=True) if need]
            outs, grads = zip(*outputs, strict=True)
            found = iter(torch.autograd.grad(outs, wrt, grads, create_graph=True, allow_unused=True))
            return (*(next(found) if need else None for need in needed), *(None,) * 11)
        G, S, E = logits.shape
        dx = dweight_t = None
        grads = [None] * 4
        if dy is not None:
            dx, dweight_t, *grads = _ffn_backward(
                x, expert_t, ctx.weight_t, params, act, loop, ctx.block, saved, dy, needed[0], True
            )
        d_router_weight = None
        if needed[0] or needed[1]:  # the router's and its logits' backward: the input's second gradient
            d_weight = None if dweight_t is None else dweight_t.view(G, S, k).transpose(1, 2).reshape(G, k * S)
            saved_router = (gates, logits, threshold, expert, kept)
            d_logits = _router_backward(saved_router, sigma, k, load, None, d_weight, None, None, d_aux, ctx.aux_grads)
            dx_router, d_router_weight = _logits_backward(x, router_weight, d_logits, needed[0])
            if dx_router is not None:
                dx = dx_router if dx is None else dx.add_(dx_router)  # as autograd sums the two nodes' gradients
        return dx, d_router_weight if needed[1] else None, *grads, *(None,) * 11


def topk_moe(
    x: Tensor,
    group_size: int,
    router_weight: Tensor,
    experts: torch.nn.Module,
    noise: Tensor | None,
    sigma: float,
    k: int,
    capacity: int | None,
    aux_weights: Sequence[tuple[str, float]],
    what: str = "the router's logit tensor",
) -> tuple[Tensor, ...]:
    """A token-choice MoE layer with V-MoE's noisy top-``k`` router, whole: ``x`` (T, D) float32 tokens in
    routing groups of ``group_size``, the router's (E, D) weight (logits ``x Wᵀ``, :func:`router_logits`),
    ``noise`` (T / group_size, group_size, E) standard normal draws or None, and the
    :class:`~visionmoe.layers.Experts` (:func:`ffn_supported`). The same kernels, in the same order, as
    :func:`router_logits`, :func:`topk_router` and :func:`expert_ffn` one after another, so the same
    outputs and gradients bit for bit, in one autograd node (double backward through the three's).

    Returns ``y`` (T, D); ``aux`` = Σ weight · CV² of the batch's importance and load sums
    (``aux_weights``: pairs among ``"importance"`` and ``"load"``; the load loss needs ``sigma`` > 0);
    and, not differentiable: ``gates`` (G, S, E), the plan's ``weight``, ``expert``, ``position`` and
    ``kept`` (G, K·S) as :func:`topk_router` gives them, the entropy sum, the unweighted losses, and the
    kept assignments per group and expert (G, E) and tokens with no kept choice per group (G,), as
    :func:`plan_counts` gives them.
    Raises ``FloatingPointError`` naming ``what`` if a logit is an infinity or a NaN."""
    aux_weights = tuple((name, float(w)) for name, w in aux_weights)
    load = any(name == "load" for name, _ in aux_weights)
    if bad := [name for name, _ in aux_weights if name not in ("importance", "load")]:
        raise ValueError(f"the fused layer's aux losses are importance and load, got {bad}")
    _check_router(router_weight.shape[0], k, sigma, load)
    if x.dim() != 2 or x.shape[0] % group_size:
        raise ValueError(f"topk_moe needs (T, D) tokens, T a multiple of group_size={group_size}, got {tuple(x.shape)}")
    args = (experts.w1, experts.b1, experts.w2, experts.b2, noise, float(sigma), k, capacity, load, aux_weights)
    loop = ffn_loop(experts.dim, experts.hidden_dim)
    keep = _keeps(x, router_weight, *args[:4])
    return _TopKMoE.apply(x, router_weight, *args, experts.act, loop, group_size, what, keep)
