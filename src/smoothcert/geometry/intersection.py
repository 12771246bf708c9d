"""Region intersection: ``Intersect`` of memory-based certification and the K(t) function.

The intersection step of memory-based certification (seed 000 Algorithm 1, sections 3.3.4, 4.6):

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
sorting its breakpoints); an ellipsoid and an l1 region, and two ellipsoids that both have a zero semi-axis
(where ``K`` is ill-conditioned), find ``w`` by accelerated alternating projections (pairs closer than ``1e-9``
of their scale count as intersecting); a ball uses the exact distance test; a low-rank ellipsoid against another
or an axis-aligned ellipsoid, K(t) by Woodbury (:mod:`smoothcert.geometry.lowrank_ops`; against a dense-basis
ellipsoid or an l1 region it answers "may intersect").
Distances come from :mod:`smoothcert.geometry.distance` (lower bounds).

Canonical per pair: a verdict depends on its own pair only, never on the other regions it is tested with
(memory-based certification needs the same decision alone, in any batch, after a resume). Batched steps use
the canonical reductions of :mod:`smoothcert.geometry.tolerances` and iterations frozen per row once
converged; the steps that need a dense ``d x d`` factorization (two ellipsoids with different bases:
``U_b^T U_a``, ``eigh``) run per pair on that pair's tensors, in one fixed shape.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from smoothcert.geometry.distance import RegionPack, distances, pack_groups, separated
from smoothcert.geometry.lowrank_ops import lowrank_disjoint
from smoothcert.geometry.regions import Ball, Region
from smoothcert.geometry.tolerances import (ELLIPSOID, L1, LOWRANK, check_regions, fixed_cumsum, fixed_matvec, fixed_norm,
                                            fixed_sum, fixed_vecmat, is_point, outer_radius, region_basis,
                                            region_kind, rounding_allowance)

__all__ = ["k_function", "intersects", "intersects_each"]


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
    ua, ub = region_basis(ra), region_basis(rb)
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
        scale = max(float(alpha.max()), float(beta.max()), float(fixed_norm(delta)))
        beta = beta.clamp_min(1e-9 * scale if scale > 0 else 1e-300)
    same = ua is ub or (ua is not None and ub is not None and torch.equal(ua, ub))
    u = delta if ub is None else fixed_vecmat(delta[None], ub[None])[0]  # U_b^T delta
    if same:
        ratio = alpha / beta
        return ratio * ratio, u / beta, ub, 1.0 / beta, swapped
    # the dense products below run on fresh contiguous copies, so they see the same layout and alignment
    # whether a basis is the caller's view or a reloaded region's own tensor
    ua, ub = (None if m is None else m.clone(memory_format=torch.contiguous_format) for m in (ua, ub))
    if ua is None:
        rot = ub.T  # type: ignore[union-attr]  (U_b^T U_a with None meaning the identity)
    else:
        rot = ua if ub is None else ub.T @ ua
    g = rot * alpha[None, :] / beta[:, None]
    lam, v = torch.linalg.eigh(g @ g.T)
    w_map = (v / beta[:, None]) if ub is None else (ub / beta[None, :]) @ v
    return lam.clamp_min(0.0), fixed_vecmat((u / beta)[None], v[None])[0], w_map, torch.ones_like(beta), swapped


def _k_eval(t: torch.Tensor, lam: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    tt = t[..., None]
    return 1.0 - fixed_sum(z2 * (tt * (1.0 - tt) / (tt + lam * (1.0 - tt))))


def _golden_min(lam: torch.Tensor, z2: torch.Tensor, iters: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimize each row's convex ``K`` on (0, 1) by golden-section search; (best t, best K) seen.

    A row stops once its bracket is below ``1e-15`` (its state is frozen), so its result is the one it gets
    alone, whatever the other rows of the batch.
    """
    g = (math.sqrt(5.0) - 1.0) / 2.0
    m = lam.shape[0]
    lo = torch.zeros(m, dtype=lam.dtype, device=lam.device)
    hi = torch.ones_like(lo)
    x1, x2 = hi - g, lo + g
    f1, f2 = _k_eval(x1, lam, z2), _k_eval(x2, lam, z2)
    best_t, best_k = torch.where(f1 <= f2, x1, x2), torch.minimum(f1, f2)
    for _ in range(iters):
        active = hi - lo > 1e-15
        if not bool(active.any()):
            break
        left = f1 < f2
        new_hi = torch.where(left, x2, hi)
        new_lo = torch.where(left, lo, x1)
        xn = torch.where(left, new_hi - g * (new_hi - new_lo), new_lo + g * (new_hi - new_lo))
        fn = _k_eval(xn, lam, z2)
        new = (new_hi, new_lo, torch.where(left, xn, x2), torch.where(left, fn, f2),
               torch.where(left, x1, xn), torch.where(left, f1, fn))
        hi, lo, x1, f1, x2, f2 = (torch.where(active, a, b) for a, b in zip(new, (hi, lo, x1, f1, x2, f2)))
        better = active & (fn < best_k)
        best_t, best_k = torch.where(better, xn, best_t), torch.where(better, fn, best_k)
    return best_t, best_k


def k_function(r1: Region, r2: Region) -> Callable[[torch.Tensor], torch.Tensor]:
    """``t -> K(t)`` of seed 000 eq. 4.9(3) for two balls/ellipsoids (``A`` from ``r1``, ``B`` from ``r2``).

    ``K(t) = 1 - (b-a)^T [B^-1/(1-t) + A^-1/t]^-1 (b-a)`` with ``A^-1 = U diag(axes^2) U^T``; convex on (0, 1),
    ``K(0) = K(1) = 1``; the regions are disjoint iff ``min K < 0``. Evaluated as an O(d) sum after one
    simultaneous diagonalization. At least one region must have all semi-axes > 0.
    """
    check_regions(r1, r2)
    if region_kind(r1) == L1 or region_kind(r2) == L1:
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
    """Ellipsoid pairs: minimize K(t) (eq. 4.9(3)); a negative minimum's direction is checked exactly.

    When both regions have a zero semi-axis, the whitened side's are inflated (:func:`_k_parts`) and the
    pencil's small eigenvalues carry errors of ``eps * lam_max`` (``lam_max ~ 1e18``): ``K`` is unreliable there,
    so pairs it did not separate go to :func:`_alternating_disjoint` (every verdict is checked exactly anyway).
    """
    parts = [_k_parts(ra, rb) for rb in rbs]
    lam = torch.stack([p[0] for p in parts])
    z = torch.stack([p[1] for p in parts])
    t, k = _golden_min(lam, z * z)
    out = torch.zeros(len(rbs), dtype=torch.bool)
    dev = ra.center.device
    pa = RegionPack.of([ra], dev)
    for i in torch.nonzero(k < 0).flatten().tolist():
        ti = t[i]
        v = parts[i][3] * z[i] * ti * (1.0 - ti) / (ti + lam[i] * (1.0 - ti))
        w_map = parts[i][2]
        w = v if w_map is None else fixed_matvec(w_map[None], v[None])[0]
        out[i] = bool(separated(pa, RegionPack.of([rbs[i]], dev), w[None, :])[0])
    if bool((ra.axes <= 0).any()):
        flat = [i for i, rb in enumerate(rbs) if not out[i] and bool((rb.axes <= 0).any())]
        if flat:
            out[flat] = _alternating_disjoint(ra, [rbs[i] for i in flat])
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
    pa = RegionPack.of([ra], dev)
    out = torch.zeros(len(rbs), dtype=torch.bool)
    for idx, pb in pack_groups(rbs, dev):
        n = len(idx)
        pa_n = pa.expand(n)
        delta = (pb.center - pa_n.center).abs()
        scale = (pa_n.outer() + pb.outer() + delta.amax(-1)).clamp_min(1e-300)[:, None] * 1e-12
        a, b = pa_n.axes.clamp_min(0.0).maximum(scale), pb.axes.maximum(scale)
        brk = a / (a + b)
        order = torch.argsort(brk, dim=-1, stable=True)
        t = torch.gather(brk, -1, order)
        pa_coef = torch.gather(delta / a, -1, order)  # items with breakpoint >= t use t / a_i
        pb_coef = torch.gather(delta / b, -1, order)  # items with breakpoint < t use (1 - t) / b_i
        suffix_a = fixed_cumsum(pa_coef.flip(-1)).flip(-1)
        prefix_b = fixed_cumsum(pb_coef) - pb_coef
        phi = t * suffix_a + (1.0 - t) * prefix_b
        best = torch.gather(t, -1, phi.argmax(-1, keepdim=True))
        w = torch.sign(pb.center - pa_n.center) * torch.minimum(best / a, (1.0 - best) / b)
        out[idx] = separated(pa_n, pb, w).cpu()
    return out


def _alternating_disjoint(ra: Region, rbs: Sequence[Region], max_iter: int = 1000) -> torch.Tensor:
    """Pairs of an ellipsoid (or flat region) and an l1 region, or of two flat ellipsoids: accelerated
    alternating projections.

    ``x <- P_b(P_a(y))`` with Nesterov momentum on ``y`` is projected gradient descent (FISTA) on the smooth
    convex ``dist(x, region_a)^2 / 2`` over ``region_b``; the difference of the projections is checked
    exactly as a separating direction. Pairs never verified (touching, or closer than ``1e-9`` of the scale)
    count as intersecting.
    """
    dev = ra.center.device
    out = torch.zeros(len(rbs), dtype=torch.bool)
    base = RegionPack.of([ra], dev)
    for idx, pb in pack_groups(rbs, dev):
        n = len(idx)
        pa = base.expand(n)
        x = prev = pb.center.clone()
        found = torch.zeros(n, dtype=torch.bool, device=dev)
        done = torch.zeros_like(found)
        best = torch.full((n,), math.inf, dtype=torch.float64, device=dev)
        since = torch.zeros(n, dtype=torch.long, device=dev)
        scale = pa.outer() + pb.outer() + fixed_norm(pb.center - pa.center)
        for it in range(max_iter):
            y = x + (it / (it + 3.0)) * (x - prev)
            qa, _ = pa.project(y)
            prev, (x, _) = x, pb.project(qa)
            w = x - qa
            gap = fixed_norm(w)
            sep = separated(pa, pb, w) & ~done
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
    l1 region, and for two ellipsoids that both have a zero semi-axis, near-touching pairs may be reported as
    intersecting.
    """
    regs = list(regions)
    d = check_regions(region, *regs)
    out = torch.ones(len(regs), dtype=torch.bool)
    if not regs:
        return out
    dev = region.center.device
    centers = torch.stack([r.center.to(dev) for r in regs])
    outer = torch.tensor([outer_radius(r) for r in regs], dtype=torch.float64, device=dev)
    gap = fixed_norm(centers - region.center)
    far = gap > (outer + outer_radius(region)) * (1.0 + rounding_allowance(d)) + rounding_allowance(d) * gap
    out[far.cpu()] = False
    rest = torch.nonzero(~far).flatten().cpu().tolist()
    if not rest:
        return out
    if is_point(region):
        dist = distances(region.center, [regs[i] for i in rest])
        out[rest] = (dist <= 0).cpu()
        return out
    cases: dict[str, list[int]] = {"b_point": [], "a_ball": [], "b_ball": [], "kt": [], "l1": [], "alt": [],
                                   "lowrank": []}
    for i in rest:
        rb = regs[i]
        if is_point(rb):
            cases["b_point"].append(i)
        elif isinstance(region, Ball):
            cases["a_ball"].append(i)
        elif isinstance(rb, Ball):
            cases["b_ball"].append(i)
        elif LOWRANK in (region_kind(region), region_kind(rb)):
            cases["lowrank"].append(i)
        elif region_kind(region) == ELLIPSOID and region_kind(rb) == ELLIPSOID:
            cases["kt"].append(i)
        elif region_kind(region) == L1 and region_kind(rb) == L1:
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
    if cases["lowrank"]:
        idx = cases["lowrank"]
        out[idx] = ~lowrank_disjoint(region, [regs[i] for i in idx])
    return out


def intersects(r1: Region, r2: Region) -> bool:
    """May ``r1`` and ``r2`` intersect? ``False`` only when they are certainly disjoint (:func:`intersects_each`)."""
    check_regions(r1, r2)
    return bool(intersects_each(r1, [r2])[0])
