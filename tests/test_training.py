"""The training loop (reproducible, resumable, logged), the PCA first layer and soft-voting ensembles."""

import argparse
import csv

import numpy as np
import pytest
import torch
from torch import nn

from smoothcert.models.checkpoint import load_checkpoint, save_checkpoint
from smoothcert.models.ensemble import Ensemble, load_ensemble
from smoothcert.models.architectures import build_model
from smoothcert.training.objectives import GaussianAugmentation, make_objective
from smoothcert.models.pca import PCAProjection, ProjectedModel, add_pca, fit_pca
from smoothcert.training.loop import LOG_COLUMNS, learning_rate, noisy_accuracy, train
from smoothcert.cli.train import add_train_arguments, run_train

SHAPE = (1, 4, 4)
D = 16


class Blobs(torch.utils.data.Dataset):
    """Three classes: images whose mean brightness is 0.2, 0.5 or 0.8, items (x, y, index)."""

    def __init__(self, n=96, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(n) % 3
        base = 0.2 + 0.3 * self.labels.float()
        self.inputs = (base.view(n, 1, 1, 1) + 0.05 * torch.randn((n, *SHAPE), generator=g)).clamp(0, 1)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.inputs[i], int(self.labels[i]), i


def small_model(seed=0):
    torch.manual_seed(seed)
    return build_model("mlp", num_classes=3, input_shape=SHAPE, hidden=(16,), mean=0.5, std=0.25)


def run(tmp_path, name, epochs, model_seed=0, **kw):
    kw = {"objective": "gaussian", "sigma": 0.25, "batch_size": 16, "lr": 0.05, "seed": 3, "progress": False,
          "schedule": "step", "milestones": [1, 2], **kw}
    model = small_model(model_seed)
    history = train(model, Blobs(), epochs=epochs, out=tmp_path / name if tmp_path else None,
                    val_set=Blobs(30, seed=1), **kw)
    return model, history


def same_weights(a, b, exact=True):
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb
        if exact:
            assert torch.equal(va, vb), ka
        else:
            assert torch.allclose(va, vb, atol=1e-6), ka


# ------------------------------------------------------------------------------------------------ training loop

def test_same_seed_same_weights_other_seed_other_weights():
    a, ha = run(None, "a", 2)
    b, hb = run(None, "b", 2)
    same_weights(a, b)
    assert [r["loss"] for r in ha] == [r["loss"] for r in hb]
    c, _ = run(None, "c", 2, seed=4)
    assert not torch.equal(a[-1].weight, c[-1].weight)


def test_training_learns_and_leaves_global_rng_alone():
    model = small_model()
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    history = train(model, Blobs(), objective="gaussian", sigma=0.25, epochs=3, batch_size=16, lr=0.1, seed=0,
                    schedule="constant", val_set=Blobs(60, seed=1), progress=False)
    after = torch.rand(3)
    assert torch.equal(before, after)
    assert history[-1]["val_noisy_acc"] > 0.8          # chance is 1/3
    assert history[-1]["loss"] < history[0]["loss"]


def test_resume_equals_uninterrupted_run(tmp_path):
    direct, hd = run(tmp_path, "direct", 3)
    run(tmp_path, "split", 2)
    resumed, hr = run(tmp_path, "split", 3, resume=True)
    same_weights(direct, resumed, exact=False)
    keys = [k for k in LOG_COLUMNS if k != "seconds"]
    assert [r[k] for r in hd for k in keys] == pytest.approx([r[k] for r in hr for k in keys])
    with open(tmp_path / "split.train.tsv") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3] and list(rows[0]) == list(LOG_COLUMNS)


def test_resume_after_a_crash_mid_run(tmp_path):
    class Crash(GaussianAugmentation):
        def start_epoch(self, epoch):
            if epoch == 2:
                raise KeyboardInterrupt

    direct, _ = run(tmp_path, "direct", 4, schedule="cosine", milestones=None)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "crash", 4, schedule="cosine", milestones=None, objective=Crash())
    resumed, history = run(tmp_path, "crash", 4, schedule="cosine", milestones=None, resume=True)
    same_weights(direct, resumed, exact=False)
    assert [r["epoch"] for r in history] == [1, 2, 3, 4]


def test_resume_refuses_other_settings(tmp_path):
    run(tmp_path, "r", 1)
    with pytest.raises(ValueError, match="sigma"):
        run(tmp_path, "r", 2, resume=True, sigma=0.5)
    with pytest.raises(ValueError, match="objective"):
        run(tmp_path, "r", 2, resume=True, objective=make_objective("consistency"))
    run(tmp_path, "r", 2, resume=True)
    with pytest.raises(ValueError, match="already done 2"):
        run(tmp_path, "r", 1, resume=True)


def test_checkpoint_holds_the_trained_model(tmp_path):
    model, history = run(tmp_path, "ck", 1)
    loaded, config = load_checkpoint(tmp_path / "ck")
    x = Blobs(8).inputs
    assert torch.allclose(loaded(x), model.eval()(x))
    assert config["sigma"] == 0.25 and config["training"]["objective"] == "gaussian"
    assert config["training"]["history"][0]["loss"] == pytest.approx(history[0]["loss"])


SMALL = {"macer": {"k": 4, "threshold": 0.99}, "smoothadv": {"epsilon": 0.25, "steps": 2, "m": 2, "warmup": 1},
         "smoothmix": {"m": 2, "steps": 2, "warmup": 1}, "cat-rs": {"m": 2, "steps": 2, "epsilon": 0.5}}


@pytest.mark.parametrize("objective", ["gaussian", "consistency", "generalized-consistency", "macer", "smoothadv",
                                       "smoothmix", "cat-rs"])
def test_every_objective_trains(objective):
    kw = SMALL.get(objective, {})
    before = small_model()
    model, history = run(None, objective, 1, objective=make_objective(objective, **kw))
    assert np.isfinite(history[0]["loss"]) and 0 <= history[0]["train_acc"] <= 1
    assert not torch.equal(before[-1].weight, model[-1].weight)


def test_adam_and_dataset_without_tensors():
    class Items(torch.utils.data.Dataset):
        def __init__(self):
            self.blobs = Blobs(40)

        def __len__(self):
            return len(self.blobs)

        def __getitem__(self, i):
            return self.blobs[i]

    model = small_model()
    history = train(model, Items(), objective="gaussian", sigma=0.1, epochs=1, batch_size=8, lr=1e-2, seed=0,
                    optimizer="adam", clip_grad_norm=0.5, progress=False)
    assert len(history) == 1 and history[0]["val_noisy_acc"] is None


def test_noisy_accuracy_is_the_accuracy_under_noise():
    model = small_model()
    data = Blobs(30)
    g = torch.Generator().manual_seed(9)
    acc = noisy_accuracy(model, data, 0.2, generator=torch.Generator().manual_seed(9), batch_size=7)
    noisy = data.inputs + 0.2 * torch.randn(data.inputs.shape, generator=g)
    with torch.no_grad():
        expected = float((model(noisy).argmax(1) == data.labels).float().mean())
    assert acc == pytest.approx(expected)


def test_learning_rate_schedules():
    assert [learning_rate("step", 1.0, e, 90) for e in (0, 29, 30, 59, 60, 89)] == \
        pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    assert learning_rate("cosine", 1.0, 0, 10) == 1.0 and learning_rate("cosine", 1.0, 5, 10) == pytest.approx(0.5)
    assert learning_rate("constant", 0.3, 7, 10) == 0.3


@pytest.mark.parametrize("kw, match", [
    ({"sigma": 0.0}, "sigma"), ({"epochs": 0}, "epochs"), ({"batch_size": 0}, "batch_size"),
    ({"lr": -1.0}, "lr"), ({"schedule": "linear"}, "schedule"), ({"optimizer": "rmsprop"}, "optimizer"),
    ({"objective": "nope"}, "unknown objective"), ({"resume": True}, "resume"),
    ({"clip_grad_norm": 0.0}, "clip_grad_norm"),
])
def test_bad_training_arguments_raise(kw, match):
    args = {"objective": "gaussian", "sigma": 0.25, "epochs": 1, "progress": False, **kw}
    with pytest.raises(ValueError, match=match):
        train(small_model(), Blobs(), **args)


# ------------------------------------------------------------------------------------------------ PCA

def correlated_data(n=4000, seed=0):
    """Inputs with principal variances 0.2, 0.05, 0.02, 0.004 along a random orthonormal basis."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    scales = torch.tensor([0.2, 0.05, 0.02, 0.004]).sqrt().double()
    z = torch.randn(n, 4, generator=g, dtype=torch.float64) * scales
    x = 0.5 + z @ basis[:, :4].T
    return x.float().view(n, *SHAPE), basis


def test_pca_projection_is_orthogonal_and_keeps_directions_above_the_threshold():
    x, basis = correlated_data()
    sigma = 0.5                                             # noise variance 0.25
    projection = fit_pca(x, sigma, fraction=0.1)            # threshold 0.025: keeps 0.2 and 0.05
    assert projection.num_components == 2
    p = projection.matrix().double()
    assert torch.allclose(p, p.T, atol=1e-6)
    assert torch.allclose(p @ p, p, atol=1e-5)
    assert torch.linalg.matrix_rank(p, atol=1e-4) == 2
    # the kept subspace is that of the two largest true directions
    true = basis[:, :2] @ basis[:, :2].T
    assert torch.linalg.matrix_norm(p - true, ord=2) < 0.1
    # thresholds against an independent eigen-decomposition (numpy) of the sample covariance
    eig = np.linalg.eigvalsh(np.cov(x.view(len(x), -1).double().numpy().T))
    for fraction in (0.02, 0.05, 0.1, 0.5):
        kept = fit_pca(x, sigma, fraction).num_components
        assert kept == int((eig > fraction * sigma ** 2).sum())
    assert fit_pca(x, sigma, 0.2 / 5).num_components == 3     # sigma^2/5 of a smaller sigma keeps more
    assert (projection.variances > 0.1 * sigma ** 2).all()


def test_pca_forward_is_mean_plus_projection():
    x, _ = correlated_data(500)
    projection = fit_pca(x, 0.3, 0.2)
    z = torch.rand(5, *SHAPE)
    flat = z.view(5, -1).double()
    mu, v = projection.mean.double(), projection.components.double()
    expected = mu + (flat - mu) @ v.T @ v
    assert torch.allclose(projection(z).view(5, -1).double(), expected, atol=1e-6)
    assert projection(z).shape == z.shape


def test_pca_threshold_that_keeps_nothing_raises():
    x, _ = correlated_data(500)
    with pytest.raises(ValueError, match="no principal component"):
        fit_pca(x, 1.0, fraction=5.0)
    with pytest.raises(ValueError, match="fraction"):
        fit_pca(x, 1.0, fraction=-0.1)
    with pytest.raises(ValueError, match="sigma"):
        fit_pca(x, 0.0)


def test_pca_model_round_trips_through_a_checkpoint(tmp_path):
    x, _ = correlated_data(500)
    projection = fit_pca(x, 0.3, 0.2)
    model = add_pca(small_model(), projection)
    assert isinstance(model, ProjectedModel) and isinstance(model.projection, PCAProjection)
    z = torch.rand(6, *SHAPE)
    assert torch.allclose(model(z), model.model(projection(z)))
    save_checkpoint(tmp_path / "pca", model, {"sigma": 0.3})
    loaded, config = load_checkpoint(tmp_path / "pca")
    assert config["wrappers"][0]["kind"] == "pca"
    assert torch.equal(loaded.projection.components, projection.components)
    assert torch.equal(loaded.projection.mean, projection.mean)
    assert torch.allclose(loaded(z), model(z))


def test_training_a_pca_model_keeps_the_projection_fixed(tmp_path):
    x, _ = correlated_data(500)
    projection = fit_pca(x, 0.25, 0.2)
    model = add_pca(small_model(), projection)
    train(model, Blobs(), objective="gaussian", sigma=0.25, epochs=1, batch_size=16, seed=0, progress=False,
          out=tmp_path / "p")
    assert torch.equal(model.projection.components, projection.components)
    loaded, _ = load_checkpoint(tmp_path / "p")
    z = torch.rand(4, *SHAPE)
    assert torch.allclose(loaded(z), model.eval()(z))


# ------------------------------------------------------------------------------------------------ ensembles

def test_ensemble_is_the_soft_vote():
    members = [small_model(s) for s in range(3)]
    ensemble = Ensemble(members)
    z = torch.rand(7, *SHAPE)
    with torch.no_grad():
        probs = np.stack([torch.softmax(m(z), 1).numpy() for m in members]).astype(np.float64)
        scores = ensemble(z).numpy()
    average = probs.mean(0)
    assert np.allclose(np.exp(scores), average, atol=1e-6)
    assert (scores.argmax(1) == average.argmax(1)).all()
    assert ensemble.num_classes == 3 and ensemble.input_shape == SHAPE


def test_ensemble_rejects_mismatched_members():
    three = small_model()
    torch.manual_seed(0)
    four = build_model("mlp", num_classes=4, input_shape=SHAPE, hidden=(16,))
    with pytest.raises(ValueError, match="classes"):
        Ensemble([three, four])
    other_shape = build_model("mlp", num_classes=3, input_shape=(1, 5, 5), hidden=(16,))
    with pytest.raises(ValueError, match="input shapes"):
        Ensemble([three, other_shape])
    # undeclared members: checked by running them on the given input shape
    plain3 = nn.Sequential(nn.Flatten(), nn.Linear(D, 3))
    plain4 = nn.Sequential(nn.Flatten(), nn.Linear(D, 4))
    with pytest.raises(ValueError, match="classes"):
        Ensemble([plain3, plain4], input_shape=SHAPE)
    wide = nn.Sequential(nn.Flatten(), nn.Linear(25, 3))
    with pytest.raises(ValueError, match="does not accept"):
        Ensemble([plain3, wide], input_shape=SHAPE)
    with pytest.raises(ValueError, match="at least one"):
        Ensemble([])


def test_load_ensemble_from_checkpoints(tmp_path):
    members = [small_model(s) for s in range(3)]
    paths = [save_checkpoint(tmp_path / f"m{s}", m) for s, m in enumerate(members)]
    loaded = load_ensemble(paths)
    z = torch.rand(5, *SHAPE)
    with torch.no_grad():
        assert torch.allclose(loaded(z), Ensemble(members)(z), atol=1e-6)


# ------------------------------------------------------------------------------------------------ command line

def parse(argv):
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    return parser.parse_args(argv)


def test_command_line_training_with_pca_and_resume(tmp_path, capsys):
    out = tmp_path / "digits-gc"
    argv = ["--dataset", "digits", "--arch", "mnist-cnn", "--objective", "generalized-consistency",
            "--sigma", "0.25", "--epochs", "1", "--batch-size", "256", "--lr", "0.05", "--seed", "1",
            "--out", str(out), "--pca-fraction", "0.2", "--val-size", "100", "--no-progress", "--lbd", "5",
            "--device", "cpu"]
    assert run_train(parse(argv)) == 0
    model, config = load_checkpoint(out)
    assert config["wrappers"][0]["kind"] == "pca" and config["pca"]["fraction"] == 0.2
    assert config["training"]["objective_config"] == {"objective": "generalized-consistency", "m": 2,
                                                      "lbd": 5.0, "eta": 0.5}
    argv[argv.index("--epochs") + 1] = "2"
    assert run_train(parse(argv + ["--resume"])) == 0
    _, config = load_checkpoint(out)
    assert [r["epoch"] for r in config["training"]["history"]] == [1, 2]
    assert "PCA: kept" in capsys.readouterr().out


def test_command_line_rejects_hyperparameters_of_another_objective(tmp_path):
    args = parse(["--dataset", "digits", "--objective", "gaussian", "--sigma", "0.25", "--out",
                  str(tmp_path / "x"), "--beta", "3"])
    with pytest.raises(ValueError, match="takes no hyperparameter beta"):
        run_train(args)
