"""Figures from evaluation results: certified-accuracy curves with what they were made with, and saving figures.

The curves come from :mod:`smoothcert.evaluation.tables`; this module only draws. A curve of Cohen's isotropic
certificate cannot pass the Clopper-Pearson ceiling ``sigma * Phi^-1(alpha^(1/n))`` (the radius when all ``n``
samples vote for the top class; seed 002 section 5.1): each such ceiling is drawn as a dashed vertical line.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["draw_curves", "save_figure"]


def save_figure(fig, path: str | Path) -> Path:
    """Lay out ``fig``, write it to ``path`` (creating the folder) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def draw_curves(curves: Sequence[tuple[str, np.ndarray, np.ndarray]], path: str | Path, *, xlabel: str,
                title: str, ceilings: Sequence[tuple[float, str]] = ()) -> Path:
    """A PNG of certified accuracy against radius: ``curves`` are ``(legend label, radii, accuracy)``;
    ``ceilings`` are ``(radius, label)`` drawn as dashed vertical lines; ``title`` says what the runs were."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not curves:
        raise ValueError("no curve to draw")
    fig, ax = plt.subplots(figsize=(6.5, 4.5), dpi=120)
    for label, grid, accuracy in curves:
        ax.plot(grid, accuracy, label=label)
    for number, (radius, label) in enumerate(ceilings):
        ax.axvline(radius, color="grey", ls="--", lw=1, label=label, alpha=0.5 + 0.5 / (number + 1))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("certified accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    return save_figure(fig, path)
