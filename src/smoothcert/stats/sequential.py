"""Sequential tests and confidence sequences for a binomial proportion, checked at fixed sample sizes.

Pure functions of counts (scipy.stats for the special functions). A sequential run looks at the counts at the
*checks* ``n_1 < n_2 < ... < n_K = n_max`` of a deterministic schedule (:func:`check_schedule`), so the number of
looks is known in advance and the error can be spent over them exactly.

* **Union-bound Clopper-Pearson sequence** (:func:`spending`, :func:`union_cp_bounds`): at check ``k`` the
  one-sided Clopper-Pearson bounds at level ``alpha_k = alpha / (k^2 H_K)``, ``H_K = sum_{j <= K} 1 / j^2``, so
  ``sum_k alpha_k = alpha``. By the union bound, ``P(exists k: p < L_k) <= alpha`` for every ``p``: the lower
  bounds form a confidence sequence over the checks, valid at any data-dependent stopping check. The
  ``1/k^2`` spending gives the early checks (where most inputs stop) the largest share (alpha_1 = 0.61 alpha
  as K grows; a geometric schedule has K about log2(n_max / n_1) + 1 checks); the anytime mode spends the same
  shares in reverse (``late``), most at ``n_max``, where its bound matters.
* **Betting test, Krichevsky-Trofimov mixture** (:func:`kt_log_wealth`): for the null ``p <= p*``, the mixture
  over ``q ~ Beta(1/2, 1/2)`` restricted to ``[p*, 1]`` of the likelihood ratios ``prod_i (q / p*)^{X_i}
  ((1 - q) / (1 - p*))^{1 - X_i}`` is a nonnegative supermartingale with initial value 1 under every
  ``p <= p*`` (each factor has mean ``p q / p* + (1 - p)(1 - q) / (1 - p*) <= 1`` for ``q >= p* >= p``), so by
  Ville's inequality ``P(sup_n M_n >= 1 / alpha) <= alpha`` (Waudby-Smith & Ramdas, JRSS-B 2024, sections 3-4;
  the betting view of the KT mixture; Voracek, NeurIPS 2024, uses such sequences for certification). It needs
  no split of alpha over the checks (any check times are fine), at the cost of a mixture's regret.
* :func:`target_decisions`: the test of ``p_A >= p*`` ("is the input certified at radius r?") with either
  sequence; a *futility* stop (the upper bound at ``alpha_k`` falls below ``p*``) only ever makes the run
  abstain, so it costs no error.
* :func:`randomized_cp_lower`: the randomized Clopper-Pearson lower bound, whose coverage is exactly
  ``1 - alpha`` (Stevens, Biometrika 1950; Thulin, 2014).

Exactness of every sequential guarantee here is checked in the tests by dynamic programming over
``(successes, n)`` on a grid of ``p``, against the negative control of re-using the fixed-n bound at the full
``alpha`` after every batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
from numpy.typing import ArrayLike
from scipy import special as _sp
from scipy import stats as _st

from smoothcert.stats.bounds import clopper_pearson_lower, clopper_pearson_upper
from smoothcert.validation import check_alpha, check_count

__all__ = ["SEQUENCES", "check_schedule", "spending", "union_cp_bounds", "kt_log_wealth", "target_decisions",
           "target_step", "anytime_decisions", "randomized_cp_lower", "CERTIFIED", "FUTILE", "UNDECIDED"]

#: The sequences a target test can use: ``cp`` (union-bound Clopper-Pearson) or ``betting`` (KT mixture).
SEQUENCES = ("cp", "betting")
CERTIFIED, FUTILE, UNDECIDED = 1, -1, 0


def check_schedule(n_max: int, first: int = 100, growth: float = 2.0) -> np.ndarray:
    """The checks ``n_1 < ... < n_K = n_max``: ``n_k = min(round(first growth^(k-1)), n_max)`` (int64)."""
    check_count("n_max", n_max)
    check_count("first", first)
    if not (math.isfinite(growth) and growth > 1.0):
        raise ValueError(f"growth must be a finite number > 1, got {growth!r}")
    out, n = [], float(min(first, n_max))
    while int(round(n)) < n_max:
        value = int(round(n))
        if not out or value > out[-1]:
            out.append(value)
        n *= growth
    out.append(int(n_max))
    return np.asarray(out, dtype=np.int64)


def spending(alpha: float, checks: int, late: bool = False) -> np.ndarray:
    """``alpha_k = alpha / (k^2 H_K)`` for ``k = 1..checks`` (``H_K = sum 1/j^2``): they sum to ``alpha``.

    ``late``: the same shares in reverse, ``alpha_k = alpha / ((K - k + 1)^2 H_K)``, so the last check (``n_max``)
    has the largest (0.61 alpha as K grows): for a sequence whose aim is the bound at ``n_max`` (the anytime mode).
    """
    check_alpha(alpha)
    check_count("checks", checks)
    w = 1.0 / np.arange(1, checks + 1, dtype=np.float64) ** 2
    return alpha * (w[::-1] if late else w) / w.sum()


def union_cp_bounds(successes: ArrayLike, trials: ArrayLike, alpha_k: float) -> tuple[np.ndarray, np.ndarray]:
    """One-sided Clopper-Pearson lower and upper bounds at level ``alpha_k`` (one check of the sequence)."""
    lower = np.atleast_1d(clopper_pearson_lower(successes, trials, alpha_k))
    upper = np.atleast_1d(clopper_pearson_upper(successes, trials, alpha_k))
    return lower, upper


def kt_log_wealth(successes: ArrayLike, trials: ArrayLike, level: ArrayLike) -> np.ndarray:
    """``log M_n`` of the KT mixture restricted to ``q >= level`` against the null ``p <= level`` (see above).

    ``M_n = [int_{p*}^1 q^{s - 1/2} (1 - q)^{n - s - 1/2} dq / int_{p*}^1 q^{-1/2} (1 - q)^{-1/2} dq]
    / (p*^s (1 - p*)^{n - s})``, from the regularized incomplete beta function (in logs, so large ``n`` is fine).
    """
    s = np.asarray(successes, dtype=np.float64)
    n = np.asarray(trials, dtype=np.float64)
    p = np.asarray(level, dtype=np.float64)
    if np.any((p <= 0) | (p >= 1)):
        raise ValueError("the null level must lie in (0, 1)")
    a, b = s + 0.5, n - s + 0.5
    with np.errstate(divide="ignore"):
        tail = np.log(_sp.betaincc(a, b, p))  # P(Beta(a, b) >= p*)
        prior = np.log(_sp.betaincc(0.5, 0.5, p))
    return (_sp.betaln(a, b) + tail) - (_sp.betaln(0.5, 0.5) + prior) - s * np.log(p) - (n - s) * np.log1p(-p)


def target_decisions(successes: ArrayLike, trials: ArrayLike, level: ArrayLike, alpha: float, alpha_k: float,
                     sequence: str = "cp") -> np.ndarray:
    """Per input: ``CERTIFIED`` (1) when the test rejects ``p <= level``, ``FUTILE`` (-1) when the upper bound at
    ``alpha_k`` is below ``level`` (stop and abstain), else ``UNDECIDED`` (0).

    ``cp``: certified when the Clopper-Pearson lower bound at ``alpha_k`` (this check's share) reaches ``level``.
    ``betting``: certified when ``log M_n >= log(1 / alpha)`` (Ville's inequality, the whole ``alpha``).
    Either way ``P(ever CERTIFIED) <= alpha`` for every true ``p <= level``.
    """
    if sequence not in SEQUENCES:
        raise ValueError(f"sequence must be one of {', '.join(SEQUENCES)}, got {sequence!r}")
    check_alpha(alpha)
    check_alpha(alpha_k)
    level = np.asarray(level, dtype=np.float64)
    lower, upper = union_cp_bounds(successes, trials, alpha_k)
    if sequence == "cp":
        yes = lower >= level
    else:
        yes = kt_log_wealth(successes, trials, level) >= math.log(1.0 / alpha)
    out = np.where(yes, CERTIFIED, np.where(upper < level, FUTILE, UNDECIDED))
    return out.astype(np.int64)


def target_step(successes: ArrayLike, k: int, schedule: np.ndarray, alphas: np.ndarray, level: ArrayLike,
                alpha: float, sequence: str = "cp") -> np.ndarray:
    """The target test's decision at check ``k`` (0-based; ``k = -1``: before any estimation sample, successes 0).

    ``alphas``: the share of ``alpha`` of each check of ``schedule`` (the caller's spending, e.g.
    :func:`spending`; their sum at most ``alpha``); ``alpha``: the whole level (the betting test's).
    :func:`target_decisions` at check ``k``, with a second futility rule: ``FUTILE`` when no later check could
    certify even if every remaining sample were a success (the decisions increase in the successes, so that is
    the best case); at ``k = -1`` that rule alone, so a level out of reach of ``n_max`` samples (e.g. a radius
    above the ceiling ``sigma Phi^-1(alpha_K^(1/n_max))``) abstains without sampling. Futility only abstains: the
    error stays that of :func:`target_decisions`. At the last check, ``UNDECIDED`` means "abstain, at ``n_max``".
    """
    s = np.atleast_1d(np.asarray(successes, dtype=np.int64))
    level = np.broadcast_to(np.asarray(level, dtype=np.float64), s.shape)
    if len(alphas) != len(schedule) or float(np.sum(alphas)) > alpha * (1 + 1e-12):
        raise ValueError(f"need one share of alpha per check summing to at most alpha = {alpha}, got {alphas!r}")
    n_k = 0 if k < 0 else int(schedule[k])
    out = np.full(s.shape, UNDECIDED, dtype=np.int64)
    if k >= 0:
        out = target_decisions(s, np.full(s.shape, n_k), level, alpha, float(alphas[k]), sequence)
    reachable = np.zeros(s.shape, dtype=bool)
    for j in range(k + 1, len(schedule)):
        best = s + int(schedule[j]) - n_k
        reachable |= target_decisions(best, np.full(s.shape, int(schedule[j])), level, alpha, float(alphas[j]),
                                      sequence) == CERTIFIED
    return np.where((out == UNDECIDED) & ~reachable & (k < len(schedule) - 1), FUTILE, out).astype(np.int64)


def anytime_decisions(successes: ArrayLike, n_k: int, n_max: int, alpha_k: float, alpha_last: float,
                      precision: float, gaps: Sequence[Callable[[float], float]]) -> np.ndarray:
    """The stopping rule of the anytime mode at one check ``n_k`` (any stopping rule keeps the sequence valid).

    Per input (``gaps[i]`` its noise's ``p -> gap``): ``FUTILE`` when the upper bound at ``alpha_k`` is below 1/2
    (it can never certify); ``CERTIFIED`` (stop and certify at the current lower bound) when the gap of the lower
    bound at ``alpha_k`` is within ``precision`` of the gap the last check's bound would give at ``n_max`` with the
    current estimate ``s / n_k``; at ``n_k >= n_max`` every input stops (certified if its bound reaches 1/2).
    """
    s = np.atleast_1d(np.asarray(successes, dtype=np.int64))
    lower, upper = union_cp_bounds(s, np.full(s.shape, n_k), alpha_k)
    if n_k >= n_max:
        return np.where(lower >= 0.5, CERTIFIED, FUTILE).astype(np.int64)
    final = np.atleast_1d(clopper_pearson_lower(np.round(s / n_k * n_max).astype(np.int64), np.full(s.shape, n_max),
                                                alpha_last))
    out = np.full(s.shape, UNDECIDED, dtype=np.int64)
    for j, gap in enumerate(gaps):
        if upper[j] < 0.5:
            out[j] = FUTILE
        elif lower[j] >= 0.5 and final[j] >= 0.5 and gap(float(lower[j])) >= gap(float(final[j])) - precision:
            out[j] = CERTIFIED
    return out


def randomized_cp_lower(successes: ArrayLike, trials: ArrayLike, alpha: float, uniform: ArrayLike) -> np.ndarray:
    """The randomized one-sided Clopper-Pearson lower bound: exactly ``P(p < L) = alpha`` for every ``p``.

    ``L`` solves ``P_L(X > k) + U P_L(X = k) = alpha`` for ``U ~ Uniform(0, 1)`` drawn independently of the
    samples: the randomized p-value ``P_p(X > k) + U P_p(X = k)`` is exactly uniform under ``p`` and increases in
    ``p``. ``L`` lies between the Clopper-Pearson bounds of ``k`` (``U = 1``) and ``k + 1`` (``U = 0``); found by
    60 bisection steps (below 1e-18 of the bracket) and returned at the bracket's lower end (never above the
    root). At ``k = n`` and ``U <= alpha`` the root is 1; it is capped at the largest double below 1.
    """
    check_alpha(alpha)
    k = np.atleast_1d(np.asarray(successes, dtype=np.int64))
    n = np.atleast_1d(np.asarray(trials, dtype=np.int64))
    u = np.atleast_1d(np.asarray(uniform, dtype=np.float64))
    k, n, u = np.broadcast_arrays(k, n, u)
    if np.any((u < 0) | (u > 1)):
        raise ValueError("the uniform draws must lie in [0, 1]")
    lo = np.atleast_1d(clopper_pearson_lower(k, n, alpha)).astype(np.float64)
    hi = np.where(k < n, np.atleast_1d(clopper_pearson_lower(np.minimum(k + 1, n), n, alpha)), 1.0)

    def pvalue(p):
        return _st.binom.sf(k, n, p) + u * _st.binom.pmf(k, n, p)

    for _ in range(60):
        mid = 0.5 * (lo + hi)
        above = pvalue(mid) > alpha  # the p-value increases in p: the root lies below mid
        hi = np.where(above, mid, hi)
        lo = np.where(above, lo, mid)
    return np.minimum(lo, np.nextafter(1.0, 0.0))
