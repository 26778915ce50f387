"""Which modules FSDP gathers one at a time (no process group needed)."""

import pytest
from torch import nn

from visionmoe.distributed.fsdp import fsdp_units


def stack() -> nn.Module:
    # stem 3·8 + 8 = 32 parameters; two blocks of 8·8 + 8 + 8·8 + 8 = 144; a head of 8·2 + 2 = 18
    block = lambda: nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))  # noqa: E731
    return nn.Sequential(nn.Linear(3, 8), nn.ModuleList([block(), block()]), nn.Linear(8, 2))


def test_blocks_of_a_stack_become_units_innermost_first():
    model = stack()
    # min 100: each block (144) is a unit; their Linears (72 each) are not, nor the stem (32) or head (18)
    assert fsdp_units(model, 100) == ["1.0", "1.1"]
    # min 50: the Linears inside each block (72) first, then nothing is left in the blocks; stem and head stay small
    assert fsdp_units(model, 50) == ["1.0.0", "1.0.2", "1.1.0", "1.1.2"]
    # min 300: no block is big enough alone and the ModuleList (288) is not counted as one: only the root
    assert fsdp_units(model, 300) == []
    # min 1: every element of a stack (a ReLU holds none), innermost first
    assert fsdp_units(model, 1) == ["0", "1.0.0", "1.0.2", "1.1.0", "1.1.2", "2"]


def test_ignored_and_shared_parameters_are_not_counted():
    model = stack()
    ignored = list(model[1][0].parameters())  # as expert shards are under expert parallelism
    assert fsdp_units(model, 100, ignored) == ["1.1"]
    model[1][1][2].weight = model[1][1][0].weight  # tied: 64 parameters counted once, 80 left
    assert fsdp_units(model, 100) == ["1.0"]


def test_a_vit_is_wrapped_block_by_block():
    import timm

    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, num_classes=10, depth=3)
    assert fsdp_units(model, 100_000) == ["blocks.0", "blocks.1", "blocks.2"]  # 0.56M each; embeddings in the root


@pytest.mark.parametrize("bad", [0, -5, 2.5, True, "1e6"])
def test_a_bad_unit_size_is_refused(bad):
    with pytest.raises(ValueError, match=f"got {bad!r}"):
        fsdp_units(stack(), bad)
