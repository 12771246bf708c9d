"""End to end through the command line: train, certify, kill -9 and resume, predict, report."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from smoothcert.cli.main import main

PY = [sys.executable, "-m", "smoothcert.cli"]


def without_time(path):
    rows = [line.split("\t") for line in path.read_text().splitlines()]
    t = rows[0].index("time")
    return [r[:t] + r[t + 1 :] for r in rows]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("model") / "toy"
    assert main(["train", "--dataset", "toy-curved", "--arch", "mlp", "--sigma", "0.25", "--epochs", "3",
                 "--lr", "0.1", "--seed", "0", "--out", str(out), "--no-progress"]) == 0
    return out


def certify_args(checkpoint, out, **extra):
    args = ["certify", "--checkpoint", str(checkpoint), "--split", "test", "--n0", "20", "--n", "2000",
            "--alpha", "0.01", "--batch-size", "200", "--seed", "3", "--max", "60", "--out", str(out), "--no-progress"]
    for k, v in extra.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args


def test_train_certify_report(checkpoint, tmp_path, capsys):
    out = tmp_path / "r.tsv"
    assert main(certify_args(checkpoint, out, inputs_per_batch=8)) == 0
    header = out.read_text().splitlines()[0].split("\t")
    assert header[:6] == ["idx", "label", "predict", "radius", "correct", "time"]
    assert {"radius_proxy", "p_lower", "gap", "method", "dtype", "sigma"} <= set(header)
    assert len(out.read_text().splitlines()) == 61
    sidecar = json.loads((tmp_path / "r.tsv.json").read_text())
    assert sidecar["method"] == {"name": "fixed", "sigma": 0.25, "noise": "gaussian", "norm": "l2",
                                 "sampling": "float"}
    assert sidecar["seed"] == 3
    assert sidecar["checkpoints"][0]["sha256"]
    capsys.readouterr()
    assert main(["report", str(out), "--plot", str(tmp_path / "p.png"), "--latex"]) == 0
    text = capsys.readouterr().out
    assert r"\begin{tabular}" in text and (tmp_path / "p.png").stat().st_size > 1000
    # a split of the work gives the same numbers: each input's noise derives from the seed and its index
    evens = tmp_path / "evens.tsv"
    assert main(certify_args(checkpoint, evens, inputs_per_batch=8, skip=2)) == 0
    assert without_time(evens)[1:] == without_time(out)[1::2]


@pytest.mark.slow
def test_kill_and_resume_gives_the_uninterrupted_file(checkpoint, tmp_path):
    full = tmp_path / "full.tsv"
    assert main(certify_args(checkpoint, full)) == 0
    part = tmp_path / "part.tsv"
    cmd = PY + certify_args(checkpoint, part)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 120
    while time.time() < deadline:
        if part.exists() and len(part.read_text().splitlines()) >= 6:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rows_at_kill = len(part.read_text().splitlines()) - 1
    assert 5 <= rows_at_kill < 60, "the run must be killed part way"
    assert subprocess.run(cmd, env=env, capture_output=True).returncode == 0
    assert without_time(part) == without_time(full)


def test_refuses_another_configuration_and_bad_input(checkpoint, tmp_path, capsys):
    out = tmp_path / "r.tsv"
    assert main(certify_args(checkpoint, out, max=5)) == 0
    before = out.read_text()
    capsys.readouterr()
    assert main(certify_args(checkpoint, out, max=5, sigma=0.5)) == 2
    assert "another configuration" in capsys.readouterr().err and out.read_text() == before
    assert main(certify_args(checkpoint, tmp_path / "x.tsv", n0=3000)) == 2
    assert "n0" in capsys.readouterr().err
    assert main(certify_args(checkpoint, tmp_path / "x.tsv", alpha=1.5)) == 2
    assert "alpha" in capsys.readouterr().err
    assert main(certify_args(checkpoint, tmp_path / "x.tsv", sigma=-1)) == 2
    assert "sigma" in capsys.readouterr().err
    assert main(certify_args(checkpoint, tmp_path / "x.tsv", dataset="nope")) == 2
    assert "nope" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.with_suffix(".json").write_text((checkpoint.parent / "toy.json").read_text())
    bad.with_suffix(".safetensors").write_bytes(b"\x00garbage")
    args = certify_args(checkpoint, tmp_path / "y.tsv")
    args[args.index("--checkpoint") + 1] = str(bad)
    assert main(args) == 2
    assert "bad" in capsys.readouterr().err


def test_predict_writes_cohen_columns(checkpoint, tmp_path):
    out = tmp_path / "p.tsv"
    assert main(["predict", "--checkpoint", str(checkpoint), "--n", "500", "--alpha", "0.01", "--max", "20",
                 "--out", str(out), "--no-progress"]) == 0
    rows = [r.split("\t") for r in out.read_text().splitlines()]
    assert rows[0] == ["idx", "label", "predict", "correct", "time", "sampling"] and len(rows) == 21
    assert {r[5] for r in rows[1:]} == {"float"}
    assert sum(int(r[3]) for r in rows[1:]) >= 12  # a trained toy model is mostly right


@pytest.mark.slow
def test_compiled_model_gives_a_valid_run_and_is_refused_for_gradient_methods(checkpoint, tmp_path, capsys):
    out = tmp_path / "c.tsv"
    args = certify_args(checkpoint, out, max=4)
    assert main(args + ["--compile"]) == 0
    assert json.loads((tmp_path / "c.tsv.json").read_text())["compile"] is True
    plain = tmp_path / "p.tsv"
    assert main(certify_args(checkpoint, plain, max=4)) == 0
    assert [r[:3] for r in without_time(out)] == [r[:3] for r in without_time(plain)]
    capsys.readouterr()
    assert main(certify_args(checkpoint, tmp_path / "d.tsv", max=4) + ["--compile", "--method", "dds"]) == 2
    assert "differentiates through the model" in capsys.readouterr().err
