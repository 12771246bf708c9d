"""Point-to-region distances (lower bounds) and ``LargestOutSubset`` of memory-based certification.

* :func:`distance_to_region` / :func:`distances` -- the l2 distance from a point to a ball, an ellipsoid or an
  l1 region (0 inside). For an ellipsoid this is the projection problem of seed 000 eq. 3.17, solved through
  the secular equation (eq. 3.18 for an axis-aligned ellipsoid, eq. 4.10 for a rotated one, written in the
  ellipsoid's own basis where both are the same O(d) sum). The root is bracketed and the distance is taken
  at the lower end of the bracket, so the value returned never exceeds the true distance.
* :func:`largest_ball_outside` -- ``LargestOutSubset`` of Algorithm 1 (eq. 3.19): the radius of the largest
  l2 ball around a point that does not meet a region, strictly below the distance.

Distances subtract a rounding allowance and, for a basis that is orthonormal only up to a tolerance,
``||U^T U - I||_F * (||p - c|| + max a)``, which keeps them lower bounds for the region ``{c + U (a * u)}``
as given.

**Canonical per row.** Every value of a row (a point and its region, or two regions in :func:`separated`) is
computed from that row alone with the canonical reductions of :mod:`smoothcert.geometry.tolerances` (no
``sum``/``norm``/``cumsum`` kernel, no BLAS, stable sorts, iterations frozen per row once converged), so a
distance is the same bits whether computed alone or in a pack of any size or composition (memory-based
certification relies on it: a resumed or split run decides exactly as an uninterrupted one).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from smoothcert.geometry.lowrank_ops import lowrank_distances
from smoothcert.geometry.regions import Region
from smoothcert.geometry.tolerances import (BALL, ELLIPSOID, EPS, L1, LOWRANK, SHRINK, basis_error, check_regions,
                                            fixed_cumsum, fixed_matvec, fixed_norm, fixed_sum, fixed_vecmat,
                                            region_basis, region_kind, rounding_allowance)

__all__ = ["RegionPack", "pack_groups", "separated", "distances", "distance_to_region", "largest_ball_outside"]


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
    s2_0 = fixed_sum(torch.where(pos, y * y / torch.where(pos, a2, torch.ones_like(a2)), torch.zeros_like(y)))
    active = s2_0 > 1.0
    lo = torch.zeros_like(s2_0)
    hi = fixed_sum(w2).sqrt()  # s(hi) <= ||a y|| / hi = 1

    def s2(mu: torch.Tensor) -> torch.Tensor:
        den = a2 + mu[:, None]
        return fixed_sum(torch.where(w2 > 0, w2 / (den * den), torch.zeros_like(w2)))

    for _ in range(max_iter):
        if not bool(active.any()):
            break
        den = a2 + lo[:, None]
        t2 = torch.where(w2 > 0, w2 / (den * den), torch.zeros_like(w2))
        s2_lo = fixed_sum(t2)
        s3_lo = fixed_sum(torch.where(w2 > 0, t2 / den, torch.zeros_like(w2)))
        psi = 1.0 / s2_lo.sqrt()
        new = lo + (1.0 - psi) / (s3_lo * (psi * psi * psi))
        s2_new = s2(new)
        ok = (s2_new >= 1.0) & (new <= hi)
        hi = torch.where(~ok & (s2_new < 1.0), torch.minimum(hi, new), hi)
        mid = 0.5 * (lo + hi)
        s2_mid = s2(mid)
        nxt = torch.where(ok, new, torch.where(s2_mid >= 1.0, mid, lo))
        hi = torch.where(~ok & (s2_mid < 1.0), mid, hi)
        done = (nxt - lo <= 4 * EPS * nxt) | (hi - nxt <= 4 * EPS * hi)
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
    order = torch.argsort(b, dim=-1, descending=True, stable=True)
    cp = fixed_cumsum(torch.gather(p, -1, order))
    cq = fixed_cumsum(torch.gather(q, -1, order))
    tau_k = (cp - 1.0) / torch.where(cq > 0, cq, torch.ones_like(cq))
    cond = torch.gather(b, -1, order) > tau_k
    ranks = torch.arange(1, y.shape[-1] + 1, device=y.device).expand_as(cond)
    last = (ranks * cond).amax(-1).clamp_min(1) - 1
    tau = torch.gather(tau_k, -1, last[:, None]).squeeze(-1)
    return torch.where(fixed_sum(p) <= 1.0, torch.zeros_like(tau), tau.clamp_min(0.0))


@dataclass
class RegionPack:
    """``n`` regions of one kind, row-aligned: centers (n, d), axes (n, d), bases (n or 1, d, d) or None."""

    kind: str
    center: torch.Tensor
    axes: torch.Tensor
    basis: torch.Tensor | None
    skew: torch.Tensor  # (n,) basis_error per row

    @classmethod
    def of(cls, regions: Sequence[Region], device: torch.device) -> "RegionPack":
        kind = region_kind(regions[0])
        center = torch.stack([r.center.to(device) for r in regions])
        axes = torch.stack([r.axes.to(device) for r in regions])
        bases = [region_basis(r) for r in regions]
        basis = None if bases[0] is None else torch.stack([b.to(device) for b in bases])  # type: ignore[union-attr]
        skew = torch.tensor([basis_error(b) for b in bases], dtype=torch.float64, device=device)
        return cls(kind, center, axes, basis, skew)

    def expand(self, n: int) -> "RegionPack":
        """A one-region pack broadcast to ``n`` rows (the basis stays (1, d, d))."""
        d = self.center.shape[1]
        return RegionPack(self.kind, self.center.expand(n, d), self.axes.expand(n, d), self.basis, self.skew.expand(n))

    def local(self, points: torch.Tensor) -> torch.Tensor:
        """``U^T (p - c)`` per row (canonical: :func:`fixed_vecmat`)."""
        diff = points - self.center
        return diff if self.basis is None else fixed_vecmat(diff, self.basis)

    def world(self, local: torch.Tensor) -> torch.Tensor:
        """``c + U y`` per row (canonical: :func:`fixed_matvec`)."""
        return self.center + (local if self.basis is None else fixed_matvec(self.basis, local))

    def outer(self) -> torch.Tensor:
        return self.axes.amax(-1) * (1.0 + self.skew)

    def project(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(nearest point of each row's region, its distance), both before any rounding allowance."""
        y = self.local(points)
        if self.kind == BALL:
            r = self.axes[:, 0]
            norm = fixed_norm(y)
            scale = torch.where(norm > r, r / torch.where(norm > 0, norm, torch.ones_like(norm)), torch.ones_like(r))
            return self.world(y * scale[:, None]), (norm - r).clamp_min(0.0)
        a = self.axes
        pos = a > 0
        if self.kind == ELLIPSOID:
            mu = _secular_mu(y, a)[:, None]
            resid = torch.where(pos, y * mu / torch.where(pos, a * a + mu, torch.ones_like(a)), y)
        else:
            tau = _l1_tau(y, a)[:, None]
            cut = torch.minimum(y.abs(), tau / torch.where(pos, a, torch.ones_like(a)))
            resid = torch.where(pos, torch.sign(y) * cut, y)
        return self.world(y - resid), fixed_norm(resid)

    def support(self, w: torch.Tensor) -> torch.Tensor:
        """Centered support function ``max_{u in region - c} w . u`` per row (exact for any basis)."""
        if self.kind == BALL:
            return self.axes[:, 0] * fixed_norm(w)
        if self.kind == L1:
            return (self.axes * w.abs()).amax(-1)
        bw = w if self.basis is None else fixed_vecmat(w, self.basis)
        return fixed_norm(self.axes * bw)

    def allowance(self, points: torch.Tensor) -> torch.Tensor:
        """How much a computed distance may exceed the true one: rounding plus the basis's skew."""
        scale = fixed_norm(points - self.center) + self.axes.amax(-1)
        return (rounding_allowance(self.center.shape[1]) + self.skew) * scale


def pack_groups(regions: Sequence[Region], device: torch.device) -> list[tuple[list[int], RegionPack]]:
    """Split regions into packs of one kind and basis presence (bases in chunks of at most ~128 MB).

    The split only bounds memory: every computation on a pack is canonical per row, so no result depends on it.
    """
    keys: dict[tuple[str, bool], list[int]] = {}
    for i, r in enumerate(regions):
        keys.setdefault((region_kind(r), region_basis(r) is not None), []).append(i)
    d = regions[0].dim
    out = []
    for (_, has_basis), idx in keys.items():
        step = max(1, 2**27 // (8 * d * d)) if has_basis else len(idx)
        for s in range(0, len(idx), step):
            part = idx[s:s + step]
            out.append((part, RegionPack.of([regions[i] for i in part], device)))
    return out


#: Absolute margin of :func:`separated`: an unscaled float64 norm loses at most ``sqrt(d * 2.2e-308)`` to
#: underflow (squares below the smallest normal, even flushed), far below this for any ``d < 1e20``.
UNDERFLOW_MARGIN = 1e-140


def separated(pa: RegionPack, pb: RegionPack, w: torch.Tensor) -> torch.Tensor:
    """Rigorous disjointness per row: the direction ``w`` strictly separates the two regions.

    The gap must exceed the rounding allowance and :data:`UNDERFLOW_MARGIN`: support functions of a tiny
    ``w`` (or of tiny regions) underflow to 0, which would otherwise "separate" intersecting regions.
    """
    delta = pb.center - pa.center
    gap = fixed_sum(w * delta).abs() - pa.support(w) - pb.support(w)
    scale = fixed_norm(w) * (fixed_norm(delta) + 2.0 * (pa.outer() + pb.outer()))
    return gap > rounding_allowance(delta.shape[1]) * scale + UNDERFLOW_MARGIN


# ----------------------------------------------------------------------------------------------- distances


def distances(points: torch.Tensor, regions: Region | Sequence[Region]) -> torch.Tensor:
    """Lower bounds of the l2 distances from points to regions (0 inside), float64 (n,).

    Broadcasts one point against ``n`` regions, ``n`` points against one region, or pairs row ``i`` with
    region ``i``. Ellipsoids: secular equation (seed 000 eq. 3.17-3.19, 4.10), lower end of the bracket;
    l1 regions: exact weighted-simplex projection; balls: ``||p - c|| - r``; low-rank ellipsoids: the dual bound
    of :mod:`smoothcert.geometry.lowrank_ops`. Each value is reduced by a rounding allowance, so it never exceeds
    the true distance.
    """
    single = isinstance(regions, Region)
    regs = [regions] if single else list(regions)  # type: ignore[list-item]
    if not regs:
        raise ValueError("regions is empty: give at least one region")
    d = check_regions(*regs)
    device = regs[0].center.device
    pts = _points(points, d, device)
    low = [i for i, r in enumerate(regs) if region_kind(r) == LOWRANK]
    if low:  # low-rank ellipsoids row by row (lowrank_ops), the others as below
        if single:
            return lowrank_distances(pts, regs * pts.shape[0])
        n = len(regs)
        if pts.shape[0] not in (1, n):
            raise ValueError(f"give one point or one point per region: {pts.shape[0]} points for {n} regions")
        p, rest = pts.expand(n, d), [i for i in range(n) if region_kind(regs[i]) != LOWRANK]
        out = torch.empty(n, dtype=torch.float64, device=device)
        out[low] = lowrank_distances(p[low], [regs[i] for i in low])
        if rest:
            out[rest] = distances(p[rest], [regs[i] for i in rest])
        return out
    if single:
        n = pts.shape[0]
        groups = [(list(range(n)), RegionPack.of(regs, device).expand(n))]
    else:
        n = len(regs)
        if pts.shape[0] not in (1, n):
            raise ValueError(f"give one point or one point per region: {pts.shape[0]} points for {n} regions")
        groups = pack_groups(regs, device)
    out = torch.empty(n, dtype=torch.float64, device=device)
    for idx, pack in groups:
        p = pts.expand(len(idx), d) if pts.shape[0] == 1 else pts[idx]
        _, dist = pack.project(p)
        out[idx] = (dist - pack.allowance(p)).clamp_min(0.0)
    return out


def distance_to_region(point: torch.Tensor, region: Region) -> float:
    """The l2 distance from ``point`` to ``region`` (0 inside), never above the true distance."""
    check_regions(region)
    if not isinstance(point, torch.Tensor) or point.numel() != region.dim:
        raise ValueError(f"point must be a tensor of d={region.dim} values")
    return float(distances(point, region)[0])


def largest_ball_outside(center: torch.Tensor, region: Region) -> float:
    """Radius of an l2 ball around ``center`` that does not meet ``region`` (``LargestOutSubset``, eq. 3.19).

    It is the distance lower bound shrunk by a relative ``1e-10`` (the ``epsilon`` of eq. 3.19), so the closed
    ball stays strictly outside; 0 when ``center`` lies in (or within rounding of) the region.
    """
    return distance_to_region(center, region) * (1.0 - SHRINK)


# ----------------------------------------------------------------------------------------------- K(t)
