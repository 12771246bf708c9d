"""``--method topk``: certified top-k predictions under ``N(0, sigma^2 I)`` (Jia, Cao, Wang, Gong, ICLR 2020).

CERTIFY (:func:`certify_topk`). Theorem 1 of the paper (seed 001, "Certified Robustness for Top-k Predictions")
certifies a label ``l`` fixed before sampling: with probability at least ``1 - alpha``, ``l`` is among the ``k``
classes of largest smoothed probability at every ``x + delta`` with ``||delta||_2 < R`` (eq. (3),
:func:`~smoothcert.stats.topk.topk_radius`), from one-sided Clopper-Pearson bounds at ``alpha / c`` for every
class (the paper's SimuEM, :func:`~smoothcert.stats.topk.label_bounds`). Which label:

* ``--topk-label label`` (default): the input's own label, as the paper evaluates certified top-k accuracy (the
  label is fixed before any sample is drawn, so no selection samples are needed for the guarantee);
* ``--topk-label selected``: the top class of the ``n0`` selection samples, independent of the ``n`` estimation
  samples (Cohen et al.'s protocol), which needs no label.

Either way the ``n0`` selection samples also give the ``topk_set`` column: the ``k`` classes with the largest
selection counts, the predicted top-k set (reported, not certified). ``predict`` is the certified label when
``R > 0`` and -1 otherwise, ``radius`` is ``R`` (0 when nothing is certified) and ``gap`` is ``R / sigma``; with
``--topk-label label``, ``correct`` is then "the label is certified in the top k", so certified accuracy at radius
``r`` is the paper's certified top-k accuracy. For ``k = 1`` the radius is Cohen et al.'s two-sided one,
``sigma / 2 (Phi^-1(p_A) - Phi^-1(p_B))`` with ``p_B`` the largest upper bound of the other classes.

PREDICT (:func:`predict_topk`): the ``k`` classes of largest count among ``n`` samples, returned only when a
simultaneous test says they are the top k (:func:`~smoothcert.stats.topk.topk_set_test`); a returned set that is
not a top-k set of the smoothed classifier occurs with probability at most ``alpha``.

Only isotropic Gaussian noise: Theorem 1's bound is the Gaussian Neyman-Pearson shift ``Phi(Phi^-1(p) -+ R /
sigma)``. The radius uses the noise as sampled (``sigma`` rounded to float32).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from smoothcert.engine.sampling import sample_counts
from smoothcert.engine.smooth import ABSTAIN, check_call, dtype_name
from smoothcert.geometry.regions import Ball
from smoothcert.methods.base import CertifyMethod, RunContext, sigma_setting
from smoothcert.methods.records import MethodRecord
from smoothcert.noise.gaussian import IsotropicGaussian
from smoothcert.settings import Settings, choice, integer
from smoothcert.stats.topk import check_top_k, label_bounds, topk_radius, topk_set_test
from smoothcert.validation import check_count, check_sample_sizes

__all__ = ["TopKSettings", "TopK", "TopKCertificate", "TopKPrediction", "certify_topk", "predict_topk",
           "format_set", "LABELS"]

#: Which label CERTIFY certifies: the input's own (the paper's evaluation) or the selected top class.
LABELS = ("label", "selected")


def format_set(classes: Sequence[int]) -> str:
    """A top-k set as one TSV cell: the classes joined by commas (``3,5,8``); ``-1`` for an abstention."""
    return ",".join(str(int(c)) for c in classes) if len(classes) else str(ABSTAIN)


@dataclass(frozen=True)
class TopKCertificate:
    """What top-k CERTIFY established for one input.

    ``label`` is the class whose membership of the top ``top_k`` was tested, ``prediction`` that class when
    ``radius > 0`` and -1 otherwise; ``radius`` the certified l2 radius (eq. (3), 0 when nothing is certified);
    ``gap = radius / sigma`` (nan when nothing is certified); ``p_lower`` the lower bound of the label's
    probability and ``p_upper`` the largest upper bound of the other classes (capped at ``1 - p_lower``), each at
    ``alpha_each = alpha / c``; ``topk_set`` the ``k`` classes of largest selection count.
    """

    prediction: int
    label: int
    top_k: int
    topk_set: tuple[int, ...]
    p_lower: float
    p_upper: float
    radius: float
    gap: float
    counts: np.ndarray = field(repr=False)
    n0: int
    n: int
    alpha: float
    alpha_each: float
    dtype: str
    sigma: float
    seed: int | None = None

    @property
    def abstained(self) -> bool:
        return self.prediction == ABSTAIN

    @property
    def radius_proxy(self) -> float:
        return self.radius


@dataclass(frozen=True)
class TopKPrediction:
    """PREDICT's record of a top-k set: ``classes`` (by decreasing count) or empty for an abstention.

    ``predict`` is the first class of the set (largest count) or -1; the guarantee is about the set only."""

    classes: tuple[int, ...]
    top_k: int

    def values(self) -> dict:
        return {"predict": int(self.classes[0]) if self.classes else ABSTAIN, "top_k": self.top_k,
                "topk_set": format_set(self.classes), "sampling": "float"}


def _noise(sigma: float | IsotropicGaussian) -> IsotropicGaussian:
    if isinstance(sigma, IsotropicGaussian):
        return sigma
    if isinstance(sigma, torch.nn.Module) or not isinstance(sigma, (int, float)) or isinstance(sigma, bool):
        raise TypeError("top-k certificates take isotropic Gaussian noise: give sigma (a number) or an "
                        f"IsotropicGaussian, got {type(sigma).__name__}")
    return IsotropicGaussian(float(sigma))


def _check(model, x, num_classes, k, alpha, batch_size, dtype, range_policy) -> int:
    check_call(model, x, num_classes, alpha, batch_size, dtype, range_policy)
    k = check_top_k(k, num_classes)
    if x.ndim < 2:
        raise ValueError(f"x must be a batch (B, *input_shape), got shape {tuple(x.shape)}")
    return k


def _pairs(generators, size: int) -> tuple[list, list]:
    if generators is None:
        return [None] * size, [None] * size
    gens = list(generators)
    if len(gens) != size or not all(isinstance(g, (tuple, list)) and len(g) == 2 for g in gens):
        raise ValueError(f"give one (selection, estimation) pair of generators per input ({size} inputs)")
    return [g[0] for g in gens], [g[1] for g in gens]


def certify_topk(
    model: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    sigma: float | IsotropicGaussian,
    num_classes: int,
    k: int,
    n0: int,
    n: int,
    alpha: float,
    labels: Sequence[int] | torch.Tensor | None = None,
    *,
    batch_size: int = 1000,
    block: int | None = None,
    generators: Sequence | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int | None = None,
    range_policy: str = "warn",
) -> list[TopKCertificate]:
    """Top-k CERTIFY of a batch ``x`` (B, ...): one :class:`TopKCertificate` per input (see the module docstring).

    ``labels`` (B,) are the labels to certify (fixed before sampling, e.g. the true labels); ``None`` certifies
    the top class of the ``n0`` selection samples. ``generators``: one ``(selection, estimation)`` pair of
    independent streams per input. Everything is checked before any sample is drawn, ``1 <= k < num_classes``
    included.
    """
    k = _check(model, x, num_classes, k, alpha, batch_size, dtype, range_policy)
    check_sample_sizes(n0, n)
    noise = _noise(sigma)
    size = x.shape[0]
    if labels is not None:
        y = torch.as_tensor(labels).reshape(-1).cpu().numpy()
        if y.shape != (size,) or not np.issubdtype(y.dtype, np.integer) or np.any((y < 0) | (y >= num_classes)):
            raise ValueError(f"labels must be {size} class indices in [0, {num_classes - 1}], got {y.tolist()}")
    select, estimate = _pairs(generators, size)
    kw = dict(batch_size=batch_size, block=block, dtype=dtype)
    selection = sample_counts(model, x, noise, n0, num_classes, generators=select, **kw).cpu().numpy()
    sets = np.argsort(-selection, axis=1, kind="stable")[:, :k]
    if labels is None:
        y = sets[:, 0]
    counts = sample_counts(model, x, noise, n, num_classes, generators=estimate, **kw).cpu().numpy()
    p_lower, p_upper = label_bounds(counts, y.astype(np.int64), alpha)
    radius = np.atleast_1d(topk_radius(p_lower, p_upper, k, noise.sigma_sampled))
    out = []
    for i in range(size):
        r = float(radius[i])
        certified = r > 0
        out.append(TopKCertificate(int(y[i]) if certified else ABSTAIN, int(y[i]), k, tuple(int(c) for c in sets[i]),
                                   float(p_lower[i]), float(p_upper[i].max()), r if certified else 0.0,
                                   r / noise.sigma_sampled if certified else float("nan"), counts[i], n0, n, alpha,
                                   alpha / num_classes, dtype_name(dtype), noise.sigma, seed))
    return out


def predict_topk(
    model: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    sigma: float | IsotropicGaussian,
    num_classes: int,
    k: int,
    n: int,
    alpha: float,
    *,
    batch_size: int = 1000,
    block: int | None = None,
    generators: Sequence[torch.Generator | None] | None = None,
    dtype: torch.dtype = torch.float32,
    range_policy: str = "warn",
) -> list[TopKPrediction]:
    """PREDICT of a top-k set for a batch: the ``k`` classes of largest count among ``n`` samples, or an abstention
    (an empty set) unless the simultaneous test separates them from the rest (see the module docstring)."""
    k = _check(model, x, num_classes, k, alpha, batch_size, dtype, range_policy)
    check_count("n", n)
    counts = sample_counts(model, x, _noise(sigma), n, num_classes, generators=generators, batch_size=batch_size,
                           block=block, dtype=dtype).cpu().numpy()
    sets, answered = topk_set_test(counts, k, alpha)
    return [TopKPrediction(tuple(int(c) for c in s) if ok else (), k) for s, ok in zip(sets, answered)]


@dataclass(frozen=True)
class TopKSettings(Settings):
    """Cohen's noise level, ``k`` and which label is certified to stay among the top ``k``."""

    sigma: float = sigma_setting()
    top_k: int = integer(1, low=1, help="certify that the label stays among the K classes of largest smoothed "
                                        "probability (1 <= K < number of classes; Jia et al., ICLR 2020)")
    topk_label: str = choice("label", LABELS, help="the label certified in the top k: the input's own label (the "
                             "paper's certified top-k accuracy) or the top class of the n0 selection samples")


class TopK(CertifyMethod):
    """``--method topk``: the certified l2 radius within which a label stays among the top ``k`` (Theorem 1)."""

    name = "topk"
    columns = ("sigma", "top_k", "topk_label", "topk_class", "topk_set", "p_upper", "alpha_each")
    settings_type = TopKSettings
    samples_only = True

    def __init__(self, settings: TopKSettings | float | None = None, /, **keywords):
        """``TopK(TopKSettings(0.25, 3))``, ``TopK(0.25, top_k=3)`` or ``TopK(sigma=0.25, top_k=3)``."""
        super().__init__(settings, **keywords)
        self.noise = IsotropicGaussian(self.settings.sigma)

    def check_classes(self, num_classes: int) -> None:
        """``1 <= k < num_classes``, before any sampling."""
        check_top_k(self.settings.top_k, num_classes)

    def certify(self, ctx: RunContext, x, labels, indices) -> list[MethodRecord]:
        self.check_classes(ctx.num_classes)
        given = labels if self.settings.topk_label == "label" else None
        certs = certify_topk(ctx.model, x, self.noise, ctx.num_classes, self.settings.top_k, ctx.n0, ctx.n,
                             ctx.alpha, given, batch_size=ctx.batch_size, block=ctx.block,
                             generators=ctx.certify_generators(indices), dtype=ctx.dtype, seed=ctx.seed)
        records = []
        for xi, c in zip(x, certs):
            fields = {"sigma": c.sigma, "top_k": c.top_k, "topk_label": self.settings.topk_label,
                      "topk_class": c.label, "topk_set": format_set(c.topk_set), "p_upper": c.p_upper,
                      "alpha_each": c.alpha_each}
            records.append(MethodRecord(self.name, c, None if c.abstained else Ball(xi, c.radius), fields))
        return records
