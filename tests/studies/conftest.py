"""Fixtures for the study tests: stand-in CIFAR-10/100 in their official layouts, written once per session."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from standins import write_cifar


@pytest.fixture(scope="session")
def standin_data(tmp_path_factory):
    """A data root holding stand-in cifar-10-batches-py (120 train / 40 test) and cifar-100-python."""
    root = tmp_path_factory.mktemp("data")
    write_cifar(root, "cifar10")
    write_cifar(root, "cifar100", per_class=3, test_per_class=1)
    return root
