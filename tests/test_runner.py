"""Results files: rows as they go, resume after a crash, refusal of another run's file."""

import json

import pytest
import torch

from smoothcert.noise.gaussian import IsotropicGaussian
from smoothcert.engine.smooth import certify
from smoothcert.cli.runner import CERTIFY_COLUMNS, ResultsFile, run_dataset, select_indices
from smoothcert.engine.sampling import input_generator
from smoothcert.methods.records import MethodRecord

from conftest import Linear2

COLUMNS = CERTIFY_COLUMNS + ("p_lower",)
X = torch.rand(20, 3, generator=torch.Generator().manual_seed(0))
Y = (X[:, 0] > 0.5).long()
MODEL = Linear2(torch.tensor([1.0, 0.0, 0.0]), -0.5)


def inputs(batch):
    return X[batch], Y[batch]


def process(x, labels, idx):
    gens = [(input_generator(5, i, "select"), input_generator(5, i, "estimate")) for i in idx]
    certs = certify(MODEL, x, IsotropicGaussian(0.25), 2, 20, 200, 0.01, block=50, generators=gens)
    return [MethodRecord("fixed", c, c.region) for c in certs]


def table(path):
    lines = path.read_text().splitlines()
    return [fields[:5] + fields[6:] for fields in (line.split("\t") for line in lines)]  # all but time


def test_select_indices_like_cohen():
    assert select_indices(10, 3) == [0, 3, 6, 9]
    assert select_indices(10, 2, 5) == [0, 2, 4]
    with pytest.raises(ValueError, match="skip"):
        select_indices(10, 0)


def test_resume_after_torn_write_equals_uninterrupted(tmp_path):
    config = {"seed": 5}
    full = ResultsFile(tmp_path / "full.tsv", COLUMNS, config)
    run_dataset(full, inputs, list(range(20)), process, inputs_per_batch=4, progress=False)

    part = ResultsFile(tmp_path / "part.tsv", COLUMNS, config)
    calls = []

    def crashing(x, labels, idx):
        calls.append(list(idx))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return process(x, labels, idx)

    with pytest.raises(KeyboardInterrupt):
        run_dataset(part, inputs, list(range(20)), crashing, inputs_per_batch=3, progress=False)
    with open(part.path, "a") as f:
        f.write("6\t1\t1\t0.12")  # a torn row, as a kill in the middle of a write leaves it
    done = []
    run_dataset(part, inputs, list(range(20)), process, inputs_per_batch=5, progress=False,
                on_open=done.extend)
    assert done == list(range(6))
    assert table(part.path) == table(full.path)
    assert len(part.path.read_text().splitlines()) == 21


def test_refuses_a_file_from_another_configuration(tmp_path):
    rf = ResultsFile(tmp_path / "r.tsv", COLUMNS, {"seed": 5, "sigma": 0.25})
    run_dataset(rf, inputs, [0, 1], process, progress=False)
    before = rf.path.read_text()
    other = ResultsFile(tmp_path / "r.tsv", COLUMNS, {"seed": 6, "sigma": 0.25})
    with pytest.raises(ValueError, match="another configuration.*seed"):
        run_dataset(other, inputs, [0, 1, 2], process, progress=False)
    assert rf.path.read_text() == before
    stray = tmp_path / "stray.tsv"
    stray.write_text("idx\tlabel\n")
    with pytest.raises(ValueError, match="no stray.tsv.json"):
        ResultsFile(stray, COLUMNS, {}).open()
    with pytest.raises(ValueError, match="not the start"):
        run_dataset(ResultsFile(tmp_path / "r.tsv", COLUMNS, {"seed": 5, "sigma": 0.25}), inputs, [1, 2],
                    process, progress=False)
    sidecar = json.loads(rf.sidecar.read_text())
    assert sidecar["seed"] == 5 and "torch" in sidecar["versions"] and sidecar["columns"] == list(COLUMNS)
