"""Radius solvers of seed 004 (Theorem 3, Corollary 3.1-3.4) against independent numerical solutions."""

import itertools
import math

import numpy as np
import pytest
from scipy import optimize, stats

from smoothcert.methods.firstorder.radii import (R_MAX, directional_radius, l2_interval, l2_radius, probability_lower_bound, vertex_radius, zeroth_order_radius)

CASES_1D = [(0.8, 0.1), (0.8, 0.0), (0.6, 0.3), (0.9, 0.05), (0.99, 0.01), (0.999, 0.002)]
CASES_2D = [(0.8, -0.05, 0.2, 1.5), (0.9, -0.02, 0.15, 2.0), (0.7, -0.3, 0.1, 0.6), (0.8, 0.05, 0.1, 1.2),
            (0.95, -0.05, 0.05, 2.1)]


def _fsolve_cor_3_1(q, m):
    """Corollary 3.1 as a 3x3 system in (r, w1, w2), solved from a grid of starts; all admissible roots."""
    pdf, cdf = stats.norm.pdf, stats.norm.cdf

    def eqs(v):
        r, w1, w2 = v
        return [cdf(w1 - r) - cdf(w2 - r) - 0.5, cdf(w1) - cdf(w2) - q, pdf(w1) - pdf(w2) - m]

    roots = []
    for r, w1, w2 in itertools.product([0.5, 1.5, 3.0], [0.5, 1.5, 3.0], [-0.5, -2.0, -4.0]):
        sol, _, ier, _ = optimize.fsolve(eqs, [r, w1, w2], full_output=True, xtol=1e-13)
        if ier == 1 and max(abs(np.array(eqs(sol)))) < 1e-10 and sol[1] > sol[2] and sol[0] > 0:
            roots.append(sol)
    return roots


@pytest.mark.parametrize("q, m", CASES_1D)
def test_l2_radius_solves_corollary_3_1(q, m):
    roots = _fsolve_cor_3_1(q, m)
    assert roots, "fsolve found no admissible root"
    r = l2_radius(q, m)
    for sol in roots:
        assert r == pytest.approx(sol[0], abs=1e-7)
        assert r <= sol[0] + 1e-12  # the conservative side
    w2, w1 = l2_interval(q, m)
    assert roots[0][1] == pytest.approx(w1, abs=1e-7) and roots[0][2] == pytest.approx(w2, abs=1e-7)


def test_l2_radius_against_zeroth_order():
    for q in (0.55, 0.7, 0.9, 0.99, 0.9999):
        r0 = zeroth_order_radius(q)
        assert r0 == pytest.approx(stats.norm.ppf(q))
        mmax = stats.norm.pdf(r0)
        radii = [l2_radius(q, m) for m in np.linspace(0, 1.2 * mmax, 13)]
        assert all(r >= r0 for r in radii)  # never below Cohen's radius from the same q
        assert all(a >= b for a, b in zip(radii, radii[1:]))  # a larger gradient bound never helps
        assert l2_radius(q, mmax) == r0 and l2_radius(q, 2 * mmax) == r0  # no admissible root: Cohen
        assert radii[0] > r0
    assert l2_radius(0.5, 0.0) == 0.0 and l2_radius(0.3, 0.1) == 0.0


def _lp_brute_force(q, m1, m2, r, cells=161, width=7.0):
    """Theorem 3's program on a grid of (t, e) cells with piecewise-constant f: an upper bound of its minimum."""
    edges = np.linspace(-width, width, cells + 1)
    mass = np.diff(stats.norm.cdf(edges))
    moment = -np.diff(stats.norm.pdf(edges))
    shifted = np.diff(stats.norm.cdf(edges - r))
    res = optimize.linprog(np.outer(shifted, mass).ravel(),
                           A_ub=-np.vstack([np.outer(mass, mass).ravel(), np.outer(moment, mass).ravel(),
                                            np.outer(mass, moment).ravel()]),
                           b_ub=-np.array([q, m1, m2]), bounds=(0, 1), method="highs")
    assert res.status == 0
    return res.fun


def _primal_theorem_3(q, m1, m2, r):
    """Solve eq. 4, 5a, 5b for c(t) = c0 + c1 t + c2 exp(r t - r^2/2) with fsolve; return p = E_{N(r,1)} Phi(c)."""
    t = np.linspace(-12, 12, 24001)
    dt = t[1] - t[0]
    phi = stats.norm.pdf(t)

    def c_of(c):
        return c[0] + c[1] * t + c[2] * np.exp(r * t - r * r / 2)

    def eqs(c):
        ct = c_of(c)
        return [phi @ stats.norm.cdf(ct) * dt - q, phi @ stats.norm.pdf(ct) * dt - m2,
                (t * phi) @ stats.norm.cdf(ct) * dt - m1]

    for start in itertools.product([0.5, 1, 2, 5], [0.1, 0.5, 2], [-0.05, -0.5, -2]):
        sol, _, ier, _ = optimize.fsolve(eqs, start, full_output=True, xtol=1e-12)
        if ier == 1 and max(abs(np.array(eqs(sol)))) < 1e-9 and sol[1] >= 0 and sol[2] < 0:
            return float(stats.norm.pdf(t - r) @ stats.norm.cdf(c_of(sol)) * dt)
    raise AssertionError("no admissible solution of Theorem 3's equations")


@pytest.mark.parametrize("q, m1, m2, r", CASES_2D)
def test_probability_bound_matches_theorem_3_and_a_brute_force_lp(q, m1, m2, r):
    bound = probability_lower_bound(q, m1, m2, r)
    primal = _primal_theorem_3(q, m1, m2, r)
    assert bound <= primal + 1e-9  # weak duality, with the certified quadrature
    assert bound == pytest.approx(primal, abs=1e-6)
    lp = _lp_brute_force(q, m1, m2, r)
    assert bound <= lp + 1e-9  # the grid LP restricts f, so its minimum is larger
    assert lp - bound < 2e-3
    assert bound >= stats.norm.cdf(stats.norm.ppf(q) - r)  # at least the zeroth-order value


@pytest.mark.parametrize("q, m", CASES_1D[:4])
def test_directional_radius_without_perpendicular_part_is_corollary_3_1(q, m):
    r = directional_radius(q, -m, 0.0)
    assert r <= l2_radius(q, m) + 1e-12
    assert r == pytest.approx(l2_radius(q, m), abs=2e-4)


@pytest.mark.parametrize("q, m1, m2, r", CASES_2D)
def test_directional_radius_is_the_half_level_of_theorem_3(q, m1, m2, r):
    radius = directional_radius(q, m1, m2)
    assert zeroth_order_radius(q) <= radius < R_MAX
    assert probability_lower_bound(q, m1, m2, radius) > 0.5
    # not loose: just beyond it, even a finer grid LP (an upper bound of the minimum) falls below 1/2
    assert _lp_brute_force(q, m1, m2, radius + 0.02, cells=201) < 0.5
    # the certified probability decreases along the ray (the region is convex, seed 004 Prop. 1)
    values = [probability_lower_bound(q, m1, m2, s) for s in np.linspace(0.05, radius, 8)]
    assert all(a >= b - 1e-9 for a, b in zip(values, values[1:]))


def test_vertex_radius_uses_the_perpendicular_gradient():
    q = 0.8
    r0 = zeroth_order_radius(q)
    no_perp = vertex_radius(q, 0.02, 0.0)
    assert no_perp == l2_radius(q, 0.02)
    with_perp = [vertex_radius(q, 0.02, low) for low in (0.05, 0.15, 0.25)]
    assert all(r >= no_perp - 2e-4 for r in with_perp)
    assert with_perp[-1] > with_perp[0] > r0
    # infeasible bounds (perpendicular part beyond phi(Phi^-1(q))): fall back to the zeroth order
    assert vertex_radius(q, 0.0, 0.5) == r0
    assert directional_radius(q, -0.01, stats.norm.pdf(r0) * 1.01) == r0


def test_bad_input():
    with pytest.raises(ValueError, match="q"):
        l2_radius(1.5, 0.1)
    with pytest.raises(ValueError, match="m"):
        l2_radius(0.8, -0.1)
    with pytest.raises(ValueError, match="m2"):
        directional_radius(0.8, 0.0, -1.0)
    with pytest.raises(ValueError):
        l2_interval(0.8, 0.5)
    assert math.isfinite(directional_radius(0.9, -0.1, 0.1))
