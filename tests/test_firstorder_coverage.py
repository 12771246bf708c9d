"""Coverage of the l_inf and l1 gradient-norm upper bounds (seed 004 Table 1 without the union, see
:mod:`smoothcert.stats.gradients`) by Monte Carlo on classifiers whose gradient is known exactly, through the
soundness harness: a linear classifier with the gradient spread over every coordinate (where the l1 plug-in has
no upward bias), and extreme classifiers that put the whole gradient on one or two coordinates (half-spaces and
slabs, where the l_inf plug-in has none), in the whole space and in a rotated subspace.

The pooled mean of ``n`` samples of ``z = u (1[f(x + sigma u) = c] - 1/2)`` is simulated exactly: for a classifier
that depends on ``u`` only through ``A^T u`` (``A`` with orthonormal columns), ``z`` splits into
``A (A^T u)(f - 1/2)``, drawn sample by sample, and the part orthogonal to ``A``, which is independent of ``f`` and
sums to ``N(0, (n / 4) (I - A A^T))`` exactly.
"""

import math
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

import smoothcert.stats.gradients as fs
from smoothcert.methods.firstorder.subspace import Subspace

sys.path.insert(0, str(Path(__file__).parent))
from soundness import assert_sound, plan as soundness_plan  # noqa: E402


def _indicator(kind, t):
    """1[f = c] as a function of the relevant coordinates t (n, k) in normalized units."""
    if kind == "halfspace":  # 1[t_0 > -0.6]: g = Phi(0.6)
        return t[:, 0] > -0.6
    if kind == "slab":  # 1[|t_0 - 0.8| < 1]
        return np.abs(t[:, 0] - 0.8) < 1.0
    if kind == "wedge":  # two coordinates: 1[t_0 > -0.3 and t_1 > -0.5]
        return (t[:, 0] > -0.3) & (t[:, 1] > -0.5)
    raise ValueError(kind)


def _exact_beta_coordinates(kind):
    """E[t (1[f = c] - 1/2)] for the relevant coordinates (closed forms)."""
    phi = stats.norm.pdf
    if kind == "halfspace":
        return np.array([phi(0.6)])
    if kind == "slab":
        return np.array([phi(-0.2) - phi(1.8)])
    if kind == "wedge":
        return np.array([phi(-0.3) * stats.norm.sf(-0.5), phi(-0.5) * stats.norm.sf(-0.3)])
    raise ValueError(kind)


def simulate_means(rng, trials, n, basis, kind):
    """``trials`` pooled means (trials, d) of n samples, and the exact beta (d,), for f depending on basis^T u."""
    d, k = basis.shape
    means = np.empty((trials, d))
    for i in range(trials):
        t = rng.standard_normal((n, k))
        sign = _indicator(kind, t).astype(np.float64) - 0.5
        inside = basis @ (sign @ t)
        noise = rng.standard_normal(d) * math.sqrt(n / 4.0)
        means[i] = (inside + noise - basis @ (basis.T @ noise)) / n
    return means, basis @ _exact_beta_coordinates(kind)


def _spread(d):
    return np.full((d, 1), 1.0 / math.sqrt(d))


def _axes(d, k):
    return np.eye(d)[:, :k]


CASES = {  # name: (d, basis of the classifier's relevant directions, kind)
    "linear-spread-16": (16, _spread(16), "halfspace"),
    "halfspace-on-e0-64": (64, _axes(64, 1), "halfspace"),
    "slab-on-e0-64": (64, _axes(64, 1), "slab"),
    "wedge-on-e0-e1-32": (32, _axes(32, 2), "wedge"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_linf_and_l1_upper_bounds_cover_the_true_norms(name):
    delta, n = 0.05, 2000
    p = soundness_plan(delta)
    d, basis, kind = CASES[name]
    rng = np.random.default_rng(list(CASES).index(name))
    means, beta = simulate_means(rng, p.trials, n, basis, kind)
    misses = {"linf": fs.linf_upper(means, n, delta) < np.abs(beta).max(),
              "l1": fs.l1_upper(means, n, delta) < np.abs(beta).sum()}
    for norm, miss in misses.items():
        assert_sound(miss, p)
    # not absurdly loose: where the plug-in has no upward bias the bound is within a few tails of the truth
    if name == "linear-spread-16":
        assert np.median(fs.l1_upper(means, n, delta)) < np.abs(beta).sum() + 4 * math.sqrt(fs.KAPPA * d / n)
    if name == "halfspace-on-e0-64":
        assert np.median(fs.linf_upper(means, n, delta)) < np.abs(beta).max() + 4 * math.sqrt(fs.KAPPA / n)


def test_subspace_upper_bounds_cover_the_projected_norms():
    """||P_S beta||_inf and ||P_S beta||_1 in ambient coordinates, for a rotated plane of R^8 that contains
    most of the gradient of a half-space classifier."""
    delta, n, d = 0.05, 2000, 8
    p = soundness_plan(delta)
    rng = np.random.default_rng(7)
    w = rng.standard_normal((d, 1))
    w /= np.linalg.norm(w)
    q, _ = np.linalg.qr(np.hstack([w + 0.2 * rng.standard_normal((d, 1)), rng.standard_normal((d, 1))]))
    sub = Subspace(q)
    geo = sub.geometry((d,))
    means, beta = simulate_means(rng, p.trials, n, w, "halfspace")
    proj, truth = sub.project(means, (d,)), q @ (q.T @ beta)
    linf = fs.linf_upper(proj, n, delta, fs.KAPPA * geo.max_leverage)
    l1 = fs.l1_upper(proj, n, delta, sign_norm2=geo.sign_norm2)
    assert_sound(linf < np.abs(truth).max(), p)
    assert_sound(l1 < np.abs(truth).sum(), p)
