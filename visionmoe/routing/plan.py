"""Routing plans: what a router decides, in a compact form and as the dense D/C tensors.

Axes, named once for the whole package (as in vmoe):
    G groups, S tokens per group, E experts, C capacity (slots per expert and group),
    K experts per token, A assignments per group, D model width.

Liu et al. (TMLR 2024) write every MoE layer with two tensors of shape (G, S, E, C):
dispatch D (which token fills which slot of which expert) and combine C (how much each slot's
output contributes to each token), so that

    y = einsum("gsec,egcd->gsd", C, experts(einsum("gsec,gsd->egcd", D, x)))

Sparse routers fill D with 0/1 and C with the gate value at the same places; Soft MoE fills
both with softmax weights. The fast path never builds these tensors: it reads the compact plan
(:class:`Routing`) or the soft weights (:class:`SoftRouting`) directly. ``dispatch_tensor()`` and
``combine_tensor()`` exist for tests, analysis and the einsum reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Routing:
    """A sparse routing plan: A token-to-expert assignments per group.

    Attributes:
        token: (G, A) int64, the token s (index within its group) of each assignment.
        expert: (G, A) int64, the expert e of each assignment.
        position: (G, A) int64, the slot c in expert e's buffer; only meaningful where ``kept``.
        weight: (G, A) combine weight (the gate value); exactly 0 where not ``kept``.
        kept: (G, A) bool, False for assignments dropped because the expert was full.
        num_tokens: S.
        num_experts: E.
        capacity: C, the buffer size of each expert in each group.
        choices: K for a token-choice plan, None otherwise. Set, it promises the token-choice layout
            that lets the layer dispatch without a global sort: A = K·S assignments, choice-major
            (assignment j·S + i is the j-th choice of the i-th token in priority order, so
            ``token[:, j·S + i]`` is the same token for every j), and the kept assignments of each
            expert and group hold positions 0, 1, ... without gaps.
        token_order: True promises ``token[:, j·S + i] == i`` (a token-choice plan in token order, no
            Batch Prioritized Routing), so the layer needs no permutation to and from priority order nor
            a check for one. False promises nothing.
    """

    token: Tensor
    expert: Tensor
    position: Tensor
    weight: Tensor
    kept: Tensor
    num_tokens: int
    num_experts: int
    capacity: int
    choices: int | None = None
    token_order: bool = False

    @property
    def num_groups(self) -> int:
        return self.token.shape[0]

    def tokens_per_expert(self) -> Tensor:
        """(E,) number of kept assignments per expert, summed over groups."""
        counts = self.weight.new_zeros(self.num_experts)  # scatter, not a boolean mask: no host sync
        return counts.scatter_add_(0, self.expert.reshape(-1), self.kept.reshape(-1).to(counts.dtype))

    def _dense(self, values: Tensor) -> Tensor:
        g = torch.arange(self.num_groups, device=self.token.device)[:, None].expand_as(self.token)
        kept = self.kept
        index = (g[kept], self.token[kept], self.expert[kept], self.position[kept])
        shape = (self.num_groups, self.num_tokens, self.num_experts, self.capacity)
        return values.new_zeros(shape).index_put(index, values[kept])  # differentiable in `values`

    def dispatch_tensor(self) -> Tensor:
        """(G, S, E, C) dispatch D: 1 where token s fills slot c of expert e."""
        return self._dense(torch.ones_like(self.weight))

    def combine_tensor(self) -> Tensor:
        """(G, S, E, C) combine C: the gate value where token s fills slot c of expert e."""
        return self._dense(self.weight)


@dataclass(frozen=True)
class SoftRouting:
    """A Soft MoE plan (Puigcerver et al. 2023): dense weights over P slots per expert.

    Attributes:
        dispatch: (G, S, E, P) weight of token s in the input of slot p of expert e.
        combine: (G, S, E, P) weight of slot (e, p)'s output in the output of token s.
    """

    dispatch: Tensor
    combine: Tensor

    @property
    def num_experts(self) -> int:
        return self.dispatch.shape[2]

    @property
    def capacity(self) -> int:
        return self.dispatch.shape[3]

    def tokens_per_expert(self) -> Tensor:
        """(E,) combine mass each expert receives: the soft analogue of a token count."""
        return self.combine.detach().sum(dim=(0, 1, 3))

    def dispatch_tensor(self) -> Tensor:
        return self.dispatch

    def combine_tensor(self) -> Tensor:
        return self.combine


@dataclass(frozen=True)
class DenseRouting:
    """The dense baseline: every token goes to every expert with weight 1.

    Summing E experts of width H over every token is exactly one FFN of width E·H, so a
    ``dense`` layer is the dense FFN with the same interface (and, with E = 1, a plain FFN).
    In the D/C form each expert's buffer holds all S tokens in order: D = C = [s == c].
    """

    num_groups: int
    num_tokens: int
    num_experts: int
    like: Tensor  # a (G, S, D) tensor whose dtype and device the dense views take

    @property
    def capacity(self) -> int:
        return self.num_tokens

    def tokens_per_expert(self) -> Tensor:
        count = float(self.num_groups * self.num_tokens)
        return torch.full((self.num_experts,), count, dtype=self.like.dtype, device=self.like.device)

    def dispatch_tensor(self) -> Tensor:
        eye = torch.eye(self.num_tokens, dtype=self.like.dtype, device=self.like.device)  # (S, C=S)
        return eye[None, :, None, :].expand(self.num_groups, -1, self.num_experts, -1)

    def combine_tensor(self) -> Tensor:
        return self.dispatch_tensor()


Plan = Routing | SoftRouting | DenseRouting


def positions_in_expert(expert: Tensor, num_experts: int) -> Tensor:
    """Slot of each assignment in its expert's buffer, first come first served along A.

    expert: (G, A) expert of each assignment, in priority order. Returns (G, A): the number of
    earlier assignments (same group) to the same expert. Sort-based: a stable argsort by expert,
    then rank within each expert's segment; no (G, A, E) one-hot (a running count over one was no
    faster for E = 8 on the CPU: BENCHMARKS.md, issue 22).
    """
    G, A = expert.shape
    order = torch.argsort(expert, dim=1, stable=True)  # (G, A): assignments grouped by expert
    sorted_expert = expert.gather(1, order)
    counts = torch.zeros(G, num_experts, dtype=torch.long, device=expert.device)
    counts.scatter_add_(1, expert, torch.ones_like(expert))  # (G, E)
    starts = counts.cumsum(1) - counts  # (G, E): first sorted index of each expert's segment
    rank = torch.arange(A, device=expert.device)[None, :] - starts.gather(1, sorted_expert)
    return torch.empty_like(expert).scatter_(1, order, rank)


SMALL_K = 2
"""Up to this k, :func:`stable_topk` takes k rounds of ``max`` instead of a full sort: on the CPU a sort
of E = 8 values per token was a visible part of a CNN MoE step, and the rounds beat it for top-2
(``benchmarks/routing_micro.py``; BENCHMARKS.md, "Routing core: E = 8 per token")."""


def stable_topk(scores: Tensor, k: int, dim: int) -> tuple[Tensor, Tensor]:
    """Top-k along ``dim`` with ties broken towards the lower index (``torch.topk`` promises no order).

    ``scores`` must not hold NaN. For k <= :data:`SMALL_K`: k rounds of ``max`` along ``dim``, which
    returns the first maximal index (documented, and on the CPU faster than ``argmax``), each round with
    the earlier winners masked to -inf; the same indices as the stable sort (a winner could be picked
    twice only if every remaining score were -inf, so then the sort runs). On the CPU only, where the
    sort is slow for short rows and that check is no host sync.
    """
    small = k <= SMALL_K and k < scores.shape[dim] and scores.is_floating_point()
    if small and scores.device.type == "cpu" and not torch.compiler.is_compiling():  # the check below is a sync
        picks, masked = [], scores.detach()
        for j in range(k):
            best, pick = masked.max(dim, keepdim=True)
            picks.append(pick)
            if j + 1 < k:
                masked = masked.scatter(dim, pick, float("-inf"))
        if k == 1 or not bool(torch.isneginf(best).any()):
            index = torch.cat(picks, dim)
            return scores.gather(dim, index), index
    values, index = torch.sort(scores, dim=dim, descending=True, stable=True)
    return values.narrow(dim, 0, k), index.narrow(dim, 0, k)


SHORT_SOFTMAX_ROWS = 16
"""Below this many experts, :func:`softmax_experts` runs the softmax along the token axis of an
expert-major copy: ATen's CPU softmax along the last axis is 5-10x slower on rows shorter than 16 than
along a non-last axis (BENCHMARKS.md, "Routing core: E = 8 per token"), and at E >= 16 the last axis wins."""


def softmax_experts(logits: Tensor) -> Tensor:
    """``logits.softmax(dim=-1)`` for (..., S, E) router logits, fast for few experts on the CPU.

    For E < :data:`SHORT_SOFTMAX_ROWS` on the CPU the softmax runs on an (..., E, S) copy along the
    expert axis, where ATen vectorises over tokens, and comes back as a transposed view: the same
    maths, forward and backward, equal to the last-axis softmax up to the last bit of float rounding
    (the sum over E is accumulated in another order).
    """
    if logits.device.type != "cpu" or logits.dim() < 2 or logits.shape[-1] >= SHORT_SOFTMAX_ROWS:
        return logits.softmax(dim=-1)
    return logits.transpose(-1, -2).contiguous().softmax(dim=-2).transpose(-1, -2)
