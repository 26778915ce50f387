"""E feed-forward experts as stacked weight tensors (E, D, H) and (E, H, D)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn


class Experts(nn.Module):
    """E two-layer MLPs ``x -> act(x W1_e + b1_e) W2_e + b2_e`` with stacked weights.

    Args:
        num_experts: E.
        dim: input and output width D.
        hidden_dim: hidden width H of each expert.
        activation: a module class (``nn.GELU``) or a callable on tensors.
        bias: whether the two layers have biases.

    Shape (``layout`` of :meth:`forward`; every call goes through ``__call__`` so module hooks,
    ``FlopCounterMode``'s attribution and profilers see the experts):
        ``"batched"``: (E, T, D) -> (E, T, D), expert e applied to row block e.
        ``"sorted"``: (N, D) rows sorted by expert, ``counts[e]`` rows for expert e -> (N, D),
            one GEMM per expert.
        ``"grouped"``: the same rows, by ``torch.nn.functional.grouped_mm`` (needs ``expert_ids``,
            the (N,) expert of each row, for the biases).
        ``"all"``: (T, D) -> (T, D), the sum of every expert on every row.

    Each expert is initialised like ``nn.Linear`` (uniform in ±1/sqrt(fan_in)), so one expert
    with the weights of an ``nn.Linear`` pair is that MLP.
    """

    def __init__(
        self,
        num_experts: int,
        dim: int,
        hidden_dim: int,
        *,
        activation: type[nn.Module] | Callable[[Tensor], Tensor] = nn.GELU,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("num_experts", num_experts), ("dim", dim), ("hidden_dim", hidden_dim)):
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"Experts needs {name} to be an int >= 1, got {name}={value!r}")
        kw = {"device": device, "dtype": dtype}
        self.num_experts, self.dim, self.hidden_dim = num_experts, dim, hidden_dim
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim, **kw))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim, **kw))
        self.b1 = nn.Parameter(torch.empty(num_experts, hidden_dim, **kw)) if bias else None
        self.b2 = nn.Parameter(torch.empty(num_experts, dim, **kw)) if bias else None
        self.act = activation() if isinstance(activation, type) else activation
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for w, b, fan_in in ((self.w1, self.b1, self.dim), (self.w2, self.b2, self.hidden_dim)):
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(w, -bound, bound)
            if b is not None:
                nn.init.uniform_(b, -bound, bound)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, dim={self.dim}, hidden_dim={self.hidden_dim}, bias={self.b1 is not None}"
        )

    def forward(
        self,
        x: Tensor,
        layout: str = "batched",
        counts: Tensor | None = None,
        expert_ids: Tensor | None = None,
    ) -> Tensor:
        if layout == "batched":
            return self.forward_batched(x)
        if layout == "sorted":
            return self.forward_sorted(x, counts.tolist())
        if layout == "grouped":
            return self.forward_grouped(x, counts, expert_ids)
        if layout == "all":
            return self.forward_all(x)
        raise ValueError(f"unknown experts layout {layout!r}; expected batched, sorted, grouped or all")

    def forward_batched(self, x: Tensor) -> Tensor:
        """(E, T, D) -> (E, T, D): one batched matmul per layer (padded buffers, Soft MoE slots)."""
        # baddbmm: the bias added inside the GEMM, not in a second pass over (E, T, H)
        h = torch.bmm(x, self.w1) if self.b1 is None else torch.baddbmm(self.b1[:, None, :], x, self.w1)  # (E, T, H)
        h = self.act(h)
        return torch.bmm(h, self.w2) if self.b2 is None else torch.baddbmm(self.b2[:, None, :], h, self.w2)

    def forward_sorted(self, x: Tensor, counts: Sequence[int]) -> Tensor:
        """(N, D) rows sorted by expert, ``counts[e]`` rows for expert e -> (N, D).

        The weights are split with ``unbind`` once per call, whose backward is a single stack, so
        the cost is linear in E (indexing ``w1[e]`` in a loop would build a full-size gradient per
        expert in backward, E² work). The loop runs over experts, never over tokens; an expert
        with no rows still gets a (zero) gradient.
        """
        w1, w2 = self.w1.unbind(0), self.w2.unbind(0)
        b1 = self.b1.unbind(0) if self.b1 is not None else (None,) * self.num_experts
        b2 = self.b2.unbind(0) if self.b2 is not None else (None,) * self.num_experts
        outputs = []
        for e, xe in enumerate(x.split(list(counts))):  # xe: (counts[e], D)
            h = xe @ w1[e] if b1[e] is None else torch.addmm(b1[e], xe, w1[e])
            h = self.act(h)
            outputs.append(h @ w2[e] if b2[e] is None else torch.addmm(b2[e], h, w2[e]))
        return torch.cat(outputs)

    def forward_grouped(self, x: Tensor, counts: Tensor, expert_ids: Tensor) -> Tensor:
        """(N, D) rows sorted by expert -> (N, D) with two grouped GEMMs (no loop, no host sync).

        ``torch.nn.functional.grouped_mm`` needs row strides that are multiples of 16 bytes (D and
        H multiples of 4 in fp32); :func:`grouped_mm_supported` checks. Biases are gathered per row.
        """
        offs = counts.cumsum(0).to(torch.int32)  # end row of each expert's block
        w1, w2 = self.w1.to(x.dtype), self.w2.to(x.dtype)  # autocast has no grouped_mm kernel: match x
        h = _grouped_mm(x, w1, offs)  # (N, H)
        if self.b1 is not None:
            h = h + self.b1[expert_ids]
        h = self.act(h).to(x.dtype)
        y = _grouped_mm(h, w2, offs)  # (N, D)
        return y if self.b2 is None else y + self.b2[expert_ids]

    def forward_all(self, x: Tensor) -> Tensor:
        """(T, D) -> (T, D): Σ_e expert_e(x), computed as one FFN of width E·H (two GEMMs)."""
        E, D, H = self.w1.shape
        w1 = self.w1.permute(1, 0, 2).reshape(D, E * H)  # (D, E·H): experts' hidden units side by side
        h = x @ w1 if self.b1 is None else torch.addmm(self.b1.reshape(E * H), x, w1)
        y = self.act(h) @ self.w2.reshape(E * H, D)  # (T, D): the sum over experts, in one GEMM
        return y if self.b2 is None else y + self.b2.sum(0)


def expert_bias_names(model: nn.Module) -> set[str]:
    """Full parameter names of the biases (``b1``, ``b2``) of every :class:`Experts` in ``model``.

    For ``no_weight_decay()``: the biases are stacked (E, H) and (E, D) tensors, so an optimiser that
    skips decay by rank (timm's ``create_optimizer_v2``: ``ndim <= 1`` or a name ending ``.bias``)
    would decay them, where a dense MLP's biases are not.
    """
    return {
        f"{prefix}.{leaf}" if prefix else leaf
        for prefix, module in model.named_modules()
        if isinstance(module, Experts)
        for leaf in ("b1", "b2")
        if getattr(module, leaf) is not None
    }


def _grouped_mm(a: Tensor, b: Tensor, offs: Tensor) -> Tensor:
    fn = getattr(torch.nn.functional, "grouped_mm", None) or torch._grouped_mm
    return fn(a.contiguous(), b, offs=offs)


def grouped_mm_supported(experts: Experts, x: Tensor) -> bool:
    """Whether this torch has grouped_mm, for this dtype, and the shapes meet its alignment (16-byte rows).

    grouped_mm takes float32, bfloat16 and float16 only (a float64 model, e.g. for exact Hessians,
    must take another backend).
    """
    if getattr(torch.nn.functional, "grouped_mm", None) is None and not hasattr(torch, "_grouped_mm"):
        return False
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    row_multiple = 16 // x.element_size()
    return experts.dim % row_multiple == 0 and experts.hidden_dim % row_multiple == 0
