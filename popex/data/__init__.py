"""Dataset readers (IDX / Fashion-MNIST, ImageFolder, CIFAR-10 binary), safe image
decoding, and the preprocessing shared by training and serving."""

from typing import Any

from popex.data.cifar import CIFAR10_CLASSES, load_cifar10_binary, read_cifar_batch
from popex.data.dataset import Dataset, HoldoutSplit
from popex.data.idx import (
    DEFAULT_FASHION_MNIST_ROOT,
    FASHION_MNIST_CLASSES,
    load_fashion_mnist,
    read_idx,
    write_idx,
)
from popex.data.imagefolder import load_image_folder
from popex.data.images import DEFAULT_MAX_PIXELS, ImageHeader, decode_image, encode_png, read_image_header
from popex.data.preprocess import Preprocessing, preprocess

__all__ = [
    "CIFAR10_CLASSES",
    "DEFAULT_FASHION_MNIST_ROOT",
    "DEFAULT_MAX_PIXELS",
    "FASHION_MNIST_CLASSES",
    "SHIPPED_SUBSET_ROOT",
    "Dataset",
    "HoldoutSplit",
    "ImageHeader",
    "Preprocessing",
    "TestSet",
    "decode_image",
    "default_test_set",
    "encode_png",
    "load_cifar10_binary",
    "load_fashion_mnist",
    "load_image_folder",
    "preprocess",
    "read_cifar_batch",
    "read_idx",
    "read_image_header",
    "write_fashion_mnist_subset",
    "write_idx",
]

# popex.data.subset is also a script (python -m popex.data.subset); importing it
# here eagerly would make runpy warn that it was imported before being run.
_SUBSET_NAMES = frozenset({"SHIPPED_SUBSET_ROOT", "TestSet", "default_test_set", "write_fashion_mnist_subset"})


def __getattr__(name: str) -> Any:
    if name in _SUBSET_NAMES:
        from popex.data import subset

        return getattr(subset, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
