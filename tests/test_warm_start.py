"""Warm starts (``train(init=...)``, ``smoothcert train --init``): exactly the saved weights, recorded, resumable,
and a clear error before training for a checkpoint that does not fit the model."""

import argparse
import hashlib

import pytest
import torch

from smoothcert.cli.train import add_train_arguments, run_train
from smoothcert.models.architectures import build_model
from smoothcert.models.checkpoint import load_checkpoint, save_checkpoint
from smoothcert.training.loop import train, warm_start, weights_digest

from test_training import SHAPE, Blobs, same_weights, small_model


def fit(model, epochs=2, **kw):
    kw = {"objective": "gaussian", "sigma": 0.25, "batch_size": 16, "lr": 0.05, "seed": 3, "progress": False,
          "schedule": "cosine", **kw}
    return train(model, Blobs(), epochs=epochs, val_set=Blobs(30, seed=1), **kw)


@pytest.fixture
def saved(tmp_path):
    """A model trained for one epoch from seed 7, saved as a checkpoint."""
    model = small_model(7)
    fit(model, epochs=1)
    return save_checkpoint(tmp_path / "init", model), model


def test_warm_start_loads_exactly_the_saved_weights(saved):
    path, source = saved
    model = small_model(0)
    assert not all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), source.state_dict().values()))
    record = warm_start(model, path)
    same_weights(model, source)                                       # bit for bit
    digest = hashlib.sha256()
    for name, t in source.state_dict().items():                       # the digest, written out
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode() + t.numpy().tobytes())
    assert record == {"path": str(path), "sha256": digest.hexdigest()}
    with torch.no_grad():
        next(source.parameters())[0, 0] += 1e-3
    assert weights_digest(source) != record["sha256"]


def test_training_from_init_is_training_the_loaded_model(saved, tmp_path):
    path, _ = saved
    by_hand = small_model(0)
    warm_start(by_hand, path)
    fit(by_hand)
    warm = small_model(5)                                             # other fresh weights: all replaced
    fit(warm, init=path, out=tmp_path / "warm")
    same_weights(warm, by_hand)
    cold = small_model(5)
    fit(cold)
    assert not torch.equal(next(cold.parameters()), next(warm.parameters()))
    _, config = load_checkpoint(tmp_path / "warm")
    assert config["training"]["init"] == {"path": str(path), "sha256": weights_digest(load_checkpoint(path)[0])}


def test_warm_start_resumes_and_refuses_another_init(saved, tmp_path):
    path, _ = saved
    direct = small_model(0)
    fit(direct, epochs=3, init=path, out=tmp_path / "direct")
    fit(small_model(0), epochs=1, init=path, out=tmp_path / "split")
    resumed = small_model(0)
    history = fit(resumed, epochs=3, init=path, out=tmp_path / "split", resume=True)
    same_weights(direct, resumed, exact=False)
    assert [r["epoch"] for r in history] == [1, 2, 3]
    with pytest.raises(ValueError, match="init"):
        fit(small_model(0), epochs=4, out=tmp_path / "split", resume=True)          # started from init, not fresh
    other = save_checkpoint(tmp_path / "other", small_model(9))
    with pytest.raises(ValueError, match="init"):
        fit(small_model(0), epochs=4, init=other, out=tmp_path / "split", resume=True)


@pytest.mark.parametrize("make, match", [
    (lambda: build_model("mlp", num_classes=3, input_shape=SHAPE, hidden=(8,), mean=0.5, std=0.25),
     "weights that differ"),
    (lambda: build_model("mlp", num_classes=3, input_shape=(1, 2, 8), hidden=(16,), mean=0.5, std=0.25),
     r"input shape \[1, 2, 8\]"),
    (lambda: build_model("mlp", num_classes=4, input_shape=SHAPE, hidden=(16,), mean=0.5, std=0.25), "4 classes"),
    (None, "no checkpoint weights"),
])
def test_a_checkpoint_that_does_not_fit_errors_before_training(saved, tmp_path, make, match):
    path, _ = saved
    init = save_checkpoint(tmp_path / "bad", make()) if make else tmp_path / "missing"
    model = small_model(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"init \(--init\) must be a saved checkpoint of the model being trained"):
        fit(model, init=init, out=tmp_path / "run" / "x")
    with pytest.raises(ValueError, match=match):
        warm_start(model, init)
    assert not (tmp_path / "run").exists()                                          # nothing written
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())   # nothing loaded


def parse(argv):
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    return parser.parse_args(argv)


def test_command_line_init(tmp_path):
    base = ["--dataset", "digits", "--sigma", "0.25", "--epochs", "1", "--batch-size", "256", "--lr", "0.05",
            "--val-size", "0", "--no-progress", "--device", "cpu"]
    assert run_train(parse(base + ["--arch", "mlp", "--out", str(tmp_path / "gauss")])) == 0
    argv = base + ["--arch", "mlp", "--objective", "cat-rs", "--num-noise", "2", "--pgd-steps", "1", "--out",
                   str(tmp_path / "catrs"), "--init", str(tmp_path / "gauss"), "--catrs-teacher", str(tmp_path / "gauss")]
    assert run_train(parse(argv)) == 0
    _, config = load_checkpoint(tmp_path / "catrs")
    assert config["training"]["init"]["path"] == str(tmp_path / "gauss")
    assert config["training"]["objective_config"]["teacher"] == str(tmp_path / "gauss")
    with pytest.raises(ValueError, match=r"init \(--init\)"):
        run_train(parse(base + ["--arch", "mnist-cnn", "--out", str(tmp_path / "cnn"), "--init",
                                str(tmp_path / "gauss")]))
    assert not (tmp_path / "cnn.json").exists()
