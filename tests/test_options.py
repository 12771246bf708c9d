"""The command line maps options onto settings: names and defaults kept, bad values refused before any file,
resume refused for changed settings, records turned into the rows of the results file."""

import argparse
import dataclasses
import json
import math

import pytest
import torch

from smoothcert.cli.main import build_parser, main
from smoothcert.cli.options import add_method_options, build_method, settings_from_args
from smoothcert.cli.train import add_train_arguments, objective_from_args
from smoothcert.engine.sampling import input_generator
from smoothcert.engine.smooth import certify
from smoothcert.geometry.regions import Ball
from smoothcert.methods.base import CertifyMethod, method_class
from smoothcert.methods.records import MemoryDecision, MethodRecord, Prediction, record_row
from smoothcert.models.architectures import model_for_dataset
from smoothcert.models.checkpoint import save_checkpoint
from smoothcert.noise.gaussian import IsotropicGaussian
from smoothcert.settings import Choice, Integer, Names, Number, Switch, Text, constraint_of, flag_of

#: Every method option of the command line before settings existed, with its default (the compatibility spec).
OLD_OPTIONS = {
    "--opt-samples": 100, "--opt-batch-size": None, "--opt-gap": "pa", "--dds-steps": 900, "--dds-lr": 0.04,
    "--ancer-steps": 100, "--ancer-lr": 0.04, "--kappa": 2.0, "--norm": "l2", "--no-memory": True,
    "--rancer-lambda1": 0.5, "--rancer-lambda2": 0.5, "--hessian": "auto", "--select-samples": 1000,
    "--rddrs-steps": 100, "--rddrs-lr": 1.0, "--rddrs-samples": 1000, "--rddrs-kappa": 1e-6,
    "--norms": ("l2", "l1", "linf"), "--subspace": None, "--alpha-split": 0.5,
}
#: Options added since, with their defaults (a default keeps the earlier behaviour).
NEW_OPTIONS = {"--ancer-constraint": "elementwise", "--compare-base": 0, "--top-k": 1, "--topk-label": "label",
               "--sampling": "float", "--noise": "gaussian",
               "--shift-sigma": 2.0, "--max-shift": 8, "--translation-mode": "smooth",
               "--angle-sigma": 10.0, "--max-angle": 10.0, "--angle-cells": 10, "--beta-step": 0.05,
               "--angle-tail": 4.0,
               "--rancer-scales": "isotropic", "--rancer-eigen-map": "curvature", "--rancer-rank": 0, "--rddrs-rank": 0}
OPTIONS = {**OLD_OPTIONS, **NEW_OPTIONS}


def method_parser(methods=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--sigma", type=float)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--alpha", type=float, default=0.001)
    add_method_options(parser, methods)
    return parser


def test_every_old_option_keeps_its_name_and_default():
    parser = method_parser()
    flags = {s for a in parser._actions for s in a.option_strings} - {"-h", "--help", "--sigma", "--n", "--alpha"}
    assert flags == set(OPTIONS)
    args = parser.parse_args(["--sigma", "0.3"])
    for cls in CertifyMethod.registry.values():
        settings = settings_from_args(cls.settings_type, args)
        for f in dataclasses.fields(settings):
            if f.name != "sigma":
                assert getattr(settings, f.name) == OPTIONS[flag_of(f)], (cls.name, f.name)
    # the certify and plot-regions commands carry the same method options
    for command in ("certify", "plot-regions"):
        sub = build_parser()._subparsers._group_actions[0].choices[command]
        assert set(OPTIONS) <= {s for a in sub._actions for s in a.option_strings}


def other_value(f):
    """A valid value of field ``f`` other than its default, and its command-line words."""
    c, default = constraint_of(f), f.default
    if isinstance(c, Switch):
        return (not default), [flag_of(f)]
    if isinstance(c, Integer):
        value = (default or 1) + 1
    elif isinstance(c, Number):
        value = default / 2 if default else 0.25
    elif isinstance(c, Choice):
        value = [v for v in c.choices if v != default][0] if len(c.choices) > 1 else default
    elif isinstance(c, Names):
        value = c.choices[:2]
        return value, [flag_of(f), ",".join(value)]
    else:
        assert isinstance(c, Text)
        value = "coords:0-1"
    return value, [flag_of(f), str(value)]


@pytest.mark.parametrize("name", sorted(CertifyMethod.registry))
def test_each_methods_options_parse_into_its_settings(name):
    cls = method_class(name)
    # each setting on its own (some pairs exclude each other, e.g. fixed's --noise laplace with --sampling sound)
    base = {"sigma": 0.3} if "sigma" in cls.settings_type.field_names() else {}  # translations: shifts only
    for f in dataclasses.fields(cls.settings_type):
        if f.name != "sigma":
            value, words = other_value(f)
            method = build_method(cls, method_parser().parse_args(["--sigma", "0.3", *words]))
            assert type(method) is cls
            assert method.settings == cls.settings_type(**base, **{f.name: value})
            assert method.config() == {"name": name, **method.settings.to_dict()}
    # plot-regions draws single inputs: memory off by an override, whatever the options say
    single = build_method(cls, method_parser().parse_args(["--sigma", "0.3"]), memory=False)
    assert not single.uses_memory


def test_method_values_and_checks_against_the_run():
    args = method_parser().parse_args(["--sigma", "0.5", "--kappa", "3", "--norm", "l1", "--opt-batch-size", "64",
                                       "--no-memory", "--ancer-steps", "7"])
    ancer = build_method(method_class("ancer"), args)
    assert ancer.settings.kappa == 3.0 and ancer.settings.ancer_steps == 7 and ancer.family == "uniform"
    assert ancer.settings.opt_batch_size == 64 and not ancer.uses_memory and ancer.config()["memory"] is False
    with pytest.raises(ValueError, match=r"^norm \(--norm\) must be one of l2, got 'l1'$"):
        build_method(method_class("rddrs"), args)
    too_few = method_parser().parse_args(["--sigma", "0.5", "--n", "5"])
    with pytest.raises(ValueError):
        build_method(method_class("first-order"), too_few)
    with pytest.raises(ValueError, match="give --sigma"):
        build_method(method_class("fixed"), method_parser().parse_args([]))


def test_train_options_map_onto_the_objectives_settings():
    parser = add_train_arguments(argparse.ArgumentParser())
    base = ["--dataset", "toy-curved", "--sigma", "0.25", "--out", "x"]
    macer = objective_from_args(parser.parse_args(base + ["--objective", "macer", "--num-noise", "4", "--lbd", "3"]))
    assert macer.config() == {"objective": "macer", "k": 4, "lbd": 3.0, "gamma": 8.0, "beta": 16.0, "warmup": 0}
    macer = objective_from_args(parser.parse_args(base + ["--objective", "macer", "--macer-threshold", "0.99"]))
    assert macer.settings.threshold == 0.99 and macer.config()["threshold"] == 0.99
    for bad in ("0.5", "1", "1.2"):
        with pytest.raises(ValueError, match=r"^threshold \(--macer-threshold\) must be"):
            objective_from_args(parser.parse_args(base + ["--objective", "macer", "--macer-threshold", bad]))
    gen = objective_from_args(parser.parse_args(base + ["--objective", "generalized-consistency"]))
    assert gen.config() == {"objective": "generalized-consistency", "m": 2, "lbd": 10.0, "eta": 0.5}
    with pytest.raises(SystemExit):
        parser.parse_args(base + ["--objective", "generalized-consistency", "--consistency-gate", "softmax"])
    mix = objective_from_args(parser.parse_args(base + ["--objective", "smoothmix", "--pgd-steps", "2", "--eta", "1",
                                                        "--smoothmix-step-size", "0.5"]))
    assert mix.config() == {"objective": "smoothmix", "m": 4, "steps": 2, "step_size": 0.5, "eta": 1.0, "warmup": 10}
    cat = objective_from_args(parser.parse_args(base + ["--objective", "cat-rs", "--lbd", "0.5", "--epsilon", "0.5"]))
    assert cat.config() == {"objective": "cat-rs", "m": 4, "epsilon": 0.5, "steps": 4, "lbd": 0.5, "teacher": None,
                            "teacher_samples": 32, "confidence": "model"}
    with pytest.raises(ValueError, match=r"^teacher_samples \(--teacher-samples\) must be"):
        objective_from_args(parser.parse_args(base + ["--objective", "cat-rs", "--teacher-samples", "0"]))
    with pytest.raises(ValueError, match=r"^confidence \(--catrs-confidence\) 'teacher' needs a teacher"):
        objective_from_args(parser.parse_args(base + ["--objective", "cat-rs", "--catrs-confidence", "teacher"]))
    with pytest.raises(ValueError, match="takes no hyperparameter"):
        objective_from_args(parser.parse_args(base + ["--objective", "cat-rs", "--macer-threshold", "0.9"]))
    adv = objective_from_args(parser.parse_args(base + ["--objective", "smoothadv", "--pgd-steps", "3"]))
    assert adv.settings.steps == 3 and adv.num_noise == 4
    gauss = objective_from_args(parser.parse_args(base + ["--num-noise", "3"]))
    assert gauss.config() == {"objective": "gaussian", "m": 3}
    with pytest.raises(ValueError, match=r"^lbd \(--lbd\) must be a finite number >= 0, got -1.0$"):
        objective_from_args(parser.parse_args(base + ["--objective", "consistency", "--lbd", "-1"]))
    with pytest.raises(ValueError, match="takes no hyperparameter steps"):
        objective_from_args(parser.parse_args(base + ["--pgd-steps", "3"]))


# ------------------------------------------------------------------------------------- through the command line

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "toy"
    save_checkpoint(path, model_for_dataset("toy-curved", "mlp"), {"dataset": "toy-curved", "sigma": 0.25})
    return path


def certify_args(checkpoint, out, *extra):
    return ["certify", "--checkpoint", str(checkpoint), "--n0", "10", "--n", "100", "--alpha", "0.01", "--max", "3",
            "--batch-size", "100", "--seed", "2", "--no-progress", "--out", str(out), *extra]


DDS_FAST = ("--method", "dds", "--opt-samples", "4", "--dds-steps", "1")


@pytest.mark.parametrize("extra, message", [
    (("--method", "ancer", "--kappa", "-1"), "kappa (--kappa) must be a finite number >= 0, got -1.0"),
    (("--method", "rancer", "--norm", "l1"), "norm (--norm) must be one of l2, got 'l1'"),
    (("--method", "dds", "--opt-samples", "0"), "opt_samples (--opt-samples) must be an integer >= 1, got 0"),
    (("--method", "first-order", "--alpha-split", "1"),
     "alpha_split (--alpha-split) must be a finite number in (0, 1)"),
    (("--method", "first-order", "--norms", "l5"), "norms (--norms) must be a non-empty list of names among l2"),
    (("--sigma", "-0.5",), "sigma (--sigma) must be a finite number > 0, got -0.5"),
    (("--noise", "laplace", "--sigma", "0"), "sigma (--sigma) must be a finite number > 0, got 0.0"),
    (("--method", "dds", "--norm", "linf"), "norm (--norm) must be one of l2, l1, got 'linf'"),
    (("--method", "dds", "--noise", "laplace"), "--noise is an option of --method fixed; --method dds chooses"),
])
def test_a_bad_setting_exits_2_before_any_file_is_written(checkpoint, tmp_path, capsys, extra, message):
    out = tmp_path / "r.tsv"
    assert main(certify_args(checkpoint, out, *extra)) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_resume_refuses_changed_settings_and_names_them(checkpoint, tmp_path, capsys):
    out = tmp_path / "d.tsv"
    assert main(certify_args(checkpoint, out, *DDS_FAST)) == 0
    sidecar = json.loads((tmp_path / "d.tsv.json").read_text())
    assert sidecar["method"] == {"name": "dds", "sigma": 0.25, "opt_samples": 4, "opt_batch_size": None,
                                 "opt_gap": "pa", "dds_steps": 1, "dds_lr": 0.04, "norm": "l2", "memory": True,
                                 "compare_base": 0}
    before = out.read_text()
    capsys.readouterr()
    assert main(certify_args(checkpoint, out, *DDS_FAST, "--dds-steps", "2", "--no-memory")) == 2
    err = capsys.readouterr().err
    assert "method.dds_steps: file has 1, this run has 2" in err and "method.memory: file has True" in err
    assert out.read_text() == before
    assert main(certify_args(checkpoint, out, *DDS_FAST)) == 0  # the same settings resume (nothing left to do)
    assert out.read_text() == before


def test_rows_of_the_results_file_are_the_certificates_columns(checkpoint, tmp_path):
    """Every column of a fixed-sigma run, against CERTIFY called directly with the run's per-input streams."""
    out = tmp_path / "f.tsv"
    assert main(certify_args(checkpoint, out, "--sigma", "0.3", "--inputs-per-batch", "2")) == 0
    lines = [line.split("\t") for line in out.read_text().splitlines()]
    header, rows = lines[0], [dict(zip(lines[0], r)) for r in lines[1:]]
    assert header == ["idx", "label", "predict", "radius", "correct", "time", "radius_proxy", "p_lower", "gap", "n",
                      "method", "dtype", "sampling", "n_used", "sigma", "noise", "scale", "norm", "radius_l1",
                      "radius_l2", "radius_linf", "converted"]
    from smoothcert.cli.common import load_base_classifier
    from smoothcert.data.datasets import load_dataset

    model, _, _ = load_base_classifier([str(checkpoint)], torch.device("cpu"))
    x, y = load_dataset("toy-curved", "test").batch([0, 1, 2])
    gens = [(input_generator(2, i, "select"), input_generator(2, i, "estimate")) for i in range(3)]
    certs = certify(model, x, IsotropicGaussian(0.3), 2, 10, 100, 0.01, batch_size=100, block=50,  # 100 // 2 inputs
                    generators=gens)
    assert any(not c.abstained for c in certs)  # radii to compare, not only zeros
    for i, (row, c) in enumerate(zip(rows, certs)):
        assert (int(row["idx"]), int(row["label"]), int(row["predict"])) == (i, int(y[i]), c.prediction)
        assert int(row["correct"]) == int(c.prediction == int(y[i])) and float(row["time"]) >= 0
        for column, value in (("radius", c.radius), ("radius_proxy", c.radius_proxy), ("p_lower", c.p_lower),
                              ("gap", c.gap)):
            assert float(row[column]) == value or (math.isnan(value) and row[column] == "nan")
        assert (int(row["n"]), row["method"], row["dtype"], float(row["sigma"])) == (100, "fixed", "float32", 0.3)
        # Gaussian: l2 native (the radius), l1 the same ball's, l_inf divided by sqrt(d) (d = 2), both converted
        assert (row["noise"], float(row["scale"]), row["norm"]) == ("gaussian", 0.3, "l2")
        for column, value in (("radius_l1", c.radii["l1"]), ("radius_l2", c.radius), ("radius_linf", c.radii["linf"])):
            assert float(row[column]) == value
        assert row["converted"] == ("none" if c.abstained else "l1,linf")
        assert c.radii["l1"] == c.radius and c.radii["linf"] <= c.radius / math.sqrt(2)
        assert row["sampling"] == "float"
        assert int(row["n_used"]) == 100  # fixed-n CERTIFY uses all n estimation samples


@pytest.mark.parametrize("argv, message", [
    (("--sampling", "sound"), "sound sampling needs inputs on the grid k/255"),  # the toy data are not pixels
    (("--sampling", "sound", *DDS_FAST), "--sampling sound needs a method with one isotropic Gaussian noise (fixed)"),
    (("--sampling", "sound", "--method", "first-order"), "--method first-order samples in floating point only"),
])
def test_sound_sampling_is_refused_where_it_does_not_apply(checkpoint, tmp_path, capsys, argv, message):
    assert main(certify_args(checkpoint, tmp_path / "s.tsv", *argv)) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    predict_argv = ["predict", "--checkpoint", str(checkpoint), "--n", "10", "--out", str(tmp_path / "p.tsv"),
                    "--sampling", "sound", "--no-progress"]
    assert main(predict_argv) == 2 and "grid k/255" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_sound_sampling_rows_say_sound(tmp_path):
    torch.manual_seed(0)
    model = tmp_path / "mnist"
    save_checkpoint(model, model_for_dataset("mnist", "mnist-cnn"), {"dataset": "mnist", "sigma": 0.25})
    common = ["--checkpoint", str(model), "--n", "40", "--alpha", "0.01", "--max", "2", "--batch-size", "40",
              "--no-progress"]
    for command, extra in (("certify", ["--n0", "8"]), ("predict", [])):
        out = tmp_path / f"{command}.tsv"
        assert main([command, *common, *extra, "--sampling", "sound", "--out", str(out)]) == 0
        lines = [line.split("\t") for line in out.read_text().splitlines()]
        rows = [dict(zip(lines[0], r)) for r in lines[1:]]
        assert len(rows) == 2 and {r["sampling"] for r in rows} == {"sound"}
        sidecar = json.loads((tmp_path / f"{command}.tsv.json").read_text())
        assert (sidecar["method"]["sampling"] if command == "certify" else sidecar["sampling"]) == "sound"


class _Cert:
    """A certificate as the engine reports it (only what a row reads)."""

    prediction, p_lower, gap, radius, radius_proxy, n, dtype = 1, 0.9, 1.28, 0.4, 0.5, 100, "float32"


def test_a_record_carries_what_memory_decided():
    ball = Ball(torch.zeros(2), 0.1)
    columns = ("predict", "radius", "radius_proxy", "p_lower", "memory")
    kept = MethodRecord("m", _Cert(), None, {"memory": "kept"}, MemoryDecision("kept", None, 0.4))
    shrunk = MethodRecord("m", _Cert(), None, {"memory": "shrunk"}, MemoryDecision("shrunk", ball, 0.1))
    gone = MethodRecord("m", _Cert(), None, {"memory": "abstained"}, MemoryDecision("abstained", None, 0.0))
    assert record_row(kept, columns) == {"predict": 1, "radius": 0.4, "radius_proxy": 0.5, "p_lower": 0.9,
                                         "memory": "kept"}
    assert record_row(shrunk, columns) == {"predict": 1, "radius": 0.1, "radius_proxy": 0.1, "p_lower": 0.9,
                                           "memory": "shrunk"}
    assert shrunk.certified_region is ball and gone.certified_region is None
    assert record_row(gone, columns) == {"predict": -1, "radius": 0.0, "radius_proxy": 0.0, "p_lower": 0.9,
                                         "memory": "abstained"}
    assert record_row(Prediction(3), ("predict",)) == {"predict": 3}
    with pytest.raises(ValueError, match="no value for the column"):
        record_row(kept, ("predict", "basis"))
    with pytest.raises(ValueError, match="action"):
        MemoryDecision("enlarged", None, 1.0)


#: The options of the modes of certification (``smoothcert certify`` only), with their defaults.
MODE_OPTIONS = {"--mode": "fixed", "--radius": None, "--n-max": None, "--precision": None, "--sequence": "cp",
                "--randomized-cp": False, "--first-check": 50, "--check-growth": 1.5}


def test_mode_options_and_their_defaults():
    sub = build_parser()._subparsers._group_actions[0].choices["certify"]
    defaults = {s: a.default for a in sub._actions for s in a.option_strings}
    assert {k: defaults[k] for k in MODE_OPTIONS} == MODE_OPTIONS


@pytest.mark.parametrize("extra, message", [
    (("--mode", "target"), "--mode target needs --radius R"),
    (("--mode", "target", "--radius", "0", "--n-max", "500"), "a finite number > 0"),
    (("--mode", "target", "--radius", "0.5"), "needs --n-max N"),
    (("--radius", "0.5"), "radius is for --mode target"),
    (("--mode", "anytime", "--n-max", "5"), "--n-max (5) must be at least --n0 (10)"),
    (("--mode", "anytime", "--n-max", "500", "--precision", "-1"), "--precision must be a finite number > 0"),
    (("--mode", "anytime", "--n-max", "500", "--randomized-cp"), "option of --mode fixed"),
    (("--mode", "target", "--radius", "0.1", "--n-max", "500", "--method", "topk", "--top-k", "1"),
     "--method topk certifies with fixed n only"),
    (("--mode", "target", "--radius", "0.1", "--n-max", "500", "--check-growth", "1"), "must be a number in (1, 16]"),
    (("--mode", "anytime", "--n-max", "500", "--first-check", "0"), "the first check (samples) must be"),
    (("--check-growth", "3"), "are for --mode target or anytime"),
])
def test_bad_mode_options_are_refused_before_any_file(checkpoint, tmp_path, capsys, extra, message):
    out = tmp_path / "bad.tsv"
    assert main(certify_args(checkpoint, out, *extra)) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_target_anytime_and_randomized_runs_record_their_samples(checkpoint, tmp_path, capsys):
    """Every mode through the command line: ``n_used`` per row (at most n_max), the mode's columns, the report's
    samples per input."""
    rows = {}
    for name, extra in {"target": ("--mode", "target", "--radius", "0.05", "--n-max", "400"),
                        "anytime": ("--mode", "anytime", "--n-max", "400", "--precision", "0.1"),
                        "rand": ("--randomized-cp",)}.items():
        out = tmp_path / f"{name}.tsv"
        assert main(certify_args(checkpoint, out, *extra)) == 0
        lines = [line.split("\t") for line in out.read_text().splitlines()]
        rows[name] = [dict(zip(lines[0], r)) for r in lines[1:]]
        sidecar = json.loads((tmp_path / f"{name}.tsv.json").read_text())
        assert sidecar["mode"]["name"] == ("fixed" if name == "rand" else name)
    assert all(1 <= int(r["n_used"]) <= 400 and r["decision"] in ("certified", "futile", "undecided")
               for r in rows["target"] + rows["anytime"])
    assert all(float(r["radius"]) in (0.0, pytest.approx(0.05)) for r in rows["target"])
    assert all(0 <= float(r["cp_uniform"]) <= 1 and int(r["n_used"]) == 100 for r in rows["rand"])
    capsys.readouterr()
    assert main(["report", str(tmp_path / "target.tsv"), str(tmp_path / "rand.tsv")]) == 0
    text = capsys.readouterr().out
    assert "mean n" in text and "median n" in text
