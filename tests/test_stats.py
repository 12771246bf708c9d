import numpy as np
import pytest
from scipy import stats as st
from statsmodels.stats.proportion import proportion_confint

from smoothcert.stats.bounds import (binomial_pvalue, clopper_pearson_lower, clopper_pearson_upper, gap, max_certifiable_gap)


@pytest.mark.parametrize("side,bound,edge", [(0, clopper_pearson_lower, 0.0), (1, clopper_pearson_upper, 1.0)])
def test_bounds_match_statsmodels_exactly(side, bound, edge):
    """One-sided bound at alpha = one side of statsmodels' two-sided interval at 2 alpha (NaN there at k = 0 or n)."""
    rng = np.random.default_rng(side)
    for _ in range(400):
        n = int(rng.integers(1, 200_000))
        k = int(rng.integers(0, n + 1))
        alpha = float(10 ** rng.uniform(-6, -0.5))
        expected = proportion_confint(k, n, alpha=2 * alpha, method="beta")[side]
        expected = edge if np.isnan(expected) else expected
        assert abs(bound(k, n, alpha) - expected) <= 1e-12


def test_edge_counts_and_vectorized():
    assert clopper_pearson_lower(0, 10, 0.01) == 0.0
    assert clopper_pearson_upper(10, 10, 0.01) == 1.0
    k = np.array([0, 5, 10])
    lo = clopper_pearson_lower(k, np.array([10, 10, 10]), 0.05)
    assert lo.shape == (3,) and lo[0] == 0.0 and 0 < lo[1] < 0.5 < lo[2] < 1
    # k = n: the bound is alpha^(1/n), so the largest certifiable gap at n=100000, alpha=0.001 is 3.81
    assert clopper_pearson_lower(100_000, 100_000, 0.001) == pytest.approx(0.001 ** (1 / 100_000), rel=1e-12)
    assert max_certifiable_gap(100_000, 0.001) == pytest.approx(3.81, abs=0.005)


def test_lower_bound_coverage_by_simulation():
    """P(p >= lower) >= 1 - alpha: the share of misses is within the binomial tail of alpha."""
    rng = np.random.default_rng(2)
    p, n, alpha, trials = 0.83, 500, 0.05, 20_000
    k = rng.binomial(n, p, size=trials)
    misses = int(np.sum(clopper_pearson_lower(k, np.full(trials, n), alpha) > p))
    assert misses <= st.binom.ppf(1 - 1e-6, trials, alpha)


def test_binomial_pvalue_and_gap():
    assert binomial_pvalue(50, 100) == pytest.approx(1.0)
    assert binomial_pvalue(90, 100) < 1e-10
    assert binomial_pvalue(7, 20) == pytest.approx(st.binomtest(7, 20).pvalue)
    assert gap(0.5) == 0.0
    assert gap(st.norm.cdf(1.3)) == pytest.approx(1.3)


@pytest.mark.parametrize("alpha", [0, 1, -0.1, 1.5, float("nan"), "0.1", None])
def test_bad_alpha(alpha):
    with pytest.raises(ValueError, match="alpha"):
        clopper_pearson_lower(3, 10, alpha)


def test_bad_counts():
    with pytest.raises(ValueError, match="trials"):
        clopper_pearson_lower(0, 0, 0.1)
    with pytest.raises(ValueError, match="successes"):
        clopper_pearson_lower(11, 10, 0.1)
    with pytest.raises(ValueError, match="whole"):
        clopper_pearson_lower(1.5, 10, 0.1)
