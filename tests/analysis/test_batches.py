"""The batch rule the Hessian and the loss surface share, and the finite check."""

import pytest
import torch

from visionmoe.analysis.batches import device_batches
from visionmoe.checks import check_finite


def test_one_pair_or_many_become_a_list_of_pairs_on_the_device():
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    one = device_batches((x, y), torch.device("cpu"), "test")
    assert len(one) == 1 and one[0][0] is x and one[0][1] is y  # a single (x, y) pair is not iterated
    many = device_batches(iter([(x[:2], y[:2]), (x[2:], y[2:])]), torch.device("meta"), "test")
    assert [(b.device.type, tuple(b.shape)) for pair in many for b in pair] == [
        ("meta", (2, 3)),
        ("meta", (2,)),
        ("meta", (2, 3)),
        ("meta", (2,)),
    ]


def test_no_batch_is_an_error_naming_the_caller():
    with pytest.raises(ValueError, match="the loss surface needs at least one"):
        device_batches([], torch.device("cpu"), "the loss surface")


def test_check_finite_counts_nan_and_inf():
    check_finite(torch.ones(3), "ones")
    bad = torch.tensor([1.0, float("nan"), float("inf"), float("-inf")])
    with pytest.raises(FloatingPointError, match=r"^the loss is not finite: 1 NaN and 2 inf of 4 values$"):
        check_finite(bad, "the loss")
    # one bad value anywhere, of any kind and dtype, is found (the check is one min/max reduction)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        for value in (float("nan"), float("inf"), float("-inf")):
            x = torch.randn(257, 8).to(dtype)
            x[200, 5] = value
            with pytest.raises(FloatingPointError, match="is not finite"):
                check_finite(x, "x")
    check_finite(torch.empty(0), "nothing")
    check_finite(torch.arange(3), "ints")
