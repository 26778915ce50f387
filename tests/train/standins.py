"""Tiny, learnable datasets in each official layout, written by the tests themselves.

Each class has its own colour; images are that colour plus noise, so a few SGD steps on a small
model reduce the loss, and evaluation has something to measure.
"""

import pickle

import numpy as np
from PIL import Image


def class_images(num_classes, per_class, size, seed=0):
    """(N, size, size, 3) uint8 images and labels: class colour + Gaussian noise."""
    colours = np.random.default_rng(12345).integers(30, 226, size=(num_classes, 3))  # the same in every split
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_classes), per_class)
    rng.shuffle(labels)
    noise = rng.normal(0, 25, size=(labels.size, size, size, 3))
    images = np.clip(colours[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8)
    return images, labels


def write_cifar(root, name="cifar10", per_class=12, test_per_class=4):
    """cifar-10-batches-py (5 data batches + test_batch + batches.meta) or cifar-100-python."""
    num_classes = 10 if name == "cifar10" else 100
    images, labels = class_images(num_classes, per_class, 32, seed=1)
    test_images, test_labels = class_images(num_classes, test_per_class, 32, seed=2)

    def rows(x):  # official row layout: 1024 R, 1024 G, 1024 B
        return x.transpose(0, 3, 1, 2).reshape(len(x), 3072)

    if name == "cifar10":
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        for i, chunk in enumerate(np.array_split(np.arange(len(labels)), 5), start=1):
            batch = {b"data": rows(images[chunk]), b"labels": labels[chunk].tolist()}
            (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch))
        test = {b"data": rows(test_images), b"labels": test_labels.tolist()}
        (folder / "test_batch").write_bytes(pickle.dumps(test))
        meta = {b"label_names": [f"class{i}".encode() for i in range(10)]}
        (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    else:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True)
        (folder / "train").write_bytes(pickle.dumps({b"data": rows(images), b"fine_labels": labels.tolist()}))
        (folder / "test").write_bytes(pickle.dumps({b"data": rows(test_images), b"fine_labels": test_labels.tolist()}))
        (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": [f"c{i}".encode() for i in range(100)]}))
    return root


def write_image_folder(root, splits=("train", "val"), num_classes=4, per_class=6, size=16):
    for s, split in enumerate(splits):
        images, labels = class_images(num_classes, per_class, size, seed=10 + s)
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            path = root / split / f"class{label}" / f"{i:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(path)
    return root


def write_tiny_imagenet(root, num_classes=3, per_class=6, size=16):
    base = root / "tiny-imagenet-200"
    wnids = [f"n{i:08d}" for i in range(num_classes)]
    base.mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    images, labels = class_images(num_classes, per_class, size, seed=3)
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        wnid = wnids[label]
        path = base / "train" / wnid / "images" / f"{wnid}_{i}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path, format="PNG")  # content need not be JPEG; PIL reads either
    val_images, val_labels = class_images(num_classes, 2, size, seed=4)
    lines = []
    for i, (image, label) in enumerate(zip(val_images, val_labels, strict=True)):
        path = base / "val" / "images" / f"val_{i}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path, format="PNG")
        lines.append(f"val_{i}.JPEG\t{wnids[label]}\t0\t0\t{size}\t{size}")
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return root
