"""Native routing and row moves for the token-choice MoE layer on the CPU: a probe (issue 22, eighth pass).

    python benchmarks/native_moves_probe.py --threads 2 --repeats 7

The seventh pass left the routing and the row moves of the MoE layer as the whole gap between a CNN MoE
step and its dense twin's, and named moving them below PyTorch's operators as the way left. This probe
does that for the parts that are integer bookkeeping and row copies (``native_moves_probe.c``, plain C
compiled here with the system's ``cc`` in about a second and called through ctypes): the stable top-k
of each token with the choice-major capacity positions (replacing :func:`stable_topk` and
:func:`positions_in_expert`), the k-th largest noisy logit of the load loss, and the dispatch and
combine as one scatter and one gated gather per layer over a (tokens, K) slot map, with their backward
passes (the same moves again: autograd Functions whose backward is differentiable). The expert GEMMs
stay in the BLAS and the router's floating-point maths (logits, noise, softmax, aux losses) in ATen.

It patches the layer (:func:`native_path`), checks the patched layer's output bit-identical and its
gradients equal (to float rounding) to the layer's own at every shape, then times forward and backward
of one MoE layer (the default CNN settings: E = 8, noisy top-2, capacity factor 1.25, importance and
load losses, GELU experts of width ratio·D) at the stage shapes of the CIFAR CNNs, batch 64, with and
without the kernels, the router alone likewise, and the twin's FFN (width 2·ratio·D), interleaved.
The library's own fused router (:mod:`visionmoe.native`, which came after this probe) is switched off
throughout, so both columns route by ATen as the probe measured them. Not part of the library: it
measured no gain (BENCHMARKS.md, "Eighth pass"), so the layer keeps its ATen row moves.
Needs a C compiler (``$CC`` or ``cc``).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

import visionmoe.layers.dispatch as dispatch
import visionmoe.layers.routers as routers
import visionmoe.native
import visionmoe.routing.losses as losses
from visionmoe import MoE
from visionmoe.allocator import keep_freed_memory
from visionmoe.analysis.speed import benchmark_header, interleaved_times
from visionmoe.routing import Routing, token_choice

SOURCE = Path(__file__).with_name("native_moves_probe.c")
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fPIC", "-shared", "-pthread", "-fopenmp")
"""``-ffp-contract=off``: no fused multiply-adds, so products and sums round as ATen's do; ``-fopenmp``: threads
from PyTorch's own OpenMP runtime (see ``visionmoe.native``; a first run of this probe with POSIX threads raced
PyTorch's spinning OpenMP workers)."""
MAX_K = 64
_build_dir = tempfile.TemporaryDirectory(prefix="vmoe-native-")
_lib: ctypes.CDLL | None = None
_error: str | None = None


def _library() -> ctypes.CDLL | None:
    """The kernels, compiled on first use into a temporary directory (about a second)."""
    global _lib, _error
    if _lib is not None or _error is not None:
        return _lib
    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None:
        _error = "no C compiler ($CC or cc)"
        return None
    target = Path(_build_dir.name) / "vmoe_native.so"
    done = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", str(target)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        _error = done.stderr.strip()
        return None
    lib = ctypes.CDLL(str(target))
    i64, ptr, cint = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    signatures = {
        "vmoe_topk_route": [ptr, i64, i64, i64, i64, i64, ptr, ptr, ptr, ptr, cint],
        "vmoe_kth_largest": [ptr, i64, i64, i64, ptr, cint],
        "vmoe_slots": [ptr, ptr, ptr, ptr, i64, i64, i64, i64, ptr, cint],
        "vmoe_gather": [ptr, i64, ptr, ptr, i64, i64, i64, ptr, cint],
        "vmoe_scatter": [ptr, i64, ptr, ptr, i64, i64, i64, ptr, i64, cint],
        "vmoe_rowdot": [ptr, i64, ptr, i64, ptr, i64, i64, i64, ptr, cint],
    }
    for name, args in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, None
    _lib = lib
    return _lib


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _rows(x: Tensor) -> tuple[Tensor, int]:
    """A 2-D float tensor whose rows are contiguous, and its row stride (no copy when it has one)."""
    if x.stride(-1) != 1 or (x.shape[0] > 1 and x.stride(0) < x.shape[1]):
        x = x.contiguous()
    return x, x.stride(0)


def _threads() -> int:
    return torch.get_num_threads()


# ---- routing ---------------------------------------------------------------------------------------


def topk_route(scores: Tensor, k: int, capacity: int | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Stable top-``k`` of (G, S, E) ``scores`` per token and each choice's slot, choice-major.

    Returns ``expert``, ``position`` (G, K·S) int64, ``kept`` (G, K·S) bool in the layout of
    :func:`visionmoe.routing.token_choice` (assignment j·S + s is token s's j-th choice; first choices
    fill the experts before second choices) and ``load`` (G, E), the assignments offered to each
    expert. ``capacity=None`` keeps every assignment. The scores must hold no NaN.
    """
    G, S, E = scores.shape
    if not 1 <= k <= min(E, MAX_K):
        raise ValueError(f"native top-k needs 1 <= k <= min(E, {MAX_K}), got k={k}, E={E}")
    scores = scores.detach().contiguous()
    expert = torch.empty(G, k * S, dtype=torch.int64)
    position = torch.empty(G, k * S, dtype=torch.int64)
    kept = torch.empty(G, k * S, dtype=torch.bool)
    load = torch.empty(G, E, dtype=torch.int64)
    c = -1 if capacity is None else int(capacity)
    _lib.vmoe_topk_route(_ptr(scores), G, S, E, k, c, _ptr(expert), _ptr(position), _ptr(kept), _ptr(load), _threads())
    return expert, position, kept, load


def kth_largest(x: Tensor, k: int) -> Tensor:
    """(..., E) -> (..., 1): the ``k``-th largest of each row, a repeated value counting each time."""
    E = x.shape[-1]
    if not 1 <= k <= min(E, MAX_K):
        raise ValueError(f"native k-th largest needs 1 <= k <= min(E, {MAX_K}), got k={k}, E={E}")
    flat = x.detach().reshape(-1, E).contiguous()
    out = torch.empty(flat.shape[0], dtype=torch.float32)
    _lib.vmoe_kth_largest(_ptr(flat), flat.shape[0], E, k, _ptr(out), _threads())
    return out.reshape(*x.shape[:-1], 1)


def slot_map(expert: Tensor, position: Tensor, kept: Tensor, base: Tensor, num_tokens: int) -> Tensor:
    """(G·S, K) buffer row of each token's j-th choice: ``base[g, e] + position``, -1 where dropped.

    ``expert``, ``position``, ``kept``: (G, K·S) plan layout; ``base``: (G, E) int64 first row of each
    (group, expert) block in the experts' buffer.
    """
    G, A = expert.shape
    S = num_tokens
    K = A // S
    E = base.shape[1]
    base = base.contiguous()
    slot = torch.empty(G * S, K, dtype=torch.int64)
    _lib.vmoe_slots(
        _ptr(expert.contiguous()),
        _ptr(position.contiguous()),
        _ptr(kept.contiguous()),
        _ptr(base),
        G,
        S,
        E,
        K,
        _ptr(slot),
        _threads(),
    )
    return slot


# ---- row moves (differentiable, twice and more) ------------------------------------------------------


def _gather(h: Tensor, slot: Tensor, weight: Tensor | None) -> Tensor:
    h, stride = _rows(h)
    T, K = slot.shape
    y = torch.empty(T, h.shape[1], dtype=h.dtype)
    w = None if weight is None else weight.detach().contiguous()
    _lib.vmoe_gather(_ptr(h), stride, _ptr(slot), _ptr(w), T, K, h.shape[1], _ptr(y), _threads())
    return y


def _scatter(x: Tensor, slot: Tensor, weight: Tensor | None, rows: int) -> Tensor:
    x, stride = _rows(x)
    T, K = slot.shape
    buf = torch.empty(rows, x.shape[1], dtype=x.dtype)
    w = None if weight is None else weight.detach().contiguous()
    _lib.vmoe_scatter(_ptr(x), stride, _ptr(slot), _ptr(w), T, K, x.shape[1], _ptr(buf), rows, _threads())
    return buf


def _rowdot(a: Tensor, h: Tensor, slot: Tensor) -> Tensor:
    a, a_stride = _rows(a)
    h, h_stride = _rows(h)
    T, K = slot.shape
    out = torch.empty(T, K, dtype=a.dtype)
    _lib.vmoe_rowdot(_ptr(a), a_stride, _ptr(h), h_stride, _ptr(slot), T, K, a.shape[1], _ptr(out), _threads())
    return out


class _Gather(torch.autograd.Function):
    """y[t] = Σ_j w[t, j] · h[slot[t, j]]; d/dh = scatter(dy; w), d/dw = rowdot(dy, h)."""

    @staticmethod
    def forward(ctx, h: Tensor, slot: Tensor, weight: Tensor | None) -> Tensor:
        ctx.save_for_backward(h, slot, weight)
        ctx.rows = h.shape[0]
        return _gather(h.detach(), slot, weight)

    @staticmethod
    def backward(ctx, grad: Tensor):
        h, slot, weight = ctx.saved_tensors
        dh = scatter_rows(grad, slot, weight, ctx.rows) if ctx.needs_input_grad[0] else None
        dw = rowdot(grad, h, slot) if weight is not None and ctx.needs_input_grad[2] else None
        return dh, None, dw


class _Scatter(torch.autograd.Function):
    """buf[slot[t, j]] = w[t, j] · x[t], other rows 0; d/dx = gather(dbuf; w), d/dw = rowdot(x, dbuf)."""

    @staticmethod
    def forward(ctx, x: Tensor, slot: Tensor, weight: Tensor | None, rows: int) -> Tensor:
        ctx.save_for_backward(x, slot, weight)
        return _scatter(x.detach(), slot, weight, rows)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, slot, weight = ctx.saved_tensors
        dx = gather_rows(grad, slot, weight) if ctx.needs_input_grad[0] else None
        dw = rowdot(x, grad, slot) if weight is not None and ctx.needs_input_grad[2] else None
        return dx, None, dw, None


class _RowDot(torch.autograd.Function):
    """r[t, j] = <a[t], h[slot[t, j]]>; d/da = gather(h; dr), d/dh = scatter(a; dr)."""

    @staticmethod
    def forward(ctx, a: Tensor, h: Tensor, slot: Tensor) -> Tensor:
        ctx.save_for_backward(a, h, slot)
        return _rowdot(a.detach(), h.detach(), slot)

    @staticmethod
    def backward(ctx, grad: Tensor):
        a, h, slot = ctx.saved_tensors
        da = gather_rows(h, slot, grad) if ctx.needs_input_grad[0] else None
        dh = scatter_rows(a, slot, grad, h.shape[0]) if ctx.needs_input_grad[1] else None
        return da, dh, None


def gather_rows(h: Tensor, slot: Tensor, weight: Tensor | None = None) -> Tensor:
    """(T, D): ``y[t] = Σ_j weight[t, j] · h[slot[t, j]]`` over the j with ``slot[t, j] >= 0``
    (``weight`` None: 1). ``h``: (R, D) float32; ``slot``: (T, K) int64, contiguous."""
    return _Gather.apply(h, slot, weight)


def scatter_rows(x: Tensor, slot: Tensor, weight: Tensor | None, rows: int) -> Tensor:
    """(rows, D): ``buf[slot[t, j]] = weight[t, j] · x[t]``, zeros in every row no slot names.
    Each row may be named by at most one (t, j)."""
    return _Scatter.apply(x, slot, weight, rows)


def rowdot(a: Tensor, h: Tensor, slot: Tensor) -> Tensor:
    """(T, K): ``<a[t], h[slot[t, j]]>``, 0 where ``slot[t, j] < 0``."""
    return _RowDot.apply(a, h, slot)


# ---- the layer with the kernels ------------------------------------------------------------------------


def native_token_choice(gates, k, capacity, *, select=None, batch_priority=False, renormalize=False):
    """:func:`visionmoe.routing.token_choice` with the top-k and positions from ``vmoe_topk_route``."""
    if batch_priority or select is not None or renormalize:
        return token_choice(gates, k, capacity, select=select, batch_priority=batch_priority, renormalize=renormalize)
    G, S, E = gates.shape
    expert, position, kept, _ = topk_route(gates, k, capacity)
    token = torch.arange(S).repeat(G, k)  # (G, A): token s for every choice j
    if capacity is None:
        capacity = int(position.max()) + 1 if position.numel() else 1
    weight = gates.reshape(G, S * E).gather(1, token * E + expert) * kept
    return Routing(token, expert, position, weight, kept, S, E, capacity, choices=k)


def native_token_choice_moe(x: Tensor, plan: Routing, experts, backend: str = "sorted") -> Tensor:
    """:func:`visionmoe.layers.dispatch.token_choice_moe` for plans in token order, its row moves native:
    each token's K buffer rows one row of a (G·S, K) slot map, the dispatch one scatter into the experts'
    rows (empty ones zero), the combine one gather of each token's K rows summed with their gates."""
    G, S, D = x.shape
    K, E, C = plan.choices, plan.num_experts, plan.capacity
    if not torch.equal(plan.token[:, :S], torch.arange(S).expand(G, S)):
        return dispatch.token_choice_moe(x, plan, experts, backend)  # Batch Prioritized Routing
    if backend == "padded":  # expert e's slot c of group g at row e·G·C + g·C + c
        base = torch.arange(E)[None, :] * (G * C) + torch.arange(G)[:, None] * C  # (G, E)
        rows = E * G * C
    else:  # the kept rows sorted by expert, then group: counting_sort's order
        per_group = plan.token.new_zeros(G, E).scatter_add_(1, plan.expert, plan.kept.long())  # (G, E)
        counts = per_group.sum(0)  # (E,)
        base = (counts.cumsum(0) - counts) + (per_group.cumsum(0) - per_group)
        rows = int(counts.sum())
    slot = slot_map(plan.expert, plan.position, plan.kept, base, S)  # (G·S, K)
    buffer = scatter_rows(x.reshape(G * S, D), slot, None, rows)  # (rows, D)
    if backend == "padded":
        h = experts(buffer.reshape(E, G * C, D), "batched").reshape(rows, D)
    else:
        h = experts(buffer, "sorted", counts)
    weight = plan.weight.reshape(G, K, S).transpose(1, 2).reshape(G * S, K)  # (G·S, K) token-major
    return gather_rows(h, slot, weight.to(h.dtype)).reshape(G, S, D)


@contextlib.contextmanager
def native_path() -> Iterator[None]:
    """The layer with the kernels: routing (top-k, positions, load-loss threshold) and row moves."""
    saved = (routers.token_choice, dispatch.token_choice_moe, losses._kth_largest)
    routers.token_choice = native_token_choice
    dispatch.token_choice_moe = native_token_choice_moe
    losses._kth_largest = kth_largest
    try:
        yield
    finally:
        routers.token_choice, dispatch.token_choice_moe, losses._kth_largest = saved


def check_equal(layer: MoE, x: Tensor) -> None:
    """The patched layer: the same output (bit for bit) and gradients (to rounding) as the layer's own."""
    outputs = []
    for patched in (False, True):
        with native_path() if patched else contextlib.nullcontext():
            torch.manual_seed(1)  # the same router noise
            y = layer(x)
            grads = torch.autograd.grad(y.square().sum() + layer.aux_loss, [x, *layer.parameters()])
        outputs.append((y, grads))
    (y0, g0), (y1, g1) = outputs
    if not torch.equal(y0, y1):
        raise AssertionError(f"native output differs by {(y0 - y1).abs().max():.3g}")
    for a, b in zip(g0, g1, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--widths", nargs="+", type=int, default=[8, 16, 32])
    parser.add_argument("--ratios", nargs="+", type=float, default=[1.0, 2.0, 4.0])
    parser.add_argument("--backends", nargs="+", default=["padded", "sorted"], choices=["padded", "sorted"])
    args = parser.parse_args(argv)
    keep_freed_memory()
    torch.set_num_threads(args.threads)
    with visionmoe.native.disabled():  # the router's ATen path in both columns (see above)
        probe(args)
    return 0


def probe(args: argparse.Namespace) -> None:
    if _library() is None:
        raise SystemExit(f"the kernels did not build: {_error}")
    print(benchmark_header("MoE layer at CNN stage shapes: native routing and row moves vs ATen", args.threads))
    print(
        "\n| D | H | positions | backend | twin FFN ms | ATen ms | native ms | native / ATen "
        "| router ATen ms | router native ms | ATen / twin | native / twin |\n|" + "---|" * 12
    )
    shapes = sorted(
        {(w * 2**s, int(r * w * 2**s), 32 // 2**s) for w in args.widths for r in args.ratios for s in range(3)}
    )
    for D, H, side in shapes:
        x = torch.randn(args.batch, D, side, side).to(memory_format=torch.channels_last).requires_grad_()
        tokens = x.detach().permute(0, 2, 3, 1).reshape(args.batch, side * side, D).requires_grad_()
        twin = nn.Sequential(nn.Linear(D, 2 * H), nn.GELU(), nn.Linear(2 * H, D))
        rows = tokens.detach().reshape(-1, D).requires_grad_()
        for backend in args.backends:
            layer = MoE(D, 8, H, k=2, backend=backend)
            check_equal(layer, x)

            def step(layer: MoE = layer, x: Tensor = x) -> None:
                (layer(x).square().mean() + layer.aux_loss).backward()

            def router(layer: MoE = layer, tokens: Tensor = tokens) -> None:
                routed = layer.router(tokens)
                (routed.plan.weight.sum() + routed.aux_loss).backward()

            def patched(fn) -> Callable[[], None]:
                def run() -> None:
                    with native_path():
                        fn()

                return run

            fns = {
                "twin": lambda twin=twin, rows=rows: twin(rows).square().mean().backward(),
                "aten": step,
                "native": patched(step),
                "router aten": router,
                "router native": patched(router),
            }
            times = interleaved_times(fns, threads=args.threads, repeats=args.repeats)
            ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
            print(
                f"| {D} | {H} | {side}² | {backend} | {ms['twin']:.2f} | {ms['aten']:.2f} | {ms['native']:.2f} | "
                f"{ms['native'] / ms['aten']:.2f} | {ms['router aten']:.2f} | {ms['router native']:.2f} | "
                f"{ms['aten'] / ms['twin']:.2f} | {ms['native'] / ms['twin']:.2f} |",
                flush=True,
            )
    print(f"\nBatch {args.batch}, fp32, forward + backward, median of {args.repeats} interleaved repeats.")


if __name__ == "__main__":
    sys.exit(main())
