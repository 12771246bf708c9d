"""Gaussian, Laplace and uniform smoothing on MNIST at one per-coordinate sigma: l1 and l_inf certified accuracy (not
run in CI).

For each family it trains the small MNIST CNN (``mnist-cnn``) under that noise (``smoothcert train --noise FAMILY``,
Gaussian-augmentation objective, the same epochs, optimizer, schedule and seed for all), then certifies the same
first ``--inputs`` test digits (default 100; smoothcert's MNIST test split) with ``smoothcert certify --method fixed
--noise FAMILY`` (n0 = 100, ``--n`` = 10,000, alpha = 0.001, the same per-input streams), and prints certified
accuracy at l1 and l_inf radii (``smoothcert report --norm l1`` / ``--norm linf``): Gaussian's l1 and l_inf radii
follow from its l2 ball (converted), Laplace's l1 radius is native (its l_inf converted), uniform's l1 and l_inf
radii are both native. Also l2, where only Gaussian is native.

Every step goes through the command line and resumes (training from its last epoch, certification from its last
row); the tables are written to ``OUT/table.md``. Run it in the background, e.g.

    nohup nice -n 10 .venv/bin/python benchmarks/noise_families_mnist.py --out runs/noise-families > runs/nf.log 2>&1 &
"""

from __future__ import annotations

import argparse
import contextlib
import io
from pathlib import Path

from smoothcert.cli.main import main

FAMILIES = ("gaussian", "laplace", "uniform")
L1_RADII = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0)
LINF_RADII = (0.0, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02)
L2_RADII = (0.0, 0.1, 0.2, 0.3, 0.5, 0.75)


def run(args: argparse.Namespace) -> str:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logs = []
    for fam in FAMILIES:
        prefix = out / f"mnist-{fam}"
        if not prefix.with_suffix(".safetensors").is_file() or args.resume_training:
            assert main(["train", "--dataset", "mnist", "--arch", "mnist-cnn", "--noise", fam, "--sigma",
                         str(args.sigma), "--epochs", str(args.epochs), "--lr", "0.05", "--schedule", "cosine",
                         "--seed", "0", "--out", str(prefix), "--resume", "--no-progress"]) == 0
        log = out / f"cert-{fam}.tsv"
        assert main(["certify", "--checkpoint", str(prefix), "--method", "fixed", "--noise", fam, "--norm", "l1",
                     "--sigma", str(args.sigma), "--n0", "100", "--n", str(args.n), "--alpha", "0.001",
                     "--batch-size", str(args.batch_size), "--max", str(args.inputs), "--seed", "0",
                     "--out", str(log), "--no-progress"]) == 0
        logs.append(str(log))
    parts = [f"MNIST, the first {args.inputs} test digits, mnist-cnn trained {args.epochs} epochs with each noise at "
             f"sigma {args.sigma} (per-coordinate standard deviation); CERTIFY n0 = 100, n = {args.n}, alpha = 0.001."]
    for norm, radii in (("l1", L1_RADII), ("linf", LINF_RADII), ("l2", L2_RADII)):
        text = io.StringIO()
        with contextlib.redirect_stdout(text):
            assert main(["report", *logs, "--labels", *FAMILIES, "--norm", norm,
                         "--radii", *map(str, radii)]) == 0
        parts.append(f"### {norm}\n\n" + text.getvalue().strip())
    table = "\n\n".join(parts) + "\n"
    (out / "table.md").write_text(table)
    return table


def main_cli() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/noise-families")
    p.add_argument("--sigma", type=float, default=0.25)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--inputs", type=int, default=100)
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--resume-training", action="store_true", help="continue training a saved model to --epochs")
    print(run(p.parse_args()))


if __name__ == "__main__":
    main_cli()
