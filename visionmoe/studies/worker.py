"""A sweep's worker process: ``python -m visionmoe.studies.worker <run>/sweep_run.json [key=value ...]``.

Trains (or resumes) the one run described by the JSON file (:func:`visionmoe.studies.executors.run_one`),
with the extra ``key=value`` overrides (threads, progress bar), and exits 0 once its ``summary.json`` (and
any analysis) is written. The local executor starts one per run.
"""

from __future__ import annotations

import sys

from visionmoe.studies.executors import run_one
from visionmoe.studies.grid import Run


def main(argv: list[str]) -> int:
    if not argv:
        raise SystemExit(__doc__)
    run_one(Run.load(argv[0]), argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
