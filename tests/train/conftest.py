"""Fixtures for the training tests: tiny learnable datasets in their official layouts (see standins.py)."""

import pytest
from standins import write_cifar


@pytest.fixture
def cifar10_root(tmp_path):
    return write_cifar(tmp_path / "data")
