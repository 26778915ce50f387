"""Data: datasets in their official layouts as uint8 tensors, batched augmentation, a resumable loader."""

from visionmoe.data.augment import CIFAR_MEAN, CIFAR_STD, normalize, random_crop_flip
from visionmoe.data.datasets import (
    CIFAR10,
    CIFAR100,
    DATA_ENV,
    Archive,
    ImageTensors,
    data_root,
    download_archive,
    load_cifar,
    load_image_folder,
    load_tiny_imagenet,
)
from visionmoe.data.loader import TensorLoader

__all__ = [
    "CIFAR10",
    "CIFAR100",
    "CIFAR_MEAN",
    "CIFAR_STD",
    "DATA_ENV",
    "Archive",
    "ImageTensors",
    "TensorLoader",
    "data_root",
    "download_archive",
    "load_cifar",
    "load_image_folder",
    "load_tiny_imagenet",
    "normalize",
    "random_crop_flip",
]
