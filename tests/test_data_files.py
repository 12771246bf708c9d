"""Your own data from files: .npz / .npy arrays and folders of images, with the built-in sets' semantics."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from smoothcert.data.datasets import load_dataset
from smoothcert.data.files import stratified_split


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return f"npz:{path}"


def _splits(rng, n_train=12, n_test=6, shape=(5, 4), classes=3):
    return {"x_train": rng.integers(0, 256, (n_train, *shape), dtype=np.uint8),
            "y_train": np.arange(n_train) % classes,
            "x_test": rng.integers(0, 256, (n_test, *shape), dtype=np.uint8),
            "y_test": (np.arange(n_test) + 1) % classes}


def test_npz_splits_keep_file_order_labels_and_pixels(tmp_path):
    arrays = _splits(np.random.default_rng(0))
    name = _npz(tmp_path / "d.npz", **arrays, class_names=np.array(["a", "b", "c"]))
    for split in ("train", "test"):
        ds = load_dataset(name, split)
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        assert ds.name == f"npz:{(tmp_path / 'd.npz').resolve()}" and ds.split == split
        assert ds.input_shape == (1, 5, 4) and ds.num_classes == 3 and ds.class_names == ("a", "b", "c")
        assert torch.equal(ds.inputs, torch.from_numpy(x[:, None].astype(np.float32)) / 255)   # row i is index i
        assert ds.labels.tolist() == y.tolist()
        item, label, index = ds[4]
        assert index == 4 and label == int(y[4]) and torch.equal(item, ds.inputs[4])


def test_npy_directory_equals_npz_and_channels_last_is_moved_first(tmp_path):
    rng = np.random.default_rng(1)
    arrays = _splits(rng, shape=(6, 5, 3))
    (tmp_path / "npy").mkdir()
    for key, value in arrays.items():
        np.save(tmp_path / "npy" / f"{key}.npy", value)
    a = load_dataset(_npz(tmp_path / "d.npz", **arrays), "train")
    b = load_dataset(f"npy:{tmp_path / 'npy'}", "train")
    assert a.input_shape == (3, 6, 5) and torch.equal(a.inputs, b.inputs) and torch.equal(a.labels, b.labels)
    assert torch.equal(a.inputs[2, :, 1, 4] * 255, torch.from_numpy(arrays["x_train"][2, 1, 4].astype(np.float32)))


def test_a_pool_is_split_by_the_rule_of_the_builtin_digits(tmp_path):
    from sklearn.datasets import load_digits

    d = load_digits()
    name = _npz(tmp_path / "digits.npz", x=d.data.reshape(-1, 8, 8), y=d.target, scale=np.array(16.0))
    for split in ("train", "test"):
        own, builtin = load_dataset(name, split), load_dataset("digits", split)
        assert torch.equal(own.inputs, builtin.inputs) and torch.equal(own.labels, builtin.labels)


def test_stratified_split_sizes_and_disjointness():
    y = np.repeat([0, 1, 2], [10, 5, 7])
    train, test = stratified_split(y, "train"), stratified_split(y, "test")
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(22))
    assert np.bincount(y[train]).tolist() == [8, 4, 6] and np.bincount(y[test]).tolist() == [2, 1, 1]
    assert np.array_equal(train, stratified_split(y, "train"))


def test_scale_rules(tmp_path):
    rng = np.random.default_rng(2)
    y = np.arange(10) % 2
    floats = rng.random((10, 3))
    assert torch.allclose(load_dataset(_npz(tmp_path / "f.npz", x=floats, y=y), "train").inputs,
                          torch.from_numpy(floats[stratified_split(y, "train")].astype(np.float32)))
    with pytest.raises(ValueError, match=r"inputs lie in \[.*\].*outside \[0, 1\].*'scale'"):
        load_dataset(_npz(tmp_path / "g.npz", x=floats * 255, y=y), "train")
    ok = load_dataset(_npz(tmp_path / "h.npz", x=floats * 255, y=y, scale=np.array(255)), "train")
    assert float(ok.inputs.max()) <= 1.0
    with pytest.raises(ValueError, match="int16 inputs need a stated scale"):
        load_dataset(_npz(tmp_path / "i.npz", x=(floats * 100).astype(np.int16), y=y), "train")
    assert float(load_dataset(_npz(tmp_path / "j.npz", x=(floats * 1000).astype(np.int16), y=y,
                                   scale=np.array(1000)), "test").inputs.max()) <= 1.0
    bad = floats.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        load_dataset(_npz(tmp_path / "k.npz", x=bad, y=y), "train")
    with pytest.raises(ValueError, match="scale must be one positive"):
        load_dataset(_npz(tmp_path / "l.npz", x=floats, y=y, scale=np.array(-1.0)), "train")


@pytest.mark.parametrize("change, message", [
    (lambda a: a.update(y_train=a["y_train"][:-1]), "mismatched lengths: 12 inputs but 11 labels in y_train"),
    (lambda a: a.update(y_train=np.zeros(12, int), y_test=np.zeros(6, int)), "too few classes: 1 found"),
    (lambda a: a.update(y_train=a["y_train"] * 0 + np.arange(12) % 2, y_test=np.full(6, 2)),
     r"class\(es\) 2 \(2\) have no training input"),
    (lambda a: a.update(y_test=a["y_test"] - 1), "negative label -1"),
    (lambda a: a.update(y_train=a["y_train"] + 0.5), "integer class labels"),
    (lambda a: a.update(x_test=a["x_test"][:, :4]), "both splits need one input shape"),
    (lambda a: a.update(X_train=a["x_train"]), "unknown array"),
    (lambda a: a.update(x=a["x_train"], y=a["y_train"]), "either x_train, y_train, x_test, y_test .* or x, y"),
    (lambda a: a.pop("y_test"), "either x_train"),
    (lambda a: a.update(x_test=a["x_test"][:0], y_test=a["y_test"][:0]), "x_test is empty"),
    (lambda a: a.update(x_train=a["x_train"][:, 0, 0]), r"inputs need shape \(N, D\)"),
    (lambda a: a.update(class_names=np.array(["a", "b"])), "label 2 but only 2 class_names"),
])
def test_npz_errors_name_what_is_wrong(tmp_path, change, message):
    arrays = _splits(np.random.default_rng(3))
    change(arrays)
    with pytest.raises(ValueError, match=message):
        load_dataset(_npz(tmp_path / "d.npz", **arrays), "train")


def test_unreadable_array_files(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        load_dataset(f"npz:{tmp_path / 'missing.npz'}", "train")
    (tmp_path / "junk.npz").write_bytes(b"not a zip archive")
    with pytest.raises(ValueError, match="not a readable NumPy .npz archive"):
        load_dataset(f"npz:{tmp_path / 'junk.npz'}", "train")
    np.savez(tmp_path / "obj.npz", x=np.array([object()] * 4, dtype=object), y=np.arange(4) % 2)
    with pytest.raises(ValueError, match="without pickle"):
        load_dataset(f"npz:{tmp_path / 'obj.npz'}", "train")
    with pytest.raises(ValueError, match="give a path after 'npz:'"):
        load_dataset("npz:", "train")
    with pytest.raises(ValueError, match="or your own files: npz:FILE, npy:DIR, folder:DIR"):
        load_dataset("my-set", "train")
    with pytest.raises(ValueError, match="unknown split"):
        load_dataset(f"npz:{tmp_path / 'missing.npz'}", "validation")


def _image(path, pixels: np.ndarray):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def _folder(root, counts, rng, size=(4, 6), splits=("train", "test")):
    """counts[split][cls] gray images of ``size`` (rows, cols); returns {(split, cls, file name): pixels}."""
    made = {}
    for split in splits:
        for cls, k in counts[split].items():
            for j in range(k):
                pixels = rng.integers(0, 256, size, dtype=np.uint8)
                base = root / split if split else root
                _image(base / cls / f"img{j:02d}.png", pixels)
                made[(split, cls, f"img{j:02d}.png")] = pixels
    return made


def test_image_folder_splits_classes_order_and_pixels(tmp_path):
    made = _folder(tmp_path, {"train": {"dog": 4, "cat": 3}, "test": {"dog": 2, "cat": 2}}, np.random.default_rng(4))
    (tmp_path / "train" / "cat" / ".DS_Store").write_bytes(b"\0junk")        # hidden files are skipped
    for split, seed in (("train", 1), ("test", 2)):
        ds = load_dataset(f"folder:{tmp_path}", split)
        assert ds.class_names == ("cat", "dog") and ds.num_classes == 2 and ds.input_shape == (1, 4, 6)
        ordered = sorted((cls, f) for (s, cls, f) in made if s == split)      # by class, then file name
        order = np.random.default_rng(seed).permutation(len(ordered))
        for i, k in enumerate(order):
            cls, f = ordered[k]
            assert ds.labels[i] == ds.class_names.index(cls)
            assert torch.equal(ds.inputs[i, 0] * 255, torch.from_numpy(made[(split, cls, f)].astype(np.float32)))


def test_image_folder_pool_and_colour(tmp_path):
    rng = np.random.default_rng(5)
    _folder(tmp_path, {"": {"a": 5, "b": 5}}, rng, splits=("",))
    colour = rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)
    _image(tmp_path / "b" / "zz-colour.png", colour)
    train, test = load_dataset(f"folder:{tmp_path}", "train"), load_dataset(f"folder:{tmp_path}", "test")
    assert train.input_shape == (3, 4, 6) == test.input_shape                   # one colour image: all RGB
    assert np.bincount(train.labels.numpy()).tolist() == [4, 5] and np.bincount(test.labels.numpy()).tolist() == [1, 1]
    x = torch.cat([train.inputs, test.inputs])
    assert any(torch.equal(row * 255, torch.from_numpy(colour.transpose(2, 0, 1).astype(np.float32))) for row in x)
    gray = [row for row in x if not torch.equal(row[0], row[1])]
    assert len(gray) == 1                                                       # gray images have equal channels


def test_image_folder_errors(tmp_path):
    rng = np.random.default_rng(6)
    root = tmp_path / "a"
    _folder(root, {"train": {"x": 2, "y": 2}, "test": {"x": 1, "y": 1}}, rng)
    (root / "train" / "y" / "broken.png").write_text("this is not an image")
    with pytest.raises(ValueError, match=r"broken.png: not a readable image"):
        load_dataset(f"folder:{root}", "test")
    (root / "train" / "y" / "broken.png").unlink()
    _image(root / "test" / "x" / "big.png", rng.integers(0, 256, (8, 8), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"big.png: 8x8 pixels but .* has 6x4; every image must have one size"):
        load_dataset(f"folder:{root}", "train")
    one = tmp_path / "one"
    _folder(one, {"": {"only": 3}}, rng, splits=("",))
    with pytest.raises(ValueError, match="too few classes: 1 class folder"):
        load_dataset(f"folder:{one}", "train")
    extra = tmp_path / "extra"
    _folder(extra, {"train": {"x": 2, "y": 2}, "test": {"z": 1}}, rng)
    with pytest.raises(ValueError, match="test/ has class folder.* z that train/ lacks"):
        load_dataset(f"folder:{extra}", "test")
    empty = tmp_path / "empty"
    _folder(empty, {"": {"x": 2}}, rng, splits=("",))
    (empty / "y").mkdir()
    with pytest.raises(ValueError, match="holds no image"):
        load_dataset(f"folder:{empty}", "train")
    half = tmp_path / "half"
    _folder(half, {"train": {"x": 2, "y": 2}}, rng, splits=("train",))
    with pytest.raises(ValueError, match="has train/ but not test/"):
        load_dataset(f"folder:{half}", "train")
    with pytest.raises(ValueError, match="not a directory"):
        load_dataset(f"folder:{tmp_path / 'nowhere'}", "train")


def test_train_and_certify_a_tiny_npz_set_through_the_cli(tmp_path, capsys):
    from smoothcert.cli.main import main

    rng = np.random.default_rng(7)
    y = np.arange(240) % 2
    x = np.stack([np.where(y == 1, rng.uniform(0.7, 1.0, 240), rng.uniform(0.0, 0.3, 240)),
                  rng.uniform(0, 1, 240)], 1)
    name = _npz(tmp_path / "two.npz", x=x, y=y, class_names=np.array(["low", "high"]))
    model = tmp_path / "model"
    assert main(["train", "--dataset", name, "--sigma", "0.1", "--epochs", "4", "--lr", "0.1", "--batch-size", "32",
                 "--out", str(model), "--no-progress"]) == 0
    config = json.loads(model.with_suffix(".json").read_text())
    assert config["dataset"] == f"npz:{(tmp_path / 'two.npz').resolve()}" and config["arch"] == "mlp"
    assert config["arch_kwargs"]["num_classes"] == 2 and config["arch_kwargs"]["input_shape"] == [2]
    out = tmp_path / "cert.tsv"
    assert main(["certify", "--checkpoint", str(model), "--n0", "20", "--n", "200", "--alpha", "0.01",
                 "--batch-size", "200", "--max", "20", "--out", str(out), "--no-progress"]) == 0
    rows = [line.split("\t") for line in out.read_text().splitlines()]
    assert rows[0][:6] == ["idx", "label", "predict", "radius", "correct", "time"] and len(rows) == 21
    test = load_dataset(name, "test")
    assert [int(r[1]) for r in rows[1:]] == test.labels[:20].tolist()          # labels joined by dataset index
    assert sum(int(r[4]) for r in rows[1:]) >= 18                              # margin 0.4 = 4 sigma: separable
    assert json.loads((tmp_path / "cert.tsv.json").read_text())["dataset"] == config["dataset"]
    capsys.readouterr()
    assert main(["certify", "--checkpoint", str(model), "--dataset", "npz:" + str(tmp_path / "none.npz"),
                 "--out", str(tmp_path / "c2.tsv")]) == 2
    assert "none.npz: no such file" in capsys.readouterr().err
