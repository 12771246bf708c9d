"""MACER with and without the gradient threshold (seed 002 section 3.2, eq. 3.4, figure 3.1): training curves.

Reads the per-epoch training logs that ``benchmarks/training_table.py`` writes for its two MACER rows (the same
seed, data, noise streams and settings; one with ``--macer-threshold 0.99``) and draws one PNG: training loss (left)
and accuracy on noisy validation digits (right) per epoch, one line per model, a row per sigma. It prints the
numbers it draws as a Markdown table, then the two models' certified accuracy (from the ``macer.certify.tsv`` and
``macer-threshold.certify.tsv`` that training_table.py wrote, where they exist). Not run in CI.

The table's MACER rows clip gradients to norm 1, which may hide the gradient blow-up that the threshold is meant to
prevent. ``--unclipped SIGMA --epochs E --train-size N`` also trains both MACER models of the table without
clipping (same seed, data and noise; ``TABLE/sigmaS/macer{,-threshold}-unclipped-seed0``), records the loss and
the gradient's l2 norm at every step and draws them (``TABLE/macer-steps.png``).

    python benchmarks/macer_curves.py --table runs/training-table --out runs/training-table/macer-curves.png
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from scipy.stats import norm

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MODELS = (("MACER", "macer-seed0"), ("MACER, threshold 0.99", "macer-threshold-seed0"))
RADII = (0.0, 0.25, 0.5, 0.75, 1.0)


def certified_rows(table: Path, sigmas: list[str]) -> list[str]:
    """ACR and certified accuracy (%) of both models at each sigma, from training_table.py's CERTIFY results."""
    from smoothcert.evaluation.tables import average_certified_radius, certified_accuracy, load_results

    lines = ["| sigma | model | inputs | ACR | " + " | ".join(f"{r:g}" for r in RADII) + " |",
             "|---|---|---:|---:|" + "---:|" * len(RADII)]
    for sigma in sigmas:
        for label, stem in MODELS:
            path = table / f"sigma{sigma}" / f"{stem.removesuffix('-seed0')}.certify.tsv"
            if not path.exists():
                continue
            res = load_results(path)
            acc = certified_accuracy(res.radius, res.correct, RADII)
            lines.append(f"| {sigma} | {label} | {len(res.radius)} | {average_certified_radius(res.radius, res.correct):.3f} | "
                         + " | ".join(f"{100 * a:.1f}" for a in acc) + " |")
    return lines


def hinge_floor(stem: Path) -> float | None:
    """With ``--macer-threshold t`` the margin ``xi = Phi^-1(p_A) - Phi^-1(p_B)`` is at most ``2 Phi^-1(t)``, so each
    input in the hinge pays at least ``lbd * sigma / 2 * max(0, gamma - 2 Phi^-1(t))``, a constant without
    gradient: the training loss of the two runs differs by about this times the fraction of such inputs."""
    config = json.loads(stem.with_suffix(".json").read_text())
    hyper, sigma = config["training"]["objective_config"], config["training"]["sigma"]
    if hyper.get("threshold") is None:
        return None
    return hyper["lbd"] * sigma / 2 * max(0.0, hyper["gamma"] - 2 * norm.ppf(hyper["threshold"]))


def unclipped(args) -> None:
    """Train both MACER models without gradient clipping; per-step loss and gradient norm (see the module)."""
    import statistics

    import torch
    from smoothcert.data.datasets import load_dataset
    from training_table import head, member_model, methods, stem_of, training_settings
    from smoothcert.training.loop import train

    sigma = args.unclipped
    train_set, test_set = head(load_dataset("mnist", "train"), args.train_size), load_dataset("mnist", "test")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    lines = ["| model (no clipping) | val noisy acc per epoch | median grad norm | max grad norm | steps > 10 x median |",
             "|---|---|---:|---:|---:|"]
    for method in [m for m in methods(sigma, args.epochs) if m.slug in ("macer", "macer-threshold")]:
        method.clip = None
        model, config = member_model(method, 0, sigma, train_set)
        settings = training_settings(method)
        objective, losses, norms, pending = settings.pop("objective"), [], [], []

        class Traced(type(objective)):
            def loss(self, *a, **kw):
                if pending:
                    norms.append(float(torch.stack(pending).sum().sqrt()))
                    pending.clear()
                value, scores = super().loss(*a, **kw)
                losses.append(float(value.detach()))
                return value, scores

        traced = Traced(objective.settings)
        for p in model.parameters():
            p.register_hook(lambda g: pending.append(g.detach().pow(2).sum()) or g)
        history = train(model, train_set, objective=traced, sigma=sigma, epochs=args.epochs, seed=0,
                        out=stem_of(args.table, sigma, method.slug + "-unclipped"), val_set=test_set,
                        progress=False, config=config, **settings)
        norms.append(float(torch.stack(pending).sum().sqrt()))
        median = statistics.median(norms)
        axes[0].plot(losses, label=method.label, linewidth=0.8)
        axes[1].semilogy(norms, label=method.label, linewidth=0.8)
        accs = ", ".join(f"{r['val_noisy_acc']:.3f}" for r in history)
        lines.append(f"| {method.label} | {accs} | {median:.3g} | {max(norms):.3g} | "
                     f"{sum(n > 10 * median for n in norms)} of {len(norms)} |")
    axes[0].set(title=f"sigma {sigma:g}, no clipping: training loss per step", xlabel="step", ylabel="loss")
    axes[1].set(title="gradient l2 norm per step", xlabel="step", ylabel="norm")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.table / "macer-steps.png", dpi=120)
    print("\n".join(lines))
    print(f"wrote {args.table / 'macer-steps.png'}")


def read_log(path: Path) -> list[dict[str, float]]:
    with path.open() as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f, delimiter="\t")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--table", type=Path, default=Path("runs/training-table"), help="training_table.py's --out")
    ap.add_argument("--out", type=Path, default=None, help="PNG (default TABLE/macer-curves.png)")
    ap.add_argument("--unclipped", type=float, default=None, metavar="SIGMA",
                    help="also train both MACER models at SIGMA without gradient clipping (see the module)")
    ap.add_argument("--epochs", type=int, default=4, help="with --unclipped: training_table.py's --epochs")
    ap.add_argument("--train-size", type=int, default=None, help="with --unclipped: training_table.py's --train-size")
    args = ap.parse_args()
    if args.unclipped is not None:
        unclipped(args)
    out = args.out or args.table / "macer-curves.png"
    sigmas = sorted(p.name[len("sigma"):] for p in args.table.glob("sigma*")
                    if all((p / f"{stem}.train.tsv").exists() for _, stem in MODELS))
    if not sigmas:
        raise SystemExit(f"no sigma under {args.table} has both MACER logs yet")
    fig, axes = plt.subplots(len(sigmas), 2, figsize=(9, 3.2 * len(sigmas)), squeeze=False)
    lines = ["| sigma | model | " + " | ".join(["epoch", "loss", "val noisy acc", "s"]) + " |", "|---|---|---:|---:|---:|---:|"]
    for row, sigma in zip(axes, sigmas):
        for label, stem in MODELS:
            log = read_log(args.table / f"sigma{sigma}" / f"{stem}.train.tsv")
            epochs = [r["epoch"] for r in log]
            row[0].plot(epochs, [r["loss"] for r in log], marker="o", label=label)
            row[1].plot(epochs, [r["val_noisy_acc"] for r in log], marker="o", label=label)
            floor = hinge_floor(args.table / f"sigma{sigma}" / stem)
            if floor is not None:
                row[0].axhline(floor, color="grey", linestyle="--", linewidth=1,
                               label=f"threshold: floor without gradient ({floor:.2f})")
            lines += [f"| {sigma} | {label} | {r['epoch']:.0f} | {r['loss']:.4f} | {r['val_noisy_acc']:.3f} | "
                      f"{r['seconds']:.0f} |" for r in log]
        row[0].set(title=f"sigma {sigma}: training loss", xlabel="epoch", ylabel="loss")
        row[1].set(title=f"sigma {sigma}: accuracy on noisy validation digits", xlabel="epoch", ylabel="accuracy")
        for ax in row:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print("\n".join(lines))
    print()
    print("\n".join(certified_rows(args.table, sigmas)))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
