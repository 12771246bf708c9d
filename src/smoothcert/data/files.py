"""Your own data from files: NumPy arrays and folders of images, with the built-in sets' semantics.

Wherever a data set name is asked for (``load_dataset``, ``smoothcert train/certify/predict --dataset``), a name
``KIND:PATH`` reads the data from files. Every item is ``(input, label, dataset_index)`` as for the built-in
sets: inputs float32 in [0, 1] (noise is added in these units, so sigma is measured in them), labels ``0..K-1``,
splits ``"train"`` and ``"test"``, and a dataset index fixed by the rules below (never by loader order).

``npz:FILE`` (a NumPy ``.npz`` archive) or ``npy:DIR`` (a directory of ``.npy`` files with the same names)
    Arrays ``x_train``, ``y_train``, ``x_test``, ``y_test``: the two splits, the dataset index is the row in the
    file. Or ``x``, ``y``: one pool, split per class 80/20 by the rule of the built-in ``digits`` set (each
    class's rows, in file order, permuted with ``numpy.random.default_rng(0)``; the first ``round(0.8 n_c)`` to
    train; then train permuted with ``default_rng(1)``, test with ``default_rng(2)``). Optional: ``class_names``
    (K strings) and ``scale`` (one positive number). Files are read with ``allow_pickle=False``.

    Inputs have shape ``(N, D)`` (vectors), ``(N, H, W)`` (gray images: a channel is added), ``(N, C, H, W)``, or
    ``(N, H, W, C)`` with 1 or 3 channels last (moved first when dimension 1 is not 1 or 3). The **scale** maps
    the stored values into [0, 1]: inputs are divided by ``scale`` when it is given; without it, ``uint8``
    inputs are pixels 0-255 (divided by 255) and float inputs must already lie in [0, 1]; other integer types
    need a ``scale``. Every divided value must lie in [0, 1] and be finite.
``folder:DIR``
    ``DIR/train/CLASS/IMAGE`` and ``DIR/test/CLASS/IMAGE`` (two splits), or ``DIR/CLASS/IMAGE`` (one pool, split
    80/20 per class as above). The classes are the sub-folder names in sorted order (index 0 the first); the
    test split may lack a class, not have one the train split lacks. Images are read with Pillow, files directly
    inside a class folder (names starting with ``.`` are skipped, every other file must be a readable image),
    all of one size: 8-bit gray images give one channel, all images become RGB (alpha dropped) as soon as one is
    in colour; pixels are divided by 255. Order: by class, then file name; then each split is permuted with
    ``default_rng(1)`` (train) and ``default_rng(2)`` (test), so any prefix of a split mixes the classes.

Labels are integers ``0..K-1`` with ``K = len(class_names)`` (``npz``/``npy``), else the largest label plus one;
every class must appear in the training split and ``K >= 2``. Anything else raises one ValueError naming the file,
what was wrong and what is allowed. The data set's name is ``KIND:`` followed by the absolute path, so a
checkpoint trained on it finds it again.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["FILE_KINDS", "FileSplit", "input_statistics", "is_file_dataset", "read_file_dataset", "stratified_split"]

FILE_KINDS = ("npz", "npy", "folder")
_SPLIT_KEYS = ("x_train", "y_train", "x_test", "y_test")
_POOL_KEYS = ("x", "y")
_OPTIONAL_KEYS = ("class_names", "scale")
#: Pillow modes read as 8-bit gray; 16-bit and float modes are refused (they would be clipped).
_GRAY_MODES = ("L", "1", "LA")
_DEEP_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


@dataclass(frozen=True)
class FileSplit:
    """One split read from files: ``data`` (uint8 or float32, ``(N, *input_shape)``) divided by ``scale`` lies in
    [0, 1]; ``labels`` int64 ``(N,)``; the data set's ``name`` (``KIND:absolute path``) and class names."""

    name: str
    data: torch.Tensor
    labels: torch.Tensor
    scale: float
    class_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def is_file_dataset(name: object) -> bool:
    """Whether ``name`` selects data from files (``npz:FILE``, ``npy:DIR``, ``folder:DIR``)."""
    return isinstance(name, str) and name.split(":", 1)[0] in FILE_KINDS and ":" in name


def stratified_split(labels: np.ndarray, split: str, fraction: float = 0.8) -> np.ndarray:
    """Row indices of ``split`` in a pool: per class (file order) permuted with ``default_rng(0)``, the first
    ``round(fraction * n_c)`` to train, the rest to test; train permuted with ``default_rng(1)``, test with
    ``default_rng(2)`` (the rule of the built-in ``digits`` set)."""
    rng = np.random.default_rng(0)
    parts: dict[str, list[np.ndarray]] = {"train": [], "test": []}
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(idx.size)]
        k = int(round(fraction * idx.size))
        parts["train"].append(idx[:k])
        parts["test"].append(idx[k:])
    idx = np.concatenate(parts[split]).astype(np.int64)
    return idx[np.random.default_rng(1 if split == "train" else 2).permutation(idx.size)]


def input_statistics(inputs: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (per-feature for vectors) mean and standard deviation, for a model's normalization layer."""
    x = inputs.to(torch.float64)
    dims = [0] + list(range(2, x.ndim))
    mean, std = x.mean(dim=dims), x.std(dim=dims)
    std = torch.where(std > 1e-6, std, torch.ones_like(std))   # a constant channel: do not divide by ~0
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def read_file_dataset(name: str, split: str) -> FileSplit:
    """Split ``split`` of the data set ``name`` (``npz:FILE``, ``npy:DIR`` or ``folder:DIR``; module docstring)."""
    if not is_file_dataset(name):
        raise ValueError(f"{name!r} is not a data set from files; use npz:FILE, npy:DIR or folder:DIR")
    kind, raw = name.split(":", 1)
    if not raw:
        raise ValueError(f"data set {name!r}: give a path after '{kind}:'")
    path = Path(raw).expanduser().resolve()
    full = f"{kind}:{path}"
    if kind == "folder":
        return _read_folder(full, path, split)
    return _read_arrays(full, path, split, _npz_arrays(path) if kind == "npz" else _npy_arrays(path))


# ------------------------------------------------------------------------------------------------ arrays


def _npz_arrays(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise ValueError(f"npz:{path}: no such file (expected a NumPy .npz archive)")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"npz:{path}: not a readable NumPy .npz archive (not a zip file; numpy.savez writes one, "
                         "and npy:DIR reads a directory of .npy files)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {k: archive[k] for k in archive.files}
    except ValueError as e:   # object arrays need pickle: refused
        raise ValueError(f"npz:{path}: cannot read an array without pickle ({e}); store numeric arrays and "
                         "class_names as strings") from e
    except Exception as e:   # not a zip, truncated, ...
        raise ValueError(f"npz:{path}: not a readable NumPy .npz archive ({e})") from e


def _npy_arrays(path: Path) -> dict[str, np.ndarray]:
    if not path.is_dir():
        raise ValueError(f"npy:{path}: not a directory (expected x_train.npy, y_train.npy, x_test.npy, "
                         "y_test.npy, or x.npy and y.npy)")
    out = {}
    for key in _SPLIT_KEYS + _POOL_KEYS + _OPTIONAL_KEYS:
        file = path / f"{key}.npy"
        if file.is_file():
            try:
                out[key] = np.load(file, allow_pickle=False)
            except Exception as e:
                raise ValueError(f"{file}: not a readable .npy array without pickle ({e})") from e
    return out


def _channels_first(x: np.ndarray, where: str) -> np.ndarray:
    if x.ndim < 2:
        raise ValueError(f"{where}: inputs need shape (N, D), (N, H, W), (N, C, H, W) or (N, H, W, C); "
                         f"got shape {x.shape}")
    if x.ndim == 3:
        return x[:, None]
    if x.ndim == 4 and x.shape[1] not in (1, 3) and x.shape[3] in (1, 3):
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    return x


def _scaled(x: np.ndarray, scale: float | None, where: str) -> tuple[torch.Tensor, float]:
    """Inputs as a tensor and the divisor that maps them into [0, 1]; checks the range."""
    if x.dtype == np.bool_ or not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise ValueError(f"{where}: inputs must be numbers (uint8 pixels or floats), got dtype {x.dtype}")
    if scale is None:
        if x.dtype == np.uint8:
            scale = 255.0
        elif np.issubdtype(x.dtype, np.floating):
            scale = 1.0
        else:
            raise ValueError(f"{where}: {x.dtype} inputs need a stated scale: add an entry 'scale' (e.g. 255 or "
                             "65535) that maps them into [0, 1], or store uint8 pixels or floats in [0, 1]")
    if x.size:
        if not np.isfinite(x).all():
            raise ValueError(f"{where}: inputs contain NaN or infinite values")
        lo, hi = float(x.min()), float(x.max())
        if lo < 0 or hi > scale:
            raise ValueError(f"{where}: inputs lie in [{lo:g}, {hi:g}] (dtype {x.dtype}), outside [0, {scale:g}]: "
                             f"divided by the scale {scale:g} they leave [0, 1]. Store floats in [0, 1] or uint8 "
                             "pixels 0-255, or add an entry 'scale' (e.g. 255) that maps them into [0, 1]")
    if x.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(x)), float(scale)
    kind = np.float32 if np.issubdtype(x.dtype, np.floating) else np.int64
    return torch.from_numpy(np.ascontiguousarray(x.astype(kind))), float(scale)


def _labels(y: np.ndarray, rows: int, key: str, where: str) -> np.ndarray:
    if y.ndim != 1:
        raise ValueError(f"{where}: {key} must be one label per input, shape ({rows},); got shape {y.shape}")
    if y.shape[0] != rows:
        raise ValueError(f"{where}: mismatched lengths: {rows} inputs but {y.shape[0]} labels in {key}")
    if np.issubdtype(y.dtype, np.floating) and np.isfinite(y).all() and np.array_equal(y, np.round(y)):
        y = y.astype(np.int64)
    if not np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_:
        raise ValueError(f"{where}: {key} must hold integer class labels 0..K-1, got dtype {y.dtype}")
    if y.size and y.min() < 0:
        raise ValueError(f"{where}: {key} holds the negative label {int(y.min())}; labels are 0..K-1")
    return y.astype(np.int64)


def _class_names(labels: list[np.ndarray], given, where: str) -> tuple[str, ...]:
    top = max((int(y.max()) for y in labels if y.size), default=-1)
    if given is not None:
        names = np.asarray(given)
        if names.ndim != 1 or not (np.issubdtype(names.dtype, np.str_) or np.issubdtype(names.dtype, np.bytes_)):
            raise ValueError(f"{where}: class_names must be a 1-D array of strings, got {names.dtype} {names.shape}")
        names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names.tolist())
        if top >= len(names):
            raise ValueError(f"{where}: label {top} but only {len(names)} class_names (labels are 0..K-1)")
    else:
        names = tuple(str(c) for c in range(top + 1))
    if len(names) < 2:
        raise ValueError(f"{where}: too few classes: {len(names)} found; a classifier needs at least 2")
    return names


def _check_train_classes(y_train: np.ndarray, names: tuple[str, ...], where: str) -> None:
    missing = sorted(set(range(len(names))) - set(np.unique(y_train).tolist()))
    if missing:
        shown = ", ".join(f"{c} ({names[c]})" for c in missing[:5])
        raise ValueError(f"{where}: class(es) {shown} have no training input; every class 0..{len(names) - 1} "
                         "must appear in the training split")


def _read_arrays(name: str, path: Path, split: str, arrays: dict[str, np.ndarray]) -> FileSplit:
    unknown = sorted(set(arrays) - set(_SPLIT_KEYS + _POOL_KEYS + _OPTIONAL_KEYS))
    if unknown:
        raise ValueError(f"{name}: unknown array(s) {', '.join(unknown)}; allowed: {', '.join(_SPLIT_KEYS)} "
                         f"(two splits) or x, y (one pool), and optionally class_names, scale")
    has_splits, has_pool = [k in arrays for k in _SPLIT_KEYS], [k in arrays for k in _POOL_KEYS]
    if all(has_splits) == all(has_pool) or any(has_splits) and any(has_pool):
        raise ValueError(f"{name}: give either x_train, y_train, x_test, y_test (two splits) or x, y (one pool); "
                         f"found {', '.join(sorted(arrays)) or 'no arrays'}")
    scale = None
    if "scale" in arrays:
        s = np.asarray(arrays["scale"])
        if s.size != 1 or not np.issubdtype(s.dtype, np.number) or not np.isfinite(s).all() or float(s) <= 0:
            raise ValueError(f"{name}: scale must be one positive finite number (e.g. 255), got {s!r}")
        scale = float(s.reshape(()))
    keys = {"train": ("x_train", "y_train"), "test": ("x_test", "y_test")} if all(has_splits) else None
    pairs = [keys["train"], keys["test"]] if keys else [("x", "y")]
    inputs, labels = {}, {}
    for xk, yk in pairs:
        inputs[xk] = _channels_first(np.asarray(arrays[xk]), f"{name} ({xk})")
        labels[yk] = _labels(np.asarray(arrays[yk]), inputs[xk].shape[0], yk, name)
        if inputs[xk].shape[0] == 0:
            raise ValueError(f"{name}: {xk} is empty")
    if keys and inputs["x_train"].shape[1:] != inputs["x_test"].shape[1:]:
        raise ValueError(f"{name}: x_train inputs have shape {inputs['x_train'].shape[1:]} but x_test inputs "
                         f"{inputs['x_test'].shape[1:]}; both splits need one input shape")
    names = _class_names(list(labels.values()), arrays.get("class_names"), name)
    _check_train_classes(labels["y_train" if keys else "y"], names, name)
    if keys:
        x, y = inputs[keys[split][0]], labels[keys[split][1]]
    else:
        rows = stratified_split(labels["y"], split)
        if rows.size == 0:
            raise ValueError(f"{name}: the {split} split of the pool x, y is empty; give more inputs per class")
        x, y = inputs["x"][rows], labels["y"][rows]
    data, scale = _scaled(x, scale, f"{name} ({keys[split][0] if keys else 'x'})")
    return FileSplit(name, data, torch.from_numpy(y), scale, names)


# ------------------------------------------------------------------------------------------------ folder


def _subfolders(path: Path) -> list[Path]:
    return sorted(d for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))


def _image_files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.is_file() and not f.name.startswith("."))


def _open_image(file: Path, load: bool):
    """The image's ``(mode, size)`` from its header, or (``load``) the image converted to L or RGB."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(file) as im:
            if im.mode in _DEEP_MODES:
                raise ValueError(f"{file}: a {im.mode} image (16-bit or float); save 8-bit gray or RGB images")
            if not load:
                return im.mode, im.size
            im.load()
            return im.convert("L" if im.mode in _GRAY_MODES else "RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError) as e:
        raise ValueError(f"{file}: not a readable image ({e}); a class folder holds only images "
                         "(names starting with '.' are skipped)") from e


def _class_files(base: Path, classes: tuple[str, ...], need_all: bool, name: str) -> tuple[list[Path], np.ndarray]:
    files, labels = [], []
    for c, cls in enumerate(classes):
        found = _image_files(base / cls) if (base / cls).is_dir() else []
        if not found and need_all:
            raise ValueError(f"{name}: class folder {base / cls} holds no image; every class needs training images")
        files += found
        labels += [c] * len(found)
    return files, np.asarray(labels, dtype=np.int64)


def _read_folder(name: str, root: Path, split: str) -> FileSplit:
    if not root.is_dir():
        raise ValueError(f"{name}: not a directory (expected DIR/train/CLASS/IMAGE and DIR/test/CLASS/IMAGE, "
                         "or DIR/CLASS/IMAGE)")
    top = {d.name for d in _subfolders(root)}
    explicit = "train" in top or "test" in top
    if explicit:
        if not {"train", "test"} <= top:
            raise ValueError(f"{name}: has {'train' if 'train' in top else 'test'}/ but not "
                             f"{'test' if 'train' in top else 'train'}/; give both splits or one folder per class")
        classes = tuple(d.name for d in _subfolders(root / "train"))
        extra = sorted({d.name for d in _subfolders(root / "test")} - set(classes))
        if extra:
            raise ValueError(f"{name}: test/ has class folder(s) {', '.join(extra)} that train/ lacks")
    else:
        classes = tuple(d.name for d in _subfolders(root))
    if len(classes) < 2:
        raise ValueError(f"{name}: too few classes: {len(classes)} class folder(s); a classifier needs at least 2 "
                         "(one sub-folder of images per class)")
    if explicit:
        train, test = _class_files(root / "train", classes, True, name), _class_files(root / "test", classes, False, name)
        every = train[0] + test[0]
        files, y = train if split == "train" else test
        rows = np.random.default_rng(1 if split == "train" else 2).permutation(y.size)
    else:
        files, y = _class_files(root, classes, True, name)
        every, rows = files, stratified_split(y, split)
    if rows.size == 0:
        raise ValueError(f"{name}: the {split} split holds no image")
    # headers of both splits: one size, and one channel count for every image
    heads = [_open_image(f, load=False) for f in every]
    for f, (_, size) in zip(every, heads):
        if size != heads[0][1]:
            raise ValueError(f"{f}: {size[0]}x{size[1]} pixels but {every[0]} has {heads[0][1][0]}x{heads[0][1][1]}; "
                             "every image must have one size (resize them first)")
    gray = all(mode in _GRAY_MODES for mode, _ in heads)
    images = [_open_image(files[i], load=True).convert("L" if gray else "RGB") for i in rows]
    x = np.stack([np.asarray(im, dtype=np.uint8) for im in images])
    x = x[:, None] if gray else np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    return FileSplit(name, torch.from_numpy(x), torch.from_numpy(y[rows]), 255.0, classes)
