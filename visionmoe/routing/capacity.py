"""Expert capacity: how many slots each expert has in each group."""

from __future__ import annotations

import math


def expert_capacity(
    num_tokens: int,
    num_experts: int,
    *,
    k: int = 1,
    capacity_factor: float | None = None,
    capacity: int | None = None,
    multiple: int = 1,
) -> int | None:
    """Per-expert, per-group capacity C (V-MoE, Riquelme et al. 2021, Sec. 2.2).

    ``C = ceil(k · S · capacity_factor / E)``, or ``capacity`` when given directly; then rounded
    up to a multiple of ``multiple`` (V-MoE rounds to 4, so its published numbers need
    ``multiple=4``). Returns None for dropless routing (``capacity_factor=None`` and no
    ``capacity``). The quotient is rounded to 9 decimals before the ceiling, so a float error in a
    decimal factor cannot add a slot: ``ceil(2 · 16 · 1.1 / 8)`` is 5 (4.4000000000000004 → 4.4).
    Plain Python arithmetic on static sizes, so ``torch.compile`` folds it to a constant.
    """
    if multiple < 1:
        raise ValueError(f"capacity multiple must be >= 1, got multiple={multiple}")
    if capacity is not None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got capacity={capacity}")
        c = capacity
    elif capacity_factor is None:
        return None
    else:
        check_capacity_factor(capacity_factor)
        c = math.ceil(round(k * num_tokens * capacity_factor / num_experts, 9))
        c = max(c, 1)
    return -(-c // multiple) * multiple


def check_capacity_factor(capacity_factor: float | None, name: str = "capacity_factor") -> None:
    if capacity_factor is None:
        return
    # Plain comparisons (NaN fails them too) so that torch.compile can fold the check.
    if (
        isinstance(capacity_factor, bool)
        or not isinstance(capacity_factor, (int, float))
        or not 0 < capacity_factor < math.inf
    ):
        raise ValueError(f"{name} must be a finite number > 0 or None (dropless), got {name}={capacity_factor!r}")
