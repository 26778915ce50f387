"""Speed of MoE layers: a timer, the layer benchmark (dense, our backends, einsum, peer packages) and the
realised speed-up of sparse inference.

Axes as in :mod:`visionmoe.routing.plan`: G groups (here one per image), S tokens per group, E experts,
C capacity, K experts per token, D width, H expert hidden width (4·D in the layer benchmark).

Every comparison is timed in one run on one input and reported as a ratio to the dense FFN of equal
active FLOPs timed in that same run: a busier or slower machine moves all rows together, and only the
ratios are compared across machines.
"""

from __future__ import annotations

import csv
import importlib
import math
import os
import platform
import shlex
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

from visionmoe import native
from visionmoe.allocator import KEPT, keep_freed_memory, kept
from visionmoe.analysis.profile import profile_model
from visionmoe.layers.dispatch import einsum_moe
from visionmoe.layers.moe import MoE
from visionmoe.routing.plan import Routing

Shape = tuple[int, int, int, int, int, float | None]  # (images, tokens/image, D, E, K, capacity factor or None)
MODES = ("fwd", "fwdbwd")
PEERS = ("mixture_of_experts", "st_moe_pytorch", "soft_moe_pytorch")  # import names of the peer packages
IMPLEMENTATIONS = (
    "dense",
    "visionmoe:auto",
    "visionmoe:sorted",
    "visionmoe:padded",
    "visionmoe:grouped",
    "einsum",
    "visionmoe:soft",
    *PEERS,
)
TARGET_SHAPE: Shape = (8, 1024, 512, 8, 2, 1.25)  # 8 images × 32×32 patch tokens, d=512, E=8, top-2
QUICK_SHAPE: Shape = (2, 64, 32, 4, 2, 1.25)  # seconds: checks that everything runs, measures nothing
NO_NOISE = {"noise_std": 0.0}  # noise would make the plans, hence the work, differ between repeats


@dataclass(frozen=True)
class Timing:
    """Seconds per call: the median and inter-quartile range of ``times``, one value per repeat."""

    median: float
    iqr: float
    times: list[float]


def time_fn(fn: Callable[[], Any], *, threads: int, repeats: int, min_run_time: float = 0.02) -> Timing:
    """Time ``fn()`` with :class:`torch.utils.benchmark.Timer` on ``threads`` threads.

    One warm-up call (it pays for allocations, lazy initialisation and starting the thread pool), then
    ``repeats`` measurements, each the mean of enough back-to-back calls to last about ``min_run_time``
    seconds, so that timer overhead does not dominate tiny shapes.
    """
    from torch.utils import benchmark  # lazy: it loads setuptools, which only timing needs

    if repeats < 1 or threads < 1:
        raise ValueError(f"need repeats >= 1 and threads >= 1, got repeats={repeats}, threads={threads}")
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
    first = timer.timeit(1).median  # warm-up
    number = max(1, math.ceil(min_run_time / max(first, 1e-9)))
    times = [timer.timeit(number).median for _ in range(repeats)]  # median of one block = its mean per call
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return Timing(statistics.median(times), q[2] - q[0], times)


class EinsumMoE(nn.Module):
    """An :class:`MoE`'s routing executed by :func:`einsum_moe`: the GShard / V-MoE one-hot dispatch.

    Shares the wrapped layer's router and experts, so its output equals the layer's for the same plan.
    Takes (B, N, D) tokens, grouped as the layer groups them.
    """

    def __init__(self, moe: MoE) -> None:
        super().__init__()
        self.moe = moe
        self.last_plan: Routing | None = None  # of the latest forward, to count what it processed

    def forward(self, x: Tensor) -> Tensor:
        grouped = self.moe.group(x)  # (G, S, D)
        self.last_plan = self.moe.router(grouped).plan
        return einsum_moe(grouped, self.last_plan, self.moe.experts).reshape(x.shape)


class _Skip(Exception):
    """An implementation that cannot run this configuration (the message says why)."""


def _import_peer(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise _Skip(f"not importable ({err.__class__.__name__})") from None


def _topk_moe(shape: Shape, backend: str) -> MoE:
    _, _, d, E, k, cf = shape
    kw = dict(k=k, capacity_factor=cf, backend=backend, router_options=NO_NOISE, aux_loss_weights={})
    return MoE(d, E, 4 * d, router="topk", **kw)


def _dispatch_counts(dispatch: Tensor) -> dict[str, int]:
    """What a (B, S, E, C) one-hot dispatch tensor processes: kept assignments, executed slots, C."""
    B, _, E, C = dispatch.shape
    # count_nonzero, not sum: st-moe's straight-through dispatch is 1 + c - c, not always exactly 1.0
    return {"assignments": int(torch.count_nonzero(dispatch)), "expert_rows": B * E * C, "capacity": C}


def _gate_counter(gate: nn.Module) -> Callable[[], dict[str, int]]:
    """Counts of the peer's latest gating call, read from its dispatch tensor by a forward hook."""
    seen: dict[str, Tensor] = {}
    gate.register_forward_hook(lambda module, args, out: seen.update(dispatch=out[0].detach()))
    return lambda: _dispatch_counts(seen["dispatch"])


def _build(name: str, shape: Shape) -> tuple[nn.Module, Callable[[], dict[str, int | None]], str]:
    """The module, a function reading what its latest forward processed, and a note on its settings."""
    images, n, d, E, k, cf = shape
    H, G = 4 * d, images
    slots = max(1, k * n // E)  # Soft MoE: E·P slots per image = K·S token-expert pairs' worth of work
    if name == "dense":  # every token through one FFN of width K·H: the active FLOPs of K experts
        return MoE(d, 1, k * H, router="dense"), lambda: {"expert_rows": G * n * k}, "one FFN of width k·H"
    if name in ("visionmoe:auto", "visionmoe:sorted", "visionmoe:padded", "visionmoe:grouped"):
        backend = name.split(":")[1]
        moe = _topk_moe(shape, backend)
        seen: dict[str, int] = {}  # C of the latest plan (dropless: its largest load, what padded executes)
        moe.router.register_forward_hook(lambda module, args, out: seen.update(C=out.plan.capacity))

        def count() -> dict[str, int | None]:
            assignments, C = int(moe.last_stats.tokens_per_expert.sum()), seen["C"]
            return dict(
                assignments=assignments, expert_rows=G * E * C if backend == "padded" else assignments, capacity=C
            )

        return moe, count, ""
    if name == "einsum":
        wrapper = EinsumMoE(_topk_moe(shape, "sorted"))

        def count() -> dict[str, int | None]:
            plan = wrapper.last_plan
            return dict(assignments=int(plan.kept.sum()), expert_rows=G * E * plan.capacity, capacity=plan.capacity)

        return wrapper, count, "dense (G, S, E, C) dispatch/combine"
    soft_counts = {"assignments": G * E * slots, "expert_rows": G * E * slots, "capacity": slots}
    if name == "visionmoe:soft":
        moe = MoE(d, E, H, router="soft", router_options={"slots_per_expert": slots})
        return moe, lambda: soft_counts, f"P={slots} slots/expert; assignments = slots; vs dense of width k·H"
    if name not in PEERS:
        raise ValueError(f"unknown implementation {name!r}; choose from: {', '.join(IMPLEMENTATIONS)}")
    if cf is None and name != "soft_moe_pytorch":
        raise _Skip("dropless (capacity factor None): its gating needs a capacity factor")
    peer = _import_peer(name)
    if name == "mixture_of_experts":
        if k > 2:
            raise _Skip("top-2 gating only")
        # 'all' routes every second choice (the default 'random' drops them by chance); 'none' gives top-1.
        # Mismatches: C = int(S·cf/E) (at least 4) shared by both choices where ours is ceil(K·S·cf/E);
        # gates renormalised over the top 2; unscaled randn gate weights (peakier gates, so more
        # drops); experts without biases; it always computes its balance loss.
        policy = "all" if k == 2 else "none"
        kw = dict(
            second_policy_train=policy, second_policy_eval=policy, capacity_factor_train=cf, capacity_factor_eval=cf
        )
        model = peer.MoE(d, num_experts=E, hidden_dim=H, activation=nn.GELU, **kw)
        note = "C = int(S·cf/E) shared by both choices" if k == 2 else "top-1: second_policy='none'; C = int(S·cf/E)"
        return model, _gate_counter(model.gate), f"{note}; no expert bias"
    if name == "st_moe_pytorch":
        if k < 2:
            raise _Skip("TopNGating needs top_n >= 2")
        # Threshold 0 (clamped to eps) routes every k-th choice: the default 0.2 drops them at random.
        # Our GELU FFN as experts (its default is a GEGLU of width 2/3·4·D, other FLOPs). Mismatches:
        # capacity int(S·cf/E) (at least 4) shared by all k choices; gates renormalised over the top k;
        # straight-through dispatch (extra backward work); balance and z losses always computed; a
        # Python loop over experts that also moves each expert .to(device) every call.
        experts = nn.ModuleList(nn.Sequential(nn.Linear(d, H), nn.GELU(), nn.Linear(H, d)) for _ in range(E))
        kw = dict(threshold_train=0.0, threshold_eval=0.0, capacity_factor_train=cf, capacity_factor_eval=cf)
        model = peer.MoE(d, num_experts=E, gating_top_n=k, experts=experts, is_distributed=False, **kw)
        return model, _gate_counter(model.gate), "C = int(S·cf/E) shared by all k choices"
    # soft_moe_pytorch: num_slots is P per expert (it takes seq_len or num_slots, not both). Mismatches:
    # it RMS-normalises the tokens the experts see and the slot embeddings (we normalise only to compute
    # the logits); its RMSNorm gains replace our learnable logit scale. offload_unused_experts_to_cpu=False:
    # the default moves every expert .to(device) each call, for expert parallelism we don't use.
    model = peer.SoftMoE(
        d, num_experts=E, num_slots=slots, expert_mult=H / d, is_distributed=False, offload_unused_experts_to_cpu=False
    )
    return model, lambda: soft_counts, f"P={slots}; RMSNorm on tokens and slots"


def _step(model: nn.Module, x: Tensor, mode: str) -> Callable[[], None]:
    """One timed call: a forward without grad, or a training forward and backward."""

    def fwd() -> None:
        with torch.no_grad():
            model(x)

    def fwdbwd() -> None:
        model.zero_grad(set_to_none=True)
        out = model(x)  # peers return (output, losses...): time the output's backward only
        (out if isinstance(out, Tensor) else out[0]).sum().backward()

    return fwd if mode == "fwd" else fwdbwd


def interleaved_times(
    fns: dict[str, Callable[[], Any]], *, threads: int, repeats: int, min_run_time: float = 0.02
) -> dict[str, list[float]]:
    """Seconds per call of each function, measured round-robin: repeat r times every function once.

    Each function gets one warm-up call and a block size (calls per measurement) of about
    ``min_run_time`` seconds; then the repeats interleave the functions, starting each round one
    function later, so that a slow moment of the machine hits every function alike.
    """
    from torch.utils import benchmark  # lazy, as in time_fn

    if repeats < 1 or threads < 1:
        raise ValueError(f"need repeats >= 1 and threads >= 1, got repeats={repeats}, threads={threads}")
    timers, numbers = {}, {}
    for name, fn in fns.items():
        timers[name] = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
        first = timers[name].timeit(1).median  # warm-up
        numbers[name] = max(1, math.ceil(min_run_time / max(first, 1e-9)))
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(timers[name].timeit(numbers[name]).median)
    return times


def iqr(values: Sequence[float]) -> float:
    """Interquartile range (0 for fewer than two values)."""
    if len(values) < 2:
        return 0.0
    q = statistics.quantiles(values, n=4)
    return q[2] - q[0]


def layer_benchmark(
    shapes: Sequence[Shape],
    *,
    threads: int,
    repeats: int,
    implementations: Sequence[str] = IMPLEMENTATIONS,
    mode: str = "fwdbwd",
    min_run_time: float = 0.02,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Time each implementation on each shape (images, S, D, E, K, cf) with H = 4·D; one row each.

    All implementations of a shape are timed round-robin (:func:`interleaved_times`). Rows: the shape,
    ``implementation``, ``median`` and ``iqr`` seconds (None when skipped, with the reason in
    ``note``), ``vs_dense`` and ``vs_dense_iqr`` (median and IQR over repeats of time / the dense
    time of the same repeat), ``assignments`` (kept
    token-expert assignments; Soft MoE: slots), ``expert_rows`` (rows the expert GEMMs execute, capacity
    padding included; dense: K per token), ``capacity`` (C), and ``per_assignment_vs_dense``: time per
    assignment over the dense FFN's time per token-expert pair (K per token). "dense" is always run.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if unknown := sorted(set(implementations) - set(IMPLEMENTATIONS)):
        raise ValueError(f"unknown implementations {unknown}; choose from: {', '.join(IMPLEMENTATIONS)}")
    names = ["dense", *(name for name in implementations if name != "dense")]
    rows: list[dict[str, Any]] = []
    for shape in shapes:
        images, n, d, E, k, cf = shape
        base = dict(images=images, tokens_per_image=n, tokens=images * n, dim=d, hidden=4 * d, num_experts=E, k=k)
        base.update(capacity_factor=cf, mode=mode, threads=threads, implementation="", median=None, iqr=None)
        base.update(assignments=None, expert_rows=None, capacity=None, note="", vs_dense_iqr=None)
        x = torch.randn(images, n, d, generator=torch.Generator().manual_seed(seed))
        shape_rows, steps = [], {}
        for name in names:
            row = base | {"implementation": name}
            torch.manual_seed(seed)
            try:
                model, count, row["note"] = _build(name, shape)
            except _Skip as skip:
                shape_rows.append(row | {"note": f"skipped: {skip}"})
                continue
            model.train(mode == "fwdbwd")
            with torch.no_grad():
                model(x)  # one pass in the timed mode, to read what it processes
            row.update(count())
            steps[name] = _step(model, x, mode)
            shape_rows.append(row)
        times = interleaved_times(steps, threads=threads, repeats=repeats, min_run_time=min_run_time)
        per_pair = statistics.median(times["dense"]) / (images * n * k)  # dense seconds per token-expert pair
        for row in shape_rows:
            name = row["implementation"]
            if name not in times:
                row["vs_dense"] = row["per_assignment_vs_dense"] = None
                continue
            # Ratios are taken repeat by repeat (the same moment of the machine for both rows), then
            # summarised: drift of a shared machine cancels instead of landing on one row.
            ratios = [t / dense for t, dense in zip(times[name], times["dense"], strict=True)]
            row.update(median=statistics.median(times[name]), iqr=iqr(times[name]))
            row.update(vs_dense=statistics.median(ratios), vs_dense_iqr=iqr(ratios))
            per_pair_ratio = None  # seconds per processed assignment / dense seconds per token-expert pair
            if row["assignments"]:
                per_pair_ratio = row["median"] / row["assignments"] / per_pair
            row["per_assignment_vs_dense"] = 1.0 if name == "dense" else per_pair_ratio
        rows += shape_rows
    return rows


def inference_speedup(
    *,
    threads: int,
    repeats: int,
    batch_sizes: Sequence[int] = (1, 4, 16, 64, 256, 1024),
    token_batch_sizes: Sequence[int] = (1, 4, 16, 64, 256),
    head_dim: int = 512,
    head_hidden: int = 512,
    block_dim: int = 192,
    block_hidden: int = 768,
    tokens_per_image: int = 64,
    num_experts: int = 8,
    capacity_factor: float = 1.25,
    min_run_time: float = 0.02,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Realised vs theoretical speed-up of top-1 inference over running all E experts.

    Two cases, eval mode, no grad, forward only: ``head``, a sparse head on (B, head_dim) vectors
    whose capacity is shared by the batch (groups="batch"), and ``block``, an MoE MLP block on
    (B, tokens_per_image, block_dim) tokens grouped per image. The reference is the same layer
    running all E experts (the "dense" router with the same E and H). Theoretical speed-up =
    FLOPs(all) / FLOPs(top-1), total model FLOPs from :func:`visionmoe.analysis.profile_model` (the router
    and any dropped assignments included); realised = median over interleaved repeats of
    time(all) / time(top-1).
    """
    cases = [("head", b, (b, head_dim), head_hidden, "batch") for b in batch_sizes]
    cases += [("block", b, (b, tokens_per_image, block_dim), block_hidden, "sample") for b in token_batch_sizes]
    rows = []
    for case, batch, size, hidden, groups in cases:
        d = size[-1]
        torch.manual_seed(seed)
        kw = dict(k=1, capacity_factor=capacity_factor, groups=groups, aux_loss_weights={})
        sparse = MoE(d, num_experts, hidden, router="topk", **kw)
        full = MoE(d, num_experts, hidden, router="dense")  # every token through all E experts
        x = torch.randn(size, generator=torch.Generator().manual_seed(seed))
        flops_top1, flops_all = profile_model(sparse, x).total_flops, profile_model(full, x).total_flops
        dropped = sparse.last_stats.dropped_fraction  # of the profiled (eval) forward
        steps = {"top1": _step(sparse.eval(), x, "fwd"), "all": _step(full.eval(), x, "fwd")}
        times = interleaved_times(steps, threads=threads, repeats=repeats, min_run_time=min_run_time)
        t_top1 = Timing(statistics.median(times["top1"]), iqr(times["top1"]), times["top1"])
        t_all = Timing(statistics.median(times["all"]), iqr(times["all"]), times["all"])
        theoretical = flops_all / flops_top1
        realised = statistics.median(a / b for a, b in zip(times["all"], times["top1"], strict=True))
        row = dict(case=case, batch=batch, tokens=math.prod(size[:-1]), dim=d, hidden=hidden, num_experts=num_experts)
        row.update(groups=groups, threads=threads, dropped=dropped, flops_top1=flops_top1, flops_all=flops_all)
        row.update(seconds_top1=t_top1.median, iqr_top1=t_top1.iqr, seconds_all=t_all.median, iqr_all=t_all.iqr)
        rows.append(
            row | dict(theoretical=theoretical, realised=realised, realised_over_theoretical=realised / theoretical)
        )
    return rows


def machine_info(threads: int) -> dict[str, str]:
    """CPU model, core count, torch version, thread count and what malloc does with freed memory
    (:func:`visionmoe.allocator.keep_freed_memory`), for a benchmark's header."""
    cpu = platform.processor() or platform.machine()
    try:
        names = [
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    info = {"cpu": cpu, "cores": str(os.cpu_count()), "torch": torch.__version__, "threads": str(threads), "gpu": gpu}
    return {**info, "malloc": KEPT if kept() else "defaults"}  # it moves large-batch CPU timings (allocator.py)


def benchmark_header(title: str, threads: int, argv: Sequence[str] | None = None) -> str:
    """A Markdown heading, the exact command line (``sys.argv`` by default) and the machine."""
    info = machine_info(threads)
    command = shlex.join([Path(sys.executable).name, *(sys.argv if argv is None else argv)])
    return (
        f"## {title}\n\nCommand: `{command}`\n\nMachine: {info['cpu']}, {info['cores']} cores, GPU {info['gpu']}, "
        f"torch {info['torch']}, threads={info['threads']}, malloc {info['malloc']}"
    )


def start_native_benchmark(title: str, threads: int) -> bool:
    """The start of a micro-benchmark of :mod:`visionmoe.native`'s kernels: False, the reason on stderr,
    where they cannot run; else freed memory kept (no page faults in the timings), torch on ``threads``
    threads and the header printed."""
    if not native.available():
        print(f"no native kernels here: {native.unavailable_reason()}", file=sys.stderr)
        return False
    keep_freed_memory()
    torch.set_num_threads(threads)
    print(benchmark_header(title, threads))
    return True


def fmt(value: Any, spec: str = ".3g") -> str:
    """A table cell: '—' for None, ``spec`` for floats, str() otherwise."""
    if value is None:
        return "—"
    return format(value, spec) if isinstance(value, float) else str(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, Callable[[dict], str]]]) -> str:
    """A Markdown table with one column per (header, cell function)."""
    lines = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row) for _, cell in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_csv(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Rows to CSV (columns in first-seen order); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path
