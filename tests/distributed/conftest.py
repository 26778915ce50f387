"""The training tests' tiny CIFAR-10 stand-in (``standins.write_cifar``), for the distributed trainer tests."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "train"))
