"""MACER with and without the gradient threshold (seed 002 section 3.2, eq. 3.4, figure 3.1): training curves.

Reads the per-epoch training logs that ``benchmarks/training_table.py`` writes for its two MACER rows (the same
seed, data, noise streams and settings; one with ``--macer-threshold 0.99``) and draws one PNG: training loss (left)
and accuracy on noisy validation digits (right) per epoch, one line per model, a row per sigma. It prints the
numbers it draws as a Markdown table. Not run in CI.

    python benchmarks/macer_curves.py --table runs/training-table --out runs/training-table/macer-curves.png
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MODELS = (("MACER", "macer-seed0"), ("MACER, threshold 0.99", "macer-threshold-seed0"))


def read_log(path: Path) -> list[dict[str, float]]:
    with path.open() as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f, delimiter="\t")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--table", type=Path, default=Path("runs/training-table"), help="training_table.py's --out")
    ap.add_argument("--out", type=Path, default=None, help="PNG (default TABLE/macer-curves.png)")
    args = ap.parse_args()
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
            lines += [f"| {sigma} | {label} | {r['epoch']:.0f} | {r['loss']:.4f} | {r['val_noisy_acc']:.3f} | "
                      f"{r['seconds']:.0f} |" for r in log]
        row[0].set(title=f"sigma {sigma}: training loss", xlabel="epoch", ylabel="loss")
        row[1].set(title=f"sigma {sigma}: accuracy on noisy validation digits", xlabel="epoch", ylabel="accuracy")
        for ax in row:
            ax.grid(alpha=0.3)
            ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
