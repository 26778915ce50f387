"""The training tests' tiny CIFAR-10 stand-in, for the distributed trainer tests."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "train"))
from standins import write_cifar


@pytest.fixture
def cifar10_root(tmp_path):
    return write_cifar(tmp_path / "data")
