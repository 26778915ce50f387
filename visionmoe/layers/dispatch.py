"""Running experts on a routing plan: the fast paths, and the D/C einsum reference.

Sparse plans have three backends, all exact (they compute the same sums in a different order):

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

``auto`` picks ``padded`` while compiling, ``grouped`` on CUDA when available and aligned,
for experts with fewer than 128 rows on average ``grouped`` (aligned sizes) or else ``padded``,
and ``sorted`` otherwise. Soft MoE uses
three batched matmuls; the dense router one FFN of width E·H.

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
from torch import Tensor

from visionmoe.layers.experts import Experts, grouped_mm_supported
from visionmoe.routing.plan import DenseRouting, Plan, Routing, SoftRouting

BACKENDS = ("auto", "sorted", "grouped", "padded")


SMALL_EXPERT_ROWS = 128
"""Below this many assignments per expert on average, a loop of small per-expert GEMMs loses on the
CPU (measured at E = 64, ~63 rows each: grouped 1.6×, padded 2.0×, sorted 2.9× the dense FFN; at
E = 8, 512 rows each: sorted 1.0×, grouped 1.4×, padded 1.5× — BENCHMARKS.md)."""


def choose_backend(x: Tensor, experts: Experts, plan: Routing | None = None) -> str:
    """The ``auto`` choice for a sparse plan on this input (decided from shapes only: no host sync)."""
    if torch.compiler.is_compiling():
        return "padded"  # static shapes, no data-dependent split
    if x.is_cuda and grouped_mm_supported(experts, x) and torch.cuda.get_device_capability(x.device)[0] >= 9:
        return "grouped"
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
    if backend == "padded":
        return padded_moe(x, plan, experts, deterministic)
    if backend not in ("sorted", "grouped"):
        raise ValueError(f"unknown MoE backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
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
