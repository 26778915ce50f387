"""Per-epoch metrics to ``metrics.jsonl`` (the record), ``metrics.csv`` (pandas) and TensorBoard.

One record per epoch, nested as it is computed (``routing`` holds a dict per MoE layer). The CSV is
the flattened record (``routing/<layer>/<stat>`` columns), rewritten from the JSONL after every
epoch so its columns always cover every record. On resume, records after the checkpoint are dropped
first, so a run killed between logging and checkpointing does not log an epoch twice. A record is
appended in one write and flushed, and the other files are replaced atomically, so a crash tears at
most the last line of ``metrics.jsonl``, which resume drops with a warning (:mod:`visionmoe.jsonl`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from visionmoe.jsonl import append_jsonl, read_jsonl, write_atomic, write_jsonl


def flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts to ``a/b/c`` keys; per-expert loads to ``.../load/e<i>`` entries."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}/"))
        elif key == "tokens_per_expert" and isinstance(value, list):
            out.update({f"{prefix}load/e{i}": v for i, v in enumerate(value)})
        else:
            out[name] = value
    return out


class RunLogger:
    """Writes the records of one run directory; ``tensorboard=False`` skips TensorBoard.

    Resuming at ``resume_step`` keeps the records up to that step and drops later ones (a killed run's
    records past its checkpoint); ``partial=True`` (the checkpoint sits inside an epoch, as after a time
    limit) drops the record at that step too: the resumed epoch logs the whole epoch when it ends.
    TensorBoard keeps its events up to ``resume_step`` as well (``purge_step`` is the first step dropped).
    """

    def __init__(
        self, run_dir: Path, *, tensorboard: bool = True, resume_step: int | None = None, partial: bool = False
    ) -> None:
        self.run_dir = Path(run_dir)
        self.jsonl = self.run_dir / "metrics.jsonl"
        self.csv = self.run_dir / "metrics.csv"
        self.records: list[dict[str, Any]] = []
        if resume_step is not None and self.jsonl.is_file():
            self.records = [
                r
                for r in read_jsonl(self.jsonl)
                if r["step"] < resume_step or (r["step"] == resume_step and not partial)
            ]
            write_jsonl(self.jsonl, self.records)
        elif self.jsonl.exists():
            self.jsonl.unlink()
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(
                str(self.run_dir / "tensorboard"),
                purge_step=None if resume_step is None else resume_step + (not partial),
            )

    def log(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        append_jsonl(self.jsonl, record)
        write_atomic(self.csv, pd.json_normalize(self.records, sep="/").to_csv(index=False))
        if self.writer is not None:
            step = record["step"]
            for key, value in flatten(record).items():
                number = isinstance(value, int | float) and not isinstance(value, bool)
                if number and key not in ("step", "epoch") and math.isfinite(value):
                    self.writer.add_scalar(key, value, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def epoch_line(record: dict[str, Any]) -> str:
    """The console line of an epoch's record: train loss and top-1, test metrics, the first MoE layer's routing."""
    line = (
        f"epoch {record['epoch']:g} step {record['step']}: train loss {record['train_loss']:.3f} "
        f"top-1 {record['train_top1']:.1%}, {record['images_per_s']:.0f} img/s"
    )
    if "test" in record:
        t = record["test"]
        line += f" | test top-1 {t['top1']:.2%} top-5 {t['top5']:.2%} nll {t['nll']:.3f} ece {t['ece']:.3f}"
    for name, r in record["routing"].items():
        entropy = r["router_entropy"]  # NaN for a dense "router", which has no choice to make
        line += f" | {name}: drop {r['dropped_fraction']:.1%} H {'—' if math.isnan(entropy) else f'{entropy:.2f}'}"
        break  # the first layer only; every layer is in metrics.jsonl
    return line


def progress_bar(enabled: bool):
    """A rich progress bar of an epoch's steps with running loss, accuracy and images/s (off: a no-op)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f} acc {task.fields[acc]:.1%} {task.fields[ips]:.0f} img/s"),
        TimeElapsedColumn(),
        disable=not enabled,
        transient=True,
    )
