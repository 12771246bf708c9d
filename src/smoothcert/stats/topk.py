"""Top-k certificates under Gaussian noise: simultaneous class bounds and the certified radius of a label.

Source: Jia, Cao, Wang, Gong, "Certified robustness for top-k predictions against adversarial perturbations via
randomized smoothing", ICLR 2020 (the theorem is reproduced in seed 001, "Improvement: Certified Robustness for
Top-k Predictions", Theorem 1, eq. (1)-(3)). Notation: ``g_k(x)`` is the set of the ``k`` classes with the largest
``p_c(x) = P(f(x + eps) = c)``, ``eps ~ N(0, sigma^2 I)``.

* **Bounds (the paper's SimuEM, eq. (1)).** For a label ``l`` fixed before sampling, one-sided Clopper-Pearson
  bounds at level ``alpha / c`` each (Bonferroni over the ``c`` classes): the lower bound ``p_l`` of ``p_l(x)`` and
  the upper bounds ``P_i`` of ``p_i(x)`` for every ``i != l``. All ``c`` hold at once with probability at least
  ``1 - alpha``. Since ``sum_{i != l} p_i(x) <= 1 - p_l(x) <= 1 - p_l``, every upper bound and every sum of upper
  bounds is also capped at ``1 - p_l`` on that event (as the authors' code does): still valid, never larger.
* **Radius (Theorem 1, eq. (3)).** Let ``P_{b_k} >= ... >= P_{b_1}`` be the ``k`` largest upper bounds among the
  other classes and ``P_{S_t} = sum_{j <= t} P_{b_j}`` (the ``t`` smallest of them), ``t = 1..k``. Then
  ``l in g_k(x + delta)`` for every ``||delta||_2 < R`` where ``R`` solves

      Phi(Phi^-1(p_l) - R / sigma) - min_t Phi(Phi^-1(P_{S_t}) + R / sigma) / t = 0.

  Each ``h_t(r) = Phi(a - r) - Phi(b_t + r) / t`` (``a = Phi^-1(p_l)``, ``b_t = Phi^-1(P_{S_t})``, ``r = R / sigma``)
  is strictly decreasing, so the root of eq. (3) is ``max_t r_t`` with ``r_t`` the root of ``h_t``; ``h_t(0) > 0``
  iff ``p_l > P_{S_t} / t``, and with no such ``t`` nothing is certified (``R = 0``). For ``k = 1`` eq. (3) reads
  ``a - r = b_1 + r``: ``R = sigma / 2 (Phi^-1(p_l) - Phi^-1(P_{b_1}))``, Cohen et al.'s two-sided radius.
* **Solving.** Each ``r_t`` by bisection on ``log Phi(a - r) - log Phi(b_t + r) + log t`` (scipy's ``log_ndtr``,
  accurate in both tails), vectorized over inputs and ``t``. The bracket is ``[0, r_hi]`` in units of sigma with
  ``r_hi = max(0, -b_t, a - Phi^-1(1 / (2t))) + 1``: there ``Phi(b_t + r) >= 1/2`` and ``Phi(a - r) < 1 / (2t)``, so
  ``h_t(r_hi) < 0`` (no fixed search interval: in input units the bracket is ``sigma r_hi``). The lower end, at
  which ``h_t >= 0`` holds as computed, is returned: the conservative end.
* **PREDICT of a top-k set.** The ``k`` classes with the largest counts are returned when
  ``min_{i in K} L_i > max_{j not in K} U_j`` for one-sided bounds ``L``, ``U`` at ``alpha / c`` for every class, else
  it abstains. Let ``K*`` be a top-k set of the true probabilities (fixed). The event that ``L_j <= p_j`` for
  ``j not in K*`` and ``U_j >= p_j`` for ``j in K*`` (``c`` one-sided events) has probability at least
  ``1 - alpha``; on it a returned ``K != K*`` has ``i in K \\ K*``, ``m in K* \\ K`` with
  ``p_i >= L_i > U_m >= p_m >= p_i``, a contradiction, and ``K = K*`` is a top-k set. So a returned set that is
  not a top-k set of ``g`` occurs with probability at most ``alpha``.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike
from scipy import special

from smoothcert.stats.bounds import clopper_pearson_lower, clopper_pearson_upper
from smoothcert.validation import check_alpha

__all__ = ["check_top_k", "simultaneous_bounds", "label_bounds", "topk_radius", "topk_set_test"]

_MARGIN = 1e-12  # relative, taken off every finite radius (toward the smaller region)
_ITERATIONS = 200  # bisection steps at most; each halves the bracket, float64 resolution is reached well before


def check_top_k(k: int, num_classes: int) -> int:
    """``k`` is a whole number with ``1 <= k < num_classes`` (for ``k >= num_classes`` every class is in the top k)."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"top_k (--top-k) must be an integer in [1, num_classes - 1], got {k!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if not 1 <= int(k) < int(num_classes):
        raise ValueError(f"top_k (--top-k) must be an integer in [1, {int(num_classes) - 1}] (at least 1 and below "
                         f"the number of classes, {int(num_classes)}), got {int(k)}")
    return int(k)


def _count_matrix(counts: ArrayLike) -> np.ndarray:
    c = np.asarray(counts)
    if c.ndim != 2 or c.shape[1] < 2 or c.shape[0] < 1:
        raise ValueError(f"counts must be a (B, num_classes) array with num_classes >= 2, got shape {c.shape}")
    if not np.issubdtype(c.dtype, np.integer):
        if not np.all(np.isfinite(c)) or not np.all(np.mod(c, 1) == 0):
            raise ValueError("counts must be whole numbers")
    c = c.astype(np.int64)
    if np.any(c < 0) or np.any(c.sum(1) < 1):
        raise ValueError("counts must be >= 0 with at least one sample per input")
    return c


def simultaneous_bounds(counts: ArrayLike, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Per class, the one-sided Clopper-Pearson lower and upper bounds at level ``alpha / c`` each.

    ``counts`` is ``(B, c)``; returns ``(lower, upper)``, both ``(B, c)``. Any ``c`` of these one-sided events
    (one per class, the side chosen before sampling) hold at once with probability at least ``1 - alpha``
    (Bonferroni over the classes; the paper's SimuEM).
    """
    check_alpha(alpha)
    c = _count_matrix(counts)
    n = np.broadcast_to(c.sum(1, keepdims=True), c.shape)
    each = alpha / c.shape[1]
    return (np.asarray(clopper_pearson_lower(c, n, each), dtype=np.float64).reshape(c.shape),
            np.asarray(clopper_pearson_upper(c, n, each), dtype=np.float64).reshape(c.shape))


def label_bounds(counts: ArrayLike, labels: ArrayLike, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """eq. (1) for the label of each input: ``(p_lower (B,), p_upper (B, c - 1))``.

    ``p_lower`` bounds ``p_l(x)`` from below and ``p_upper`` the other classes' probabilities from above (in
    class order, the label left out), each at ``alpha / c``, the upper ones capped at ``1 - p_lower``. With
    probability at least ``1 - alpha`` all of them hold. ``labels`` must be fixed before the counts are drawn.
    """
    c = _count_matrix(counts)
    y = np.asarray(labels)
    if y.shape != (c.shape[0],) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be {c.shape[0]} integer class indices, got {y!r}")
    if np.any(y < 0) or np.any(y >= c.shape[1]):
        raise ValueError(f"labels must lie in [0, {c.shape[1] - 1}], got {y.tolist()}")
    lower, upper = simultaneous_bounds(c, alpha)
    rows = np.arange(c.shape[0])
    p_lower = lower[rows, y]
    others = np.ones(c.shape, dtype=bool)
    others[rows, y] = False
    p_upper = np.minimum(upper[others].reshape(c.shape[0], c.shape[1] - 1), (1.0 - p_lower)[:, None])
    return p_lower, p_upper


def _terms(p_lower: np.ndarray, p_upper: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``a = Phi^-1(p_l)`` (B, 1) and ``b_t = Phi^-1(min(P_{S_t}, 1 - p_l))`` (B, k) of eq. (3)."""
    top = -np.sort(-p_upper, axis=1)[:, :k]  # the k largest, descending: P_{b_k}, ..., P_{b_1}
    sums = np.cumsum(top[:, ::-1], axis=1)  # P_{S_t}, t = 1..k: the t smallest of them
    sums = np.minimum(sums, (1.0 - p_lower)[:, None])
    return special.ndtri(p_lower)[:, None], special.ndtri(sums)


def _gain(a: np.ndarray, b: np.ndarray, log_t: np.ndarray, r: np.ndarray) -> np.ndarray:
    """``log Phi(a - r) - log Phi(b + r) + log t``: >= 0 iff ``Phi(a - r) >= Phi(b + r) / t``."""
    with np.errstate(invalid="ignore"):
        return special.log_ndtr(a - r) - special.log_ndtr(b + r) + log_t


def topk_radius(p_lower: ArrayLike, p_upper: ArrayLike, k: int, sigma: float = 1.0) -> np.ndarray | float:
    """Theorem 1's certified l2 radius of a label in the top ``k`` (eq. (3)), by bisection, conservative end.

    ``p_lower`` (B,) lower-bounds the label's probability, ``p_upper`` (B, m) upper-bounds the other classes'
    (``m >= k``, any order). Returns ``sigma * max_t r_t`` per input, less a relative 1e-12 for rounding (0 where
    ``p_l <= P_{S_t} / t`` for every ``t``, ties included: nothing certified; ``inf`` where ``p_l = 1`` or some ``P_{S_t} = 0``). ``k = 1`` gives
    ``sigma / 2 (Phi^-1(p_l) - Phi^-1(max_i P_i))`` (the upper bound capped at ``1 - p_l``).
    """
    scalar = np.ndim(p_lower) == 0
    pl = np.atleast_1d(np.asarray(p_lower, dtype=np.float64))
    pu = np.asarray(p_upper, dtype=np.float64)
    pu = pu.reshape(1, -1) if pu.ndim == 1 and scalar else pu
    if pl.ndim != 1 or pu.ndim != 2 or pu.shape[0] != pl.shape[0]:
        raise ValueError(f"p_lower must be (B,) and p_upper (B, m), got shapes {pl.shape} and {pu.shape}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= pu.shape[1]:
        raise ValueError(f"k must be an integer in [1, {pu.shape[1]}] (the number of other classes), got {k!r}")
    if not (np.all((pl >= 0) & (pl <= 1)) and np.all((pu >= 0) & (pu <= 1))):
        raise ValueError("probability bounds must lie in [0, 1]")
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")
    a, b = _terms(pl, pu, int(k))
    a = np.broadcast_to(a, b.shape)
    log_t = np.broadcast_to(np.log(np.arange(1, k + 1, dtype=np.float64)), b.shape)
    infinite = np.isposinf(a) | np.isneginf(b)  # p_l = 1 or P_{S_t} = 0: h_t > 0 for every r
    start = _gain(a, b, log_t, np.zeros(b.shape))
    live = (start > 0) & ~infinite & np.isfinite(a)  # h_t(0) = 0, a tie: nothing certified (the radius is 0)
    lo = np.zeros(b.shape)
    hi = np.where(live, np.maximum.reduce([np.zeros(b.shape), -b, a - special.ndtri(0.5 / np.arange(1, k + 1))]) + 1.0,
                  0.0)
    hi = np.where(np.isfinite(hi), hi, 0.0)
    # the bracket is valid by construction; widen it anyway should rounding leave h_t(hi) >= 0
    for _ in range(64):
        bad = live & (_gain(a, b, log_t, hi) >= 0)
        if not bad.any():
            break
        hi = np.where(bad, 2.0 * hi + 1.0, hi)
    for _ in range(_ITERATIONS):
        mid = 0.5 * (lo + hi)
        moving = live & (mid > lo) & (mid < hi)  # stop where lo and hi are adjacent floats
        if not moving.any():
            break
        ok = _gain(a, b, log_t, mid) >= 0
        lo = np.where(moving & ok, mid, lo)
        hi = np.where(moving & ~ok, mid, hi)
    # less a relative _MARGIN: the rounding of log_ndtr near the root (up to 6e-14 above 40-digit roots measured)
    r = np.where(infinite, np.inf, np.where(live, lo * (1.0 - _MARGIN), 0.0)).max(axis=1)
    out = sigma * r
    return float(out[0]) if scalar else out


def topk_set_test(counts: ArrayLike, k: int, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """PREDICT of a top-k set: ``(sets (B, k), answered (B,))``.

    ``sets`` holds the ``k`` classes with the largest counts (by decreasing count, ties to the smaller class),
    ``answered`` whether ``min`` of their lower bounds exceeds ``max`` of the other classes' upper bounds, all at
    ``alpha / c`` (:func:`simultaneous_bounds`). An answered set that is not a top-k set of the smoothed
    classifier occurs with probability at most ``alpha`` (see the module docstring).
    """
    c = _count_matrix(counts)
    check_top_k(k, c.shape[1])
    lower, upper = simultaneous_bounds(c, alpha)
    order = np.argsort(-c, axis=1, kind="stable")
    chosen, rest = order[:, :k], order[:, k:]
    rows = np.arange(c.shape[0])[:, None]
    answered = lower[rows, chosen].min(axis=1) > upper[rows, rest].max(axis=1)
    return chosen, answered
