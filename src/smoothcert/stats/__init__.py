"""Confidence bounds: pure functions of Monte Carlo counts (scipy.stats does the special functions).

:mod:`~smoothcert.stats.bounds` holds the binomial bounds of PREDICT and CERTIFY, :mod:`~smoothcert.stats.gradients`
the sub-Gaussian gradient-norm bounds of first-order certification (seed 004 Theorems 4, 5 and Table 1).
"""

from smoothcert.stats.bounds import (binomial_pvalue, clopper_pearson_lower, clopper_pearson_upper, gap,
                                     max_certifiable_gap)

__all__ = ["binomial_pvalue", "clopper_pearson_lower", "clopper_pearson_upper", "gap", "max_certifiable_gap"]
