"""``--compare-base``: the optimized noise against the base noise, by the radius certifiable at the run's n."""

import numpy as np
import pytest
import torch
from scipy.stats import norm

from smoothcert.methods.base import RunContext
from smoothcert.methods.compare_base import compare_with_base, predicted_proxy
from smoothcert.methods.dds import DDS
from smoothcert.noise.gaussian import IsotropicGaussian
from smoothcert.stats.bounds import clopper_pearson_lower

from soundness import assert_sound, data_dependent_violations, linear_case, plan


class HalfSpace(torch.nn.Module):
    """Class 1 where ``x_0 > 0``, else class 0 (logits +-10 x_0)."""

    def forward(self, x):
        z = 10.0 * x.reshape(x.shape[0], -1)[:, :1]
        return torch.cat([-z, z], dim=1)


def context(n: int, alpha: float = 0.001) -> RunContext:
    return RunContext(HalfSpace(), 2, 50, n, alpha, 2000, torch.float32, 0, torch.device("cpu"))


def test_predicted_proxy_matches_the_exact_expected_certificate():
    """At distance ``d`` from a half-space p_A = Phi(d / sigma); the prediction from 20,000 samples equals
    ``sigma Phi^-1(CP_lower(round(p_A n), n))`` within the estimate's sampling error."""
    d, n, samples = 0.5, 1000, 20_000
    x = torch.zeros(3, 4)
    x[:, 0] = d
    sigmas = [0.25, 0.5, 1.0]
    got = predicted_proxy(context(n), x, [IsotropicGaussian(s) for s in sigmas], samples,
                          context(n).generators(range(3), "t"))
    for s, g in zip(sigmas, got):
        p = norm.cdf(d / s)
        spread = 4 * np.sqrt(p * (1 - p) / samples)
        lo, hi = (s * norm.ppf(clopper_pearson_lower(round(q * n), n, 0.001)) for q in (p - spread, p + spread))
        assert lo - 1e-9 <= g <= hi + 1e-9


def test_base_is_kept_only_where_it_is_expected_to_certify_more():
    """Sigma 5 at distance 0.5 (p_A = Phi(0.1) = 0.54) abstains at n = 1,000 while sigma 0.25 certifies about
    0.44: the base wins. Sigma 0.5 (about 0.42) against a base of 0.1 (capped by the Clopper-Pearson ceiling at
    0.1 Phi^-1(0.001^(1/1000)) = 0.25): the optimized noise stays."""
    x = torch.zeros(1, 4)
    x[0, 0] = 0.5
    ctx = context(1000)
    assert compare_with_base(ctx, x, [0], [IsotropicGaussian(5.0)], IsotropicGaussian(0.25), 2000) == [True]
    assert compare_with_base(ctx, x, [0], [IsotropicGaussian(0.5)], IsotropicGaussian(0.1), 2000) == [False]


def test_compare_base_is_off_by_default_and_validated():
    assert DDS(0.25).settings.compare_base == 0
    with pytest.raises(ValueError, match="compare_base"):
        DDS(0.25, compare_base=-1)


def test_dds_with_compare_base_never_crosses_a_linear_boundary_beyond_alpha():
    """DDS with the comparison on, memory on, a linear problem: the rows, regions and stored regions claim more
    than the exact half-space in at most the share alpha allows, and the comparison did choose both ways."""
    p = plan(0.2)
    case = linear_case(p.trials, 8, seed=5, scale=3.0)
    method = DDS(0.3, samples=32, dds_steps=20, compare_base=200)
    violations, rows = data_dependent_violations(method, case, n0=50, n=400, alpha=p.alpha, seed=1000)
    assert sum(r["predict"] != -1 for r in rows) >= p.trials // 2, "the test would be vacuous"
    kept = {r["noise_kept"] for r in rows}
    assert kept == {"base", "optimized"}, kept
    assert_sound(violations, p)
