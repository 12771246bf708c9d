"""Data sets: built-in MNIST, 8x8 digits and 2D toys, and CIFAR-10 read from the user's files."""

from smoothcert.data.datasets import DATASETS, SmoothingDataset, load_dataset, make_toy, read_cifar10_batch

__all__ = ["DATASETS", "SmoothingDataset", "load_dataset", "make_toy", "read_cifar10_batch"]
