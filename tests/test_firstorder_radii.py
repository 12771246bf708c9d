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


# ------------------------------------------------------------------------------ near Cohen's threshold (Cor. 3.1)

def _exact_cor_3_1(q: float, m: float, dps: int = 30) -> float:
    """Corollary 3.1's radius for the float inputs taken exactly, in ``dps``-digit arithmetic (mpmath).

    Both roots are found by bisection on brackets whose signs are checked: ``w2`` from
    ``phi(Phi^-1(q + Phi(w2))) - phi(w2) = m`` (decreasing in ``w2``), then ``r`` from
    ``Phi(w1 - r) - Phi(w2 - r) = 1/2`` (decreasing for ``r >= 0``). Cohen's ``Phi^-1(q)`` when
    ``m >= phi(Phi^-1(q))`` (no admissible root).
    """
    mpmath = pytest.importorskip("mpmath")
    with mpmath.workdps(dps):
        qq, mm = mpmath.mpf(q), mpmath.mpf(m)

        def ppf(p):
            return mpmath.sqrt(2) * mpmath.erfinv(2 * p - 1)

        def bisect(f, lo, hi):
            flo, fhi = f(lo), f(hi)
            assert flo > 0 > fhi, "bracket without a sign change"
            for _ in range(4 * dps):
                mid = (lo + hi) / 2
                if f(mid) > 0:
                    lo = mid
                else:
                    hi = mid
            return lo, hi

        g0 = ppf(qq)
        if mm >= mpmath.npdf(g0):
            return float(g0)
        upper = lambda a: ppf(qq + mpmath.ncdf(a))  # noqa: E731
        lo = mpmath.mpf(-60)
        hi = -g0 - mpmath.mpf("1e-3")
        w2, _ = bisect(lambda a: mpmath.npdf(upper(a)) - mpmath.npdf(a) - mm, lo, hi)
        w1 = upper(w2)
        _, r_hi = bisect(lambda r: mpmath.ncdf(w1 - r) - mpmath.ncdf(w2 - r) - mpmath.mpf(0.5), g0 - 1, w1 + 1)
        # the end of the final bracket where the half-level is already crossed: not below the root
        return float(r_hi)


NEAR_Q = [0.51, 0.6, 0.8, 0.9, 0.99, 0.9999]
NEAR_REL = [1e-4, 1e-6, 1e-7, 3e-8, 1e-8, 1e-10, 1e-12, 0.0, -1e-12, -1e-8, -1e-4]


def _near_threshold_grid():
    """``(q, m)`` approaching ``m* = phi(Phi^-1(q))`` from below and above, plus the few floats just below it."""
    for q in NEAR_Q:
        threshold = float(stats.norm.pdf(stats.norm.ppf(q)))
        for rel in NEAR_REL:
            yield q, threshold * (1.0 - rel)
        m = threshold
        for _ in range(3):
            m = float(np.nextafter(m, 0.0))
            yield q, m


@pytest.mark.parametrize("q", NEAR_Q)
def test_l2_radius_near_cohens_threshold_is_certified_and_tight(q):
    for qq, m in _near_threshold_grid():
        if qq != q:
            continue
        r = l2_radius(q, m)  # never raises
        r0 = zeroth_order_radius(q)
        exact = _exact_cor_3_1(q, m)
        assert r >= r0
        # never above the exact radius (Cohen's fallback up to the rounding of Phi^-1 itself)
        assert r <= exact * (1.0 + 4 * np.finfo(float).eps), (q, m, r, exact)
        # and not loose: within the certification margin's effect (a few 1e-9) of the exact radius
        assert exact - r <= 1e-7, (q, m, r, exact)
        if exact - r0 > 1e-7:
            assert r > r0


def test_l2_radius_random_scan_near_threshold_never_raises():
    rng = np.random.default_rng(20240613)
    qs = rng.uniform(0.5001, 0.99999, 200)
    rels = 10.0 ** rng.uniform(-13, -4, 200) * rng.choice([-1.0, 1.0], 200, p=[0.2, 0.8])
    for q, rel in zip(qs, rels):
        m = float(stats.norm.pdf(stats.norm.ppf(q))) * (1.0 - rel)
        r = l2_radius(q, m)
        r0 = zeroth_order_radius(q)
        assert r0 <= r <= r0 + 1e-3  # m this close to the threshold leaves almost Cohen's radius
        assert vertex_radius(q, m, 0.5 * m) == r


def test_l2_radius_returns_only_certified_radii(monkeypatch):
    """With a stricter certificate the candidate root fails it; the radius returned must pass it (no give-up exit)."""
    import smoothcert.methods.firstorder.radii as radii

    exact_bound = radii._interval_bound
    penalty = 1e-3

    def stricter(a, b, q, m, r):
        return exact_bound(a, b, q, m, r) - penalty

    monkeypatch.setattr(radii, "_interval_bound", stricter)
    for q, m in [(0.8, 0.1), (0.9, 0.05), (0.6, 0.3), (0.99, 0.01)]:
        loose = _exact_cor_3_1(q, m)
        r = radii.l2_radius(q, m)
        r0 = zeroth_order_radius(q)
        assert r0 <= r < loose
        if r > r0:
            assert stricter(*l2_interval(q, m), q, m, r) >= 0.5 + radii.MARGIN
        # close to the largest radius that passes: a little further fails
        assert stricter(*l2_interval(q, m), q, m, r + 1e-6) < 0.5 + radii.MARGIN


@pytest.mark.parametrize("q", [0.6, 0.9, 0.99])
def test_vertex_radius_near_cohens_threshold(q):
    r0 = zeroth_order_radius(q)
    threshold = float(stats.norm.pdf(stats.norm.ppf(q)))
    for rel in [1e-4, 1e-8, 1e-12, 0.0, -1e-8]:
        b = threshold * (1.0 - rel)
        for low in (0.0, 0.5 * b, b):  # no perpendicular part: Corollary 3.1 with m = dual_bound
            r = vertex_radius(q, b, low)
            assert r == l2_radius(q, b)
            assert r0 <= r <= _exact_cor_3_1(q, b) * (1.0 + 4 * np.finfo(float).eps)


@pytest.mark.parametrize("rel", [1e-8, 0.0])
def test_vertex_radius_with_perpendicular_part_near_threshold(rel):
    """Theorem 3 path: certified, so the brute-force LP (an upper bound of the program's minimum) exceeds 1/2."""
    q = 0.9
    b = float(stats.norm.pdf(stats.norm.ppf(q))) * (1.0 - rel)
    r = vertex_radius(q, b, 1.2 * b)
    assert r >= zeroth_order_radius(q)
    assert _lp_brute_force(q, -b, math.sqrt(0.44) * b, r) > 0.5


def test_l2_interval_near_threshold_is_a_clear_error_or_a_root():
    for q, m in _near_threshold_grid():
        try:
            w2, w1 = l2_interval(q, m)
        except ValueError as err:
            assert "phi(Phi^-1(q))" in str(err)
            continue
        assert stats.norm.cdf(w1) - stats.norm.cdf(w2) == pytest.approx(q, abs=1e-12)
        assert stats.norm.pdf(w1) - stats.norm.pdf(w2) == pytest.approx(m, abs=1e-12)
