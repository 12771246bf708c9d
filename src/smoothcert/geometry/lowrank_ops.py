"""Distances and intersection tests for low-rank ellipsoids, in O(d k^2) time and O(d k) memory.

Both answers are certified by a hyperplane, so the search that finds it only costs tightness, never soundness.
For a region ``E = {c + A v : ||v|| <= 1}`` (:class:`~smoothcert.geometry.lowrank.Factored`, ``A = diag(s)
(I + Q G Q^T)``, covariance ``Sigma = A A^T = diag(s^2) + W H W^T``) the support function is
``h(z) = ||A^T z||`` (:func:`~smoothcert.geometry.lowrank.support`, canonical reductions), and

* **distance** (seed 000 eq. 3.17, in dual form): for every ``z != 0`` and every ``y`` in ``E``,
  ``||p - y|| >= z . (p - y) / ||z|| >= (z . (p - c) - h(z)) / ||z||``. The bound is the distance when ``z`` is
  the outward normal at the nearest point: ``z = (Sigma + mu I)^-1 (p - c)`` with ``mu`` the root of the
  secular equation ``z^T Sigma z = 1`` (the nearest point is ``Sigma z``), found by bisection; the inverse is
  Woodbury's, ``(D + W H W^T)^-1 = D^-1 - D^-1 W H (I + W^T D^-1 W H)^-1 W^T D^-1`` (k x k solves). The value
  returned is the larger bound at the two ends of the final bracket, less a rounding allowance.
* **intersection** (eq. 4.9(3)): ``K(t) = 1 - delta^T M(t)^-1 delta`` with ``M(t) = Sigma_a / t + Sigma_b / (1 - t)``
  = diagonal + rank ``k_a + k_b`` (Woodbury again), minimized by golden-section search; the direction
  ``w = M(t*)^-1 delta`` separates whenever ``K(t*) < 0`` (Cauchy-Schwarz: ``h_a(w) + h_b(w) <= sqrt(w^T M w)``),
  and "disjoint" is returned only when ``w . delta - h_a(w) - h_b(w)`` exceeds the rounding allowance.

A ball (``s = r``, ``k = 0``) and an axis-aligned ellipsoid (``s = a``, ``k = 0``) take the same form, so a low-rank
region is tested against either. Against an ellipsoid with a dense basis or an l1 region the pair is reported as
possibly intersecting (the safe answer; memory then shrinks the new region to a ball).

Canonical per row: each (point, region) or (region, region) row is computed alone, from that row's tensors, with
fixed shapes and the canonical reductions (k x k solves aside, which see the same bits in any batch), so a
distance or a verdict is the same bits alone or in any batch (memory-based certification relies on it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from smoothcert.geometry.lowrank import Factored, LowRankEllipsoid, gram, support
from smoothcert.geometry.linalg import rounding_allowance
from smoothcert.geometry.reductions import fixed_norm, fixed_sum
from smoothcert.geometry.regions import Ball, Ellipsoid, Region

__all__ = ["as_factored", "lowrank_distances", "lowrank_disjoint"]

_UNDERFLOW = 1e-140


def as_factored(region: Region) -> Factored | None:
    """The region in the shared low-rank form, or None (a dense-basis ellipsoid, an l1 region)."""
    if isinstance(region, LowRankEllipsoid):
        return region.factored()
    c = region.center
    empty_q = torch.zeros((region.dim, 0), dtype=torch.float64, device=c.device)
    empty_g = torch.zeros(0, dtype=torch.float64, device=c.device)
    if isinstance(region, Ball):
        r = float(region.radius)
        return Factored(c, torch.full_like(c, r), empty_q, empty_g, r)
    if isinstance(region, Ellipsoid) and region.basis is None:
        return Factored(c, region.semi_axes, empty_q, empty_g, float(region.semi_axes.max()))
    return None


def _allowance(d: int, k: int) -> float:
    return rounding_allowance(d + k) * (1.0 + k)


class _Shape:
    """``D + W H W^T`` with ``D = base + mu`` (or a combination over ``t``): Woodbury solves for one row."""

    def __init__(self, w: torch.Tensor, h: torch.Tensor, g: torch.Tensor | None = None):
        self.w, self.h = w, h
        self.k = w.shape[1]
        self.eye = torch.eye(self.k, dtype=torch.float64, device=w.device)
        self.g = g if g is not None or not self.k else gram(w)  # W^T W, for a constant D

    def solve(self, diag: torch.Tensor, rhs: torch.Tensor, constant: bool) -> torch.Tensor:
        """``(diag(diag) + W H W^T)^-1 rhs``; ``constant``: every entry of ``diag`` is the same."""
        x = rhs / diag
        if not self.k:
            return x
        wd = self.w / diag[:, None]
        c = self.g / diag[0] if constant else fixed_sum(wd[:, :, None] * self.w[:, None, :], dim=0)
        wx = fixed_sum(self.w * x[:, None], dim=0)
        y = torch.linalg.solve(self.eye + c @ self.h, wx)
        return x - fixed_sum(wd * (self.h @ y)[None, :], dim=1)

    def quad(self, alpha: float, r: torch.Tensor, n2: float) -> tuple[float, float]:
        """``(z . b, ||z||^2)`` for ``z = (alpha I + W H W^T)^-1 b``, from ``r = W^T b`` and ``n2 = ||b||^2`` only
        (k x k work): ``y = (alpha I + G H)^-1 r``, ``z = (b - W H y) / alpha``."""
        if not self.k:
            return n2 / alpha, n2 / (alpha * alpha)
        y = torch.linalg.solve(alpha * self.eye + self.g @ self.h, r)
        hy = self.h @ y
        rhy = float(r @ hy)
        return (n2 - rhy) / alpha, (n2 - 2.0 * rhy + float(hy @ (self.g @ hy))) / (alpha * alpha)


def _distance(p: torch.Tensor, f: Factored, iters: int = 100) -> float:
    v = p - f.center
    norm_v = float(fixed_norm(v))
    if norm_v == 0.0:
        return 0.0
    if f.outer <= 0.0:  # a point
        return norm_v * (1.0 - _allowance(f.dim, f.rank))
    w, h = f.shape_factors()
    shape = _Shape(w, h)
    s2 = f.s * f.s
    constant = bool((s2 == s2[0]).all())
    r = fixed_sum(w * v[:, None], dim=0)

    def z_of(mu: float) -> torch.Tensor:
        return shape.solve(s2 + mu, v, constant)

    def level(mu: float) -> float:  # z^T Sigma z = z.v - mu ||z||^2
        if constant:
            zv, zz = shape.quad(float(s2[0]) + mu, r, norm_v * norm_v)
        else:
            z = z_of(mu)
            zv, zz = float(fixed_sum(z * v)), float(fixed_sum(z * z))
        return zv - mu * zz

    def bound(z: torch.Tensor) -> float:
        nz = float(fixed_norm(z))
        if not nz > 0.0 or not math.isfinite(nz):
            return 0.0
        return (float(fixed_sum(z * v)) - float(support(f, z[None])[0])) / nz

    if bool((s2 > 0).all()) and level(0.0) <= 1.0:
        return 0.0  # inside (or within rounding of it)
    lo, hi = 0.0, norm_v * f.outer * (1.0 + 1e-9)  # z^T Sigma z <= ||v||^2 sigma_max^2 / mu^2 <= 1 at hi
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if mid <= lo or mid >= hi:
            break
        if level(mid) > 1.0:
            lo = mid
        else:
            hi = mid
    best = max(bound(z_of(hi)), bound(z_of(lo)) if lo > 0 else 0.0)
    return max(0.0, best - _allowance(f.dim, f.rank) * (norm_v + f.outer))


def lowrank_distances(points: torch.Tensor, regions: Sequence[Region]) -> torch.Tensor:
    """Lower bounds of ``dist(points[i], regions[i])`` (0 inside), float64 (n,); each row computed alone."""
    out = torch.empty(len(regions), dtype=torch.float64, device=points.device)
    for i, region in enumerate(regions):
        f = as_factored(region)
        if f is None:
            raise TypeError(f"no low-rank form for {type(region).__name__}")
        out[i] = _distance(points[i].clone(), f)
    return out


def _k_min(fa: Factored, fb: Factored, delta: torch.Tensor, iters: int = 100) -> tuple[float, torch.Tensor]:
    """Golden-section minimum of ``K(t)`` on (0, 1); returns (K at the best t, ``M(t)^-1 delta`` there)."""
    wa, ha = fa.shape_factors()
    wb, hb = fb.shape_factors()
    ka, kb = fa.rank, fb.rank
    w = torch.cat([wa, wb], dim=1)
    sa2, sb2 = fa.s * fa.s, fb.s * fb.s
    constant = bool((sa2 == sa2[0]).all()) and bool((sb2 == sb2[0]).all())
    floor = 1e-300 + 1e-18 * float(torch.maximum(sa2, sb2).max())
    gw = gram(w) if w.shape[1] else None
    r = fixed_sum(w * delta[:, None], dim=0) if w.shape[1] else None
    n2 = float(fixed_sum(delta * delta))
    eval_cache: dict[float, float] = {}

    def parts(t: float) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.zeros((ka + kb, ka + kb), dtype=torch.float64, device=delta.device)
        h[:ka, :ka], h[ka:, ka:] = ha / t, hb / (1.0 - t)
        return h, (sa2 / t + sb2 / (1.0 - t)).clamp_min(floor)

    def evaluate(t: float) -> float:
        if t not in eval_cache:
            h, diag = parts(t)
            shape = _Shape(w, h, gw)
            if constant:
                zd = shape.quad(float(diag[0]), r, n2)[0] if r is not None else n2 / float(diag[0])
            else:
                zd = float(fixed_sum(shape.solve(diag, delta, False) * delta))
            eval_cache[t] = 1.0 - zd
        return eval_cache[t]

    g = (math.sqrt(5.0) - 1.0) / 2.0
    lo, hi = 0.0, 1.0
    x1, x2 = hi - g * (hi - lo), lo + g * (hi - lo)
    f1, f2 = evaluate(x1), evaluate(x2)
    for _ in range(iters):
        if hi - lo <= 1e-15:
            break
        if f1 < f2:
            hi, x2, f2 = x2, x1, f1
            x1 = hi - g * (hi - lo)
            f1 = evaluate(x1)
        else:
            lo, x1, f1 = x1, x2, f2
            x2 = lo + g * (hi - lo)
            f2 = evaluate(x2)
    t_best, k_best = min(eval_cache.items(), key=lambda item: (item[1], item[0]))
    h, diag = parts(t_best)
    return k_best, _Shape(w, h, gw).solve(diag, delta, constant)


def _separated(fa: Factored, fb: Factored, delta: torch.Tensor, w: torch.Tensor) -> bool:
    """``w . delta - h_a(w) - h_b(w)`` beyond the rounding allowance (canonical)."""
    gap = float(fixed_sum(w * delta)) - float(support(fa, w[None])[0]) - float(support(fb, w[None])[0])
    scale = float(fixed_norm(w)) * (float(fixed_norm(delta)) + 2.0 * (fa.outer + fb.outer))
    return gap > _allowance(delta.numel(), fa.rank + fb.rank) * scale + _UNDERFLOW


def lowrank_disjoint(region: Region, regions: Sequence[Region]) -> torch.Tensor:
    """Per region of ``regions``: certainly disjoint from ``region``? Boolean (n,) on the CPU (see the module
    docstring; pairs without a low-rank form on both sides answer False)."""
    out = torch.zeros(len(regions), dtype=torch.bool)
    fa = as_factored(region)
    if fa is None:
        return out
    for i, other in enumerate(regions):
        fb = as_factored(other)
        if fb is None:
            continue
        fb = Factored(fb.center.to(fa.center.device), fb.s.to(fa.center.device), fb.q.to(fa.center.device),
                      fb.gamma.to(fa.center.device), fb.outer)
        delta = fb.center - fa.center
        k, w = _k_min(fa, fb, delta)
        out[i] = k < 0 and _separated(fa, fb, delta, w)
    return out
