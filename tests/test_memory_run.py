"""Memory-based certification inside a run: what the memory was built for, closing, and the exact replay."""

import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch

from smoothcert.geometry.regions import Ball, Ellipsoid
from smoothcert.geometry.tolerances import inscribed_lower
from smoothcert.methods.memory_replay import RunMemory
from test_dds import FixedChoices, Stripe, context

F64 = torch.float64
SIGMAS = {0: 0.25, 1: 0.01, 2: 0.01}
#: x0 gets a class-1 ball of radius > 0.2; x1 = (0.5, 0.5) lies inside it but is class 0 (the stripe)
X = torch.tensor([[0.6, 0.5], [0.5, 0.5], [0.5, 0.02]])
LABELS = torch.tensor([1, 0, 0])


def stripe_context(checkpoint="a" * 64, dataset="toy-stripe", split="test"):
    ctx = context(Stripe(), n0=100, n=2000, alpha=0.001)
    return dataclasses.replace(ctx, identity={"checkpoints": [checkpoint], "dataset": dataset, "split": split})


# ----------------------------------------------------------------------------------------------- identity


def test_a_memory_built_for_another_checkpoint_or_data_set_is_refused_plainly(tmp_path):
    log = tmp_path / "log.tsv"
    method = FixedChoices(SIGMAS)
    method.open(stripe_context(), log, [])
    assert method.certify_rows(stripe_context(), X[:1], LABELS[:1], [0])[0]["memory"] == "kept"
    method.close()
    header = json.loads((tmp_path / "log.tsv.memory" / "memory.json").read_text())
    assert header["config"]["checkpoints"] == ["a" * 64] and header["config"]["dataset"] == "toy-stripe"
    # the log is gone (or was never written): the memory itself must refuse a run that certifies something else
    refusals = [(stripe_context(checkpoint="b" * 64), "built for another checkpoint"),
                (stripe_context(dataset="toy-other"), "built for another data set "),
                (stripe_context(split="train"), "built for another data set split")]
    for ctx, message in refusals:
        with pytest.raises(ValueError, match=message):
            FixedChoices(SIGMAS).open(ctx, log, [])
    with pytest.raises(ValueError, match="built with opt_samples 100 \\(this run: 7\\)"):
        FixedChoices(SIGMAS, samples=7).open(stripe_context(), log, [])
    again = FixedChoices(SIGMAS)  # the same run resumes
    again.open(stripe_context(), log, [0])
    assert again.certify_rows(stripe_context(), X[1:2], LABELS[1:2], [1])[0]["memory"] == "abstained"
    again.close()


def test_command_line_memory_names_the_checkpoint_it_was_built_for(tmp_path, capsys):
    from smoothcert.cli.main import main
    from smoothcert.models.architectures import build_model
    from smoothcert.models.checkpoint import save_checkpoint

    stems = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        stems.append(save_checkpoint(tmp_path / f"mlp{seed}", build_model("mlp", num_classes=2, input_shape=(2,)),
                                     {"dataset": "toy-rotated", "sigma": 0.1, "num_classes": 2}))
    out = tmp_path / "dds.tsv"
    argv = ["certify", "--out", str(out), "--method", "dds", "--max", "2", "--n", "100", "--n0", "10",
            "--dds-steps", "2", "--opt-samples", "10", "--no-progress", "--device", "cpu"]
    assert main(argv + ["--checkpoint", f"{stems[0]}.safetensors"]) == 0
    out.unlink()  # the log is lost; its memory is left behind
    assert main(argv + ["--checkpoint", f"{stems[1]}.safetensors"]) == 2
    assert "built for another checkpoint" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- closing


@pytest.mark.parametrize("saved", [False, True])
def test_closing_keeps_checking_later_inputs_against_earlier_certificates(tmp_path, saved):
    ctx = stripe_context()
    free = FixedChoices(SIGMAS, memory=False).certify_rows(ctx, X, LABELS, [0, 1, 2])
    assert free[0]["predict"] == 1 and free[1]["predict"] == 0 and free[1]["radius"] > 0  # they conflict
    method = FixedChoices(SIGMAS)
    log = tmp_path / "log.tsv"
    if saved:
        method.open(ctx, log, [])
    assert method.certify_rows(ctx, X[:1], LABELS[:1], [0])[0]["memory"] == "kept"
    method.close()
    later = method.certify_rows(ctx, X[1:], LABELS[1:], [1, 2])
    assert later[0]["memory"] == "abstained" and later[0]["predict"] == -1 and later[0]["radius"] == 0.0
    assert later[1]["memory"] == "kept" and later[1]["radius"] == free[2]["radius"]  # far away: unchanged
    method.close()
    if saved:  # the folder keeps what was processed while it was bound: the log's one row
        records = (tmp_path / "log.tsv.memory" / "records.jsonl").read_text().splitlines()
        assert [json.loads(line)["index"] for line in records] == [0]
        resumed = FixedChoices(SIGMAS)
        resumed.open(ctx, log, [0])
        assert resumed.certify_rows(ctx, X[1:2], LABELS[1:2], [1])[0]["memory"] == "abstained"
        resumed.close()


# ----------------------------------------------------------------------------------------------- replay


def certificate(prediction, region):
    return SimpleNamespace(prediction=prediction, region=region, radius=region.inscribed_radius)


def test_replay_accepts_only_the_recorded_region_bit_for_bit(tmp_path):
    results = tmp_path / "log.tsv"
    first = RunMemory.open(results, {"run": 1}, [])
    c0, c1 = torch.tensor([0.2, 0.3], dtype=F64), torch.tensor([0.5, 0.3], dtype=F64)
    kept = Ellipsoid(c0, torch.tensor([0.2, 0.05], dtype=F64), torch.tensor([[0.6, -0.8], [0.8, 0.6]], dtype=F64))
    conflicting = Ball(c1, 0.25)
    assert first.remember(0, c0, certificate(1, kept))[0] == "kept"
    action, ball, radius = first.remember(1, c1, certificate(0, conflicting))
    assert action == "shrunk" and 0 < radius < 0.25
    first.close()
    # a crash after the memory recorded both inputs, before the log got their rows: both are processed again
    nudged = Ellipsoid(c0, torch.nextafter(kept.axes, torch.ones(2, dtype=F64)), kept.basis)  # one ulp wider
    tilted = Ellipsoid(c0, kept.axes, kept.basis + torch.tensor([[1e-16, 0.0], [0.0, 0.0]], dtype=F64))
    for recomputed in (nudged, tilted, Ellipsoid(c0, kept.axes)):
        with pytest.raises(ValueError, match="not reproducible"):
            RunMemory.open(results, {"run": 1}, []).remember(0, c0, certificate(1, recomputed))
    with pytest.raises(ValueError, match="not reproducible"):  # another prediction
        RunMemory.open(results, {"run": 1}, []).remember(0, c0, certificate(2, kept))
    replay = RunMemory.open(results, {"run": 1}, [])
    same = Ellipsoid(c0.clone(), kept.axes.clone(), kept.basis.clone())
    action, region, radius = replay.remember(0, c0, certificate(1, same))
    # the row reports the recomputed certificate: it is exactly the region the memory holds
    assert action == "kept" and radius == same.inscribed_radius
    assert torch.equal(region.axes, same.axes) and torch.equal(region.basis, same.basis)
    # shrunk: the row reports the stored ball, which must lie inside the recomputed region
    smaller = Ball(c1, radius_below(ball.radius))
    with pytest.raises(ValueError, match="not reproducible"):
        RunMemory.open(results, {"run": 1}, [0]).remember(1, c1, certificate(0, smaller))
    action, region, radius = replay.remember(1, c1, certificate(0, Ball(c1.clone(), 0.25)))
    assert action == "shrunk" and radius == ball.radius and torch.equal(region.center, c1)
    assert radius <= inscribed_lower(conflicting)


def radius_below(radius):
    """A ball radius whose inscribed lower bound is below ``radius`` (the stored ball would stick out)."""
    return radius * (1.0 - 1e-9)
