"""Shared fixtures."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only add synchronisation, which on a busy 2-core machine made
    such files 3-4x slower. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``; the
    thread count is restored for the other files."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
