"""Geometry of certified regions: the l1 region, point-to-region distances and region intersection.

These are the geometric steps of memory-based certification (seed 000 Algorithm 1, sections 3.3.4, 4.6):

* :func:`distance_to_region` / :func:`distances` -- the l2 distance from a point to a ball, an ellipsoid or an
  l1 region (0 inside). For an ellipsoid this is the projection problem of seed 000 eq. 3.17, solved through
  the secular equation (eq. 3.18 for an axis-aligned ellipsoid, eq. 4.10 for a rotated one, written in the
  ellipsoid's own basis where both are the same O(d) sum). The root is bracketed and the distance is taken
  at the lower end of the bracket, so the value returned never exceeds the true distance.
* :func:`largest_ball_outside` -- ``LargestOutSubset`` of Algorithm 1 (eq. 3.19): the radius of the largest
  l2 ball around a point that does not meet a region, strictly below the distance.
* :func:`intersects` / :func:`intersects_each` -- ``Intersect`` of Algorithm 1. Two ellipsoids
  ``E_a = {(x-a)^T A (x-a) <= 1}``, ``E_b`` likewise, are disjoint iff ``min_{t in (0,1)} K(t) < 0`` with
  ``K(t) = 1 - (b-a)^T [ B^-1 / (1-t) + A^-1 / t ]^-1 (b-a)`` (eq. 4.9(3); eq. 3.16 in the diagonal case),
  where ``A^-1 = U diag(axes^2) U^T`` is the *squared* shape. One simultaneous diagonalization of ``A^-1``
  and ``B^-1`` turns ``K`` into an O(d) sum that is minimized by golden-section search (``K`` is convex).

Soundness: every answer errs toward "the regions may intersect" and toward smaller distances. A "disjoint"
verdict is only returned with a certificate checked in exact form: a direction ``w`` with
``|w . (c_b - c_a)| > h_a(w) + h_b(w)``, where ``h`` is the support function (``r ||w||`` for a ball,
``||a * U^T w||`` for an ellipsoid ``{c + U (a * u) : ||u|| <= 1}``, ``max_i a_i |w_i|`` for an l1 region),
less a float64 rounding allowance. For ellipsoids that direction is ``M(t*)^-1 (b - a)`` at the minimizer of
``K``: whenever ``K(t) < 0`` it separates (Cauchy-Schwarz), so the check only rejects what rounding blurs.
Two l1 regions use the l1 analogue of ``K`` (a concave piecewise-linear ``phi(t)``, maximized exactly by
sorting its breakpoints); an ellipsoid and an l1 region find ``w`` by accelerated alternating projections
(pairs closer than ``1e-9`` of their scale count as intersecting); a ball uses the exact distance test.
Distances subtract a rounding allowance and, for a basis that is orthonormal only up to a tolerance,
``||U^T U - I||_F * (||p - c|| + max a)``, which keeps them lower bounds for the region ``{c + U (a * u)}``
as given.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .regions import Ball, Ellipsoid, Region

__all__ = [
    "CrossPolytope", "distance_to_region", "distances", "largest_ball_outside", "intersects", "intersects_each",
    "k_function", "basis_error", "outer_radius", "inscribed_lower",
]

_EPS = float(torch.finfo(torch.float64).eps)
_BALL, _ELLIPSOID, _L1 = "ball", "ellipsoid", "l1"
_BASIS_ERRORS: dict[int, tuple[weakref.ref, int, float]] = {}  # id -> (tensor ref, its version, error)
_SHRINK = 1e-10  # relative margin that keeps a ball strictly inside the distance (eq. 3.19's epsilon)


def _rounding(d: int) -> float:
    """A generous relative error allowance for an O(d) float64 reduction or matrix-vector product."""
    return 64.0 * (d + 4) * _EPS


@dataclass(frozen=True, eq=False)
class CrossPolytope(Region):
    """The axis-aligned l1 region ``{c + diag(a) v : ||v||_1 <= 1} = {y : sum_i |y_i - c_i| / a_i <= 1}``.

    ANCER's l1 certificate (uniform noise, seed 000 section 3.3.3 with p = 1): the "ellipsoid" of the l1 norm.
    It lies inside the l2 ellipsoid with the same axes (``||v||_2 <= ||v||_1``). A zero semi-axis admits only
    points with no component along it.
    """

    center: torch.Tensor
    semi_axes: torch.Tensor

    def __post_init__(self) -> None:
        c = self.center.detach().reshape(-1).to(torch.float64)
        a = self.semi_axes.detach().reshape(-1).to(dtype=torch.float64, device=c.device)
        if a.numel() != c.numel():
            raise ValueError(f"an l1 region needs one semi-axis per dimension: {a.numel()} axes for d={c.numel()}")
        if not bool(torch.isfinite(a).all()) or bool((a < 0).any()):
            raise ValueError("an l1 region's semi-axes must be finite and >= 0")
        object.__setattr__(self, "center", c)
        object.__setattr__(self, "semi_axes", a)

    @property
    def axes(self) -> torch.Tensor:
        return self.semi_axes

    @property
    def inscribed_radius(self) -> float:
        """Largest l2 ball inside: the distance ``1 / ||1/a||_2`` from the center to every facet."""
        a = self.semi_axes
        if bool((a <= 0).any()):
            return 0.0
        return float(1.0 / torch.linalg.vector_norm(1.0 / a))

    @property
    def proxy_radius(self) -> float:
        """Radius of the l1 ball with the same volume (ANCER eq. 3.14 with p = 1): ``exp(mean(log a))``."""
        return super().proxy_radius

    @property
    def log_volume(self) -> float:
        """``log(2^d / d! * prod a)``, the volume of a scaled l1 ball."""
        a = self.semi_axes
        if bool((a <= 0).any()):
            return -math.inf
        return float(torch.log(a).sum()) + self.dim * math.log(2.0) - math.lgamma(self.dim + 1.0)

    def contains(self, points: torch.Tensor) -> torch.Tensor:
        """Boolean per point (points reshaped to (-1, d))."""
        y = self._flat(points).abs()
        a = self.semi_axes
        safe = torch.where(a > 0, a, torch.ones_like(a))
        scaled = torch.where(a > 0, y / safe, torch.where(y == 0, 0.0, math.inf))
        return scaled.sum(dim=1) <= 1.0


# ----------------------------------------------------------------------------------------------- helpers


def _kind(region: object) -> str:
    if isinstance(region, Ball):
        return _BALL
    if isinstance(region, Ellipsoid):
        return _ELLIPSOID
    if isinstance(region, CrossPolytope):
        return _L1
    raise TypeError(f"expected a Ball, an Ellipsoid or a CrossPolytope region, got {type(region).__name__}")


def _basis(region: Region) -> torch.Tensor | None:
    return region.basis if isinstance(region, Ellipsoid) else None


def basis_error(basis: torch.Tensor | None) -> float:
    """``||U^T U - I||_F`` plus rounding: how far a basis is from orthonormal (0 for None; cached per tensor).

    Geometry in the ellipsoid's own basis uses ``U^T`` as ``U^-1``; distances subtract this error times the
    scale so they stay lower bounds for a basis that is orthonormal only up to a tolerance.
    """
    if basis is None:
        return 0.0
    key = id(basis)
    entry = _BASIS_ERRORS.get(key)
    if entry is not None and entry[0]() is basis and entry[1] == basis._version:
        return entry[2]
    b = basis.to(torch.float64)
    eye = torch.eye(b.shape[0], dtype=b.dtype, device=b.device)
    err = float(torch.linalg.matrix_norm(b.T @ b - eye)) + _rounding(b.shape[0])
    ref = weakref.ref(basis, lambda _, k=key: _BASIS_ERRORS.pop(k, None))
    _BASIS_ERRORS[key] = (ref, basis._version, err)
    return err


def outer_radius(region: Region) -> float:
    """Radius of a ball around the center that contains the region (``max a``, inflated for a skewed basis)."""
    return float(region.axes.max()) * (1.0 + basis_error(_basis(region)))


def inscribed_lower(region: Region) -> float:
    """A lower bound of the region's inscribed l2 radius, safe for a basis orthonormal only up to tolerance."""
    skew = basis_error(_basis(region))  # smallest singular value of U >= sqrt(1 - skew) >= 1 - skew
    return max(0.0, region.inscribed_radius * (1.0 - skew - _rounding(region.dim)))


def _is_point(region: Region) -> bool:
    return not bool((region.axes > 0).any())


def _check_regions(*regions: object) -> int:
    dims = set()
    for r in regions:
        _kind(r)
        dims.add(r.dim)  # type: ignore[attr-defined]
    if len(dims) > 1:
        raise ValueError(f"regions must live in the same dimension, got dimensions {sorted(dims)}")
    return dims.pop()


def _points(points: torch.Tensor, d: int, device: torch.device) -> torch.Tensor:
    if not isinstance(points, torch.Tensor):
        raise TypeError(f"points must be a torch.Tensor, got {type(points).__name__}")
    if points.numel() == 0 or points.numel() % d:
        raise ValueError(f"points must hold a multiple of d={d} values (one flat point per row), got shape "
                         f"{tuple(points.shape)}")
    p = points.detach().to(dtype=torch.float64, device=device).reshape(-1, d)
    if not bool(torch.isfinite(p).all()):
        raise ValueError("points contain NaN or infinite values")
    return p


def _secular_mu(y: torch.Tensor, a: torch.Tensor, max_iter: int = 200) -> torch.Tensor:
    """Lower end ``mu <= mu*`` of the root of the secular equation ``sum_i (a_i y_i)^2 / (a_i^2 + mu)^2 = 1``.

    Seed 000 eq. 3.18 / 4.10 in the ellipsoid's own basis (``A = diag(1/a^2)``, ``mu = 2 lambda``); the
    projection of ``y`` is ``y a^2 / (a^2 + mu)``. ``mu = 0`` for points inside. Newton's method on the
    concave increasing ``1 / s(mu)`` started at 0 stays below the root; each step is kept only if it stays on
    the outer side (``s >= 1``), otherwise the bracket is bisected. Any iterate is a valid lower end.
    """
    a2 = a * a
    w2 = a2 * y * y
    pos = a > 0
    s2_0 = torch.where(pos, y * y / torch.where(pos, a2, torch.ones_like(a2)), torch.zeros_like(y)).sum(-1)
    active = s2_0 > 1.0
    lo = torch.zeros_like(s2_0)
    hi = w2.sum(-1).sqrt()  # s(hi) <= ||a y|| / hi = 1

    def s2(mu: torch.Tensor) -> torch.Tensor:
        den = a2 + mu[:, None]
        return torch.where(w2 > 0, w2 / (den * den), torch.zeros_like(w2)).sum(-1)

    for _ in range(max_iter):
        if not bool(active.any()):
            break
        den = a2 + lo[:, None]
        t2 = torch.where(w2 > 0, w2 / (den * den), torch.zeros_like(w2))
        s2_lo = t2.sum(-1)
        s3_lo = torch.where(w2 > 0, t2 / den, torch.zeros_like(w2)).sum(-1)
        psi = s2_lo.rsqrt()
        new = lo + (1.0 - psi) / (s3_lo * psi**3)
        s2_new = s2(new)
        ok = (s2_new >= 1.0) & (new <= hi)
        hi = torch.where(~ok & (s2_new < 1.0), torch.minimum(hi, new), hi)
        mid = 0.5 * (lo + hi)
        s2_mid = s2(mid)
        nxt = torch.where(ok, new, torch.where(s2_mid >= 1.0, mid, lo))
        hi = torch.where(~ok & (s2_mid < 1.0), mid, hi)
        done = (nxt - lo <= 4 * _EPS * nxt) | (hi - nxt <= 4 * _EPS * hi)
        lo = torch.where(active, nxt, lo)
        active = active & ~done
    return lo


def _l1_tau(y: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Threshold ``tau >= 0`` of the projection onto ``{x : sum |x_i| / a_i <= 1}``: ``|x_i| = (|y_i| - tau/a_i)_+``.

    Exact by sorting the breakpoints ``|y_i| a_i`` (the weighted simplex projection); 0 for points inside.
    """
    pos = a > 0
    safe = torch.where(pos, a, torch.ones_like(a))
    ay = y.abs()
    p = torch.where(pos, ay / safe, torch.zeros_like(ay))
    q = torch.where(pos, 1.0 / (safe * safe), torch.zeros_like(ay))
    b = torch.where(pos, ay * a, torch.full_like(ay, -1.0))
    order = torch.argsort(b, dim=-1, descending=True)
    cp = torch.gather(p, -1, order).cumsum(-1)
    cq = torch.gather(q, -1, order).cumsum(-1)
    tau_k = (cp - 1.0) / torch.where(cq > 0, cq, torch.ones_like(cq))
    cond = torch.gather(b, -1, order) > tau_k
    ranks = torch.arange(1, y.shape[-1] + 1, device=y.device).expand_as(cond)
    last = (ranks * cond).amax(-1).clamp_min(1) - 1
    tau = torch.gather(tau_k, -1, last[:, None]).squeeze(-1)
    return torch.where(p.sum(-1) <= 1.0, torch.zeros_like(tau), tau.clamp_min(0.0))


@dataclass
class _Pack:
    """``n`` regions of one kind, row-aligned: centers (n, d), axes (n, d), bases (n or 1, d, d) or None."""

    kind: str
    center: torch.Tensor
    axes: torch.Tensor
    basis: torch.Tensor | None
    skew: torch.Tensor  # (n,) basis_error per row

    @classmethod
    def of(cls, regions: Sequence[Region], device: torch.device) -> "_Pack":
        kind = _kind(regions[0])
        center = torch.stack([r.center.to(device) for r in regions])
        axes = torch.stack([r.axes.to(device) for r in regions])
        bases = [_basis(r) for r in regions]
        basis = None if bases[0] is None else torch.stack([b.to(device) for b in bases])  # type: ignore[union-attr]
        skew = torch.tensor([basis_error(b) for b in bases], dtype=torch.float64, device=device)
        return cls(kind, center, axes, basis, skew)

    def expand(self, n: int) -> "_Pack":
        """A one-region pack broadcast to ``n`` rows (the basis stays (1, d, d))."""
        d = self.center.shape[1]
        return _Pack(self.kind, self.center.expand(n, d), self.axes.expand(n, d), self.basis, self.skew.expand(n))

    def local(self, points: torch.Tensor) -> torch.Tensor:
        diff = points - self.center
        if self.basis is None:
            return diff
        if self.basis.shape[0] == 1:
            return diff @ self.basis[0]
        return torch.bmm(diff.unsqueeze(1), self.basis).squeeze(1)

    def world(self, local: torch.Tensor) -> torch.Tensor:
        if self.basis is None:
            return self.center + local
        if self.basis.shape[0] == 1:
            return self.center + local @ self.basis[0].T
        return self.center + torch.bmm(self.basis, local.unsqueeze(-1)).squeeze(-1)

    def outer(self) -> torch.Tensor:
        return self.axes.amax(-1) * (1.0 + self.skew)

    def project(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(nearest point of each row's region, its distance), both before any rounding allowance."""
        y = self.local(points)
        if self.kind == _BALL:
            r = self.axes[:, 0]
            norm = torch.linalg.vector_norm(y, dim=-1)
            scale = torch.where(norm > r, r / torch.where(norm > 0, norm, torch.ones_like(norm)), torch.ones_like(r))
            return self.world(y * scale[:, None]), (norm - r).clamp_min(0.0)
        a = self.axes
        pos = a > 0
        if self.kind == _ELLIPSOID:
            mu = _secular_mu(y, a)[:, None]
            resid = torch.where(pos, y * mu / torch.where(pos, a * a + mu, torch.ones_like(a)), y)
        else:
            tau = _l1_tau(y, a)[:, None]
            cut = torch.minimum(y.abs(), tau / torch.where(pos, a, torch.ones_like(a)))
            resid = torch.where(pos, torch.sign(y) * cut, y)
        return self.world(y - resid), torch.linalg.vector_norm(resid, dim=-1)

    def support(self, w: torch.Tensor) -> torch.Tensor:
        """Centered support function ``max_{u in region - c} w . u`` per row (exact for any basis)."""
        if self.kind == _BALL:
            return self.axes[:, 0] * torch.linalg.vector_norm(w, dim=-1)
        if self.kind == _L1:
            return (self.axes * w.abs()).amax(-1)
        if self.basis is None:
            bw = w
        elif self.basis.shape[0] == 1:
            bw = w @ self.basis[0]
        else:
            bw = torch.bmm(w.unsqueeze(1), self.basis).squeeze(1)
        return torch.linalg.vector_norm(self.axes * bw, dim=-1)

    def allowance(self, points: torch.Tensor) -> torch.Tensor:
        """How much a computed distance may exceed the true one: rounding plus the basis's skew."""
        scale = torch.linalg.vector_norm(points - self.center, dim=-1) + self.axes.amax(-1)
        return (_rounding(self.center.shape[1]) + self.skew) * scale


def _groups(regions: Sequence[Region], device: torch.device) -> list[tuple[list[int], _Pack]]:
    """Split regions into packs of one kind and basis presence (bases in chunks of at most ~128 MB)."""
    keys: dict[tuple[str, bool], list[int]] = {}
    for i, r in enumerate(regions):
        keys.setdefault((_kind(r), _basis(r) is not None), []).append(i)
    d = regions[0].dim
    out = []
    for (_, has_basis), idx in keys.items():
        step = max(1, 2**27 // (8 * d * d)) if has_basis else len(idx)
        for s in range(0, len(idx), step):
            part = idx[s:s + step]
            out.append((part, _Pack.of([regions[i] for i in part], device)))
    return out


def _separated(pa: _Pack, pb: _Pack, w: torch.Tensor) -> torch.Tensor:
    """Rigorous disjointness per row: the direction ``w`` strictly separates the two regions."""
    delta = pb.center - pa.center
    gap = (w * delta).sum(-1).abs() - pa.support(w) - pb.support(w)
    scale = torch.linalg.vector_norm(w, dim=-1) * (
        torch.linalg.vector_norm(delta, dim=-1) + 2.0 * (pa.outer() + pb.outer()))
    return gap > _rounding(delta.shape[1]) * scale


# ----------------------------------------------------------------------------------------------- distances


def distances(points: torch.Tensor, regions: Region | Sequence[Region]) -> torch.Tensor:
    """Lower bounds of the l2 distances from points to regions (0 inside), float64 (n,).

    Broadcasts one point against ``n`` regions, ``n`` points against one region, or pairs row ``i`` with
    region ``i``. Ellipsoids: secular equation (seed 000 eq. 3.17-3.19, 4.10), lower end of the bracket;
    l1 regions: exact weighted-simplex projection; balls: ``||p - c|| - r``. Each value is reduced by a
    rounding allowance, so it never exceeds the true distance.
    """
    single = isinstance(regions, Region)
    regs = [regions] if single else list(regions)  # type: ignore[list-item]
    if not regs:
        raise ValueError("regions is empty: give at least one region")
    d = _check_regions(*regs)
    device = regs[0].center.device
    pts = _points(points, d, device)
    if single:
        n = pts.shape[0]
        groups = [(list(range(n)), _Pack.of(regs, device).expand(n))]
    else:
        n = len(regs)
        if pts.shape[0] not in (1, n):
            raise ValueError(f"give one point or one point per region: {pts.shape[0]} points for {n} regions")
        groups = _groups(regs, device)
    out = torch.empty(n, dtype=torch.float64, device=device)
    for idx, pack in groups:
        p = pts.expand(len(idx), d) if pts.shape[0] == 1 else pts[idx]
        _, dist = pack.project(p)
        out[idx] = (dist - pack.allowance(p)).clamp_min(0.0)
    return out


def distance_to_region(point: torch.Tensor, region: Region) -> float:
    """The l2 distance from ``point`` to ``region`` (0 inside), never above the true distance."""
    _check_regions(region)
    if not isinstance(point, torch.Tensor) or point.numel() != region.dim:
        raise ValueError(f"point must be a tensor of d={region.dim} values")
    return float(distances(point, region)[0])


def largest_ball_outside(center: torch.Tensor, region: Region) -> float:
    """Radius of an l2 ball around ``center`` that does not meet ``region`` (``LargestOutSubset``, eq. 3.19).

    It is the distance lower bound shrunk by a relative ``1e-10`` (the ``epsilon`` of eq. 3.19), so the closed
    ball stays strictly outside; 0 when ``center`` lies in (or within rounding of) the region.
    """
    return distance_to_region(center, region) * (1.0 - _SHRINK)


# ----------------------------------------------------------------------------------------------- K(t)


def _k_parts(ra: Region, rb: Region) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, bool]:
    """Simultaneous diagonalization for eq. 4.9(3): ``K(t) = 1 - sum_i z_i^2 t(1-t) / (t + lam_i (1-t))``.

    With ``B^-1 = L L^T`` (``L = U_b diag(beta)``) and ``L^-1 A^-1 L^-T = V diag(lam) V^T``, ``z = V^T L^-1 (b-a)``.
    The separating direction at ``t`` is ``w = W (s * z * h(t))``, ``h = t(1-t) / (t + lam (1-t))``.
    The side whitened (``b``) needs positive axes: the regions are swapped if that helps (``K`` then reads
    ``t -> 1 - t``), and zero axes left on that side are inflated by ``1e-9`` of the scale (a larger region:
    only more "intersect" verdicts; a disjoint verdict is checked on the true regions anyway).
    """
    dev = ra.center.device
    alpha, beta = ra.axes, rb.axes.to(dev)
    ua, ub = _basis(ra), _basis(rb)
    ub = None if ub is None else ub.to(dev)
    if isinstance(ra, Ball):
        ua = ub
    if isinstance(rb, Ball):
        ub = ua
    delta = rb.center.to(dev) - ra.center
    swapped = bool((beta <= 0).any()) and bool((alpha > 0).all())
    if swapped:
        alpha, beta, ua, ub, delta = beta, alpha, ub, ua, -delta
    if bool((beta <= 0).any()):
        scale = max(float(alpha.max()), float(beta.max()), float(torch.linalg.vector_norm(delta)))
        beta = beta.clamp_min(1e-9 * scale if scale > 0 else 1e-300)
    same = ua is ub or (ua is not None and ub is not None and torch.equal(ua, ub))
    u = delta if ub is None else ub.T @ delta
    if same:
        return (alpha / beta) ** 2, u / beta, ub, 1.0 / beta, swapped
    if ua is None:
        rot = ub.T  # type: ignore[union-attr]  (U_b^T U_a with None meaning the identity)
    else:
        rot = ua if ub is None else ub.T @ ua
    g = rot * alpha[None, :] / beta[:, None]
    lam, v = torch.linalg.eigh(g @ g.T)
    w_map = (v / beta[:, None]) if ub is None else (ub / beta[None, :]) @ v
    return lam.clamp_min(0.0), v.T @ (u / beta), w_map, torch.ones_like(beta), swapped


def _k_eval(t: torch.Tensor, lam: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    tt = t[..., None]
    return 1.0 - (z2 * (tt * (1.0 - tt) / (tt + lam * (1.0 - tt)))).sum(-1)


def _golden_min(lam: torch.Tensor, z2: torch.Tensor, iters: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimize each row's convex ``K`` on (0, 1) by golden-section search; (best t, best K) seen."""
    g = (math.sqrt(5.0) - 1.0) / 2.0
    m = lam.shape[0]
    lo = torch.zeros(m, dtype=lam.dtype, device=lam.device)
    hi = torch.ones_like(lo)
    x1, x2 = hi - g, lo + g
    f1, f2 = _k_eval(x1, lam, z2), _k_eval(x2, lam, z2)
    best_t, best_k = torch.where(f1 <= f2, x1, x2), torch.minimum(f1, f2)
    for _ in range(iters):
        left = f1 < f2
        hi = torch.where(left, x2, hi)
        lo = torch.where(left, lo, x1)
        xn = torch.where(left, hi - g * (hi - lo), lo + g * (hi - lo))
        fn = _k_eval(xn, lam, z2)
        x1, f1, x2, f2 = (torch.where(left, xn, x2), torch.where(left, fn, f2),
                          torch.where(left, x1, xn), torch.where(left, f1, fn))
        better = fn < best_k
        best_t, best_k = torch.where(better, xn, best_t), torch.where(better, fn, best_k)
        if bool((hi - lo <= 1e-15).all()):
            break
    return best_t, best_k


def k_function(r1: Region, r2: Region) -> Callable[[torch.Tensor], torch.Tensor]:
    """``t -> K(t)`` of seed 000 eq. 4.9(3) for two balls/ellipsoids (``A`` from ``r1``, ``B`` from ``r2``).

    ``K(t) = 1 - (b-a)^T [B^-1/(1-t) + A^-1/t]^-1 (b-a)`` with ``A^-1 = U diag(axes^2) U^T``; convex on (0, 1),
    ``K(0) = K(1) = 1``; the regions are disjoint iff ``min K < 0``. Evaluated as an O(d) sum after one
    simultaneous diagonalization. At least one region must have all semi-axes > 0.
    """
    _check_regions(r1, r2)
    if _kind(r1) == _L1 or _kind(r2) == _L1:
        raise TypeError("K(t) is defined for balls and ellipsoids, not for l1 regions")
    if bool((r1.axes <= 0).any()) and bool((r2.axes <= 0).any()):
        raise ValueError("K(t) needs one region with all semi-axes > 0")
    lam, z, _, _, swapped = _k_parts(r1, r2)
    z2 = z * z

    def k(t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64, device=lam.device)
        return _k_eval(1.0 - t if swapped else t, lam, z2)

    return k


# ----------------------------------------------------------------------------------------------- intersection


def _kt_disjoint(ra: Region, rbs: Sequence[Region]) -> torch.Tensor:
    """Ellipsoid pairs: minimize K(t) (eq. 4.9(3)); a negative minimum's direction is checked exactly."""
    parts = [_k_parts(ra, rb) for rb in rbs]
    lam = torch.stack([p[0] for p in parts])
    z = torch.stack([p[1] for p in parts])
    t, k = _golden_min(lam, z * z)
    out = torch.zeros(len(rbs), dtype=torch.bool)
    dev = ra.center.device
    pa = _Pack.of([ra], dev)
    for i in torch.nonzero(k < 0).flatten().tolist():
        ti = t[i]
        v = parts[i][3] * z[i] * ti * (1.0 - ti) / (ti + lam[i] * (1.0 - ti))
        w_map = parts[i][2]
        w = v if w_map is None else w_map @ v
        out[i] = bool(_separated(pa, _Pack.of([rbs[i]], dev), w[None, :])[0])
    return out


def _l1_disjoint(ra: Region, rbs: Sequence[Region]) -> torch.Tensor:
    """Two l1 regions: the l1 analogue of K(t). With ``delta = c_b - c_a``,

    ``min_x max(g_a(x), g_b(x)) = max_t phi(t)``, ``phi(t) = sum_i |delta_i| min(t / a_i, (1 - t) / b_i)``

    (minimax over ``t g_a + (1-t) g_b`` of the two gauges), concave and piecewise linear with breakpoints
    ``a_i / (a_i + b_i)``; the regions are disjoint iff ``max phi > 1``. The maximizing ``t`` gives
    ``w_i = sign(delta_i) min(t / a_i, (1 - t) / b_i)`` with ``h_a(w) <= t``, ``h_b(w) <= 1 - t`` and
    ``w . delta = phi(t)``: a separating direction, checked exactly. Zero axes are inflated by ``1e-12`` of the
    scale to find ``t`` only (the check uses the true regions).
    """
    dev = ra.center.device
    pa = _Pack.of([ra], dev)
    out = torch.zeros(len(rbs), dtype=torch.bool)
    for idx, pb in _groups(rbs, dev):
        n = len(idx)
        pa_n = pa.expand(n)
        delta = (pb.center - pa_n.center).abs()
        scale = (pa_n.outer() + pb.outer() + delta.amax(-1)).clamp_min(1e-300)[:, None] * 1e-12
        a, b = pa_n.axes.clamp_min(0.0).maximum(scale), pb.axes.maximum(scale)
        brk = a / (a + b)
        order = torch.argsort(brk, dim=-1)
        t = torch.gather(brk, -1, order)
        pa_coef = torch.gather(delta / a, -1, order)  # items with breakpoint >= t use t / a_i
        pb_coef = torch.gather(delta / b, -1, order)  # items with breakpoint < t use (1 - t) / b_i
        suffix_a = pa_coef.flip(-1).cumsum(-1).flip(-1)
        prefix_b = pb_coef.cumsum(-1) - pb_coef
        phi = t * suffix_a + (1.0 - t) * prefix_b
        best = torch.gather(t, -1, phi.argmax(-1, keepdim=True))
        w = torch.sign(pb.center - pa_n.center) * torch.minimum(best / a, (1.0 - best) / b)
        out[idx] = _separated(pa_n, pb, w).cpu()
    return out


def _alternating_disjoint(ra: Region, rbs: Sequence[Region], max_iter: int = 1000) -> torch.Tensor:
    """Pairs of an ellipsoid (or flat region) and an l1 region: accelerated alternating projections.

    ``x <- P_b(P_a(y))`` with Nesterov momentum on ``y`` is projected gradient descent (FISTA) on the smooth
    convex ``dist(x, region_a)^2 / 2`` over ``region_b``; the difference of the projections is checked
    exactly as a separating direction. Pairs never verified (touching, or closer than ``1e-9`` of the scale)
    count as intersecting.
    """
    dev = ra.center.device
    out = torch.zeros(len(rbs), dtype=torch.bool)
    base = _Pack.of([ra], dev)
    for idx, pb in _groups(rbs, dev):
        n = len(idx)
        pa = base.expand(n)
        x = prev = pb.center.clone()
        found = torch.zeros(n, dtype=torch.bool, device=dev)
        done = torch.zeros_like(found)
        best = torch.full((n,), math.inf, dtype=torch.float64, device=dev)
        since = torch.zeros(n, dtype=torch.long, device=dev)
        scale = pa.outer() + pb.outer() + torch.linalg.vector_norm(pb.center - pa.center, dim=-1)
        for it in range(max_iter):
            y = x + (it / (it + 3.0)) * (x - prev)
            qa, _ = pa.project(y)
            prev, (x, _) = x, pb.project(qa)
            w = x - qa
            gap = torch.linalg.vector_norm(w, dim=-1)
            sep = _separated(pa, pb, w) & ~done
            found |= sep
            improved = gap < best * (1.0 - 1e-9)
            since = torch.where(improved, torch.zeros_like(since), since + 1)
            best = torch.minimum(best, gap)
            touching = gap <= 1e-9 * scale  # qa (in region a) is this close to region b
            done |= sep | touching | (since > 50)
            if bool(done.all()):
                break
        out[idx] = found.cpu()
    return out


def intersects_each(region: Region, regions: Sequence[Region]) -> torch.Tensor:
    """Per region in ``regions``: may it intersect ``region``? Boolean (n,) on the CPU.

    ``False`` is certified (a separating direction checked in exact form, or a distance lower bound beyond
    a ball's radius); ``True`` means intersecting or too close to tell. Exact for balls and ellipsoids
    (seed 000 eq. 3.16 / 4.9(3)) up to a rounding margin; for l1 regions paired with an ellipsoid or another
    l1 region, near-touching pairs may be reported as intersecting.
    """
    regs = list(regions)
    d = _check_regions(region, *regs)
    out = torch.ones(len(regs), dtype=torch.bool)
    if not regs:
        return out
    dev = region.center.device
    centers = torch.stack([r.center.to(dev) for r in regs])
    outer = torch.tensor([outer_radius(r) for r in regs], dtype=torch.float64, device=dev)
    gap = torch.linalg.vector_norm(centers - region.center, dim=-1)
    far = gap > (outer + outer_radius(region)) * (1.0 + _rounding(d)) + _rounding(d) * gap
    out[far.cpu()] = False
    rest = torch.nonzero(~far).flatten().cpu().tolist()
    if not rest:
        return out
    if _is_point(region):
        dist = distances(region.center, [regs[i] for i in rest])
        out[rest] = (dist <= 0).cpu()
        return out
    cases: dict[str, list[int]] = {"b_point": [], "a_ball": [], "b_ball": [], "kt": [], "l1": [], "alt": []}
    for i in rest:
        rb = regs[i]
        if _is_point(rb):
            cases["b_point"].append(i)
        elif isinstance(region, Ball):
            cases["a_ball"].append(i)
        elif isinstance(rb, Ball):
            cases["b_ball"].append(i)
        elif _kind(region) == _ELLIPSOID and _kind(rb) == _ELLIPSOID:
            cases["kt"].append(i)
        elif _kind(region) == _L1 and _kind(rb) == _L1:
            cases["l1"].append(i)
        else:
            cases["alt"].append(i)
    if cases["b_point"]:
        idx = cases["b_point"]
        out[idx] = (distances(centers[idx], region) <= 0).cpu()
    if cases["a_ball"]:
        idx = cases["a_ball"]
        out[idx] = ~(distances(region.center, [regs[i] for i in idx]) > float(region.radius)).cpu()  # type: ignore
    if cases["b_ball"]:
        idx = cases["b_ball"]
        radii = torch.tensor([float(regs[i].radius) for i in idx], dtype=torch.float64, device=dev)  # type: ignore
        out[idx] = ~(distances(centers[idx], region) > radii).cpu()
    if cases["kt"]:
        idx = cases["kt"]
        out[idx] = ~_kt_disjoint(region, [regs[i] for i in idx])
    if cases["l1"]:
        idx = cases["l1"]
        out[idx] = ~_l1_disjoint(region, [regs[i] for i in idx])
    if cases["alt"]:
        idx = cases["alt"]
        out[idx] = ~_alternating_disjoint(region, [regs[i] for i in idx])
    return out


def intersects(r1: Region, r2: Region) -> bool:
    """May ``r1`` and ``r2`` intersect? ``False`` only when they are certainly disjoint (:func:`intersects_each`)."""
    _check_regions(r1, r2)
    return bool(intersects_each(r1, [r2])[0])
