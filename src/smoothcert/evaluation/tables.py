"""Evaluation as the field does it: certified accuracy curves, ACR, tables and plots.

* certified accuracy at radius ``r``: the share of inputs that are classified correctly *and* certified with
  radius ``>= r`` (Cohen et al.; at ``r = 0`` it is the clean accuracy of the smoothed classifier).
* ACR, the average certified radius: the mean over all inputs of ``radius * correct`` (seed 002, MACER).
* proxy ACR: the same with ANCER's proxy radius (seed 000 section 5.2).
* abstention rate: the share of inputs with prediction -1.
* ARI / proxy ARI, the average (proxy) radius improvement of a method over a baseline (seed 000 section 5.2):
  the mean of ``R_method - R_baseline`` over the inputs both classify correctly, matched by dataset index.

Reads smoothcert's TSVs and the logs of the classic reference code (same first columns, ``time`` as
``H:MM:SS.ffffff``).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["Results", "load_results", "certified_accuracy", "average_certified_radius", "average_radius_improvement",
           "report", "plot_curves"]


@dataclass
class Results:
    """The columns of one results file as arrays (``radius_proxy`` falls back to ``radius``)."""

    name: str
    idx: np.ndarray
    label: np.ndarray
    predict: np.ndarray
    radius: np.ndarray
    correct: np.ndarray
    seconds: np.ndarray
    radius_proxy: np.ndarray
    columns: dict[str, list[str]]

    def __len__(self) -> int:
        return len(self.label)


def _seconds(text: str) -> float:
    """Seconds from ``12.5`` or the reference code's ``0:00:12.500000``."""
    if ":" in text:
        h, m, s = text.split(":")
        return 3600 * float(h) + 60 * float(m) + float(s)
    return float(text)


def load_results(path: str | Path, name: str | None = None) -> Results:
    """Read a results TSV (Cohen's columns ``idx label predict [radius] correct time`` first)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no results file at {path}")
    with open(path, newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    if not rows:
        raise ValueError(f"{path} is empty")
    header = [h.strip() for h in rows[0]]
    needed = {"idx", "label", "predict", "correct"}
    if not needed <= set(header):
        raise ValueError(f"{path} is not a results file: it needs columns {sorted(needed)}, has {header}")
    body = [r for r in rows[1:] if len(r) == len(header)]
    cols = {h: [r[i] for r in body] for i, h in enumerate(header)}

    def floats(key, default=0.0):
        return np.array([float(v) for v in cols[key]]) if key in cols else np.full(len(body), default)

    radius = floats("radius")
    return Results(
        name=name or path.stem,
        idx=floats("idx").astype(int),
        label=floats("label").astype(int),
        predict=floats("predict").astype(int),
        radius=radius,
        correct=floats("correct").astype(bool),
        seconds=np.array([_seconds(v) for v in cols["time"]]) if "time" in cols else np.zeros(len(body)),
        radius_proxy=floats("radius_proxy") if "radius_proxy" in cols else radius,
        columns=cols,
    )


def certified_accuracy(radius: np.ndarray, correct: np.ndarray, radii: Sequence[float]) -> np.ndarray:
    """Share of inputs correct and certified at radius ``>= r``, for each ``r`` in ``radii``."""
    radius = np.asarray(radius, dtype=float)
    correct = np.asarray(correct, dtype=bool)
    if len(radius) == 0:
        return np.full(len(radii), math.nan)
    certified = np.sort(radius[correct])
    below = np.searchsorted(certified, np.asarray(radii, dtype=float), side="left")
    return (len(certified) - below) / len(radius)


def average_certified_radius(radius: np.ndarray, correct: np.ndarray) -> float:
    """ACR: mean of ``radius`` over all inputs, counting 0 for wrong or abstained ones."""
    radius = np.asarray(radius, dtype=float)
    return float(np.mean(np.where(np.asarray(correct, dtype=bool), radius, 0.0))) if len(radius) else math.nan


def average_radius_improvement(method: Results, baseline: Results, *, proxy: bool = False) -> float:
    """ARI (or proxy ARI): mean of ``R_method - R_baseline`` over inputs both got right, matched by dataset index."""
    common, a, b = np.intersect1d(method.idx, baseline.idx, return_indices=True)
    if len(common) == 0:
        raise ValueError(f"{method.name} and {baseline.name} share no dataset index")
    both = method.correct[a] & baseline.correct[b]
    if not both.any():
        return math.nan
    ra = (method.radius_proxy if proxy else method.radius)[a]
    rb = (baseline.radius_proxy if proxy else baseline.radius)[b]
    return float(np.mean((ra - rb)[both]))


def _table(header: list[str], rows: list[list[str]], latex: bool) -> str:
    if latex:
        lines = [r"\begin{tabular}{l" + "r" * (len(header) - 1) + "}", r"\toprule",
                 " & ".join(header) + r" \\", r"\midrule"]
        lines += [" & ".join(r).replace("_", r"\_") + r" \\" for r in rows]
        lines += [r"\bottomrule", r"\end{tabular}"]
        return "\n".join(lines)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def samples_cells(res: Results) -> list[str]:
    """Mean and median estimation samples per input: ``n_used`` (what was drawn), else ``n``; "-" if neither."""
    key = "n_used" if "n_used" in res.columns else "n" if "n" in res.columns else None
    if key is None or not len(res):
        return ["-", "-"]
    used = np.array([float(v) for v in res.columns[key]])
    return [f"{used.mean():,.0f}", f"{np.median(used):,.0f}"]


def summary_table(results: Sequence[Results], radii: Sequence[float], *, latex: bool = False,
                  proxy: bool = False) -> str:
    """Certified accuracy at ``radii``, ACR, clean accuracy, abstention rate, seconds per input and (when the files
    record them) mean and median estimation samples per input (``n_used``), per file."""
    header = ["method", "inputs"] + [f"r={r:g}" for r in radii] + ["ACR", "clean acc.", "abstain", "s/input"]
    samples = any(k in res.columns for res in results for k in ("n_used", "n"))
    if samples:
        header += ["mean n", "median n"]
    rows = []
    for res in results:
        acc = certified_accuracy(res.radius, res.correct, radii)
        rows.append([res.name, str(len(res))] + [f"{a:.3f}" for a in acc] + [
            f"{average_certified_radius(res.radius, res.correct):.3f}", f"{np.mean(res.correct):.3f}",
            f"{np.mean(res.predict == -1):.3f}", f"{np.mean(res.seconds):.3g}"] + (samples_cells(res) if samples else []))
    text = _table(header, rows, latex)
    if proxy:
        header = ["method"] + [f"proxy r={r:g}" for r in radii] + ["proxy ACR"]
        rows = [[res.name] + [f"{a:.3f}" for a in certified_accuracy(res.radius_proxy, res.correct, radii)]
                + [f"{average_certified_radius(res.radius_proxy, res.correct):.3f}"] for res in results]
        text += "\n\n" + _table(header, rows, latex)
    return text


#: Norms whose zeroth- and first-order radii a first-order log holds as ``radius_<norm>_0`` / ``radius_<norm>_1``.
ORDER_NORMS = ("l2", "l1", "linf", "sub_l2", "sub_l1", "sub_linf")


def norm_tables(results: Sequence[Results], radii: dict[str, Sequence[float]], *, latex: bool = False) -> str:
    """Per norm, certified accuracy and ACR of the zeroth- against the first-order radius (seed 004 logs)."""
    parts = []
    for norm in ORDER_NORMS:
        rows = []
        grid = radii.get(norm.removeprefix("sub_"), radii["l2"])
        for res in results:
            for order, name in ((0, "zeroth"), (1, "first")):
                key = f"radius_{norm}_{order}"
                if key not in res.columns:
                    continue
                values = np.array([float(v) for v in res.columns[key]])
                if np.all(np.isnan(values)):
                    continue
                values = np.nan_to_num(values, nan=0.0)
                rows.append([f"{res.name} ({name} order)"]
                            + [f"{a:.3f}" for a in certified_accuracy(values, res.correct, grid)]
                            + [f"{average_certified_radius(values, res.correct):.4f}"])
        if rows:
            header = [f"{norm} radius"] + [f"r={r:g}" for r in grid] + ["ACR"]
            parts.append(_table(header, rows, latex))
    return "\n\n".join(parts)


def plot_curves(results: Sequence[Results], path: str | Path, *, proxy: bool = False) -> Path:
    """Write a PNG of certified accuracy against radius, one curve per results file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    top = max([float(np.max(r.radius_proxy if proxy else r.radius, initial=0.0)) for r in results] + [0.1])
    grid = np.linspace(0.0, top * 1.05, 400)
    for res in results:
        radius = res.radius_proxy if proxy else res.radius
        ax.plot(grid, certified_accuracy(radius, res.correct, grid), label=res.name)
    ax.set_xlabel("proxy radius" if proxy else "l2 radius")
    ax.set_ylabel("certified accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def save_figure(fig, path: str | Path) -> Path:
    """Lay out ``fig``, write it to ``path`` (creating the folder) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def improvement_table(results: Sequence[Results], baseline: Results, *, latex: bool = False) -> str:
    """ARI and proxy ARI of each results file over ``baseline`` (seed 000 section 5.2)."""
    header = ["method", f"ARI vs {baseline.name}", f"proxy ARI vs {baseline.name}"]
    rows = [[r.name, f"{average_radius_improvement(r, baseline):.4f}",
             f"{average_radius_improvement(r, baseline, proxy=True):.4f}"] for r in results]
    return _table(header, rows, latex)


def report(files: Sequence[str | Path], *, radii: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
           latex: bool = False, plot: str | Path | None = None, labels: Sequence[str] | None = None,
           proxy: bool = False, baseline: str | Path | None = None,
           norm_radii: dict[str, Sequence[float]] | None = None) -> str:
    """The table for ``files`` (and a plot when ``plot`` is a path); returns the text to print.

    With ``baseline`` (another results file), also ARI and proxy ARI of each file over it. Files with zeroth-
    and first-order radii per norm (``--method first-order``) get one table per norm, at ``norm_radii[norm]``.
    """
    if labels is not None and len(labels) != len(files):
        raise ValueError(f"got {len(labels)} labels for {len(files)} files")
    results = [load_results(f, None if labels is None else labels[i]) for i, f in enumerate(files)]
    text = summary_table(results, radii, latex=latex, proxy=proxy)
    if baseline is not None:
        text += "\n\n" + improvement_table(results, load_results(baseline), latex=latex)
    per_norm = norm_tables(results, {"l2": radii, "l1": radii, "linf": [r / 28 for r in radii], **(norm_radii or {})},
                           latex=latex)
    if per_norm:
        text += "\n\n" + per_norm
    if plot is not None:
        text += f"\n\nplot: {plot_curves(results, plot)}"
    return text
