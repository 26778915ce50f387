"""Inference speed of the exported programs (``torch.export``, ``.pt2``) against the eager models.

    python benchmarks/export_speed.py --threads 2 --repeats 7 --batch 32 --out runs/bench

Every registered model in eval mode, no grad, forward only, at its pretrained_cfg input size (32 px
for the CIFAR models, 224 px for the ImageNet ones, where ``--batch-224`` sets the batch). Three
functions per model, timed round-robin in the same process (:func:`interleaved_times`: a slow
moment of the machine hits all three): ``eager`` (the model as trained: the auto backend, dropless
capacity read from the data), ``static`` (the same model on the static-shape path that export
traces: padded backend, C = S) and ``exported`` (the program saved to a .pt2, loaded back, run by
``program.module()``). Each model's exported output is checked against eager to 1e-5 first.
Prints a Markdown table (command and machine first) and writes export_speed.csv under --out.
``--quick`` runs three small models to check the script, not to measure anything.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import timm
import torch

import visionmoe
from visionmoe.analysis.speed import benchmark_header, interleaved_times, iqr, markdown_table, write_csv
from visionmoe.export import export_model, max_abs_error, static_shapes

QUICK = {
    "cnn_resnet_cifar_moe": {"width": 8},
    "resnet18_cifar_sparse_head": {"width": 8},
    "vit_moe_tiny_patch4_32": {"depth": 4},
}

COLUMNS = [
    ("model", lambda r: r["model"]),
    ("batch × px", lambda r: f"{r['batch']} × {r['size']}"),
    ("eager ms", lambda r: f"{r['eager'] * 1e3:.2f} ± {r['eager_iqr'] * 1e3:.2f}"),
    ("static ms", lambda r: f"{r['static'] * 1e3:.2f} ± {r['static_iqr'] * 1e3:.2f}"),
    ("exported ms", lambda r: f"{r['exported'] * 1e3:.2f} ± {r['exported_iqr'] * 1e3:.2f}"),
    ("exported / eager", lambda r: f"{r['exported'] / r['eager']:.2f}"),
    ("max abs error vs eager", lambda r: f"{r['error']:.1e}"),
]


def measure(name: str, kwargs: dict, batch: int, threads: int, repeats: int) -> dict:
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs).eval()
    _, height, width = model.pretrained_cfg["input_size"]
    if "img_size" in kwargs:
        height = width = kwargs["img_size"]
    x = torch.randn(batch, 3, height, width)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.pt2"
        torch.export.save(export_model(model, x), path)
        program = torch.export.load(path)
    error = max_abs_error(program, model, x)
    if not error <= 1e-5:
        raise AssertionError(f"{name}: exported differs from eager by {error:.3g}")
    exported = program.module()

    def eager():
        with torch.no_grad():
            model(x)

    def static():
        with static_shapes(model), torch.no_grad():
            model(x)

    def run_exported():
        with torch.no_grad():
            exported(x)

    times = interleaved_times(
        {"eager": eager, "static": static, "exported": run_exported}, threads=threads, repeats=repeats
    )
    row = {"model": name, "batch": batch, "size": height, "error": error}
    for key, values in times.items():
        row[key], row[f"{key}_iqr"] = statistics.median(values), iqr(values)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=32, help="images per call for the 32-px models")
    parser.add_argument("--batch-224", type=int, default=4, help="images per call for the 224-px models")
    parser.add_argument("--models", nargs="*", default=None, help="default: every registered model")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="runs/bench")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    models = QUICK if args.quick else {name: {} for name in args.models or visionmoe.list_models()}
    rows = []
    for name, kwargs in models.items():
        size = timm.get_pretrained_cfg_value(name, "input_size")[-1]
        batch = args.batch if size <= 64 else args.batch_224
        rows.append(measure(name, kwargs, batch, args.threads, 2 if args.quick else args.repeats))
        print(markdown_table(rows[-1:], COLUMNS).splitlines()[-1], file=sys.stderr, flush=True)
    print(benchmark_header("Inference: exported program (.pt2) vs eager", args.threads))
    print()
    print(markdown_table(rows, COLUMNS))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"\nwrote {write_csv(rows, out / 'export_speed.csv')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
