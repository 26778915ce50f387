r"""Stand-in JPEG folders for the data benchmarks: CIFAR-10 JPEGs upscaled to a given size.

    python benchmarks/data_standins.py --source ../shared/data/cifar10-jpeg --out runs/standins/sf160 \
        --size 160 --train 2400 --test 100

Writes ``<out>/train/<class>/*.jpg`` and ``<out>/test/<class>/*.jpg`` (ImageFolder), the first images of
each class of the source, resized with bicubic interpolation and saved as JPEG quality 90. The pixels
are CIFAR's, only larger: decode and augmentation cost depend on the size, not on the content.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image


def make(source: Path, out: Path, size: int, counts: dict[str, int], source_splits=("train", "test")) -> Path:
    for split, src_split in zip(counts, source_splits, strict=True):
        classes = sorted(p.name for p in (source / src_split).iterdir() if p.is_dir())
        per_class = -(-counts[split] // len(classes))
        written = 0
        for name in classes:
            files = sorted((source / src_split / name).iterdir())[:per_class]
            (out / split / name).mkdir(parents=True, exist_ok=True)
            for f in files:
                if written == counts[split]:
                    break
                target = out / split / name / f.name
                if not target.exists():
                    with Image.open(f) as image:
                        image.convert("RGB").resize((size, size), Image.BICUBIC).save(target, quality=90)
                written += 1
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", type=Path, required=True, help="an ImageFolder with train/ and test/")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--train", type=int, default=1000)
    p.add_argument("--test", type=int, default=100)
    a = p.parse_args()
    print(make(a.source, a.out, a.size, {"train": a.train, "test": a.test}))


if __name__ == "__main__":
    main()
