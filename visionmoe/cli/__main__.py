"""``python -m visionmoe.cli`` (what torchrun launches) runs the ``visionmoe`` command."""

import sys

from visionmoe.cli import main

sys.exit(main())
