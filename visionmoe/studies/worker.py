"""A sweep's worker process: ``python -m visionmoe.studies.worker <run>/sweep_run.json [key=value ...]``.

Trains (or resumes) the one run described by the JSON file, with the extra ``key=value`` overrides
(threads, progress bar), and exits 0 once its ``summary.json`` (and any analysis) is written.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from visionmoe.studies.sweep import Run, run_one


def main(argv: list[str]) -> int:
    if not argv:
        raise SystemExit(__doc__)
    run = Run.from_dict(json.loads(Path(argv[0]).read_text()))
    run_one(run, argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
