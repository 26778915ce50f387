"""SyncBatchNorm in one process: exactly BatchNorm; the conversion keeps parameters and buffers.

Its global-batch statistics over 2 processes are checked in test_distributed.py.
"""

import copy

import pytest
import torch
from torch import nn

from visionmoe.distributed import SyncBatchNorm, convert_sync_batchnorm


def model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.Flatten(2),
        nn.BatchNorm1d(4, momentum=None),  # cumulative averages, on (N, C, L)
        nn.Sequential(nn.BatchNorm1d(4, affine=False, track_running_stats=False)),
    )


def test_without_a_process_group_it_is_batchnorm_in_training_and_evaluation():
    plain = model()
    synced = convert_sync_batchnorm(copy.deepcopy(plain))
    assert sum(isinstance(m, SyncBatchNorm) for m in synced.modules()) == 3
    assert not any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, SyncBatchNorm) for m in synced.modules()
    )
    for _ in range(3):
        x = torch.randn(5, 3, 6, 6)
        torch.testing.assert_close(synced(x), plain(x), rtol=0, atol=0)
    assert synced.state_dict().keys() == plain.state_dict().keys()
    for key, value in plain.state_dict().items():
        assert torch.equal(synced.state_dict()[key], value), key
    synced.eval(), plain.eval()
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(synced(x), plain(x), rtol=0, atol=0)


def test_conversion_keeps_the_parameter_objects_and_mode():
    plain = model().eval()
    weight = plain[1].weight
    weight.requires_grad_(False)
    synced = convert_sync_batchnorm(plain)
    assert synced is plain and synced[1].weight is weight and not synced[1].weight.requires_grad
    assert not synced[1].training and synced[1].process_group is None
    single = convert_sync_batchnorm(nn.BatchNorm2d(3), process_group=None)  # the root itself: a new module
    assert isinstance(single, SyncBatchNorm)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match=r"\(N, C, \*\) input, got 1D of shape \(4,\)"):
        SyncBatchNorm(4)(torch.randn(4))
