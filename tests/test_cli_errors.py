"""Every subcommand with bad values: exit status 2, one ``smoothcert CMD: error: ...`` line, no traceback, no file.

Each case runs the command line in-process (an unexpected exception fails the test, so no traceback can hide) in
an empty folder, which must still be empty afterwards: a rejected run leaves nothing behind.
"""

import math

import pytest
import torch

from smoothcert.cli.main import main
from smoothcert.models.architectures import model_for_dataset
from smoothcert.models.checkpoint import save_checkpoint


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    toy = folder / "toy"
    assert main(["train", "--dataset", "toy-curved", "--arch", "mlp", "--sigma", "0.25", "--epochs", "1",
                 "--lr", "0.1", "--out", str(toy), "--no-progress"]) == 0
    torch.manual_seed(0)
    mnist = save_checkpoint(folder / "mnist", model_for_dataset("mnist"), {"dataset": "mnist", "sigma": 0.25})
    header_only = folder / "empty.tsv"
    header_only.write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\n")
    not_results = folder / "other.tsv"
    not_results.write_text("a\tb\n1\t2\n")
    return {"toy": str(toy), "mnist": str(mnist), "empty": str(header_only), "other": str(not_results)}


def _certify(m, out, *extra):
    return ["certify", "--checkpoint", m["toy"], "--n0", "10", "--n", "100", "--max", "3", "--out", out,
            "--no-progress", *extra]


def _predict(m, out, *extra):
    return ["predict", "--checkpoint", m["toy"], "--n", "100", "--max", "3", "--out", out, "--no-progress", *extra]


def _train(m, out, *extra):
    return ["train", "--dataset", "toy-curved", "--sigma", "0.25", "--epochs", "1", "--out", out, "--no-progress",
            *extra]


def _plot(m, out, *extra):
    return ["plot-regions", "--checkpoint", m["toy"], "--methods", "fixed", "--n", "100", "--n0", "10",
            "--points", "0", "--out", out, *extra]


NO_CUDA = [] if torch.cuda.is_available() else [("certify", ["--device", "cuda"]), ("predict", ["--device", "cuda"]),
                                                  ("train", ["--device", "cuda"]), ("plot-regions", ["--device", "cuda"])]

CASES = [
    # certify: sampling, selection, noise, data, model, method settings, output
    ("certify", ["--n0", "500"]), ("certify", ["--n", "0"]), ("certify", ["--n", "-5"]), ("certify", ["--n0", "0"]),
    ("certify", ["--alpha", "0"]), ("certify", ["--alpha", "1.5"]), ("certify", ["--alpha", "nan"]),
    ("certify", ["--sigma", "-1"]), ("certify", ["--sigma", "0"]), ("certify", ["--sigma", "inf"]),
    ("certify", ["--batch-size", "0"]), ("certify", ["--inputs-per-batch", "0"]), ("certify", ["--skip", "0"]),
    ("certify", ["--max", "0"]), ("certify", ["--seed", "-1"]), ("certify", ["--seed", str(2**33)]),
    ("certify", ["--dtype", "float16"]), ("certify", ["--device", "nonsense"]), ("certify", ["--dataset", "nope"]),
    ("certify", ["--dataset", "mnist"]), ("certify", ["--split", "nope"]), ("certify", ["--n", "ten"]),
    ("certify", ["--method", "nope"]), ("certify", ["--method", "dds", "--dds-lr", "-1"]),
    ("certify", ["--method", "ancer", "--kappa", "-1"]), ("certify", ["--method", "dds", "--compile"]),
    ("certify", ["--method", "first-order", "--alpha-split", "2"]),
    ("certify", ["--method", "rancer", "--rancer-rank", "3"]), ("certify", ["--method", "rancer", "--rancer-rank", "-1"]),
    ("certify", ["--method", "rancer", "--rancer-rank", "1.5"]),
    ("certify", ["--method", "rancer-best", "--rancer-rank", "1"]), ("certify", ["--method", "rddrs", "--rddrs-rank", "3"]),
    # predict
    ("predict", ["--n", "0"]), ("predict", ["--alpha", "0"]), ("predict", ["--batch-size", "0"]),
    ("predict", ["--sigma", "-1"]), ("predict", ["--dataset", "mnist"]), ("predict", ["--inputs-per-batch", "-2"]),
    # train
    ("train", ["--epochs", "0"]), ("train", ["--lr", "-1"]), ("train", ["--lr", "0"]), ("train", ["--lr", "1e9"]),
    ("train", ["--batch-size", "0"]), ("train", ["--sigma", "0"]), ("train", ["--dataset", "nope"]),
    ("train", ["--arch", "nope"]), ("train", ["--momentum", "2"]), ("train", ["--weight-decay", "-1"]),
    ("train", ["--val-size", "-1"]), ("train", ["--objective", "nope"]), ("train", ["--pca-fraction", "-1"]),
    ("train", ["--schedule", "nope"]), ("train", ["--device", "nonsense"]), ("train", ["--arch", "resnet20"]),
    # plot-regions
    ("plot-regions", ["--n0", "500"]), ("plot-regions", ["--alpha", "0"]), ("plot-regions", ["--points", "-1"]),
    ("plot-regions", ["--points", "100000"]), ("plot-regions", ["--methods", "nope"]),
    ("plot-regions", ["--dataset", "mnist"]), ("plot-regions", ["--sigma", "-1"]),
    # demo: rejected before it trains
    ("demo", ["--n", "-5"]), ("demo", ["--inputs", "0"]), ("demo", ["--n", "50"]),
    # report
    ("report", ["MISSING"]), ("report", ["EMPTY"]), ("report", ["OTHER"]), ("report", ["EMPTY", "--plot", "p.png"]),
    ("report", ["OTHER", "--labels", "a", "b"]),
] + NO_CUDA

BUILD = {"certify": _certify, "predict": _predict, "train": _train, "plot-regions": _plot}


def _args(models, folder, command, extra):
    out = str(folder / ("out.png" if command == "plot-regions" else "out" if command == "train" else "out.tsv"))
    if command in BUILD:
        return BUILD[command](models, out, *extra)
    if command == "demo":
        return ["demo", "--out", str(folder / "demo"), *extra]
    files = {"MISSING": str(folder / "missing.tsv"), "EMPTY": models["empty"], "OTHER": models["other"]}
    return ["report", *[files.get(e, str(folder / e) if e.endswith(".png") else e) for e in extra]]


@pytest.mark.parametrize("command,extra", CASES, ids=[f"{c} {' '.join(e)}" for c, e in CASES])
def test_bad_value_is_one_error_line_and_leaves_nothing(models, tmp_path, capsys, command, extra):
    folder = tmp_path / "work"
    folder.mkdir()
    args = _args(models, folder, command, extra)
    try:
        code = main(args)
    except SystemExit as e:  # argparse's own errors (a choice or a type): usage, then one error line
        code = e.code
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if "error:" in line]
    assert code == 2, captured
    assert len(errors) == 1 and errors[0].startswith(f"smoothcert {command}: error: "), captured.err
    assert "Traceback" not in captured.err + captured.out
    assert list(folder.rglob("*")) == [], f"a rejected run left {list(folder.rglob('*'))}"


def test_an_internal_error_keeps_its_traceback(models, tmp_path, monkeypatch):
    import sys

    cli = sys.modules["smoothcert.cli.main"]

    def broken(*args, **kwargs):
        raise KeyError("internal")

    monkeypatch.setattr(cli, "run_dataset", broken)
    with pytest.raises(KeyError):
        main(_certify(models, str(tmp_path / "r.tsv")))


def test_validation_comes_before_the_resume_check(models, tmp_path, capsys):
    out = str(tmp_path / "r.tsv")
    assert main(_certify(models, out)) == 0
    before = sorted(p.name for p in tmp_path.iterdir()), (tmp_path / "r.tsv").read_text()
    capsys.readouterr()
    assert main(_certify(models, out, "--alpha", "0")) == 2
    err = capsys.readouterr().err
    assert "alpha" in err and "another configuration" not in err
    assert (sorted(p.name for p in tmp_path.iterdir()), (tmp_path / "r.tsv").read_text()) == before


def test_a_file_without_complete_rows_is_replaced_and_says_so(models, tmp_path, capsys):
    out = tmp_path / "r.tsv"
    assert main(_certify(models, str(out), "--max", "1")) == 0
    out.write_text(out.read_text().splitlines()[0] + "\n0\t1\t")  # the header and a torn row: no complete row
    capsys.readouterr()
    assert main(_certify(models, str(out), "--sigma", "0.5")) == 0
    assert "held no complete row: replaced it" in capsys.readouterr().err
    assert len(out.read_text().splitlines()) == 4
    # with a complete row, another configuration is refused, naming the setting and no column list
    capsys.readouterr()
    assert main(_certify(models, str(out), "--sigma", "0.25", "--n", "200")) == 2
    err = capsys.readouterr().err
    assert "method.sigma: file has 0.5, this run has 0.25" in err and "n: file has 100" in err
    # another method: its name comes first, and no list of columns is dumped
    capsys.readouterr()
    assert main(_certify(models, str(out), "--sigma", "0.5", "--method", "dds", "--dds-steps", "1")) == 2
    err = capsys.readouterr().err
    assert "(method.name: file has 'fixed', this run has 'dds';" in err and "radius_proxy" not in err


def test_smooth_certify_says_when_one_input_has_a_batch_dimension():
    from smoothcert import Smooth

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten(), torch.nn.Linear(2 * 6 * 6, 3))
    smoothed = Smooth(model, num_classes=3, sigma=0.25, seed=0)
    x = torch.rand(1, 8, 8)
    prediction, radius = smoothed.certify(x, n0=10, n=100, alpha=0.01, batch_size=50)  # one input: fine
    assert prediction in (-1, 0, 1, 2) and math.isfinite(radius)
    with pytest.raises(ValueError, match="without a batch dimension"):
        smoothed.certify(x[None], n0=10, n=100, alpha=0.01, batch_size=50)
    with pytest.raises(ValueError, match="without a batch dimension"):
        smoothed.predict(x[None], n=100, alpha=0.01, batch_size=50)


def test_every_option_has_help_and_names_its_choices():
    import argparse

    from smoothcert.cli.main import build_parser
    from smoothcert.data.datasets import DATASETS
    from smoothcert.models.architectures import ARCHITECTURES

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = [f"{name} {a.option_strings or a.dest}" for name, p in sub.choices.items() for a in p._actions
               if not a.help and not isinstance(a, argparse._HelpAction)]
    assert missing == []
    train_help = sub.choices["train"].format_help()
    assert all(name in train_help for name in DATASETS) and all(name in train_help for name in ARCHITECTURES)
    assert all(name in sub.choices["certify"].format_help() for name in DATASETS)
