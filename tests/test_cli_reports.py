"""Reports, plots and resumes that explain themselves: settings in the plot, the Clopper-Pearson ceiling, PREDICT
tables, warnings across models, resume messages, extension by --max, other batch sizes of the same block."""

import json

import numpy as np
import pytest
import torch
from scipy.stats import norm

import smoothcert.evaluation.plots as plots
from smoothcert.cli.main import main
from smoothcert.evaluation.tables import report


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    folder = tmp_path_factory.mktemp("toy")
    out = folder / "toy"
    assert main(["train", "--dataset", "toy-curved", "--arch", "mlp", "--sigma", "0.25", "--epochs", "3",
                 "--lr", "0.1", "--out", str(out), "--no-progress"]) == 0
    return str(out)


def certify(toy, out, *extra):
    return ["certify", "--checkpoint", toy, "--n0", "20", "--n", "400", "--alpha", "0.01", "--batch-size", "200",
            "--max", "8", "--out", str(out), "--no-progress", *extra]


def rows(path):
    lines = [line.split("\t") for line in path.read_text().splitlines()]
    t = lines[0].index("time")
    return [r[:t] + r[t + 1:] for r in lines]


@pytest.fixture
def figures(monkeypatch):
    """The figures the plots write, kept open for inspection."""
    kept = []

    def keep(fig, path):
        kept.append(fig)
        fig.savefig(path)
        return path

    monkeypatch.setattr(plots, "save_figure", keep)
    return kept


def test_plot_names_its_settings_and_marks_the_ceiling(toy, tmp_path, figures):
    a, b = tmp_path / "a" / "cert.tsv", tmp_path / "b" / "cert.tsv"
    assert main(certify(toy, a)) == 0
    assert main(certify(toy, b, "--sigma", "0.5")) == 0
    png = tmp_path / "curves.png"
    text = report([a, b], plot=png)
    assert png.stat().st_size > 1000 and "| a/cert |" in text and "| b/cert |" in text
    (ax,) = figures[0].axes
    title = ax.get_title()
    assert "toy-curved test" in title and "n 400" in title and "alpha 0.01" in title and "8 inputs" in title
    assert ax.get_xlabel() == "l2 radius" and ax.get_ylabel() == "certified accuracy"
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "a/cert (sigma 0.25)" in labels and "b/cert (sigma 0.5)" in labels  # two files of one name, told apart
    ceilings = sorted(line.get_xdata()[0] for line in ax.get_lines() if line.get_linestyle() == "--")
    expected = [s * norm.ppf(0.01 ** (1 / 400)) for s in (0.25, 0.5)]
    assert ceilings == pytest.approx(expected)
    assert any("Clopper-Pearson ceiling" in label for label in labels)


def test_report_on_predict_header_only_and_other_models(toy, tmp_path, recwarn):
    pred = tmp_path / "p.tsv"
    assert main(["predict", "--checkpoint", toy, "--n", "400", "--max", "10", "--out", str(pred),
                 "--no-progress"]) == 0
    text = report([pred])
    header = [line for line in text.splitlines() if line.startswith("| method")][0]
    assert header == "| method | inputs | accuracy | abstain | wrong | s/input |"
    values = text.splitlines()[2].split("|")
    assert float(values[3]) > 0.5  # a trained toy model: accuracy, not zeros
    with pytest.raises(ValueError, match="PREDICT logs have no radii"):
        report([pred], plot=tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()
    empty = tmp_path / "e.tsv"
    empty.write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\n")
    with pytest.raises(ValueError, match="holds no complete row"):
        report([empty], plot=tmp_path / "e.png")
    assert not (tmp_path / "e.png").exists()
    # files of other models: a warning naming them
    other = tmp_path / "other"
    assert main(["train", "--dataset", "toy-curved", "--arch", "mlp", "--sigma", "0.25", "--epochs", "1",
                 "--seed", "1", "--out", str(other), "--no-progress"]) == 0
    c1, c2 = tmp_path / "c1.tsv", tmp_path / "c2.tsv"
    assert main(certify(toy, c1)) == 0 and main(certify(str(other), c2)) == 0
    recwarn.clear()
    report([c1, c2])
    messages = [str(w.message) for w in recwarn.list]
    assert any("different models" in m and "c1" in m and "c2" in m for m in messages)
    assert not any("different data" in m for m in messages)


def test_resume_says_where_and_extends_with_a_larger_max(toy, tmp_path, capsys):
    whole = tmp_path / "whole.tsv"
    assert main(certify(toy, whole, "--max", "12")) == 0
    part = tmp_path / "part.tsv"
    assert main(certify(toy, part, "--max", "4")) == 0
    capsys.readouterr()
    assert main(certify(toy, part, "--max", "12")) == 0
    err = capsys.readouterr().err
    assert "resuming" in err and "kept its 4 complete rows" in err and "row 5 of 12 (dataset index 4)" in err
    assert "max: 4 -> 12" in err
    assert rows(part) == rows(whole)
    side = json.loads((tmp_path / "part.tsv.json").read_text())
    assert side["max"] == 12 and side["resumed"][0]["at_row"] == 4


def test_other_batch_sizes_of_the_same_block_continue_with_the_same_numbers(toy, tmp_path, capsys):
    whole = tmp_path / "whole.tsv"
    assert main(certify(toy, whole)) == 0  # block = 200 // 1
    part = tmp_path / "part.tsv"
    assert main(certify(toy, part, "--max", "3")) == 0
    # 800 // 4 = 200: four inputs share each forward pass, each input's noise is drawn in the same blocks
    assert main(certify(toy, part, "--batch-size", "800", "--inputs-per-batch", "4")) == 0
    assert rows(part) == rows(whole)
    # another block may change the numbers: refused, with the reason
    capsys.readouterr()
    assert main(certify(toy, part, "--max", "10", "--batch-size", "100")) == 2
    err = capsys.readouterr().err
    assert "block: file has 200, this run has 100" in err and "columns" not in err
    # a sequential mode draws its estimation samples in blocks of the batch size itself: a new one is refused
    seq = tmp_path / "seq.tsv"
    anytime = ("--mode", "anytime", "--n-max", "400")
    assert main(certify(toy, seq, "--max", "3", *anytime)) == 0
    capsys.readouterr()
    assert main(certify(toy, seq, *anytime, "--batch-size", "800", "--inputs-per-batch", "4")) == 2
    assert "batch_size" in capsys.readouterr().err


def test_sampling_puts_a_train_mode_model_in_eval_mode_and_restores_it():
    from smoothcert import Smooth

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(),
                                torch.nn.Dropout(0.5), torch.nn.Linear(8, 2))
    model.train()
    model[3].eval()  # a mixed mode: each module's own flag must come back
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.tensor([0.3, 0.7])
    in_train = Smooth(model, 2, 0.25, seed=0).certify(x, 20, 500, 0.01, 100)
    assert [m.training for m in model.modules()] == [True, True, True, True, False, True]  # Sequential first
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # BatchNorm statistics untouched
    model.eval()
    in_eval = Smooth(model, 2, 0.25, seed=0).certify(x, 20, 500, 0.01, 100)
    assert in_train == in_eval
    assert np.isfinite(in_train[1])
    # a data-dependent method's optimizer samples the model in eval mode too, and gives the modes back
    from smoothcert.methods.base import RunContext
    from smoothcert.methods.dds import DDS

    model.train()
    model[3].eval()
    ctx = RunContext(model, 2, 20, 500, 0.01, 100, torch.float32, 0, torch.device("cpu"))
    (record,) = DDS(0.25, dds_steps=3, opt_samples=16, memory=False).certify(ctx, x[None], torch.zeros(1).long(), [0])
    assert record.fields["fallback"] == "none"
    assert [m.training for m in model.modules()] == [True, True, True, True, False, True]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_plot_regions_with_first_order_labels_axes_background_and_points(toy, tmp_path, monkeypatch):
    import smoothcert.evaluation.regions_plot as regions_plot

    kept = []
    monkeypatch.setattr(regions_plot, "save_figure", lambda fig, path: kept.append(fig) or fig.savefig(path) or path)
    out = tmp_path / "regions.png"
    assert main(["plot-regions", "--checkpoint", toy, "--methods", "fixed", "first-order", "--n", "2000",
                 "--n0", "50", "--points", "0", "3", "--out", str(out)]) == 0
    assert out.stat().st_size > 1000
    (ax,) = kept[0].axes
    assert ax.get_xlabel() == "input coordinate x1" and ax.get_ylabel() == "input coordinate x2"
    assert "background: the base classifier's predicted class" in ax.get_title()
    assert sorted(t.get_text() for t in ax.texts) == ["0", "3"]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any(label.startswith("first-order (") for label in labels)
