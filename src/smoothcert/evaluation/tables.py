"""Evaluation as the field does it: certified accuracy curves, ACR, tables and plots.

* certified accuracy at radius ``r``: the share of inputs that are classified correctly *and* certified with
  radius ``>= r`` (Cohen et al.; at ``r = 0`` it is the clean accuracy of the smoothed classifier).
* ACR, the average certified radius: the mean over all inputs of ``radius * correct`` (seed 002, MACER).
* proxy ACR: the same with ANCER's proxy radius (seed 000 section 5.2).
* abstention rate: the share of inputs with prediction -1.
* ARI / proxy ARI, the average (proxy) radius improvement of a method over a baseline (seed 000 section 5.2):
  the mean of ``R_method - R_baseline`` over the inputs both classify correctly, matched by dataset index.

Reads smoothcert's TSVs and the logs of the classic reference code (same first columns, ``time`` as
``H:MM:SS.ffffff``), and smoothcert's ``OUT.json`` sidecar when there is one: the plot then says which data set,
sigma, n, alpha and how many inputs each curve is, and the report warns when compared files certified other
models or data. A PREDICT log (no ``radius`` column) gets its own table: accuracy, abstention, wrong answers.
"""

from __future__ import annotations

import csv
import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import norm

from smoothcert.evaluation.plots import draw_curves, save_figure  # noqa: F401 (save_figure: kept importable here)
from smoothcert.evaluation.comparison import comparison_warnings, distinct_names  # noqa: F401 (re-exported)

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
    #: The run's configuration from ``OUT.json`` (empty for the reference code's logs).
    config: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.label)

    @property
    def certifies(self) -> bool:
        """Whether the file holds radii (CERTIFY) rather than PREDICT's answers only."""
        return "radius" in self.columns

    @property
    def sigma(self) -> float | None:
        value = self.config.get("method", {}).get("sigma") if isinstance(self.config.get("method"), dict) else None
        value = self.config.get("sigma") if value is None else value
        return None if value is None else float(value)

    def settings(self) -> dict[str, str]:
        """What the run was, from its sidecar: data set and split, method, sigma, n, alpha, the number of inputs."""
        c, out = self.config, {}
        if c.get("dataset"):
            out["data"] = f"{c['dataset']} {c.get('split', '')}".strip()
        if isinstance(c.get("method"), dict):
            out["method"] = str(c["method"].get("name"))
        for key, shown in (("sigma", self.sigma), ("n", c.get("n")), ("alpha", c.get("alpha"))):
            if shown is not None:
                out[key] = f"{key} {shown:,}" if key == "n" else f"{key} {shown:g}"
        out["inputs"] = f"{len(self)} inputs"
        return out

    def ceiling(self) -> float | None:
        """``sigma Phi^-1(alpha^(1/n))``, the largest radius of the isotropic certificate at ``sigma`` with ``n``
        samples at level ``alpha`` (one-sided Clopper-Pearson with all ``n`` votes for the top class), when every
        row's radius is at most ``sigma * gap`` (so the bound holds for this file); else None."""
        sigma, n, alpha = self.sigma, self.config.get("n"), self.config.get("alpha")
        if sigma is None or n is None or alpha is None or "gap" not in self.columns:
            return None
        gap = np.array([float(v) for v in self.columns["gap"]])
        rows = self.radius > 0
        if not np.all(self.radius[rows] <= sigma * gap[rows] * (1 + 1e-6)):
            return None
        return float(sigma * norm.ppf(float(alpha) ** (1.0 / float(n))))


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
    if not body:
        raise ValueError(f"{path} holds no complete row yet (only its header): nothing to report")
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
        config=_sidecar(path),
    )


def _sidecar(path: Path) -> dict[str, Any]:
    """``OUT.json`` beside a results file, or ``{}`` (the reference code's logs have none)."""
    side = path.with_name(path.name + ".json")
    try:
        data = json.loads(side.read_text()) if side.is_file() else {}
    except (OSError, json.JSONDecodeError):
        warnings.warn(f"{side} is not readable JSON: {path} is reported without its settings", stacklevel=3)
        return {}
    return data if isinstance(data, dict) else {}


def in_norm(res: Results, norm: str) -> Results:
    """``res`` with the radius in ``norm`` (its ``radius_<norm>`` column, fixed-noise logs) as ``radius`` and
    ``radius_proxy``; the name says ``(<norm>, converted)`` when every certified row's radius in that norm was
    converted by norm inequalities (``converted`` column), ``(<norm>, partly converted)`` when some were."""
    import dataclasses

    key = f"radius_{norm}"
    if key not in res.columns:
        raise ValueError(f"{res.name} has no {key} column (--norm reads the per-norm radii of `certify --method "
                         "fixed`; other logs report their radius column without --norm)")
    radius = np.array([float(v) for v in res.columns[key]])
    marks = [set(m.split(",")) for m, r in zip(res.columns.get("converted", []), radius) if r > 0]
    flagged = sum(norm in m for m in marks)
    note = "" if not flagged else (", converted" if flagged == len(marks) else ", partly converted")
    return dataclasses.replace(res, name=f"{res.name} ({norm}{note})", radius=radius, radius_proxy=radius)


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
    for res in (r for r in results if r.certifies):
        acc = certified_accuracy(res.radius, res.correct, radii)
        rows.append([res.name, str(len(res))] + [f"{a:.3f}" for a in acc] + [
            f"{average_certified_radius(res.radius, res.correct):.3f}", f"{np.mean(res.correct):.3f}",
            f"{np.mean(res.predict == -1):.3f}", f"{np.mean(res.seconds):.3g}"]
                    + (samples_cells(res) if samples else []))
    text = _table(header, rows, latex) if rows else ""
    answers = [r for r in results if not r.certifies]
    if answers:
        text = (text + "\n\n" if text else "") + predict_table(answers, latex=latex)
    if proxy and rows:
        header = ["method"] + [f"proxy r={r:g}" for r in radii] + ["proxy ACR"]
        rows = [[res.name] + [f"{a:.3f}" for a in certified_accuracy(res.radius_proxy, res.correct, radii)]
                + [f"{average_certified_radius(res.radius_proxy, res.correct):.3f}"] for res in results]
        text += "\n\n" + _table(header, rows, latex)
    return text


def predict_table(results: Sequence[Results], *, latex: bool = False) -> str:
    """PREDICT logs: accuracy (correct answers over all inputs), abstention rate, wrong answers (not abstained
    and wrong: at most ``alpha`` of the inputs in expectation when PREDICT agrees with ``g``) and seconds per input."""
    header = ["method", "inputs", "accuracy", "abstain", "wrong", "s/input"]
    rows = [[r.name, str(len(r)), f"{np.mean(r.correct):.3f}", f"{np.mean(r.predict == -1):.3f}",
             f"{np.mean(~r.correct & (r.predict != -1)):.3f}", f"{np.mean(r.seconds):.3g}"] for r in results]
    return _table(header, rows, latex)


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


def topk_tables(results: Sequence[Results], radii: Sequence[float], *, latex: bool = False) -> str:
    """Top-k logs (a ``top_k`` column; Jia et al., ICLR 2020): certified top-k accuracy at ``radii`` for CERTIFY
    (``--method topk``: the share of inputs whose label is certified among the top k with radius ``>= r``; with
    ``topk_label = selected``, the selected class, which must also be the label), and for PREDICT (``--top-k``) the
    share of inputs whose label is in the returned set, and the abstention rate."""
    certify_rows, predict_rows = [], []
    for res in results:
        if "top_k" not in res.columns or not res.columns["top_k"]:
            continue
        k = ",".join(sorted(set(res.columns["top_k"]), key=int))
        if "radius" in res.columns:
            mode = ",".join(sorted(set(res.columns.get("topk_label", ["label"]))))
            acc = certified_accuracy(res.radius, res.correct, radii)
            certify_rows.append([res.name, k, mode] + [f"{a:.3f}" for a in acc]
                                + [f"{average_certified_radius(res.radius, res.correct):.3f}"])
        elif "topk_set" in res.columns:
            inside = [str(y) in s.split(",") for y, s in zip(res.label.tolist(), res.columns["topk_set"])]
            predict_rows.append([res.name, k, str(len(res)), f"{np.mean(inside):.3f}", f"{np.mean(res.predict == -1):.3f}"])
    parts = []
    if certify_rows:
        parts.append(_table(["top-k CERTIFY", "k", "label"] + [f"r={r:g}" for r in radii] + ["ACR"], certify_rows,
                            latex))
    if predict_rows:
        parts.append(_table(["top-k PREDICT", "k", "inputs", "label in set", "abstain"], predict_rows, latex))
    return "\n\n".join(parts)


def plot_curves(results: Sequence[Results], path: str | Path, *, proxy: bool = False) -> Path:
    """Write a PNG of certified accuracy against radius, one curve per CERTIFY results file.

    The title holds the settings all files share (data set, method, sigma, n, alpha, inputs, from the sidecars),
    each legend entry the file's name and the settings where it differs; the Clopper-Pearson ceiling
    ``sigma Phi^-1(alpha^(1/n))`` of each file where it applies is a dashed line (:meth:`Results.ceiling`).
    """
    results = [r for r in results if r.certifies]
    if not results:
        raise ValueError("no CERTIFY results to plot (PREDICT logs have no radii)")
    settings = [r.settings() for r in results]
    shared = {k: v for k, v in settings[0].items() if all(s.get(k) == v for s in settings)}
    ceilings = {c for c in (r.ceiling() for r in results) if c is not None and not proxy}
    top = max([float(np.max(r.radius_proxy if proxy else r.radius, initial=0.0)) for r in results]
              + [0.1] + [c for c in ceilings])
    grid = np.linspace(0.0, top * 1.05, 400)
    curves = []
    for res, own in zip(results, settings):
        extra = [v for k, v in own.items() if k not in shared]
        curves.append((res.name + (f" ({', '.join(extra)})" if extra else ""), grid,
                       certified_accuracy(res.radius_proxy if proxy else res.radius, res.correct, grid)))
    title = "certified accuracy" + (f": {', '.join(shared.values())}" if shared else "")
    marks = [(c, f"Clopper-Pearson ceiling {c:.3g} = sigma Phi^-1(alpha^(1/n))") for c in sorted(ceilings)]
    return draw_curves(curves, path, xlabel="proxy radius" if proxy else "l2 radius", title=title, ceilings=marks)


def improvement_table(results: Sequence[Results], baseline: Results, *, latex: bool = False) -> str:
    """ARI and proxy ARI of each results file over ``baseline`` (seed 000 section 5.2)."""
    header = ["method", f"ARI vs {baseline.name}", f"proxy ARI vs {baseline.name}"]
    rows = [[r.name, f"{average_radius_improvement(r, baseline):.4f}",
             f"{average_radius_improvement(r, baseline, proxy=True):.4f}"] for r in results]
    return _table(header, rows, latex)


def report(files: Sequence[str | Path], *, radii: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
           latex: bool = False, plot: str | Path | None = None, labels: Sequence[str] | None = None,
           proxy: bool = False, baseline: str | Path | None = None,
           norm_radii: dict[str, Sequence[float]] | None = None, norm: str | None = None) -> str:
    """The table for ``files`` (and a plot when ``plot`` is a path); returns the text to print.

    With ``norm`` (l1, l2 or linf) the table is of the radii in that norm (:func:`in_norm`).

    With ``baseline`` (another results file), also ARI and proxy ARI of each file over it. Files with zeroth-
    and first-order radii per norm (``--method first-order``) get one table per norm, at ``norm_radii[norm]``.
    """
    if labels is not None and len(labels) != len(files):
        raise ValueError(f"got {len(labels)} labels for {len(files)} files")
    names = distinct_names(files) if labels is None else list(labels)
    results = [load_results(f, names[i]) for i, f in enumerate(files)]
    for message in comparison_warnings(results):
        warnings.warn(message, stacklevel=2)
    if norm is not None:
        results = [in_norm(r, norm) for r in results]
    text = summary_table(results, radii, latex=latex, proxy=proxy)
    if baseline is not None:
        text += "\n\n" + improvement_table(results, load_results(baseline), latex=latex)
    per_k = topk_tables(results, radii, latex=latex)
    if per_k:
        text += "\n\n" + per_k
    per_norm = norm_tables(results, {"l2": radii, "l1": radii, "linf": [r / 28 for r in radii], **(norm_radii or {})},
                           latex=latex)
    if per_norm:
        text += "\n\n" + per_norm
    if plot is not None:
        if not any(r.certifies for r in results):
            raise ValueError("--plot draws certified accuracy against radius: these PREDICT logs have no radii")
        text += f"\n\nplot: {plot_curves(results, plot)}"
    return text
