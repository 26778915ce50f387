"""Expert parallelism: each rank of an EP group holds E/P of a layer's experts and they swap tokens.

Axes as in :mod:`visionmoe.routing.plan` (G groups, S tokens per group, E experts, C capacity, K
experts per token, D width), plus P ranks in the EP group and E_loc = E/P experts per rank.

Routing never leaves the rank: the router sees only the rank's own tokens and builds the usual plan
(top-k with or without capacity, expert choice, Sinkhorn, dropless). Only the expert computation is
distributed, so :class:`ExpertShard` replaces a layer's :class:`~visionmoe.layers.experts.Experts`
and the rest of :class:`~visionmoe.layers.moe.MoE` runs unchanged. The dispatch backends call the
experts in one of two layouts, and each has its exchange:

    sorted / grouped   rows sorted by expert, ``counts[e]`` for expert e — the dropless and sparse
                       fast paths. Rank r sends rank j the rows of j's experts, a contiguous block:
                       ``all_to_all_single`` with *variable* splits (the (P, E_loc) counts are
                       swapped first, one small all-to-all). The receiver regroups the rows by local
                       expert, runs them, undoes the regrouping and sends the outputs back.
    batched            capacity buffers (E, T, D), T = G·C (the ``padded`` backend) or T = G·P slots
                       (Soft MoE): rank r sends block j of the E axis to rank j — *equal* splits when
                       every rank has the same T (the same local batch), which is the training case.

Each exchange is a :func:`all_to_all` whose backward is the reverse all-to-all, so gradients flow to
the tokens of every rank and each rank's expert shard receives the gradient of all the tokens routed
to it. Soft MoE works the same way: its slots are mixed from the rank's own tokens (locally), then
exchanged like capacity buffers. The dense router (every expert on every token) has no routing to
parallelise and is refused.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from visionmoe.layers.experts import Experts, grouped_mm_supported
from visionmoe.layers.moe import moe_layers
from visionmoe.layers.routers import DenseRouter


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` along dim 0; backward is the same exchange with the splits swapped."""

    @staticmethod
    def forward(ctx, x: Tensor, output_splits: list[int], input_splits: list[int], group) -> Tensor:
        ctx.output_splits, ctx.input_splits, ctx.group = output_splits, input_splits, group
        out = x.new_empty((sum(output_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _AllToAll.apply(grad, ctx.input_splits, ctx.output_splits, ctx.group), None, None, None


def all_to_all(x: Tensor, output_splits: Sequence[int], input_splits: Sequence[int], group=None) -> Tensor:
    """Differentiable ``all_to_all_single``: the first ``input_splits[j]`` rows go to rank j, and so on.

    x: (Σ input_splits, ...) -> (Σ output_splits, ...), block j of the output from rank j.
    """
    return _AllToAll.apply(x, [int(s) for s in output_splits], [int(s) for s in input_splits], group)


class ExpertShard(Experts):
    """Experts ``[ep_rank·E_loc, (ep_rank+1)·E_loc)`` of a layer, exchanging tokens over ``group``.

    Built from the full :class:`Experts` (its weights are sliced, not re-initialised), so every rank
    that built the same model from the same seed holds its part of the same layer. The parameters
    keep their names (``w1``, ``b1``, ``w2``, ``b2``); their first axis is E_loc instead of E.

    Args:
        experts: the layer's full experts.
        ep_rank, ep_size: this rank's index in the EP group, and P (which must divide E).
        group: the EP process group.
    """

    def __init__(self, experts: Experts, ep_rank: int, ep_size: int, group: dist.ProcessGroup | None) -> None:
        E = experts.num_experts
        if E % ep_size:
            raise ValueError(f"expert_parallel={ep_size} must divide the number of experts, got num_experts={E}")
        if not 0 <= ep_rank < ep_size:
            raise ValueError(f"need 0 <= ep_rank < ep_size, got ep_rank={ep_rank}, ep_size={ep_size}")
        local = E // ep_size
        w = experts.w1
        super().__init__(
            local,
            experts.dim,
            experts.hidden_dim,
            activation=experts.act,
            bias=experts.b1 is not None,
            device=w.device,
            dtype=w.dtype,
        )
        self.global_num_experts, self.ep_rank, self.ep_size, self.group = E, ep_rank, ep_size, group
        self.offset = ep_rank * local  # first global expert held here
        with torch.no_grad():
            for name, param in self.named_parameters(recurse=False):
                param.copy_(getattr(experts, name)[self.offset : self.offset + local])

    def extra_repr(self) -> str:
        return (
            f"experts {self.offset}..{self.offset + self.num_experts - 1} of {self.global_num_experts} "
            f"(ep_rank={self.ep_rank}, ep_size={self.ep_size}), dim={self.dim}, hidden_dim={self.hidden_dim}"
        )

    def forward(
        self, x: Tensor, layout: str = "batched", counts: Tensor | None = None, expert_ids: Tensor | None = None
    ) -> Tensor:
        if layout in ("sorted", "grouped"):
            return self.forward_exchange_sorted(x, counts, grouped=layout == "grouped")
        if layout == "batched":
            return self.forward_exchange_batched(x)
        if layout == "all":
            raise ValueError(
                "the dense router runs every expert on every token; expert parallelism does not apply to it "
                "(use train.expert_parallel=1)"
            )
        raise ValueError(f"unknown experts layout {layout!r}; expected batched, sorted, grouped or all")

    def forward_exchange_sorted(self, x: Tensor, counts: Tensor, grouped: bool = False) -> Tensor:
        """(N, D) rows sorted by global expert, ``counts`` (E,) -> (N, D): variable-split all-to-all."""
        P, E_loc = self.ep_size, self.num_experts
        counts = counts.to(torch.long).reshape(P, E_loc)  # (P, E_loc): rows for rank j's expert e
        received = torch.empty_like(counts)
        dist.all_to_all_single(received, counts, group=self.group)  # (P, E_loc): rows from rank j for my e
        send, recv = counts.sum(1).tolist(), received.sum(1).tolist()  # host sync: the split sizes
        rows = all_to_all(x, recv, send, self.group)  # (M, D): by source rank, then by local expert
        # Regroup by local expert (source ranks in order within an expert): one stable sort of segment keys.
        source = torch.arange(P, device=x.device)[:, None].expand(P, E_loc)
        expert = torch.arange(E_loc, device=x.device)[None, :].expand(P, E_loc)
        key = torch.repeat_interleave((expert * P + source).reshape(-1), received.reshape(-1))  # (M,)
        order = torch.argsort(key, stable=True)  # (M,): expert-major
        local_counts = received.sum(0)  # (E_loc,)
        if grouped and grouped_mm_supported(self, rows):
            ids = torch.repeat_interleave(torch.arange(E_loc, device=x.device), local_counts)
            y = self.forward_grouped(rows[order], local_counts, ids)
        else:
            y = self.forward_sorted(rows[order], local_counts.tolist())
        y = y[torch.argsort(order)]  # (M, D): back to the order received
        return all_to_all(y, send, recv, self.group)  # (N, D): back to the sender, in its order

    def forward_exchange_batched(self, x: Tensor) -> Tensor:
        """(E, T, D) buffers -> (E, T, D): block j of the E axis is computed by rank j."""
        P, E_loc = self.ep_size, self.num_experts
        E, T, D = x.shape
        sizes = torch.zeros(P, dtype=torch.long, device=x.device)
        dist.all_gather_into_tensor(sizes, torch.tensor([T], device=x.device), group=self.group)
        sizes = sizes.tolist()  # T of every rank: equal in training (same local batch and capacity)
        send, recv = [E_loc * T * D] * P, [E_loc * t * D for t in sizes]
        blocks = all_to_all(x.reshape(-1), recv, send, self.group)  # (Σ_j E_loc·T_j·D,)
        blocks = [b.reshape(E_loc, t, D) for b, t in zip(blocks.split(recv), sizes, strict=True)]
        y = self.forward_batched(torch.cat(blocks, dim=1))  # (E_loc, Σ_j T_j, D)
        y = torch.cat([b.reshape(-1) for b in y.split(sizes, dim=1)])  # back to per-source blocks
        return all_to_all(y, send, recv, self.group).reshape(E, T, D)


def shard_experts(model: nn.Module, ep_rank: int, ep_size: int, group: dist.ProcessGroup | None) -> nn.Module:
    """Replace every MoE layer's experts by this rank's :class:`ExpertShard`, in place; returns ``model``.

    Every rank must have built the same model (same config and seed) first. A model without MoE
    layers is returned as it is.
    """
    for name, moe in moe_layers(model):
        if isinstance(moe.router, DenseRouter):
            raise ValueError(
                f"MoE layer {name!r} uses the dense router (every expert on every token); expert parallelism "
                "does not apply to it (use train.expert_parallel=1)"
            )
        if not isinstance(moe.experts, ExpertShard):
            moe.experts = ExpertShard(moe.experts, ep_rank, ep_size, group)
    return model


def expert_shards(model: nn.Module) -> dict[str, ExpertShard]:
    """Every expert-parallel parameter of ``model`` by qualified name, with the shard that holds it."""
    return {
        f"{prefix}.{name}" if prefix else name: module
        for prefix, module in model.named_modules()
        if isinstance(module, ExpertShard)
        for name, _ in module.named_parameters(recurse=False)
    }
