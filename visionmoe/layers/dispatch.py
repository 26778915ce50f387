"""Running experts on a routing plan: the fast paths, and the D/C einsum reference.

Sparse plans have four backends, all exact (they compute the same sums in a different order):

    sorted   — stable argsort of the kept assignments by expert, gather their token rows, one GEMM
               per expert on its contiguous block (weights split with ``unbind``: backward is one
               stack, not a full-size gradient per expert), scale by the gates, scatter-add back.
               Work = the assignments actually processed. One host sync (the per-expert counts).
    grouped  — the same sorted rows through ``torch.nn.functional.grouped_mm``: two GEMM calls in
               all, no loop. Made for CUDA sm90+ (bf16); on the CPU torch has it for 16-byte-aligned
               sizes, slower than ``sorted`` for large experts but faster for many small ones.
    padded   — V-MoE style buffers (E, G·C, D) filled by scatter, one batched matmul per layer,
               gathered back. Static shapes and no host sync (``torch.compile`` full graph, CUDA
               graphs); executes the capacity padding.
    fused    — token-choice plans on the CPU in float32, in token order, for ReLU or exact-GELU experts
               with D and H multiples of 8, in C (:func:`visionmoe.native.expert_ffn`): the kept
               assignments sorted by expert and run a few rows at a time through register-tiled
               products; experts up to D·H = 64·128 per block of a few hundred tokens (each block's
               rows moved in token order and kept in the cache), larger ones over the whole layer. No
               capacity padding; each choice's pre-activation is kept for backward. Elsewhere (other plans,
               devices, activations, no C compiler, hooks on the experts, ``FlopCounterMode``) it
               runs what ``auto`` would pick among the other three. With the fused V-MoE router and its
               native logits too, the layer is one autograd node (router and experts:
               :func:`visionmoe.native.topk_moe`, by :meth:`visionmoe.layers.Router.fused_layer`,
               unless a hook watches the router's call).

Token-choice plans (``Routing.choices`` set: every token has exactly K assignments) take a path
without a global sort or any scatter-add (:func:`token_choice_moe`): the sorted order comes from
counting (:func:`counting_sort`), and rows move by gathers forward and backward (:func:`move_rows`).
On the CPU in float32, a plan in token order takes :func:`native_token_choice_moe` instead: the same
rows, products and sums, moved by :mod:`visionmoe.native`'s C kernels (one scatter, one gated gather).
The other plans (expert choice) keep the argsort and ``index_add_``.

``auto`` picks ``padded`` while compiling, ``grouped`` on CUDA when available and aligned, ``fused``
in training for token-choice experts with D·H ≤ 128·512 (every CIFAR-CNN shape measured) where the
kernel can run,
``padded`` in training (grad enabled) for token choice with small experts (D·H ≤ 128·128) whose routed
rows hold at most :func:`padded_hidden_values` hidden values (GELU experts up to 2**20 with ATen's row
moves; with the native ones GELU up to 2**21, other activations up to 2**20), S ≥ 8·E (the CNN
feature-map regime, where one batched matmul beat E small GEMMs despite the capacity padding:
BENCHMARKS.md, issue 22), for experts with fewer than 128 rows on average ``grouped`` (aligned sizes)
or else ``padded``, and ``sorted`` otherwise.
Soft MoE uses three batched matmuls; the dense router one FFN of width E·H.

``torch.compile(moe, fullgraph=True)`` traces every router in one graph, forward and backward
(tested), with these exceptions, which break the graph: dropless token choice (its capacity is the
largest load, read from the data), the ``sorted`` and ``grouped`` backends when forced (they read
the per-expert counts on the host), and nothing else; the non-finite-logits check is skipped while
compiling (it is a host sync).

The combine is a scatter-add (``index_add_``); ``deterministic=True`` replaces it by a segment sum
over assignments sorted by token (no atomics, so bit-identical on CUDA too; ``index_add_`` on the
CPU is deterministic already).

Reference (tests, benchmarks, analysis — never the fast path): :func:`einsum_moe` builds the dense
dispatch and combine tensors (G, S, E, C) and applies y = einsum(C, experts(einsum(D, x))), the
unified form of Liu et al. (TMLR 2024), as GShard / V-MoE-style code does.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from visionmoe import native
from visionmoe.layers.experts import Experts, grouped_mm_supported
from visionmoe.routing.plan import DenseRouting, Plan, Routing, SoftRouting

BACKENDS = ("auto", "sorted", "grouped", "padded", "fused")


SMALL_EXPERT_ROWS = 128
"""Below this many assignments per expert on average, a loop of small per-expert GEMMs loses on the
CPU to one grouped or batched call; above it the loop wins (BENCHMARKS.md, "Backends and expert count")."""


SMALL_EXPERT_WEIGHTS = 128 * 128
"""Only experts with D·H at most this can run ``padded`` under ``auto`` (CNN feature maps, D = 8-128,
H = D-4D, where it was measured); every ViT-sized one (512 × 2048) stays on ``sorted``."""


PADDED_HIDDEN_VALUES = 2**20
"""Token-choice GELU experts whose routed rows' hidden activations (G·A·H values, A = K·S assignments per
group) number at most this run ``padded`` under ``auto`` in training: up to it one batched matmul over the
capacity buffers beat E small GEMMs on the CPU; from twice it (8 MB of fp32 activations, more with the
padding, then their gradients) the per-expert blocks of ``sorted`` won, as they did for ReLU experts at
almost every size (BENCHMARKS.md, "CNN feature maps", issue 22: a grid of CIFAR-CNN layer shapes, both
activations). The count is static (shapes only), unlike a dropless plan's capacity."""


NATIVE_PADDED_HIDDEN_VALUES = {"GELU": 2**21, "other": 2**20}
"""With the native row moves (:mod:`visionmoe.native`) the same bounds, by the experts' activation: the
buffers are filled and read back by one C pass each, so ``padded`` won up to twice as many GELU values and
for ReLU experts too (BENCHMARKS.md, issue 22, eighth pass: the layer grid re-measured with them)."""


def padded_hidden_values(experts: Experts, native_moves: bool) -> int:
    """The most routed hidden values (G·A·H) for which ``auto`` takes ``padded`` in training (0: never)."""
    gelu = isinstance(experts.act, nn.GELU)
    if native_moves:
        return NATIVE_PADDED_HIDDEN_VALUES["GELU" if gelu else "other"]
    return PADDED_HIDDEN_VALUES if gelu else 0


MIN_TOKENS_PER_EXPERT = 8
"""... and only for groups of at least this many tokens per expert (S ≥ 8·E, 64 for E = 8: every CNN
feature map measured), not for tiny groups (a (B, D) head has one token per group, so its buffers would
be mostly padding). A static rule: every rank of an expert-parallel layer must pick the same backend,
so the data-dependent capacity of a dropless plan cannot enter it."""


FUSED_EXPERT_WEIGHTS = 128 * 512
"""``auto`` takes ``fused`` in training for token-choice experts (ReLU or exact GELU) with D·H at most this:
at every CIFAR-CNN layer shape measured (D = 8-128, H = D-4·D, both activations) its faster loop
(:func:`visionmoe.native.ffn_loop`) was at or below the faster of ``padded`` and ``sorted``, by 0.6-0.8
from D = 32 up, and at par with ``sorted`` at the largest, D = 128 with H = 512 (BENCHMARKS.md, issue 22,
twelfth pass). Larger experts (a ViT's 512 × 2048) keep ``sorted``: one expert's weights no longer stay in
the cache while the kernel's few-row tiles stream through them, where the BLAS blocks for it."""


def choose_backend(x: Tensor, experts: Experts, plan: Routing | None = None) -> str:
    """The ``auto`` choice for a sparse plan on this input (decided from shapes only: no host sync)."""
    if plan is not None and plan.choices is not None and auto_fuses(x, experts) and native.usable(plan.weight):
        return "fused"
    return unfused_backend(x, experts, plan)


def auto_fuses(x: Tensor, experts: Experts) -> bool:
    """Whether ``auto`` takes ``fused`` for a token-choice plan on ``x``: in training (grad enabled), for
    experts of D·H at most :data:`FUSED_EXPERT_WEIGHTS` that the kernel runs, on float32 CPU tokens."""
    return (
        torch.is_grad_enabled()
        and native.usable(x)
        and native.ffn_supported(experts)
        and experts.dim * experts.hidden_dim <= FUSED_EXPERT_WEIGHTS
    )


def unfused_backend(x: Tensor, experts: Experts, plan: Routing | None = None) -> str:
    """``auto``'s choice among the backends other than ``fused``."""
    if torch.compiler.is_compiling():
        return "padded"  # static shapes, no data-dependent split
    if x.is_cuda and grouped_mm_supported(experts, x) and torch.cuda.get_device_capability(x.device)[0] >= 9:
        return "grouped"
    if (
        plan is not None
        and torch.is_grad_enabled()  # measured on training steps; forward-only passes keep the rules below
        and plan.choices is not None
        and experts.dim * experts.hidden_dim <= SMALL_EXPERT_WEIGHTS
        and plan.num_tokens >= MIN_TOKENS_PER_EXPERT * plan.num_experts
        and plan.token.numel() * experts.hidden_dim <= padded_hidden_values(experts, native.usable(x, plan.weight))
    ):
        return "padded"  # small token-choice experts on many tokens per group
    if plan is not None and plan.token.numel() < SMALL_EXPERT_ROWS * plan.num_experts:
        # G·A assignments offered over E experts: small per-expert GEMMs; one kernel call does better
        return "grouped" if grouped_mm_supported(experts, x) else "padded"
    return "sorted"


def combine(rows: Tensor, values: Tensor, num_rows: int, deterministic: bool = False) -> Tensor:
    """Σ of ``values`` (N, D) into ``num_rows`` rows by destination ``rows`` (N,): (num_rows, D)."""
    if not deterministic:
        out = values.new_zeros(num_rows, values.shape[-1])
        return out.index_add_(0, rows, values)  # weighted scatter-add
    order = torch.argsort(rows, stable=True)  # assignments grouped by token, in a fixed order
    lengths = torch.bincount(rows, minlength=num_rows)
    return torch.segment_reduce(values[order], "sum", lengths=lengths, axis=0, unsafe=True, initial=0.0)


def sparse_moe(
    x: Tensor, plan: Routing, experts: Experts, backend: str = "auto", deterministic: bool = False
) -> Tensor:
    """(G, S, D) tokens -> (G, S, D) through a sparse plan."""
    if backend == "auto":
        backend = choose_backend(x, experts, plan)
    if backend not in BACKENDS[1:]:
        raise ValueError(f"unknown MoE backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    if plan.choices is not None:
        return token_choice_moe(x, plan, experts, backend)
    if backend == "fused":  # token-choice plans only: this one takes what auto would without it
        backend = unfused_backend(x, experts, plan)
    if backend == "padded":
        return padded_moe(x, plan, experts, deterministic)
    G, S, D = x.shape
    E = plan.num_experts
    token = (plan.token + S * torch.arange(G, device=x.device)[:, None]).reshape(-1)  # (G·A,) flat row
    key = torch.where(plan.kept, plan.expert, E).reshape(-1)  # dropped assignments sort last (key E)
    order = torch.argsort(key, stable=True)  # (G·A,): kept assignments grouped by expert
    counts = torch.bincount(key, minlength=E + 1)[:E]  # (E,) rows per expert
    order = order[: int(counts.sum())]  # host sync: the number of kept assignments
    rows = token[order]  # (N,) source row of each processed assignment
    y = experts(x.reshape(G * S, D)[rows], backend, counts, key[order])  # (N, D)
    y = y * plan.weight.reshape(-1)[order, None].to(y.dtype)
    return combine(rows, y, G * S, deterministic).reshape(G, S, D)


class _MoveRows(torch.autograd.Function):
    """``out[r] = x[index[r]]``, or zeros where ``index[r] == len(x)``, for an index that sends each row
    of x to at most one output row (a permutation, or part of one); ``inverse`` is the map back
    (``len(out)`` where a row of x goes nowhere). ``pad``/``pad_back``: whether ``index``/``inverse``
    may hold that "nowhere" value (a zero row is then appended before the gather).

    A 2-D ``index`` (R, F) sums F gathered rows: ``out[r] = Σ_f x[index[r, f]]``, the adjoint of sending
    each row of x to F output rows (a 1-D ``inverse`` holding some rows F times over). So a token read by
    its K expert slots moves with ``index`` the (slots,) token of each slot and ``inverse`` the (tokens, K)
    slots of each token, forward one gather, backward one gather and a sum over K.

    ``x[index]`` would do the forward, but its backward is a scatter-add (``index_put_``/``index_add_``,
    slow for narrow rows on the CPU); for such a map the backward is the gather by ``inverse``.
    """

    @staticmethod
    def forward(ctx, x: Tensor, index: Tensor, inverse: Tensor, pad: bool, pad_back: bool) -> Tensor:
        ctx.save_for_backward(index, inverse)
        ctx.pad_back, ctx.pad = pad_back, pad
        if pad:
            x = torch.cat([x, x.new_zeros(1, *x.shape[1:])])  # row len(x): zeros
        if index.dim() == 1:
            return x.index_select(0, index)
        rows = x.index_select(0, index.reshape(-1))  # (R·F, ...)
        return rows.reshape(*index.shape, *x.shape[1:]).sum(1)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        index, inverse = ctx.saved_tensors
        # itself differentiable, so double backward (the Hessian analysis) works
        return _MoveRows.apply(grad, inverse, index, ctx.pad_back, ctx.pad), None, None, None, None


def move_rows(x: Tensor, index: Tensor, inverse: Tensor, pad: bool = False, pad_back: bool = False) -> Tensor:
    """Rows of ``x`` (R, D) moved by a partial permutation: ``out[r] = x[index[r]]``, zeros where
    ``index[r] == R`` (give ``pad=True`` where that can happen); ``inverse[i]`` is the output row that
    row i goes to, ``len(index)`` for none (``pad_back=True``). Forward and backward are gathers.
    A 2-D ``index`` or ``inverse`` sums over its second axis (see :class:`_MoveRows`)."""
    return _MoveRows.apply(x, index, inverse, pad, pad_back)


def _inverse(index: Tensor, size: int) -> Tensor:
    """The inverse of a partial permutation ``index`` (values in 0..size, ``size`` = nothing) of ``size`` rows."""
    inverse = index.new_full((size + 1,), index.numel())
    inverse.scatter_(0, index, torch.arange(index.numel(), device=index.device))  # several write slot `size`
    return inverse[:size]


def counting_sort(plan: Routing) -> tuple[Tensor, Tensor, Tensor]:
    """The expert-sorted order of a token-choice plan's assignments, without a sort.

    The kept assignments of expert e in group g hold positions 0..n_ge - 1 (the plan's promise when
    ``choices`` is set), so their rows in the sorted order are known in closed form: the rows of
    experts < e, then of expert e in groups < g, then the position. The dropped ones follow, in
    assignment order. Same order as the stable argsort by expert of :func:`sparse_moe`.

    Returns ``dest`` (G·A,) the sorted row of each assignment, ``order`` (G·A,) its inverse (the
    assignment at each sorted row) and ``counts`` (E,) the kept rows of each expert.
    """
    G, A = plan.token.shape
    E = plan.num_experts
    kept = plan.kept.reshape(-1)  # (G·A,)
    per_group = plan.token.new_zeros(G, E).scatter_add_(1, plan.expert, plan.kept.long())  # (G, E) kept rows
    counts = per_group.sum(0)  # (E,)
    first = (counts.cumsum(0) - counts) + (per_group.cumsum(0) - per_group)  # (G, E): first row of block (g, e)
    kept_row = (first.gather(1, plan.expert) + plan.position).reshape(-1)  # (G·A,)
    dropped_row = counts.sum() + (~kept).cumsum(0) - 1  # after every kept row, in assignment order
    dest = torch.where(kept, kept_row, dropped_row)
    return dest, _inverse(dest, G * A), counts


def token_choice_moe(x: Tensor, plan: Routing, experts: Experts, backend: str = "sorted") -> Tensor:
    """(G, S, D) -> (G, S, D) through a token-choice plan: gathers only, no sort, no scatter-add.

    Every token has exactly K assignments, so in the plan's (G, K, S) layout the dispatch is a copy
    of the tokens K times and a (partial) permutation into the experts' rows; the combine is the
    inverse permutation, a weighted sum over the K choices, and (with Batch Prioritized Routing) the
    permutation from priority order back to token order. Each moves rows by gathers, forward and
    backward (:func:`move_rows`). The experts' rows:

    - ``"sorted"``/``"grouped"``: the kept assignments sorted by expert (:func:`counting_sort`, the
      order of :func:`sparse_moe`'s argsort), a GEMM per expert or grouped_mm. One host sync: the
      number of kept rows.
    - ``"padded"``: V-MoE's (E, G·C) capacity buffers, expert e's slot c of group g at row
      e·G·C + g·C + c, empty slots zero; one batched matmul per layer; no host sync.

    The combine has no atomics, so it is deterministic on every device.
    """
    G, S, D = x.shape
    K, E, C = plan.choices, plan.num_experts, plan.capacity
    flat = x.reshape(G * S, D)
    inverse = priority = None
    if not plan.token_order:
        priority = (plan.token[:, :S] + S * torch.arange(G, device=x.device)[:, None]).reshape(-1)  # (G·S,) rows
        arange = torch.arange(G * S, device=x.device)
        if x.device.type != "cpu" or torch.compiler.is_compiling() or not torch.equal(priority, arange):
            # Batch Prioritized Routing (a host sync to find out where it is free, on the CPU; else assumed)
            inverse = _inverse(priority, G * S)
            flat = move_rows(flat, priority, inverse)  # (G·S, D) tokens in priority order
    if inverse is None and x.numel() and native.usable(x, plan.weight):
        return native_token_choice_moe(x, plan, experts, backend)
    if backend == "fused":  # no native kernels here (or a plan out of token order): auto's other choice
        backend = unfused_backend(x, experts, plan)
    if backend == "padded":
        group = torch.arange(G, device=x.device)[:, None]
        slot = torch.where(plan.kept, plan.expert * (G * C) + group * C + plan.position, E * G * C).reshape(-1)
        source = _inverse(slot, E * G * C)  # (E·G·C,) the assignment in each slot; G·A for an empty one
        # the token row each slot reads (G·S for an empty slot), and the K slots of each token row
        token = torch.where(source < G * K * S, (source // (K * S)) * S + source % S, G * S)
        slots = slot.reshape(G, K, S).transpose(1, 2).reshape(G * S, K)
        buffer = move_rows(flat, token, slots, True, True).reshape(E, G * C, D)  # no K-fold copy of the tokens
        y = move_rows(experts(buffer, "batched").reshape(E * G * C, D), slot, source, True, True)  # (G·A, D)
    else:
        rows = flat.reshape(G, 1, S, D).expand(G, K, S, D).reshape(G * K * S, D)  # (G·A, D): a row per assignment
        dest, order, counts = counting_sort(plan)
        n = int(counts.sum())  # host sync: the kept rows the experts process
        kept = order[:n]  # (n,) the assignment at each kept sorted row
        back = torch.where(dest < n, dest, n)  # (G·A,) dropped assignments read zeros
        rows = move_rows(rows, kept, back, False, n < G * K * S)  # (n, D): the kept rows, sorted by expert
        if backend == "grouped":
            ids = torch.repeat_interleave(torch.arange(E, device=x.device), counts, output_size=n)
            y = experts(rows, "grouped", counts, ids)  # (n, D)
        else:
            y = experts(rows, "sorted", counts)  # (n, D)
        y = move_rows(y, back, kept, n < G * K * S, False)  # (G·A, D) in the plan's layout
    y = y.reshape(G, K, S, D) * plan.weight.reshape(G, K, S, 1).to(y.dtype)
    y = y.sum(1).reshape(G * S, D)  # Σ_j w_j · expert_j(x), in priority order
    if inverse is not None:
        y = move_rows(y, inverse, priority)  # priority order -> token order
    return y.reshape(G, S, D)


def native_token_choice_moe(x: Tensor, plan: Routing, experts: Experts, backend: str = "sorted") -> Tensor:
    """:func:`token_choice_moe` for a plan in token order (no Batch Prioritized Routing) on the CPU, its row
    moves by :mod:`visionmoe.native`: each token's K buffer rows are one row of a (G·S, K) slot map, the
    dispatch is one scatter of the tokens into the experts' rows (empty ones zero), the combine one gather
    of each token's K expert rows summed with their gates; backward, the same moves again. The experts'
    rows and the products and sums are :func:`token_choice_moe`'s, so the output is bit-identical to it
    (the gates' gradients sum their row dot products in another order). ``fused``: no rows move at all;
    :func:`visionmoe.native.expert_ffn` computes each token's experts from its row (same sums, another order)."""
    G, S, D = x.shape
    K, E, C = plan.choices, plan.num_experts, plan.capacity
    if backend == "fused":
        if native.ffn_supported(experts):
            expert = native.token_major_experts(plan.expert, plan.kept, K)  # (G·S, K), -1 where dropped
            weight = plan.weight.reshape(G, K, S).transpose(1, 2).reshape(G * S, K)
            return native.expert_ffn(x.reshape(G * S, D), expert, weight, experts).reshape(G, S, D)
        backend = unfused_backend(x, experts, plan)
    if backend == "padded":  # expert e's slot c of group g at row e·G·C + g·C + c
        base = torch.arange(E)[None, :] * (G * C) + torch.arange(G)[:, None] * C  # (G, E)
        rows = E * G * C
    else:  # the kept rows sorted by expert, then group: counting_sort's order
        per_group, _ = native.plan_counts(plan.expert, plan.kept, K, E)  # (G, E) kept rows
        counts = per_group.sum(0)  # (E,)
        base = (counts.cumsum(0) - counts) + (per_group.cumsum(0) - per_group)
        rows = int(counts.sum())  # host sync: the kept rows the experts process
    rowmap = native.slot_map(plan.expert, plan.position, plan.kept, base, S, rows)  # (G·S, K) and back
    buffer = native.scatter_rows(x.reshape(G * S, D), rowmap)  # (rows, D)
    if backend == "padded":
        h = experts(buffer.reshape(E, G * C, D), "batched").reshape(rows, D)
    elif backend == "grouped":
        ids = torch.repeat_interleave(torch.arange(E), counts, output_size=rows)
        h = experts(buffer, "grouped", counts, ids)
    else:
        h = experts(buffer, "sorted", counts)
    weight = plan.weight.reshape(G, K, S).transpose(1, 2).reshape(G * S, K)  # (G·S, K) token-major
    return native.gather_rows(h, rowmap, weight).reshape(G, S, D)


def padded_moe(x: Tensor, plan: Routing, experts: Experts, deterministic: bool = False) -> Tensor:
    """Capacity buffers (E, G·C, D), one batched matmul per expert layer; static shapes throughout."""
    G, S, D = x.shape
    E, C = plan.num_experts, plan.capacity
    group = torch.arange(G, device=x.device)[:, None]
    dump = E * G * C  # one extra slot that every dropped assignment writes to; it is discarded
    slot = torch.where(plan.kept, plan.expert * (G * C) + group * C + plan.position, dump).reshape(-1)  # (G·A,)
    src = (plan.token + group * S).reshape(-1)  # (G·A,) token row of each assignment
    buffer = x.new_zeros(dump + 1, D).index_put((slot,), x.reshape(G * S, D)[src])  # each kept slot once
    h = experts(buffer[:dump].reshape(E, G * C, D), "batched").reshape(dump, D)  # (E·G·C, D)
    h = torch.cat([h, h.new_zeros(1, D)])  # the dump slot reads back zeros
    y = h[slot] * plan.weight.reshape(-1, 1).to(h.dtype)  # (G·A, D); dropped weigh 0 anyway
    return combine(src, y, G * S, deterministic).reshape(G, S, D)


def soft_moe(x: Tensor, plan: SoftRouting, experts: Experts) -> Tensor:
    """(G, S, D) tokens -> (G, S, D) through Soft MoE weights, by batched matmuls."""
    G, S, D = x.shape
    _, _, E, P = plan.dispatch.shape
    dispatch = plan.dispatch.to(x.dtype).reshape(G, S, E * P)
    slots = torch.bmm(dispatch.transpose(1, 2), x)  # (G, E·P, D): slot inputs X̃ = Dᵀ X
    slots = slots.reshape(G, E, P, D).transpose(0, 1).reshape(E, G * P, D)  # (E, G·P, D)
    y = experts(slots, "batched")  # (E, G·P, D)
    y = y.reshape(E, G, P, D).transpose(0, 1).reshape(G, E * P, D)  # (G, E·P, D)
    return torch.bmm(plan.combine.to(y.dtype).reshape(G, S, E * P), y)  # (G, S, D): Y = C Ỹ


def dense_moe(x: Tensor, plan: DenseRouting, experts: Experts) -> Tensor:
    """(G, S, D) -> (G, S, D): all experts on all tokens, summed (one FFN of width E·H)."""
    G, S, D = x.shape
    return experts(x.reshape(G * S, D), "all").reshape(G, S, D)


def apply_plan(x: Tensor, plan: Plan, experts: Experts, backend: str = "auto", deterministic: bool = False) -> Tensor:
    """The fast path for any plan type (``backend`` and ``deterministic`` concern sparse plans)."""
    if isinstance(plan, Routing):
        return sparse_moe(x, plan, experts, backend, deterministic)
    if isinstance(plan, SoftRouting):
        return soft_moe(x, plan, experts)
    return dense_moe(x, plan, experts)


def einsum_moe(x: Tensor, plan: Plan, experts: Experts) -> Tensor:
    """Reference: the layer written with the dense (G, S, E, C) dispatch and combine tensors."""
    dispatch = plan.dispatch_tensor().to(x.dtype)  # (G, S, E, C)
    combine_ = plan.combine_tensor().to(x.dtype)  # (G, S, E, C)
    G, _, E, C = dispatch.shape
    slots = torch.einsum("gsec,gsd->egcd", dispatch, x)  # (E, G, C, D): each expert's buffer
    y = experts(slots.reshape(E, G * C, -1), "batched").reshape(E, G, C, -1)
    return torch.einsum("gsec,egcd->gsd", combine_, y)
