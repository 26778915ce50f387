"""Which blocks of a model get an MoE layer.

Placements (B = number of MoE-able blocks, indices 0-based):

    "every-n"   blocks n-1, 2n-1, 3n-1, ...  (V-MoE's "Every-n": every-2 = the odd blocks)
    "last-n"    the last n blocks of the every-2 grid, i.e. the last n odd blocks (V-MoE's
                "Last-n", the placement Videau et al. 2025 find robust)
    "tail-n"    the last n blocks, whatever their parity
    "all"       every block;   "none"  no block
    [i, j, ...] exactly these blocks (negative indices count from the end); a plain int i is [i]

Indices they produce:

    placement   B = 8                   B = 12
    every-2     1 3 5 7                 1 3 5 7 9 11
    every-3     2 5                     2 5 8 11
    last-2      5 7                     9 11
    last-3      3 5 7                   7 9 11
    tail-2      6 7                     10 11
    all         0 1 2 3 4 5 6 7         0 ... 11
"""

from __future__ import annotations

import re
from collections.abc import Sequence

PLACEMENTS = ("every-<n>", "last-<n>", "tail-<n>", "all", "none", "a block index or a list of them")

Placement = str | int | Sequence[int]


def resolve_placement(placement: Placement, num_blocks: int) -> list[int]:
    """Sorted block indices for ``placement`` in a model of ``num_blocks`` MoE-able blocks."""
    if isinstance(placement, str):
        if placement == "all":
            return list(range(num_blocks))
        if placement == "none":
            return []
        match = re.fullmatch(r"(every|last|tail)-(\d+)", placement)
        if not match or int(match.group(2)) < 1:
            raise ValueError(f"unknown placement {placement!r}; choose one of: {', '.join(PLACEMENTS)}")
        kind, n = match.group(1), int(match.group(2))
        if kind == "every":
            return list(range(n - 1, num_blocks, n))
        odd = list(range(1, num_blocks, 2))
        grid = odd if kind == "last" else list(range(num_blocks))
        if n > len(grid):
            what = "odd blocks" if kind == "last" else "blocks"
            have = f"the model has {len(grid)} ({num_blocks} blocks)"
            raise ValueError(f"placement {placement!r} needs {n} {what}, {have}")
        return grid[-n:]
    if isinstance(placement, int) and not isinstance(placement, bool):
        placement = [placement]
    if not isinstance(placement, Sequence):
        raise ValueError(f"unknown placement {placement!r}; choose one of: {', '.join(PLACEMENTS)}")
    indices = []
    for i in placement:
        if not isinstance(i, int) or isinstance(i, bool):
            raise ValueError(f"block index {i!r} is not an int (a model of {num_blocks} blocks)")
        if not -num_blocks <= i < num_blocks:
            raise ValueError(f"block index {i!r} out of range for a model of {num_blocks} blocks")
        indices.append(i % num_blocks)
    return sorted(set(indices))
