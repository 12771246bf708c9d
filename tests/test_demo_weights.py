"""The demo's shipped weights: intact, made by the documented command, a noise-robust model; the demo's steps."""

from __future__ import annotations

import fnmatch
import json
import shlex
import tomllib
from pathlib import Path

import pytest
import torch

from smoothcert.cli import demo
from smoothcert.cli.common import file_digest
from smoothcert.models.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_weights_match_their_manifest_and_are_package_data():
    path, manifest = demo.shipped_weights()
    weights = path.with_name(path.name + ".safetensors")
    assert file_digest(weights) == manifest["sha256"]
    assert demo.tensors_digest(weights) == manifest["tensors_sha256"]
    assert manifest["command"] == demo.TRAIN_COMMAND
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["smoothcert"]
    shipped = [f"weights/{f.name}" for f in demo.weights_dir().iterdir() if f.is_file()]
    assert all(any(fnmatch.fnmatch(f, p) for p in patterns) for f in shipped)
    assert {weights.name, path.name + ".json", "demo-weights.json"} <= {f.split("/")[1] for f in shipped}
    assert weights.stat().st_size < 2_000_000


def test_shipped_weights_record_the_documented_training_settings():
    path, _ = demo.shipped_weights()
    model, config = load_checkpoint(path)
    options = shlex.split(demo.TRAIN_COMMAND)[2:]
    given = dict(zip(options[0::2], options[1::2]))
    training = config["training"]
    assert config["dataset"] == given["--dataset"] and config["arch"] == given["--arch"]
    assert config["sigma"] == training["sigma"] == float(given["--sigma"]) == demo.SIGMA
    assert training["objective"] == given["--objective"] and training["epochs_done"] == int(given["--epochs"])
    for key in ("lr", "momentum", "weight_decay"):
        assert training[key] == float(given["--" + key.replace("_", "-")])
    for key in ("schedule", "optimizer"):
        assert training[key] == given["--" + key]
    assert training["batch_size"] == int(given["--batch-size"]) and training["seed"] == int(given["--seed"])
    assert given["--out"] == f"src/smoothcert/weights/{path.name}"


def test_shipped_model_is_accurate_under_noise():
    from smoothcert.data.datasets import load_dataset
    from smoothcert.training.loop import noisy_accuracy

    model, _ = load_checkpoint(demo.shipped_weights()[0])
    test = load_dataset("mnist", "test")
    x, y = test.batch(range(300))
    with torch.inference_mode():
        clean = float((model(x).argmax(1) == y).float().mean())

    class First:
        inputs, labels = x, y

        def __len__(self):
            return 300

    noisy = noisy_accuracy(model, First(), demo.SIGMA, generator=torch.Generator().manual_seed(0))
    assert clean >= 0.95 and noisy >= 0.9


def test_ceiling_is_the_clopper_pearson_limit():
    from scipy.stats import norm
    from statsmodels.stats.proportion import proportion_confint

    for n in (2_000, 10_000):   # all n samples on the top class: the largest lower bound, hence radius
        top = demo.SIGMA * norm.ppf(proportion_confint(n, n, alpha=2 * demo.ALPHA, method="beta")[0])
        assert demo.ceiling(n) == pytest.approx(top, rel=1e-9)
    assert round(demo.ceiling(2_000), 3) == 0.675 and round(demo.ceiling(10_000), 2) == 0.80


class Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, argv):
        self.calls.append(list(argv))
        return 0


def test_demo_uses_the_shipped_model_unless_retrained_and_says_what_it_certified(tmp_path, capsys):
    main = Recorder()
    demo.run_demo(main, tmp_path, num_inputs=7, n=300)
    out = capsys.readouterr().out
    certify = main.calls[0]
    assert [c[0] for c in main.calls] == ["certify"] * len(demo.ROWS) + ["report"]
    assert certify[certify.index("--checkpoint") + 1] == str(demo.shipped_weights()[0])
    assert ["--n0", "100", "--n", "300", "--alpha", "0.001", "--max", "7"] == \
        [certify[certify.index(k) + i] for k in ("--n0", "--n", "--alpha", "--max") for i in (0, 1)]
    assert "Cohen et al.'s CERTIFY" in out and "sigma 0.25, n0 100, n 300, alpha 0.001" in out
    assert f"no radius above {demo.ceiling(300):.3f}" in out and "sha256" in out

    retrain = Recorder()
    demo.run_demo(retrain, tmp_path, num_inputs=7, n=300, retrain=True)
    train = retrain.calls[0]
    assert train == ["train", *demo.TRAIN_OPTIONS, "--out", str(tmp_path / demo.WEIGHTS_NAME)]
    certify = retrain.calls[1]
    assert certify[certify.index("--checkpoint") + 1] == str(tmp_path / demo.WEIGHTS_NAME)
    assert certify[certify.index("--out") + 1] != main.calls[0][main.calls[0].index("--out") + 1]
    assert "retrained weights" not in capsys.readouterr().out          # nothing was trained: nothing compared


def test_tensors_digest_ignores_the_header_order_but_not_a_weight(tmp_path):
    from safetensors.torch import save_file

    tensors = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.ones(2, dtype=torch.int64)}
    save_file(tensors, str(tmp_path / "x.safetensors"), metadata={"format": "pt", "arch": "m"})
    save_file(dict(reversed(tensors.items())), str(tmp_path / "y.safetensors"), metadata={"arch": "m", "format": "pt"})
    tensors["b"][1, 2] = 5.5
    save_file(tensors, str(tmp_path / "z.safetensors"))
    x, y, z = (demo.tensors_digest(tmp_path / f"{k}.safetensors") for k in "xyz")
    assert x == y != z


@pytest.mark.parametrize("inputs, n, message", [(100, -5, "n must be"), (0, 2000, "inputs must be"),
                                                (100, 50, r"n0 \(selection samples\) must not exceed n")])
def test_demo_rejects_bad_settings_before_any_work(tmp_path, inputs, n, message):
    main = Recorder()
    with pytest.raises(ValueError, match=message):
        demo.run_demo(main, tmp_path / "out", num_inputs=inputs, n=n)
    assert main.calls == [] and not (tmp_path / "out").exists()


def test_demo_end_to_end_on_three_digits(tmp_path, capsys):
    from smoothcert.cli.main import main

    demo.run_demo(main, tmp_path, num_inputs=3, n=200)
    captured = capsys.readouterr()
    assert "| Cohen sigma=0.25 | 3 |" in captured.out and (tmp_path / "certified-accuracy.png").is_file()
    assert "\r" not in captured.err
    sidecar = json.loads(next(tmp_path.glob("cohen-shipped-*.tsv.json")).read_text())
    assert sidecar["checkpoints"][0]["sha256"] == demo.shipped_weights()[1]["sha256"]
