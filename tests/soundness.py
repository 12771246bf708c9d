"""The shared statistical soundness harness: "the certified radius exceeds the exact one in at most an alpha
share of trials", with stated power.

A certificate path is run on ``trials`` independent cases whose exact answer is known (a linear classifier, a
quadrature, an enumeration). A trial *violates* when the certificate claims more than is true: a radius above
the exact robust radius of the smoothed classifier, or a non-abstaining prediction that is not the smoothed
classifier's class. For a sound method each trial violates with probability at most ``alpha``, so the number
of violations is stochastically below ``Binomial(trials, alpha)``.

:func:`plan` picks the smallest ``trials`` and a threshold ``max_violations`` such that

* a sound method passes (``violations <= max_violations``) with probability at least ``pass_prob`` (0.999):
  ``P(Binomial(trials, alpha) <= max_violations) >= 0.999``;
* a method whose violation rate is ``2 alpha`` fails with probability at least ``power`` (0.9):
  ``P(Binomial(trials, 2 alpha) > max_violations) >= 0.9``.

Both probabilities are computed exactly from the binomial distribution (scipy.stats) and kept in the
:class:`Plan`, so a test states what it can detect. (The earlier shared check, 40 trials at alpha = 0.1 with a
1e-3 p-value threshold, caught a 2 x alpha method only 9% of the time.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

__all__ = ["Plan", "plan", "count_violations", "assert_sound", "violations_of"]

PASS_PROB = 0.999
POWER = 0.9


@dataclass(frozen=True)
class Plan:
    """How many trials, how many violations a sound method may show, and the two probabilities that follow."""

    alpha: float
    trials: int
    max_violations: int
    pass_prob: float  #: P(a sound method passes) = P(Binomial(trials, alpha) <= max_violations)
    power: float  #: P(a 2 x alpha method fails) = P(Binomial(trials, 2 alpha) > max_violations)

    def __str__(self) -> str:
        return (f"{self.trials} trials at alpha {self.alpha}: at most {self.max_violations} violations; "
                f"a sound method passes with probability {self.pass_prob:.4f}, a method over-certifying at "
                f"2 x alpha fails with probability {self.power:.4f}")


def plan(alpha: float, *, pass_prob: float = PASS_PROB, power: float = POWER, max_trials: int = 200_000) -> Plan:
    """The smallest number of trials with ``P(sound passes) >= pass_prob`` and ``P(2 alpha fails) >= power``."""
    if not 0.0 < alpha < 0.5:
        raise ValueError(f"alpha must lie in (0, 0.5) so that 2 x alpha is a probability, got {alpha!r}")

    def at(trials: int) -> Plan:
        c = int(stats.binom.ppf(pass_prob, trials, alpha))  # smallest c with P(X <= c) >= pass_prob
        return Plan(alpha, trials, c, float(stats.binom.cdf(c, trials, alpha)),
                    float(stats.binom.sf(c, trials, 2 * alpha)))

    lo, hi = 1, 1
    while at(hi).power < power:  # power is not monotone in trials step by step; bracket, then scan down
        lo, hi = hi, hi * 2
        if hi > max_trials:
            raise ValueError(f"no plan within {max_trials} trials at alpha {alpha}")
    for trials in range(lo, hi + 1):
        p = at(trials)
        if p.power >= power and p.pass_prob >= pass_prob:
            return p
    return at(hi)


def violations_of(certified: Sequence[float] | np.ndarray, exact: Sequence[float] | np.ndarray,
                  predicted: Sequence[int] | np.ndarray | None = None,
                  true_class: Sequence[int] | np.ndarray | None = None, *, abstain: int = -1,
                  rtol: float = 1e-12) -> np.ndarray:
    """Boolean per trial: the certificate claims more than is true.

    ``certified`` radii against ``exact`` robust radii (a radius counts as larger only beyond a relative
    ``rtol`` of float64 rounding); with ``predicted`` and ``true_class``, a non-abstaining prediction of
    another class than the smoothed classifier's also violates.
    """
    certified = np.asarray(certified, dtype=np.float64)
    exact = np.asarray(exact, dtype=np.float64)
    if certified.shape != exact.shape:
        raise ValueError(f"certified and exact radii differ in shape: {certified.shape} vs {exact.shape}")
    bad = certified > exact * (1.0 + rtol) + 1e-300
    if predicted is not None:
        predicted = np.asarray(predicted)
        wrong = (predicted != abstain) & (predicted != np.asarray(true_class))
        bad = bad | wrong
    return bad


def count_violations(trial: Callable[[int], bool], p: Plan) -> int:
    """Run ``trial(k)`` (True = violation) for ``k = 0 .. trials - 1`` and count the violations."""
    return sum(bool(trial(k)) for k in range(p.trials))


def assert_sound(violations: int | np.ndarray, p: Plan) -> None:
    """Fail when the violations exceed what ``alpha`` allows (see :class:`Plan` for the test's two error rates)."""
    count = int(np.sum(violations)) if np.ndim(violations) else int(violations)
    if np.ndim(violations):
        if np.size(violations) != p.trials:
            raise ValueError(f"got {np.size(violations)} trial outcomes for a plan of {p.trials} trials")
    assert count <= p.max_violations, f"{count} violations: {p}"


if __name__ == "__main__":  # the plans at the usual levels: python tests/soundness.py
    for level in (0.05, 0.1, 0.2):
        print(plan(level))
