"""One training step of a CIFAR CNN with MoE in every stage against its dense twin (issue 22).

Each cell builds ``cnn_resnet_cifar_moe`` or ``cnn_dw_cifar_moe`` (E = 8, top-2, capacity factor 1.25,
per-image groups, the default V-MoE losses) with ``moe_stages="all"`` at one width and hidden ratio,
and its dense twin of equal active FLOPs (:func:`visionmoe.analysis.dense_twin`, FFNs of width 2·H).
A step is forward, backward and SGD on a random channels-last batch, fp32, as the trainer runs it.
The MoE model is timed once per backend given (the same weights; only ``MoE.backend`` changes), all
of them interleaved round-robin with the twin in one process; each cell reports the median over
repeats of (MoE step / twin step in the same repeat).

    python benchmarks/cnn_moe_step.py --threads 2 --repeats 9 --batch 128

``--before`` adds a column for the code before issue 22, run in the same process on the same weights:
plans without ``Routing.choices`` (the argsort + ``index_add_`` dispatch, and ``auto``'s earlier choice),
a full sort for the top-k, ``topk`` for the load loss's threshold and the router softmax along the last
axis. Every path but the softmax is exact (that one differs in the last bit), so only the speed differs.

``--aten`` adds a column for the first backend with the fused native router switched off
(:func:`visionmoe.native.disabled`: the router's ATen path, as before it), in the same repeats.

``--vit`` instead re-runs ViT-sized shapes of the layer benchmark (benchmarks/layer_speed.py: images ×
1024 tokens, d = 512, H = 2048, E = 8, top-2, capacity factor 1.25, no router noise, forward + backward)
with the layer as it is (``auto``) and as it was (``before``), against the dense FFN of width 2·H.

``--compile`` adds a column for the MoE model under ``torch.compile`` (inductor; ``auto`` then runs
``padded``, the static-shape path) over its twin, also compiled, in the same repeats.

``--nodes`` adds a column for the first backend with a no-op forward hook on every router: the router and
the experts then run as their own autograd nodes (:meth:`visionmoe.layers.Router.fused_layer` steps aside
for a watched router), the fourteenth pass's path; otherwise the whole token-choice layer is one node
(:func:`visionmoe.native.topk_moe`). The same results bit for bit; only the speed differs.

``--floor`` adds the column "floor": 1 + (the routers alone / twin step), where "the routers alone" is
forward and backward of every MoE layer's router (logits, softmax, top-2, capacity positions, gate
weights, aux losses) on the tokens that layer sees, nothing else, timed in the same repeats. It is the
step the MoE would take if dispatch, experts and combine together cost what the twin's FFN does (equal
active FLOPs): an estimate of what faster dispatch or expert kernels can reach while the routing maths
stays as it is. Not a strict bound: the experts skip the assignments dropped for capacity, and the
routers alone run their own backward pass.

``--experts-only`` adds the column "experts only": the MoE model's step with every MoE layer reduced to
its experts (:func:`experts_only`: the layer's tokens as E contiguous blocks through the experts' batched
GEMMs, K times, so exactly the twin's FFN FLOPs; no router, dispatch, padding or aux loss) over the twin's
step. With ``--floor`` it adds "bound" = floor + experts only − 1: the step if the routers cost what
they cost alone, the experts what they cost alone, and dispatch and combine nothing. The experts'
column says what small batched GEMMs cost against the twin's one wide GEMM, whatever the routing.

``--layer-grid`` instead times the MoE layer alone (forward and backward, training mode, the default
losses) at the shapes of every stage of every cell (D = width · 2^stage, H = ratio · D, 32², 16² and 8²
positions per image, ``--batch`` images), with ``padded`` and ``sorted`` interleaved, for GELU and ReLU
experts: the measurement behind ``auto``'s choice between them
(:data:`visionmoe.layers.dispatch.PADDED_HIDDEN_VALUES`). With ``--all-experts`` it adds a candidate
the issue named and the layer does not take: every expert on every token, weighted by the plan's
combine matrix (:func:`all_experts_masked`: two GEMMs of width E·H, no sort, gather or scatter), timed
in the same repeats, with its largest difference from ``auto``'s output.

``--layer-grid --loops`` times the ``fused`` backend's loops (tiled per block of tokens, tiled by expert:
:data:`visionmoe.native.FFN_LOOPS`, :func:`visionmoe.native.ffn_loop`), against
``padded`` and ``sorted`` at the same shapes: the
measurement behind which loop ``fused`` takes and where ``auto`` takes ``fused``.

``--profile`` instead prints the torch.profiler table of one MoE step of the first cell, its time
broken down by operator; with ``--callers N`` also the N places in visionmoe whose ATen calls take the
most time per step (each outermost ATen call charged to the nearest visionmoe line up its Python stack,
or to the autograd node that ran it in the backward): where the many small operators come from. The C
kernels called through ctypes are not ATen calls; the custom autograd Functions' own rows show them.
``--router-noise 0`` builds the MoE models without router noise (and so with the importance loss alone,
no load loss): the same layers with a router that does less arithmetic per token.

``--quick`` runs one tiny cell to check the script, measuring nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import sys
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import visionmoe.layers.moe
import visionmoe.layers.routers
import visionmoe.routing.losses
import visionmoe.routing.plan
from visionmoe import native
from visionmoe.allocator import keep_freed_memory
from visionmoe.analysis.speed import NO_NOISE, benchmark_header, interleaved_times, iqr
from visionmoe.analysis.twin import dense_twin
from visionmoe.layers.dispatch import BACKENDS, apply_plan, choose_backend
from visionmoe.layers.moe import MoE, collect_aux_loss, moe_layers
from visionmoe.models import create_model

BACKBONES = {"standard": "cnn_resnet_cifar_moe", "depthwise": "cnn_dw_cifar_moe"}
GOAL = 1.15


def add_cell_arguments(parser: argparse.ArgumentParser) -> None:
    """The options naming one cell of the grid and how to time it, for the scripts that study one cell."""
    parser.add_argument("--backbone", choices=list(BACKBONES), default="standard")
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--ratio", type=float, default=1.0)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)


ROUTER_NOISE: float | None = None
"""``--router-noise``: the routers' noise_std (None: the default, 1/E, with the load loss; 0: no noise, and
the importance loss alone)."""


def build(backbone: str, width: int, ratio: float, batch: int, seed: int = 0):
    """The MoE model, its twin and a step function for each: (moe, twin, step(model))."""
    torch.manual_seed(seed)
    moe_config = {} if ROUTER_NOISE is None else {"router_options": {"noise_std": ROUTER_NOISE}}
    moe = create_model(BACKBONES[backbone], width=width, hidden_ratio=ratio, moe_stages="all", moe=moe_config)
    twin = dense_twin(moe, match="flops")
    x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))

    def stepper(model: torch.nn.Module, compiled: bool = False):
        model = model.to(memory_format=torch.channels_last).train()
        optim = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        forward = torch.compile(model) if compiled else model  # the same weights, traced by inductor

        def step() -> None:
            optim.zero_grad(set_to_none=True)
            loss = F.cross_entropy(forward(x), y) + collect_aux_loss(model)
            loss.backward()
            optim.step()

        return step

    return moe, twin, stepper


@contextlib.contextmanager
def before_issue_22() -> Iterator[None]:
    """The layer as it ran before issue 22: argsort dispatch, sort top-k, topk threshold, last-axis softmax."""

    def old_apply_plan(x, plan, experts, backend="auto", deterministic=False):
        if isinstance(plan, visionmoe.routing.plan.Routing):
            plan = dataclasses.replace(plan, choices=None)  # auto then decides as it did
        return apply_plan(x, plan, experts, backend, deterministic)

    modules = (visionmoe.layers.moe, visionmoe.routing.plan, visionmoe.routing.losses, visionmoe.layers.routers)
    names = ("apply_plan", "SMALL_K", "_kth_largest", "softmax_experts")
    saved = [getattr(module, name) for module, name in zip(modules, names, strict=True)]
    before = (old_apply_plan, 0, lambda x, k: x.topk(k, dim=-1).values[..., -1:], lambda t: t.softmax(dim=-1))
    for module, name, value in zip(modules, names, before, strict=True):
        setattr(module, name, value)
    try:
        with native.disabled():  # nor the fused router, which came after
            yield
    finally:
        for module, name, value in zip(modules, names, saved, strict=True):
            setattr(module, name, value)


@contextlib.contextmanager
def experts_only() -> Iterator[None]:
    """Every MoE layer runs its experts alone: no router, no dispatch, no padding, no aux loss. The
    B·N tokens of a layer, viewed as E contiguous blocks of B·N/E rows, go through the experts' batched
    GEMMs K times (K = the router's k), so the experts do exactly the twin's FFN FLOPs; the K outputs
    are summed. The most favourable case for experts run by library GEMMs: what an MoE layer would
    cost if routing and dispatch were free. (Not the layer's results: only its experts' cost.)"""

    def forward(self: MoE, x: torch.Tensor) -> torch.Tensor:
        tokens, restore = self.to_tokens(x)
        B, N, D = tokens.shape
        E, K = self.num_experts, self.router.k
        rows = tokens.reshape(E, B * N // E, D)  # a view for channels-last maps
        y = self.experts.forward_batched(rows)
        for _ in range(K - 1):
            y = y + self.experts.forward_batched(rows)
        self.aux_loss = None
        return restore(y.reshape(B, N, D))

    saved = MoE.forward
    MoE.forward = forward
    try:
        yield
    finally:
        MoE.forward = saved


@contextlib.contextmanager
def watched_routers(model: torch.nn.Module) -> Iterator[None]:
    """A no-op forward hook on every MoE layer's router: each layer then calls its router, then its dispatch."""
    handles = [layer.router.register_forward_hook(lambda *_: None) for _, layer in moe_layers(model)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def set_backend(model: torch.nn.Module, backend: str) -> None:
    for _, layer in moe_layers(model):
        layer.backend = backend


def measure(backbone: str, width: int, ratio: float, args: argparse.Namespace) -> dict[str, list[float]]:
    moe, twin, stepper = build(backbone, width, ratio, args.batch)
    steps = {"twin": stepper(twin)}
    moe_step = stepper(moe)
    for backend in args.backends:

        def step(backend: str = backend) -> None:
            set_backend(moe, backend)
            moe_step()

        steps[backend] = step
    if args.aten:

        def aten_step() -> None:
            set_backend(moe, args.backends[0])
            with native.disabled():
                moe_step()

        steps["aten"] = aten_step
    if args.nodes:

        def nodes_step() -> None:
            set_backend(moe, args.backends[0])
            with watched_routers(moe):
                moe_step()

        steps["nodes"] = nodes_step
    if args.before:

        def old_step() -> None:
            set_backend(moe, "auto")
            with before_issue_22():
                moe_step()

        steps["before"] = old_step
    if args.floor:
        steps["routers"] = routers_step(moe, args.batch)
    if args.experts_only:

        def experts_step() -> None:
            with experts_only():
                moe_step()

        steps["experts only"] = experts_step
    if args.compile:  # both compiled, each over its own optimiser state; compiling happens in the warm-up
        compiled_step = stepper(moe, compiled=True)

        def compiled() -> None:
            set_backend(moe, "padded")  # the static-shape path: one graph, no host sync (auto's choice there)
            compiled_step()

        steps["twin compiled"], steps["compiled"] = stepper(twin, compiled=True), compiled
        for name in ("twin compiled", "compiled"):
            for _ in range(2):  # the first calls trace and compile forward and backward
                steps[name]()
    times = interleaved_times(steps, threads=args.threads, repeats=args.repeats, min_run_time=args.min_run_time)
    ratios = {name: [t / tw for t, tw in zip(ts, times["twin"], strict=True)] for name, ts in times.items()}
    if args.floor:
        ratios["floor"] = [1 + r for r in ratios.pop("routers")]
        if args.experts_only:  # routers alone + experts alone: nothing for dispatch, combine or padding
            ratios["bound"] = [f + e - 1 for f, e in zip(ratios["floor"], ratios["experts only"], strict=True)]
    if args.compile:  # compiled MoE over the compiled twin of the same repeat
        ratios["compiled"] = [t / tw for t, tw in zip(times["compiled"], times["twin compiled"], strict=True)]
    return ratios | {"twin_seconds": times["twin"]}


def captured_groups(model: torch.nn.Module, batch: int) -> list[tuple[MoE, torch.Tensor]]:
    """(layer, its (G, S, D) routing groups) for every MoE layer of ``model``, captured by hooks in one
    training forward of a random ``batch``."""
    seen = []
    hooks = [
        layer.register_forward_pre_hook(lambda m, args: seen.append((m, m.group(m.to_tokens(args[0])[0]).detach())))
        for _, layer in moe_layers(model)
    ]
    model.train()
    with torch.no_grad():
        model(torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last))
    for hook in hooks:
        hook.remove()
    return seen


def routers_step(model: torch.nn.Module, batch: int):
    """Forward and backward of every MoE layer's router alone, on the routing groups it sees in one
    training forward of ``model`` (:func:`captured_groups`), summed into one backward as in a step."""
    seen = captured_groups(model, batch)

    def step() -> None:
        loss = torch.zeros(())
        for layer, tokens in seen:
            out = layer.router(tokens.requires_grad_())
            loss = loss + out.aux_loss + out.plan.weight.sum()  # the gate weights feed the combine
        loss.backward()
        for layer, tokens in seen:
            tokens.grad = None
            layer.router.zero_grad(set_to_none=True)

    return step


def all_experts_masked(x: torch.Tensor, plan: visionmoe.routing.plan.Routing, experts) -> torch.Tensor:
    """(G, S, D) -> (G, S, D): Σ_e c[t, e] · expert_e(x_t) over every expert, c the plan's (tokens, E)
    combine weights (0 for experts a token did not choose or was dropped by): the routed layer's sums
    in another order, computed densely (one FFN of width E·H whose hidden units are scaled by c)."""
    G, S, D = x.shape
    E, H = experts.num_experts, experts.hidden_dim
    cell = (plan.token + S * torch.arange(G)[:, None]) * E + plan.expert  # (G, A) flat (token, expert)
    c = x.new_zeros(G * S * E).index_add(0, cell.reshape(-1), plan.weight.reshape(-1).to(x.dtype))
    c = c.reshape(G * S, E)
    h = experts.act(
        torch.addmm(experts.b1.reshape(E * H), x.reshape(G * S, D), experts.w1.permute(1, 0, 2).reshape(D, E * H))
    )
    h = (h.reshape(G * S, E, H) * c[:, :, None]).reshape(G * S, E * H)
    return torch.addmm(c @ experts.b2, h, experts.w2.reshape(E * H, D)).reshape(G, S, D)


@contextlib.contextmanager
def fused_loop(loop: str) -> Iterator[None]:
    """The ``fused`` backend with its loop forced: one of :data:`native.FFN_LOOPS` (see :func:`native.ffn_loop`)."""
    saved = native.ffn_loop
    native.ffn_loop = lambda *_: loop
    try:
        yield
    finally:
        native.ffn_loop = saved


def layer_grid(args: argparse.Namespace) -> None:
    """sorted / padded for one MoE layer at each CNN stage shape, GELU and ReLU experts (see above)."""
    if args.loops:
        loop_grid(args)
        return
    extra = " all experts ms | all experts / auto | max abs diff |" if args.all_experts else ""
    print(
        "\n| activation | D | H | positions | G·A·H | padded ms | sorted ms | fused ms | sorted / padded "
        f"| fused / min(padded, sorted) | auto |{extra}"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|" + "---|" * (3 if args.all_experts else 0))
    for activation in (torch.nn.GELU, torch.nn.ReLU):
        for width in args.widths:
            for ratio in args.ratios:
                for stage, side in enumerate((32, 16, 8)):
                    dim = width * 2**stage
                    hidden = int(ratio * dim)
                    torch.manual_seed(0)
                    layer = MoE(dim, 8, hidden, router="topk", k=2, activation=activation).train()
                    x = torch.randn(args.batch, dim, side, side).contiguous(memory_format=torch.channels_last)
                    x.requires_grad_()

                    def step(backend: str, layer: MoE = layer, x: torch.Tensor = x) -> None:
                        layer.backend = backend
                        x.grad = None
                        layer.zero_grad(set_to_none=True)
                        if backend == "all experts":  # the layer's forward with the dispatch replaced
                            tokens = layer.group(layer.to_tokens(x)[0])
                            routed = layer.router(tokens)
                            y = all_experts_masked(tokens, routed.plan, layer.experts)
                            (y.square().mean() + routed.aux_loss).backward()
                            return
                        (layer(x).square().mean() + layer.aux_loss).backward()

                    candidates = ("padded", "sorted", "fused", *(("auto", "all experts") if args.all_experts else ()))
                    times = interleaved_times(
                        {b: lambda b=b: step(b) for b in candidates},
                        threads=args.threads,
                        repeats=args.repeats,
                        min_run_time=args.min_run_time,
                    )
                    padded, sorted_, fused = (statistics.median(times[b]) * 1e3 for b in ("padded", "sorted", "fused"))
                    layer.backend = "auto"
                    with torch.no_grad():
                        tokens = layer.group(layer.to_tokens(x)[0])
                        plan = layer.router(tokens).plan
                    with torch.enable_grad():
                        chosen = choose_backend(tokens, layer.experts, plan)
                    row = (
                        f"| {activation.__name__} | {dim} | {hidden} | {side}² | {plan.token.numel() * hidden:,} | "
                        f"{padded:.1f} | {sorted_:.1f} | {fused:.1f} | {sorted_ / padded:.2f} | "
                        f"{fused / min(padded, sorted_):.2f} | {chosen} |"
                    )
                    if args.all_experts:
                        dense = statistics.median(times["all experts"]) * 1e3
                        auto = statistics.median(times["auto"]) * 1e3
                        with torch.no_grad():
                            diff = all_experts_masked(tokens, plan, layer.experts) - apply_plan(
                                tokens, plan, layer.experts
                            )
                        row += f" {dense:.1f} | {dense / auto:.2f} | {diff.abs().max():.1e} |"
                    print(row, flush=True)


def loop_grid(args: argparse.Namespace) -> None:
    """The fused backend's loops (:data:`visionmoe.native.FFN_LOOPS`) against padded and sorted, at the layer
    grid's shapes: the measurement behind :func:`visionmoe.native.ffn_loop` and ``auto``'s rule."""
    names = ("padded", "sorted", *native.FFN_LOOPS)
    print("\n| activation | D | H | positions | " + " | ".join(f"{n} ms" for n in names) + " | best | auto |")
    print("|---|---|---|---|" + "---|" * (len(names) + 2))
    for activation in (torch.nn.GELU, torch.nn.ReLU):
        for width in args.widths:
            for ratio in args.ratios:
                for stage, side in enumerate((32, 16, 8)):
                    dim, hidden = width * 2**stage, int(ratio * width * 2**stage)
                    torch.manual_seed(0)
                    layer = MoE(dim, 8, hidden, router="topk", k=2, activation=activation).train()
                    x = torch.randn(args.batch, dim, side, side).contiguous(memory_format=torch.channels_last)
                    x.requires_grad_()

                    def step(name: str, layer: MoE = layer, x: torch.Tensor = x) -> None:
                        layer.backend = "fused" if name in native.FFN_LOOPS else name
                        x.grad = None
                        layer.zero_grad(set_to_none=True)
                        with fused_loop(name) if name in native.FFN_LOOPS else contextlib.nullcontext():
                            (layer(x).square().mean() + layer.aux_loss).backward()

                    times = interleaved_times(
                        {n: lambda n=n: step(n) for n in names},
                        threads=args.threads,
                        repeats=args.repeats,
                        min_run_time=args.min_run_time,
                    )
                    ms = {n: statistics.median(times[n]) * 1e3 for n in names}
                    with torch.no_grad():
                        tokens = layer.group(layer.to_tokens(x)[0])
                        plan = layer.router(tokens).plan
                    with torch.enable_grad():
                        chosen = choose_backend(tokens, layer.experts, plan)
                    if chosen == "fused":
                        chosen = native.ffn_loop(dim, hidden)
                    cells = " | ".join(f"{ms[n]:.1f}" for n in names)
                    best = min(ms, key=ms.get)
                    row = f"| {activation.__name__} | {dim} | {hidden} | {side}² | {cells} | {best} | {chosen} |"
                    print(row, flush=True)


def vit_row(images: int, args: argparse.Namespace) -> str:
    """One ViT-sized shape: auto now and before issue 22, each over the dense FFN of the same repeat."""
    torch.manual_seed(0)
    d, E, k = 512, 8, 2
    moe = MoE(d, E, 4 * d, router="topk", k=k, capacity_factor=1.25, router_options=NO_NOISE, aux_loss_weights={})
    dense = MoE(d, 1, k * 4 * d, router="dense")
    x = torch.randn(images, 1024, d)

    def fwdbwd(model: torch.nn.Module) -> None:
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()

    def before() -> None:
        with before_issue_22():
            fwdbwd(moe)

    def aten() -> None:
        with native.disabled():
            fwdbwd(moe)

    steps = {"dense": lambda: fwdbwd(dense), "auto": lambda: fwdbwd(moe), "before": before}
    if args.aten:
        steps["aten"] = aten
    times = interleaved_times(steps, threads=args.threads, repeats=args.repeats)
    ratio = {n: [t / tw for t, tw in zip(ts, times["dense"], strict=True)] for n, ts in times.items()}
    columns = ("auto", "before", "aten") if args.aten else ("auto", "before")
    cells = [f"{statistics.median(ratio[n]):.2f} ± {iqr(ratio[n]):.2f}" for n in columns]
    return f"| {images} × 1024 | {statistics.median(times['dense']) * 1e3:.0f} | " + " | ".join(cells) + " |"


CATEGORIES = {  # aten operator -> what it does in a step (the rest: "other elementwise and reductions")
    "expert / FFN GEMMs": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_grouped_mm"),
    "activation (GELU/ReLU)": ("aten::gelu", "aten::gelu_backward", "aten::relu", "aten::threshold_backward"),
    "convolutions and BatchNorm": (
        "aten::mkldnn_convolution",
        "aten::convolution_backward",
        "aten::native_batch_norm",
        "aten::native_batch_norm_backward",
    ),
    "router softmax (fwd + bwd)": ("aten::_softmax", "aten::_softmax_backward_data"),
    "router noise, top-k, sorts, load loss": (
        "aten::normal_",
        "aten::sort",
        "aten::topk",
        "aten::argmax",
        "aten::erfc",
        "aten::cumsum",
    ),
    "routing stats (entropy)": ("aten::xlogy",),
    "row gathers / scatters (dispatch, combine)": (
        "aten::index_select",
        "aten::index",
        "aten::_index_put_impl_",
        "aten::index_add_",
        "aten::cat",
        "aten::scatter_add_",
        "aten::scatter_",
        "aten::scatter",
        "aten::gather",
    ),
    "layout copies": ("aten::copy_", "aten::clone", "aten::contiguous"),
}


def aten_callers(prof: profile) -> list[tuple[str, tuple[float, int]]]:
    """(place, (ms, calls)) for the outermost ATen calls of a profile taken ``with_stack``, by the nearest
    visionmoe line up their Python stack (``visionmoe/...py(line): function``; the machine's path left
    out), or else the autograd node or range they ran under; most time first."""
    totals: dict[str, list[float]] = {}
    for event in prof.events():
        parent = event.cpu_parent
        if not event.name.startswith("aten::") or (parent is not None and parent.name.startswith("aten::")):
            continue
        site = "(top level)"
        while parent is not None:
            if ".py(" in parent.name and "visionmoe/" in parent.name:
                site = parent.name[parent.name.rindex("visionmoe/") :]
                break
            if ".py(" not in parent.name and not parent.name.startswith("<built-in"):
                site = parent.name  # an autograd node (the backward) or a profiler range
                break
            parent = parent.cpu_parent
        total = totals.setdefault(site, [0.0, 0])
        total[0] += event.cpu_time_total / 1e3
        total[1] += 1
    return sorted(((site, (ms, calls)) for site, (ms, calls) in totals.items()), key=lambda item: -item[1][0])


def profile_step(backbone: str, width: int, ratio: float, args: argparse.Namespace) -> None:
    """Self CPU time per operator category of ``args.repeats`` steps, MoE model and twin."""
    moe, twin, stepper = build(backbone, width, ratio, args.batch)
    set_backend(moe, args.backends[0])
    totals = {}
    variants = [("MoE", moe, False), *([("MoE before", moe, True)] if args.before else []), ("twin", twin, False)]
    for name, model, before in variants:
        step = stepper(model)
        with before_issue_22() if before else contextlib.nullcontext():
            for _ in range(2):
                step()
            stack = bool(args.callers) and name == "MoE"
            with profile(activities=[ProfilerActivity.CPU], record_shapes=args.shapes, with_stack=stack) as prof:
                for _ in range(args.repeats):
                    step()
        events = prof.key_averages()
        if args.rows:
            print(f"\n### {name}: {backbone}, width {width}, hidden ratio {ratio}, backend {args.backends[0]}\n")
            table = prof.key_averages(group_by_input_shape=True) if args.shapes else events
            print(table.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=40))
        if stack:
            print(f"\n### ATen time by caller: {name}, {backbone}, width {width}, hidden ratio {ratio}\n")
            print("| ms per step | ATen calls per step | called from |\n|---|---|---|")
            for site, (ms, calls) in aten_callers(prof)[: args.callers]:
                print(f"| {ms / args.repeats:.3f} | {calls / args.repeats:.1f} | {site} |")
        by_category = dict.fromkeys([*CATEGORIES, "other elementwise and reductions"], 0.0)
        for event in events:
            category = next((c for c, ops in CATEGORIES.items() if event.key in ops), None)
            if category is None and not event.key.startswith("aten::"):
                continue  # autograd nodes, optimizer and profiler ranges: their aten children are counted
            by_category[category or "other elementwise and reductions"] += event.self_cpu_time_total / 1e3
        totals[name] = {c: ms / args.repeats for c, ms in by_category.items()}
    names = list(totals)
    print(f"\n| ms per step ({backbone}, width {width}, hidden ratio {ratio}) | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for category in totals["MoE"]:
        print(f"| {category} | " + " | ".join(f"{totals[n][category]:.1f}" for n in names) + " |")
    print("| **total (aten self time)** | " + " | ".join(f"{sum(totals[n].values()):.1f}" for n in names) + " |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", choices=list(BACKBONES), default=list(BACKBONES))
    parser.add_argument("--widths", nargs="+", type=int, default=[8, 16, 32])
    parser.add_argument("--ratios", nargs="+", type=float, default=[1.0, 2.0, 4.0])
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=["auto"])
    parser.add_argument("--before", action="store_true", help="add the code before issue 22 (see above)")
    parser.add_argument("--aten", action="store_true", help="add the first backend without the fused router")
    parser.add_argument("--nodes", action="store_true", help="add the first backend, router and experts as two nodes")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--router-noise", type=float, default=None, help="the routers' noise_std (0: no noise)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--min-run-time", type=float, default=0.0, help="seconds per measurement, at least")
    parser.add_argument(
        "--compile", action="store_true", help="add torch.compile'd MoE over torch.compile'd twin (inductor)"
    )
    parser.add_argument("--floor", action="store_true", help="add 1 + (the routers alone / twin step) (see above)")
    parser.add_argument(
        "--experts-only", action="store_true", help="add the step with the MoE layers' experts alone (see above)"
    )
    parser.add_argument("--vit", action="store_true", help="the ViT-shape regression check instead (see above)")
    parser.add_argument("--vit-images", nargs="+", type=int, default=[1, 4, 8])
    parser.add_argument("--layer-grid", action="store_true", help="padded vs sorted per layer shape (see above)")
    parser.add_argument(
        "--all-experts", action="store_true", help="--layer-grid: add every expert on every token, masked (see above)"
    )
    parser.add_argument(
        "--loops", action="store_true", help="--layer-grid: the fused backend's two loops against padded and sorted"
    )
    parser.add_argument("--profile", action="store_true", help="profile the first cell instead of timing")
    parser.add_argument("--rows", type=int, default=0, help="--profile: also print this many operators")
    parser.add_argument("--shapes", action="store_true", help="--profile --rows: one row per operator and input shapes")
    parser.add_argument("--callers", type=int, default=0, help="--profile: the N places calling ATen most (see above)")
    parser.add_argument("--quick", action="store_true", help="one tiny cell: checks the script only")
    parser.add_argument(
        "--keep-freed-memory", action="store_true", help="glibc keeps freed memory, as training does (header says)"
    )
    args = parser.parse_args(argv)
    if args.keep_freed_memory:
        keep_freed_memory()
    global ROUTER_NOISE
    ROUTER_NOISE = args.router_noise
    if args.quick:
        args.backbones, args.widths, args.ratios, args.batch, args.repeats = ["depthwise"], [8], [1.0], 2, 1
    torch.set_num_threads(args.threads)
    if args.profile:
        profile_step(args.backbones[0], args.widths[0], args.ratios[0], args)
        return 0
    if args.layer_grid:
        title = "the fused backend's loops, padded and sorted" if args.loops else "padded, sorted and fused"
        print(benchmark_header(f"MoE layer at CNN stage shapes: {title}", args.threads), flush=True)
        layer_grid(args)
        return 0
    if args.vit:
        print(benchmark_header("MoE layer at ViT shapes: after vs before issue 22", args.threads), flush=True)
        extra = (" aten / dense |", "---|") if args.aten else ("", "")
        print(
            f"\n| images × tokens | dense ms | auto / dense | before / dense |{extra[0]}\n|---|---|---|---|{extra[1]}",
            flush=True,
        )
        for images in args.vit_images:
            print(vit_row(images, args), flush=True)
        return 0
    print(benchmark_header("CNN training step: MoE in every stage vs the dense twin", args.threads), flush=True)
    columns = [
        *args.backends,
        *(["aten"] if args.aten else []),
        *(["nodes"] if args.nodes else []),
        *(["before"] if args.before else []),
        *(["compiled"] if args.compile else []),
        *(["floor"] if args.floor else []),
        *(["experts only"] if args.experts_only else []),
        *(["bound"] if args.floor and args.experts_only else []),
    ]
    header = "| backbone | width | hidden ratio | twin step ms | " + " | ".join(
        b if b in ("floor", "experts only", "bound") else f"MoE/twin ({b})" for b in columns
    )
    print(f"\n{header} |\n|" + "---|" * (4 + len(columns)), flush=True)
    worst = 0.0
    for backbone in args.backbones:
        for width in args.widths:
            for ratio in args.ratios:
                ratios = measure(backbone, width, ratio, args)
                cells = []
                for backend in columns:
                    med = statistics.median(ratios[backend])
                    worst = max(worst, med) if backend == args.backends[0] else worst
                    cells.append(f"{med:.2f} ± {iqr(ratios[backend]):.2f}")
                twin_ms = statistics.median(ratios["twin_seconds"]) * 1e3
                print(f"| {backbone} | {width} | {ratio:g} | {twin_ms:.0f} | " + " | ".join(cells) + " |", flush=True)
    print(
        f"\nBatch {args.batch}, channels-last, fp32, SGD step; median ± IQR over {args.repeats} interleaved repeats "
        f"of MoE step / twin step in the same repeat. Worst cell ({args.backends[0]}): {worst:.2f} (goal ≤ {GOAL})."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
