"""Certified radii from zeroth- and first-order information of a Gaussian-smoothed classifier (seed 004 sec. 3.2).

Normalized units throughout: distances are in units of ``sigma`` and ``beta = sigma * grad g(x)``; multiply
a radius by ``sigma`` to get input units. ``q`` is a lower bound of ``g(x) = P(f(x + w) = c_A)``.

**Theorem 3 as a linear program.** Move by ``r`` along a unit direction ``v``; ``t = v^T u`` and ``e`` (unit
direction of the part of ``beta`` orthogonal to ``v``) are independent ``N(0, 1)`` coordinates. The smallest
value at ``x + sigma r v`` of any smoothed classifier ``h = f * N(0, sigma^2 I)`` with
``E f >= q``, ``E[t f] >= m1`` and ``E[e f] >= m2`` (bounds that the true ``f`` satisfies when
``m1 <= v^T beta`` and ``m2 <= ||beta - (v^T beta) v||``) is

    p(r) = min_{0 <= f <= 1} E_0[f L_r],   L_r(t) = exp(r t - r^2 / 2).

Its Lagrange dual is, for any ``lam >= 0`` (weak duality: ``E_0[f L] >= lam.b + E_0[f (L - lam.a)]``),

    D(lam) = lam0 q + lam1 m1 + lam2 m2 - E_t[ psi(lam0 + lam1 t - L_r(t), lam2) ],
    psi(a, s) = E_e[(a + s e)_+] = a Phi(a / s) + s phi(a / s),

so *every* ``lam >= 0`` gives a valid lower bound of ``p(r)``; the optimum has the form of seed 004's
``c(x) = c0 + c1 x + c2 e^{r x}`` (``c0 = lam0 / lam2``, ``c1 = lam1 / lam2``, ``c2 = -e^{-r^2/2} / lam2``;
``lam1 = 0`` is the paper's "``c1 < 0``" case). :func:`probability_lower_bound` maximizes ``D`` (it is
concave) on a fixed quadrature, then evaluates it again with adaptive quadrature, its error estimate and a
bound on the truncated tails subtracted, so numerical error only lowers the bound.

**Corollary 3.1 (l2).** With ``m2 = 0`` and ``m1 = -m``, ``m >= ||beta||_2``, the optimal ``f`` is the
indicator of an interval ``[w2, w1]`` that does not depend on ``r``:
``Phi(w1) - Phi(w2) = q`` and ``phi(w1) - phi(w2) = m`` (seed 004 eq. 7a, 7b; the printed 7b lost the sign
that eq. 5b gives for ``v = -beta / ||beta||``), and ``Phi(w1 - r) - Phi(w2 - r) = 1/2`` (eq. 6). If
``m >= phi(Phi^-1(q))`` the gradient constraint is inactive and the radius is Cohen's ``Phi^-1(q)``.

**Corollaries 3.2-3.4 (l1, l_inf, subspaces).** The certified region is convex (seed 004 Proposition 1), so a
polytope ball is certified once its vertices are; the worst vertex has ``v^T beta >= -B`` with ``B`` an upper
bound of the dual norm (l1: ``||beta||_inf``; l_inf: ``||beta||_1 / sqrt(d)``; subspace: the same in the
subspace's coordinates) and ``||beta_perp|| >= sqrt(L^2 - B^2)`` with ``L`` a lower bound of ``||beta||_2``.
See :func:`vertex_radius`.

Every radius routine returns the conservative end of its bracket, and never less than the zeroth-order
radius ``Phi^-1(q)`` (the zeroth-order program has fewer constraints, hence a smaller minimum).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from scipy import integrate, optimize, special, stats

__all__ = [
    "zeroth_order_radius", "l2_interval", "l2_radius", "probability_lower_bound", "directional_radius",
    "vertex_radius", "R_MAX",
]

#: Largest normalized radius any routine reports (a cap is conservative: the region only shrinks).
R_MAX: float = 20.0
#: Probabilities are certified above ``1/2 + MARGIN``.
MARGIN: float = 1e-9
_SQRT_2PI = math.sqrt(2.0 * math.pi)
_T = 10.0  # quadrature range in t; the tails beyond are bounded explicitly


def _check_q(q: float) -> float:
    q = float(q)
    if not (0.0 <= q <= 1.0) or math.isnan(q):
        raise ValueError(f"q (lower bound of P(f(x + noise) = c_A)) must lie in [0, 1], got {q!r}")
    return q


def _check_nonneg(name: str, value: float) -> float:
    value = float(value)
    if math.isnan(value) or value < 0:
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    return value


def zeroth_order_radius(q: float) -> float:
    """Cohen's normalized radius ``Phi^-1(q)`` (seed 000 eq. 3.3); 0 when ``q <= 1/2`` (abstain)."""
    q = _check_q(q)
    return float(stats.norm.ppf(q)) if q > 0.5 else 0.0


# ---------------------------------------------------------------------------------------------- l2 (Cor 3.1)

def _interval(q: float, m: float) -> tuple[float, float] | None:
    """``(w2, w1)`` of :func:`l2_interval` for valid ``q, m``; None when float64 cannot resolve it.

    Within a few ulps of ``m = phi(Phi^-1(q))`` the root ``w2`` runs off to ``-inf`` (the limit is Cohen's
    half-line ``(-inf, Phi^-1(q)]``) and the bracket's ends no longer differ in sign.
    """
    g0 = float(stats.norm.ppf(q))
    tail = float(stats.norm.sf(g0))

    def upper(a: float) -> float:
        return float(stats.norm.isf(max(tail - stats.norm.cdf(a), 0.0)))

    def moment_excess(a: float) -> float:
        return float(stats.norm.pdf(upper(a)) - stats.norm.pdf(a) - m)

    lo, hi = -40.0, -g0
    if not (moment_excess(lo) > 0.0 > moment_excess(hi)):
        return None
    a = optimize.brentq(moment_excess, lo, hi, xtol=1e-14, rtol=1e-15)
    return float(a), upper(a)


def l2_interval(q: float, m: float) -> tuple[float, float]:
    """The worst-case interval ``[w2, w1]`` of Corollary 3.1: ``Phi(w1) - Phi(w2) = q``, ``phi(w1) - phi(w2) = m``.

    Requires ``1/2 < q < 1`` and ``0 <= m < phi(Phi^-1(q))``. With ``w2 = A``, ``w1 = B(A) = Phi^-1(q + Phi(A))``
    the function ``phi(B) - phi(A)`` decreases strictly in ``A`` (derivative ``phi(A) (A - B) < 0``) from
    ``phi(Phi^-1(q))`` to ``-phi(Phi^-1(q))``, so the root is unique and bracketed. A ValueError also when ``m``
    lies within float64 rounding of ``phi(Phi^-1(q))``, where ``w2`` is not resolvable.
    """
    q = _check_q(q)
    m = _check_nonneg("m (upper bound of sigma ||grad g||_2)", m)
    if not (0.5 < q < 1.0) or m >= stats.norm.pdf(stats.norm.ppf(q)):
        raise ValueError(f"need 1/2 < q < 1 and m < phi(Phi^-1(q)); got q={q}, m={m}")
    interval = _interval(q, m)
    if interval is None:
        raise ValueError(f"m={m!r} lies within float64 rounding of phi(Phi^-1(q))={stats.norm.pdf(stats.norm.ppf(q))!r}"
                         f" (q={q}): w2 is not resolvable; give a smaller m")
    return interval


def _interval_bound(a: float, b: float, q: float, m: float, r: float) -> float:
    """Dual value ``D(lam)`` of the 1-D program for the line through ``(a, L(a))`` and ``(b, L(b))``.

    Valid for any ``a < b`` (not only the exact interval): residuals of the constraints are added with their
    multipliers, so rounding in ``a``, ``b`` cannot inflate the bound.
    """
    la, lb = math.exp(r * a - r * r / 2), math.exp(r * b - r * r / 2)
    lam1 = (lb - la) / (b - a)
    lam0 = la - lam1 * a
    if lam0 < 0 or lam1 < 0:
        return -math.inf
    mass = stats.norm.cdf(b) - stats.norm.cdf(a)
    moment = stats.norm.pdf(a) - stats.norm.pdf(b)
    shifted = stats.norm.cdf(b - r) - stats.norm.cdf(a - r)
    return float(lam0 * (q - mass) + lam1 * (-m - moment) + shifted)


def l2_radius(q: float, m: float) -> float:
    """Corollary 3.1: normalized first-order l2 radius from ``q <= g(x)`` and ``m >= sigma ||grad g(x)||_2``.

    Solves eq. 6-7 (see :func:`l2_interval`); ``Phi(w1 - r) - Phi(w2 - r)`` decreases for ``r >= 0`` (the interval
    is centred at ``(w1 + w2) / 2 <= 0``), so the root, taken ``2 MARGIN`` above 1/2, is bracketed in
    ``[Phi^-1(q), w1 + 1]``. A radius is returned only once certified: its exact dual value
    (:func:`_interval_bound`, weak duality) must reach ``1/2 + MARGIN``; otherwise bisection between Cohen's
    radius (certified by the zeroth-order theorem) and the candidate keeps the largest certified ``r``. So the
    result never exceeds the exact Corollary 3.1 radius. Cohen's radius ``Phi^-1(q)`` is returned when
    ``m >= phi(Phi^-1(q))`` (no admissible root) and when the first-order system degenerates near that
    threshold (``w2`` not resolvable in float64, or a gain below the ``MARGIN`` resolution). Never below
    :func:`zeroth_order_radius`.
    """
    q = _check_q(q)
    m = _check_nonneg("m (upper bound of sigma ||grad g||_2)", m)
    r0 = min(zeroth_order_radius(q), R_MAX)
    if q <= 0.5 or q >= 1.0 or m >= stats.norm.pdf(stats.norm.ppf(q)):
        return r0
    interval = _interval(q, m)
    if interval is None:
        return r0
    a, b = interval

    def excess(r: float) -> float:
        return stats.norm.cdf(b - r) - stats.norm.cdf(a - r) - 0.5 - 2.0 * MARGIN

    def certified(r: float) -> bool:
        return _interval_bound(a, b, q, m, r) >= 0.5 + MARGIN

    if not excess(r0) > 0.0:  # the first-order gain is below the certification margin
        return r0
    hi = min(b + 1.0, R_MAX)
    r = hi if excess(hi) > 0 else optimize.brentq(excess, r0, hi, xtol=1e-12, rtol=1e-12)
    if certified(r):
        return float(r)
    lo = r0  # certified (Cohen); every update of lo is certified too
    for _ in range(100):
        mid = 0.5 * (lo + r)
        if not lo < mid < r:
            break
        if certified(mid):
            lo = mid
        else:
            r = mid
    return float(lo)


# --------------------------------------------------------------------------------------- Theorem 3 (general)

def _fast_rule(panels: int = 64, order: int = 12) -> tuple[np.ndarray, np.ndarray]:
    x, w = np.polynomial.legendre.leggauss(order)
    edges = np.linspace(-_T, _T, panels + 1)
    mid, half = (edges[1:] + edges[:-1]) / 2, (edges[1:] - edges[:-1]) / 2
    nodes = (mid[:, None] + half[:, None] * x[None]).ravel()
    weights = (half[:, None] * w[None]).ravel() * np.exp(-nodes**2 / 2) / _SQRT_2PI
    return nodes, weights


_NODES, _WEIGHTS = _fast_rule()


def _psi_terms(a: np.ndarray, s: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``psi(a, s) = E(a + s e)_+``, ``d psi / d a = Phi(a / s)`` and ``d psi / d s = phi(a / s)``."""
    if s <= 0.0:
        pos = (a > 0).astype(np.float64)
        return np.maximum(a, 0.0), pos, np.zeros_like(a)
    z = a / s
    cdf = special.ndtr(z)
    pdf = np.exp(-0.5 * np.minimum(z * z, 1e4)) / _SQRT_2PI
    return a * cdf + s * pdf, cdf, pdf


def _dual(lam: np.ndarray, q: float, m1: float, m2: float, r: float) -> tuple[float, np.ndarray]:
    t, w = _NODES, _WEIGHTS
    a = lam[0] + lam[1] * t - np.exp(r * t - r * r / 2)
    psi, cdf, pdf = _psi_terms(a, float(lam[2]))
    value = lam[0] * q + lam[1] * m1 + lam[2] * m2 - w @ psi
    grad = np.array([q - w @ cdf, m1 - w @ (t * cdf), m2 - w @ pdf])
    return float(value), grad


def _maximize(q: float, m1: float, m2: float, r: float, start: np.ndarray | None) -> np.ndarray:
    scale = math.exp(r * float(stats.norm.ppf(q)) - r * r / 2)  # Cohen's lam0: a natural unit
    x0 = np.array([1.0, 1e-3, 1e-3]) if start is None else np.maximum(start / scale, 0.0)

    def objective(mu):
        value, grad = _dual(mu * scale, q, m1, m2, r)
        return -value, -grad * scale

    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        res = optimize.minimize(objective, x0, jac=True, method="L-BFGS-B", bounds=[(0.0, None)] * 3,
                                options={"maxiter": 400, "ftol": 1e-14, "gtol": 1e-11})
    return np.maximum(res.x, 0.0) * scale


def _certified_dual(lam: np.ndarray, q: float, m1: float, m2: float, r: float) -> float:
    """``D(lam)`` with the expectation bounded from above: adaptive quadrature + its error + the tails."""
    lam0, lam1, lam2 = (float(v) for v in lam)

    def integrand(t: float) -> float:
        a = lam0 + lam1 * t - math.exp(r * t - r * r / 2)
        if lam2 <= 0.0:
            psi = max(a, 0.0)
        else:
            z = a / lam2
            psi = a * 0.5 * math.erfc(-z / math.sqrt(2.0)) + lam2 * math.exp(-0.5 * min(z * z, 1e4)) / _SQRT_2PI
        return psi * math.exp(-t * t / 2) / _SQRT_2PI

    # kinks/steep parts sit where the line lam0 + lam1 t meets the convex exp(r t - r^2/2)
    grid = np.linspace(-_T, _T, 2001)
    sign = np.sign(lam0 + lam1 * grid - np.exp(r * grid - r * r / 2))
    points = grid[:-1][np.diff(sign) != 0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", integrate.IntegrationWarning)
        value, err = integrate.quad(integrand, -_T, _T, points=points if len(points) else None,
                                    epsabs=1e-13, epsrel=1e-11, limit=400)
    tail = 2.0 * (lam0 + lam2 / _SQRT_2PI) * stats.norm.sf(_T) + 2.0 * lam1 * stats.norm.pdf(_T)
    return lam0 * q + lam1 * m1 + lam2 * m2 - (value + abs(err) + tail + 1e-12 * (lam0 + lam1 + lam2))


def probability_lower_bound(q: float, m1: float, m2: float, r: float) -> float:
    """Theorem 3: a certified lower bound of ``p_x(x + sigma r v)`` given ``q``, ``m1 <= v^T beta``, ``m2 <=
    ||beta_perp||``.

    The dual of the program in the module docstring, maximized over ``lam >= 0`` and evaluated with the
    expectation bounded from above. Always at least the zeroth-order value ``Phi(Phi^-1(q) - r)``.
    """
    q = _check_q(q)
    m2 = _check_nonneg("m2", m2)
    r = _check_nonneg("r", r)
    cohen = float(stats.norm.cdf(stats.norm.ppf(q) - r)) if 0 < q < 1 else q
    if not (0.0 < q < 1.0) or r == 0.0:
        return q if r == 0.0 else cohen
    lam = _maximize(q, float(m1), m2, r, None)
    return max(_certified_dual(lam, q, float(m1), m2, r), cohen)


def directional_radius(q: float, m1: float, m2: float, *, tol: float = 2e-5, r_max: float = R_MAX) -> float:
    """Largest normalized ``r`` with certified ``p_x(x + sigma r v) > 1/2`` (Theorem 3), given the bounds
    ``q <= g(x)``, ``m1 <= v^T beta`` and ``0 <= m2 <= ||beta_perp||``.

    Bisection on ``r`` from Cohen's radius (always certified) with the dual maximized on a fast quadrature;
    the returned ``r`` is re-certified with :func:`_certified_dual` and lowered until it passes. When the
    bounds are inconsistent (``m2 >= phi(Phi^-1(q))``: no feasible classifier, so the bounds failed) it falls
    back to the zeroth-order radius. Capped at ``r_max``.
    """
    q = _check_q(q)
    m2 = _check_nonneg("m2", m2)
    m1 = float(m1)
    r0 = zeroth_order_radius(q)
    if q <= 0.5 or q >= 1.0 or m2 >= stats.norm.pdf(r0) or math.isnan(m1):
        return min(r0, r_max)
    if m1 > 0 and math.hypot(m1, m2) >= stats.norm.pdf(r0):
        return min(r0, r_max)

    def fast(r: float, start):
        lam = _maximize(q, m1, m2, r, start)
        return _dual(lam, q, m1, m2, r)[0], lam

    def bisect(threshold: float, lo: float, lam_lo, hi: float):
        """Largest ``r`` in ``[lo, hi]`` (to ``tol``) whose fast dual value reaches ``threshold``."""
        if hi <= lo:
            return lo, lam_lo
        while hi - lo > tol:
            mid = 0.5 * (lo + hi)
            value, lam = fast(mid, lam_lo)
            if value >= threshold:
                lo, lam_lo = mid, lam
            else:
                hi = mid
        return lo, lam_lo

    threshold = 0.5 + 1e-7
    lo, lam_lo = r0, None
    hi = min(r0 + 0.5, r_max)
    while True:  # bracket: double the step until the fast value drops below 1/2 (or the cap)
        value, lam = fast(hi, lam_lo)
        if value < threshold:
            break
        lo, lam_lo = hi, lam
        if hi >= r_max:
            break
        hi = min(r0 + 2.0 * (hi - r0), r_max)
    lo, lam_lo = bisect(threshold, lo, lam_lo, hi)
    # re-certify rigorously; where the fast quadrature was optimistic, raise the threshold and search again
    for _ in range(8):
        if lo <= r0 or lam_lo is None:
            return r0
        value = _certified_dual(lam_lo, q, m1, m2, lo)
        if value >= 0.5 + MARGIN:
            return float(lo)
        threshold += 2.0 * max(_dual(lam_lo, q, m1, m2, lo)[0] - value, 1e-7)
        lo, lam_lo = bisect(threshold, r0, None, lo)
    return r0


def vertex_radius(q: float, dual_bound: float, l2_lower: float, *, tol: float = 2e-5) -> float:
    """Normalized radius along the worst vertex direction ``v`` of a polytope ball (Corollaries 3.2-3.4).

    ``dual_bound`` bounds ``|v^T beta|`` from above for every vertex direction (a unit vector);
    ``l2_lower`` bounds ``||beta||_2`` from below. Uses ``m1 = -dual_bound`` and
    ``m2 = sqrt(max(l2_lower^2 - dual_bound^2, 0))`` in :func:`directional_radius`; the caller divides by the
    vertex's l2 length per unit l_p radius (``sqrt(d)`` for l_inf).
    """
    b = _check_nonneg("dual_bound", dual_bound)
    low = _check_nonneg("l2_lower", l2_lower)
    m2 = math.sqrt(max(low * low - b * b, 0.0))
    if m2 == 0.0:
        return l2_radius(q, b)
    return directional_radius(q, -b, m2, tol=tol)
