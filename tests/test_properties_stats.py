"""Property-based tests (hypothesis) of the Clopper-Pearson bounds, PREDICT's test and the certifiable gap.

References are independent: statsmodels' two-sided ``proportion_confint(method="beta")`` at ``2 alpha`` (one side
of it is the one-sided bound at ``alpha``), scipy's ``binomtest`` and the closed form ``alpha^(1/n)`` at
``k = n``. Examples are derandomized so CI sees the same cases every run.
"""

import math

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import stats
from statsmodels.stats.proportion import proportion_confint

from smoothcert.stats.bounds import (binomial_pvalue, clopper_pearson_lower, clopper_pearson_upper, gap,
                                     max_certifiable_gap)

SETTINGS = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])

# alpha <= 1/2: the median of Beta(k, n - k + 1) is at most k / n, so only then must lower <= k / n hold
alphas = st.floats(min_value=1e-12, max_value=0.5, allow_nan=False, exclude_min=False)
trials = st.integers(min_value=1, max_value=2_000_000)


@st.composite
def counts(draw, max_n=2_000_000):
    n = draw(st.integers(min_value=1, max_value=max_n))
    k = draw(st.one_of(st.integers(min_value=0, max_value=n), st.sampled_from([0, n, max(n - 1, 0), min(1, n)])))
    return k, n


@SETTINGS
@given(counts(), alphas)
def test_bounds_lie_in_the_unit_interval_around_the_estimate(kn, alpha):
    k, n = kn
    lower = clopper_pearson_lower(k, n, alpha)
    upper = clopper_pearson_upper(k, n, alpha)
    assert 0.0 <= lower <= k / n <= upper <= 1.0
    assert (lower == 0.0) == (k == 0)  # 1 - (1 - alpha)^(1/n) >= 5e-19 at k = 1: no underflow
    if k == n:  # (below k = n the bound may round to 1: (1 - alpha)^(1/n) at k = n - 1)
        assert upper == 1.0


@SETTINGS
@given(counts(), alphas)
def test_bounds_equal_statsmodels_beta_interval_at_twice_alpha(kn, alpha):
    k, n = kn
    lo_sm, hi_sm = proportion_confint(k, n, alpha=2 * alpha, method="beta")
    lo_sm = 0.0 if np.isnan(lo_sm) else lo_sm  # statsmodels gives NaN at k = 0 (resp. k = n)
    hi_sm = 1.0 if np.isnan(hi_sm) else hi_sm
    assert math.isclose(clopper_pearson_lower(k, n, alpha), lo_sm, rel_tol=1e-12, abs_tol=1e-300)
    assert math.isclose(clopper_pearson_upper(k, n, alpha), hi_sm, rel_tol=1e-12, abs_tol=1e-300)


@SETTINGS
@given(trials, alphas)
def test_bounds_at_the_extreme_counts_have_closed_forms(n, alpha):
    """``k = n``: ``Beta.ppf(alpha; n, 1) = alpha^(1/n)``; ``k = 0``: ``1 - alpha^(1/n)``, both exact."""
    root = math.exp(math.log(alpha) / n)
    assert math.isclose(clopper_pearson_lower(n, n, alpha), root, rel_tol=1e-13)
    assert math.isclose(clopper_pearson_upper(0, n, alpha), -math.expm1(math.log(alpha) / n), rel_tol=1e-12)


@SETTINGS
@given(st.integers(min_value=1, max_value=5000), alphas)
def test_bounds_are_non_decreasing_in_the_success_count(n, alpha):
    k = np.arange(n + 1)
    lower = clopper_pearson_lower(k, np.full(n + 1, n), alpha)
    upper = clopper_pearson_upper(k, np.full(n + 1, n), alpha)
    assert np.all(np.diff(lower) >= 0.0)
    assert np.all(np.diff(upper) >= 0.0)


@SETTINGS
@given(counts(), alphas, st.floats(min_value=1e-6, max_value=1.0, exclude_max=True))
def test_a_smaller_alpha_widens_both_bounds(kn, alpha, shrink):
    k, n = kn
    smaller = alpha * shrink
    if not smaller > 0.0:
        return
    # scipy's inverse incomplete beta is exact to its last ulp only: alphas one ulp apart (k=89, n=174,
    # alpha=0.5) gave upper bounds in the wrong order by one ulp (1.1e-16), so one ulp is allowed
    lower, upper = clopper_pearson_lower(k, n, alpha), clopper_pearson_upper(k, n, alpha)
    assert clopper_pearson_lower(k, n, smaller) <= lower + np.spacing(lower)
    assert clopper_pearson_upper(k, n, smaller) >= upper - np.spacing(upper)


@SETTINGS
@given(counts(max_n=20_000), st.one_of(st.just(0.5), st.floats(min_value=1e-12, max_value=1.0 - 1e-12)))
def test_binomial_pvalue_equals_scipy_binomtest(kn, p):
    k, n = kn
    assert binomial_pvalue(k, n, p) == stats.binomtest(k, n, p, alternative="two-sided").pvalue


@SETTINGS
@given(trials, alphas, st.integers(min_value=0, max_value=2_000_000))
def test_max_certifiable_gap_is_the_lower_bound_at_k_equal_n(n, alpha, k_raw):
    top = max_certifiable_gap(n, alpha)
    assert top == gap(clopper_pearson_lower(n, n, alpha))
    # the lower bound at k = n is Beta.ppf(alpha; n, 1) = alpha^(1/n)
    assert math.isclose(top, stats.norm.ppf(alpha ** (1.0 / n)), rel_tol=1e-9, abs_tol=1e-9)
    # no other count certifies a larger gap
    k = k_raw % (n + 1)
    assert gap(clopper_pearson_lower(k, n, alpha)) <= top
