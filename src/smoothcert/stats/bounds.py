"""Confidence bounds on Monte Carlo counts.

Every function here is a pure function of counts; the special functions come from scipy.stats.

* :func:`clopper_pearson_lower` / :func:`clopper_pearson_upper`: one-sided exact binomial bounds.
  With probability at least ``1 - alpha`` over the samples, ``p >= lower`` (resp. ``p <= upper``).
  This is the bound of Cohen et al.'s CERTIFY (seed 002 section 5.1, seed 000 Algorithm "CERTIFY"):
  ``lower = Beta.ppf(alpha; k, n - k + 1)``, identical to statsmodels'
  ``proportion_confint(k, n, alpha=2 * alpha, method="beta")[0]``.
* :func:`binomial_pvalue`: the two-sided binomial test of Cohen et al.'s PREDICT.
* :func:`gap`: ``Phi^-1(p)``, the quantity every Gaussian certificate scales (seed 000 eq. 3.3, 3.12).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats as _st

from smoothcert.validation import check_alpha

__all__ = ["clopper_pearson_lower", "clopper_pearson_upper", "binomial_pvalue", "gap", "level", "max_certifiable_gap"]


def _counts(successes: ArrayLike, trials: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    k = np.asarray(successes)
    n = np.asarray(trials)
    if not (np.issubdtype(k.dtype, np.integer) and np.issubdtype(n.dtype, np.integer)):
        if not (np.all(np.mod(k, 1) == 0) and np.all(np.mod(n, 1) == 0)):
            raise ValueError("counts must be whole numbers")
    k = k.astype(np.int64)
    n = n.astype(np.int64)
    if np.any(n < 1):
        raise ValueError(f"trials must be >= 1, got {n.min()}")
    if np.any(k < 0) or np.any(k > n):
        raise ValueError("successes must lie in [0, trials]")
    return k, n


def clopper_pearson_lower(successes: ArrayLike, trials: ArrayLike, alpha: float) -> np.ndarray | float:
    """One-sided Clopper-Pearson lower bound: ``P(p >= bound) >= 1 - alpha``.

    Equals ``Beta.ppf(alpha, k, n - k + 1)`` and 0 when ``k = 0``. Works elementwise on arrays.
    """
    check_alpha(alpha)
    k, n = _counts(successes, trials)
    with np.errstate(invalid="ignore"):
        bound = _st.beta.ppf(alpha, np.maximum(k, 1), n - k + 1)
    bound = np.where(k == 0, 0.0, bound)
    return float(bound) if bound.ndim == 0 else bound


def clopper_pearson_upper(successes: ArrayLike, trials: ArrayLike, alpha: float) -> np.ndarray | float:
    """One-sided Clopper-Pearson upper bound: ``P(p <= bound) >= 1 - alpha``.

    Equals ``Beta.ppf(1 - alpha, k + 1, n - k)`` and 1 when ``k = n``; computed as ``Beta.isf(alpha, ...)``, since
    ``1 - alpha`` rounds away the digits of a small alpha (alpha = 1e-12, k = 0, n = 2: the ppf form was 1.1e-11
    too high, relative).
    """
    check_alpha(alpha)
    k, n = _counts(successes, trials)
    with np.errstate(invalid="ignore"):
        bound = _st.beta.isf(alpha, k + 1, np.maximum(n - k, 1))
    bound = np.where(k == n, 1.0, bound)
    return float(bound) if bound.ndim == 0 else bound


def binomial_pvalue(successes: int, trials: int, p: float = 0.5) -> float:
    """Two-sided exact binomial test p-value (scipy.stats.binomtest), as in PREDICT of Cohen et al."""
    k, n = _counts(successes, trials)
    return float(_st.binomtest(int(k), int(n), p, alternative="two-sided").pvalue)


def gap(p: ArrayLike) -> np.ndarray | float:
    """``Phi^-1(p)``: the normalized margin of a Gaussian certificate (seed 000 eq. 3.3)."""
    out = _st.norm.ppf(np.asarray(p, dtype=np.float64))
    return float(out) if np.ndim(out) == 0 else out


def level(g: ArrayLike) -> np.ndarray | float:
    """``Phi(g)``: the probability whose Gaussian gap is ``g`` (the inverse of :func:`gap`)."""
    out = _st.norm.cdf(np.asarray(g, dtype=np.float64))
    return float(out) if np.ndim(out) == 0 else out


def max_certifiable_gap(n: int, alpha: float) -> float:
    """The largest gap that ``n`` samples can certify at level ``alpha``: ``Phi^-1(alpha^(1/n))``.

    With ``n = 100_000`` and ``alpha = 0.001`` this is 3.81: no radius above ``3.81 sigma`` exists.
    """
    return float(gap(clopper_pearson_lower(n, n, alpha)))
