"""Denoised smoothing: the DnCNN starts as the identity, C o D is certified soundly (a linear classifier behind a
linear denoiser, whose composition is a known half-space), every method runs on it, the denoiser trains seeded and
resumably, and the command line records both checkpoints and refuses mismatched ones before sampling."""

import json

import numpy as np
import pytest
import torch

from conftest import Linear2
from soundness import LinearCase, assert_sound, plan, violations_of
from smoothcert.cli.common import file_digest
from smoothcert.cli.main import main
from smoothcert.engine.sampling import input_generator
from smoothcert.engine.smooth import certify
from smoothcert.methods.base import CertifyMethod, RunContext
from smoothcert.models.architectures import build_model, model_for_dataset
from smoothcert.models.checkpoint import load_checkpoint, save_checkpoint
from smoothcert.models.denoiser import DenoisedClassifier, DnCNN, check_compatible, check_denoiser
from smoothcert.noise.gaussian import IsotropicGaussian
from smoothcert.data.datasets import load_dataset
from smoothcert.training.denoising import train_denoiser


@pytest.mark.parametrize("depth,width,shape", [(2, 1, (1, 8, 8)), (5, 16, (1, 28, 28)), (4, 8, (3, 12, 10))])
def test_dncnn_is_the_identity_at_initialization(depth, width, shape):
    torch.manual_seed(depth)
    d = DnCNN(shape, depth=depth, width=width).eval()
    z = torch.randn(7, *shape) * 2 + 0.5  # noisy inputs leave [0, 1]
    with torch.no_grad():
        assert float((d(z) - z).abs().max()) < 1e-6
        built = build_model("dncnn", input_shape=shape, depth=depth, width=width)
        assert float((built(z) - z).abs().max()) < 1e-6
    # the residual's hidden layers are not trivial: only the last convolution starts at zero
    assert float(d.residual[0].weight.detach().abs().sum()) > 0
    assert sum(isinstance(m, torch.nn.Conv2d) for m in d.modules()) == depth


def test_dncnn_refuses_bad_sizes():
    with pytest.raises(ValueError, match="depth"):
        DnCNN((1, 8, 8), depth=1)
    with pytest.raises(ValueError, match="width"):
        DnCNN((1, 8, 8), width=0)
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        DnCNN((64,))


class Halve(torch.nn.Module):
    def forward(self, z):
        return z[..., ::2]


def test_a_denoiser_that_changes_the_shape_is_refused_before_sampling():
    classifier = model_for_dataset("digits")
    with pytest.raises(ValueError, match="must return its input's shape"):
        DenoisedClassifier(classifier, Halve(), (1, 8, 8))
    with pytest.raises(ValueError, match="must return its input's shape"):
        check_denoiser(Halve(), (1, 8, 8))
    with pytest.raises(ValueError, match="shape"):
        check_compatible({"input_shape": [1, 28, 28]}, {"role": "denoiser", "input_shape": [1, 8, 8]})
    with pytest.raises(ValueError, match="role"):
        check_compatible({"input_shape": [1, 8, 8]}, {"input_shape": [1, 8, 8]})


class LinearDenoiser(torch.nn.Module):
    """D(z) = A z + c on flattened inputs."""

    def __init__(self, a: torch.Tensor, c: torch.Tensor):
        super().__init__()
        self.register_buffer("a", a.float())
        self.register_buffer("c", c.float())

    def forward(self, z):
        return (z.reshape(z.shape[0], -1) @ self.a.T + self.c).reshape(z.shape)


def composed_case(trials: int, d: int, seed: int) -> LinearCase:
    """A linear classifier behind a linear denoiser: f(z) = 1[w . (A z + c) + b > 0] = 1[(A^T w) . z + w . c + b > 0]."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, generator=g)
    a = torch.eye(d) + 0.3 * torch.randn(d, d, generator=g)
    c = 0.1 * torch.randn(d, generator=g)
    x = torch.rand(trials, d, generator=g)
    w_eff = a.double().T @ w.double()
    b = -float(np.median((x.double() @ w_eff + c.double() @ w.double()).numpy()))
    model = DenoisedClassifier(Linear2(w, b), LinearDenoiser(a, c))
    return LinearCase(model, x, w_eff, float(c.double() @ w.double()) + b)


def test_certificates_through_c_o_d_are_sound_on_a_known_composition():
    p = plan(0.05)
    case = composed_case(p.trials, 10, seed=3)
    # the composed module computes the half-space of the case (up to float32 rounding, away from the boundary)
    far = np.abs(case.margin) > 1e-4
    assert np.array_equal(case.model(case.x).argmax(1).numpy()[far], case.label[far])
    gens = [(input_generator(5, i, "select"), input_generator(5, i, "estimate")) for i in range(p.trials)]
    certs = certify(case.model, case.x, IsotropicGaussian(0.5), 2, 50, 500, p.alpha, batch_size=4000, block=500,
                    generators=gens, range_policy="ignore")
    assert sum(not c.abstained for c in certs) > p.trials / 2
    exact = case.distance("l2")
    bad = violations_of([c.radius for c in certs], exact, [c.prediction for c in certs], case.label)
    assert_sound(bad, p)


QUICK_METHODS = ("fixed", "dds", "translation", "rotation")


@pytest.mark.parametrize("everything", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_every_method_runs_on_the_composed_classifier(everything):
    torch.manual_seed(0)
    classifier = model_for_dataset("digits").eval()
    model = DenoisedClassifier(classifier, DnCNN((1, 8, 8), depth=3, width=4), (1, 8, 8)).eval()
    x, y = load_dataset("digits", "test").batch([0, 1])
    ctx = RunContext(model, 10, 10, 40, 0.1, 40, torch.float32, 0, torch.device("cpu"))
    quick = {"dds": {"dds_steps": 2}, "ancer": {"ancer_steps": 2}, "rancer": {"ancer_steps": 2},
             "rancer-best": {"ancer_steps": 2}, "rddrs": {"rddrs_steps": 2, "rddrs_samples": 20}}
    for name, cls in CertifyMethod.registry.items():
        if not everything and name not in QUICK_METHODS:
            continue
        fields = cls.settings_type.field_names()
        keywords = {k: v for k, v in {"sigma": 0.25, "opt_samples": 8, "select_samples": 20, "memory": False,
                                      "max_shift": 3, "max_angle": 2.0, "angle_cells": 2, "beta_step": 1.0,
                                      **quick.get(name, {})}.items() if k in fields}
        rows = cls(**keywords).certify_rows(ctx, x, y, [0, 1])
        assert len(rows) == 2 and all(r["predict"] in range(-1, 10) for r in rows), name


def small_setup(tmp_path):
    torch.manual_seed(0)
    classifier = model_for_dataset("digits")
    stem = save_checkpoint(tmp_path / "clf", classifier, {"dataset": "digits", "sigma": 0.25})
    return classifier.eval(), stem, load_dataset("digits", "train")


class First:
    def __init__(self, ds, k):
        self.ds, self.k = ds, k

    def __len__(self):
        return self.k

    def batch(self, rows):
        return self.ds.batch(rows)


def test_training_is_seeded_and_resumable(tmp_path):
    classifier, _, data = small_setup(tmp_path)
    data = First(data, 96)

    def run(out, epochs, resume=False, denoiser=None):
        torch.manual_seed(1)
        d = denoiser or build_model("dncnn", input_shape=(1, 8, 8), depth=3, width=4)
        train_denoiser(d, classifier, data, objective="stab-mse", sigma=0.25, epochs=epochs, out=out, batch_size=32,
                       seed=4, resume=resume, progress=False)
        return d

    full = run(tmp_path / "full", 2)
    again = run(tmp_path / "again", 2)
    run(tmp_path / "split", 1)
    resumed = run(tmp_path / "split", 2, resume=True)
    for a, b, c in zip(full.state_dict().values(), again.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b) and torch.equal(a, c)
    loaded, config = load_checkpoint(tmp_path / "full")
    assert config["role"] == "denoiser" and config["sigma"] == 0.25 and config["training"]["epochs"] == 2
    assert len((tmp_path / "full.train.tsv").read_text().splitlines()) == 3
    z = torch.rand(3, 1, 8, 8)
    assert torch.equal(loaded(z), full.eval()(z))
    with pytest.raises(ValueError, match="cannot resume"):
        train_denoiser(build_model("dncnn", input_shape=(1, 8, 8), depth=3, width=4), classifier, data,
                       objective="mse", sigma=0.25, epochs=3, out=tmp_path / "full", resume=True, progress=False)


def test_objectives_reduce_their_loss(tmp_path):
    """MSE training brings D(x + delta) nearer to x than the identity is (the noise alone)."""
    classifier, _, data = small_setup(tmp_path)
    data = First(data, 256)
    torch.manual_seed(0)
    d = build_model("dncnn", input_shape=(1, 8, 8), depth=3, width=8)
    hist = train_denoiser(d, classifier, data, objective="mse", sigma=0.25, epochs=4, out=tmp_path / "m",
                          batch_size=32, lr=3e-3, progress=False)
    assert hist[-1]["mse"] < 0.7 * 0.25**2  # the identity's error is sigma^2 = 0.0625 per pixel
    assert hist[-1]["stability"] == 0.0


def test_cli_train_denoiser_and_certify_record_both_checkpoints(tmp_path, capsys):
    _, stem, _ = small_setup(tmp_path)
    surrogate = save_checkpoint(tmp_path / "sur", model_for_dataset("digits"), {"dataset": "digits"})
    den = tmp_path / "den"
    assert main(["train-denoiser", "--classifier", stem, "--surrogate", surrogate, "--objective", "stability",
                 "--sigma", "0.25", "--depth", "3", "--width", "4", "--epochs", "1", "--train-size", "64",
                 "--out", str(den), "--no-progress", "--device", "cpu"]) == 0
    config = json.loads((tmp_path / "den.json").read_text())
    assert config["training"]["query_access"] is True
    assert config["surrogate"]["sha256"] == file_digest(tmp_path / "sur.safetensors")
    out = tmp_path / "r.tsv"

    def cert(denoiser, path):
        return ["certify", "--checkpoint", stem, "--denoiser", str(denoiser), "--n0", "10", "--n", "50", "--alpha",
                "0.1", "--max", "3", "--out", str(path), "--no-progress", "--device", "cpu"]

    assert main(cert(den, out)) == 0
    side = json.loads((tmp_path / "r.tsv.json").read_text())
    assert side["denoiser"]["sha256"] == file_digest(tmp_path / "den.safetensors")
    assert side["checkpoints"][0]["sha256"] == file_digest(tmp_path / "clf.safetensors")
    assert side["denoiser"]["sigma"] == 0.25 and len(out.read_text().splitlines()) == 4
    # the other modes: PREDICT, bfloat16, several inputs per forward pass, a data-dependent method with memory
    pred = tmp_path / "p.tsv"
    assert main(["predict", "--checkpoint", stem, "--denoiser", str(den), "--n", "50", "--alpha", "0.1", "--max", "3",
                 "--out", str(pred), "--no-progress", "--device", "cpu", "--dtype", "bfloat16"]) == 0
    assert json.loads((tmp_path / "p.tsv.json").read_text())["denoiser"]["sha256"] == side["denoiser"]["sha256"]
    mem = tmp_path / "m.tsv"
    assert main([*cert(den, mem)[:-3], "--device", "cpu", "--method", "dds", "--dds-steps", "2", "--opt-samples",
                 "8", "--inputs-per-batch", "3"]) == 0
    assert len(mem.read_text().splitlines()) == 4
    memory = json.loads((tmp_path / "m.tsv.memory" / "memory.json").read_text())
    assert memory["config"]["denoiser"] == side["denoiser"]["sha256"]  # the memory is tied to C and D
    # a denoiser for another input shape, and a classifier given as denoiser: refused before any file
    other = save_checkpoint(tmp_path / "other", build_model("dncnn", input_shape=(1, 28, 28), depth=2, width=2),
                            {"role": "denoiser", "num_classes": 0, "sigma": 0.25})
    capsys.readouterr()
    bad = tmp_path / "bad.tsv"
    assert main(cert(other, bad)) == 2
    assert "shape" in capsys.readouterr().err and not bad.exists()
    assert main(cert(surrogate, bad)) == 2
    assert "role" in capsys.readouterr().err and not bad.exists()
