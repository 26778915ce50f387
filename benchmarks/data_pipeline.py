"""The input pipeline without a model: images/s of the streaming loader against the in-memory one,
and peak resident memory against the number of images.

    python benchmarks/data_pipeline.py throughput --folder runs/standins/sf64 --size 64 --images 512
    python benchmarks/data_pipeline.py memory --folders runs/standins/sf160-500 ... --plot docs/x.png
    python benchmarks/data_pipeline.py trainer --folders runs/standins/sf160-400 runs/standins/sf160-2400

Stand-in folders come from benchmarks/data_standins.py. ``throughput`` times one epoch over the first
``--images`` training images, batch 64: the stream loader (random-resized crop, flip, RandAugment
m=9, with 0, 1, 2 worker processes; workers start each epoch, as in training) and the in-memory
loader over the decoded split (pad-crop, flip, RandAugment m=9: its own recipe), both to normalised
float batches. Median of ``--repeats``, the settings interleaved within each repeat; also the CPU
time per image of the process and its workers, which a busy shared machine disturbs less than images/s. ``memory`` runs
one subprocess per (folder, loader) that builds the loader and iterates one epoch, and reports its
peak RSS (ru_maxrss of the process and of its largest worker). ``trainer`` reports the peak RSS of a
process that builds a Trainer on each folder (in memory: both splits decoded, channel statistics).
"""

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from visionmoe.data import ImageTensors, TensorLoader, load_image_folder
from visionmoe.data.datasets import list_image_folder
from visionmoe.data.stream import ImageFiles, StreamLoader, train_transform
from visionmoe.train.data import Augment


def loaders(folder: Path, size: int, images: int, workers: tuple[int, ...]) -> dict:
    files = ImageFiles.from_files(*list_image_folder(folder / "train")).subset(torch.arange(images))
    transform = train_transform(size, randaugment=9)
    out = {f"stream, {w} workers": StreamLoader(files, 64, transform, workers=w) for w in workers}
    split = load_image_folder(folder / "train", image_size=size)
    split = ImageTensors(split.images[:images], split.labels[:images], split.classes)
    out["in memory (decoded once)"] = TensorLoader(split, 64, augment=Augment(size // 8, True, 9))
    return out


def throughput(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    runs = loaders(args.folder, args.size, args.images, tuple(args.workers))
    times: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, loader in runs.items():
            start, cpu_start = time.perf_counter(), cpu_seconds()
            seen = sum(len(y) for _, y in loader)
            times[name].append(seen / (time.perf_counter() - start))
            cpu[name].append((cpu_seconds() - cpu_start) / seen * 1e3)
    reference = statistics.median(times["in memory (decoded once)"])
    print(f"\n### {args.size}-px JPEGs, {args.images} images, batch 64, torch threads {args.threads}\n")
    print("| loader | images/s (median) | runs | vs in memory | CPU ms per image (all processes) |")
    print("|---|---:|---|---:|---:|")
    for name, values in times.items():
        med = statistics.median(values)
        runs_ = ", ".join(f"{v:.0f}" for v in values)
        print(f"| {name} | {med:.0f} | {runs_} | {med / reference:.2f}× | {statistics.median(cpu[name]):.2f} |")


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the workers, once an epoch ends)."""
    return sum(
        r.ru_utime + r.ru_stime for r in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    )


CHILD = """
import resource, sys
from pathlib import Path
from visionmoe.data import TensorLoader, load_image_folder
from visionmoe.data.datasets import list_image_folder
from visionmoe.data.stream import ImageFiles, StreamLoader, train_transform
from visionmoe.train.data import Augment, channel_stats
folder, mode = Path(sys.argv[1]) / "train", sys.argv[2]
if mode == "stream":
    loader = StreamLoader(ImageFiles.from_files(*list_image_folder(folder)), 64, train_transform(64), workers=2)
else:
    split = load_image_folder(folder)
    channel_stats(split.images)
    loader = TensorLoader(split, 64, augment=Augment(8, True, None))
for x, y in loader:
    pass
print(max(resource.getrusage(w).ru_maxrss for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)) // 1024)
"""


def memory(args: argparse.Namespace) -> None:
    rows = []
    for folder in args.folders:
        n = sum(1 for _ in (folder / "train").glob("*/*"))
        peaks = {}
        for mode in ("memory", "stream"):
            shutil.rmtree(folder / ".visionmoe-cache", ignore_errors=True)  # decode, not a cache load
            out = subprocess.run([sys.executable, "-c", CHILD, str(folder), mode], capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(out.stderr)
            peaks[mode] = int(out.stdout.split()[-1])
        rows.append((n, peaks["memory"], peaks["stream"]))
    print("\n| images | decoded pixels (MB) | peak RSS in memory (MB) | peak RSS streamed (MB) |")
    print("|---:|---:|---:|---:|")
    from PIL import Image

    first = next((args.folders[0] / "train").glob("*/*"))
    with Image.open(first) as image:
        pixel_bytes = 3 * image.size[0] * image.size[1]
    for n, m, s in rows:
        print(f"| {n} | {n * pixel_bytes / 1e6:.0f} | {m} | {s} |")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.4))
        ns = [r[0] for r in rows]
        ax.plot(ns, [r[1] for r in rows], "o-", label="in memory (decoded split)")
        ax.plot(ns, [r[2] for r in rows], "s-", label="stream (2 workers)")
        ax.plot(ns, [rows[0][1] + (n - ns[0]) * pixel_bytes / 2**20 for n in ns], ":", c="grey", label="+ pixels")
        ax.set_xlabel(f"training images ({int(pixel_bytes / 3) ** 0.5:.0f}-px JPEG)")
        ax.set_ylabel("peak RSS of the process (MB)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"\nwrote {args.plot}")


TRAINER = """
import resource, sys, tempfile
from visionmoe.train import Trainer, load_config
with tempfile.TemporaryDirectory() as out:
    Trainer(load_config("cifar10_moe", [
        "data.dataset=imagefolder", f"data.data_dir={sys.argv[1]}", "data.test_split=test",
        "model.name=cnn_dw_cifar_moe", "model.kwargs.width=8", "data.batch_size=32", "train.epochs=0.01",
        "optim.warmup_epochs=0", f"train.out_dir={out}", "train.progress=false", "train.tensorboard=false",
    ]))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


def trainer(args: argparse.Namespace) -> None:
    """Peak RSS of building a Trainer (decode both splits, channel statistics) on each folder."""
    print("\n| folder | peak RSS building the Trainer (MB) |\n|---|---:|")
    for folder in args.folders:
        shutil.rmtree(folder / ".visionmoe-cache", ignore_errors=True)
        out = subprocess.run([sys.executable, "-c", TRAINER, str(folder)], capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(out.stderr)
        print(f"| {folder.name} | {int(out.stdout.split()[-1])} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("throughput")
    t.add_argument("--folder", type=Path, required=True)
    t.add_argument("--size", type=int, default=64)
    t.add_argument("--images", type=int, default=512)
    t.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    t.add_argument("--repeats", type=int, default=3)
    t.add_argument("--threads", type=int, default=1)
    t.set_defaults(func=throughput)
    m = sub.add_parser("memory")
    m.add_argument("--folders", type=Path, nargs="+", required=True)
    m.add_argument("--plot", type=Path, default=None)
    m.set_defaults(func=memory)
    b = sub.add_parser("trainer")
    b.add_argument("--folders", type=Path, nargs="+", required=True)
    b.set_defaults(func=trainer)
    args = p.parse_args()
    print(f"command: python benchmarks/data_pipeline.py {' '.join(sys.argv[1:])}")
    print(f"machine: {torch.get_num_threads()} torch threads available, shared with other jobs")
    args.func(args)


if __name__ == "__main__":
    main()
