"""Geometry of certified regions against brute force: sampling, a convex solver, boundary search, matrices."""

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.optimize import linprog, minimize, minimize_scalar

from smoothcert.geometry.regions import CrossPolytope
from smoothcert.geometry.distance import distance_to_region, distances, largest_ball_outside
from smoothcert.geometry.tolerances import inscribed_lower, outer_radius
from smoothcert.geometry.intersection import intersects, intersects_each, k_function
from smoothcert.noise.gaussian import FullGaussian
from smoothcert.geometry.regions import Ball, Ellipsoid

F64 = torch.float64
KINDS = ["ball", "axis", "rotated", "general", "l1"]


def orthonormal(d, gen):
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=F64))
    return q


def make_region(kind, center, gen, scale=1.0):
    d = center.numel()
    axes = scale * (0.15 + torch.rand(d, generator=gen, dtype=F64))
    if kind == "ball":
        return Ball(center, float(axes[0]))
    if kind == "axis":
        return Ellipsoid(center, axes)
    if kind == "rotated":
        return Ellipsoid(center, axes, orthonormal(d, gen))
    if kind == "general":  # a full-covariance region, built the way RDDRS builds it
        m = torch.randn(d, d, generator=gen, dtype=F64)
        c = m @ m.T / d + 0.05 * torch.eye(d, dtype=F64)
        return FullGaussian(c).region(center, scale * 1.2)
    if kind == "l1":
        return CrossPolytope(center, 1.5 * axes)
    if kind == "flat":
        axes[0] = 0.0
        return Ellipsoid(center, axes, orthonormal(d, gen))
    raise ValueError(kind)


def shape(region):
    """(center, basis, axes, is_l1) as numpy for the reference computations."""
    d = region.dim
    basis = getattr(region, "basis", None)
    basis = np.eye(d) if basis is None else basis.numpy()
    return region.center.numpy(), basis, region.axes.numpy(), isinstance(region, CrossPolytope)


def sample_inside(region, n, gen):
    """Uniform points of the region (on its span for a degenerate one)."""
    c, basis, axes, l1 = shape(region)
    d = c.size
    if l1:
        e = -torch.log(torch.rand(n, d + 1, generator=gen, dtype=F64))
        sign = torch.where(torch.rand(n, d, generator=gen) < 0.5, -1.0, 1.0).to(F64)
        u = (sign * e[:, :d] / e.sum(1, keepdim=True)).numpy()
    else:
        g = torch.randn(n, d, generator=gen, dtype=F64)
        r = torch.rand(n, 1, generator=gen, dtype=F64) ** (1.0 / d)
        u = (g / g.norm(dim=1, keepdim=True) * r).numpy()
    return torch.from_numpy(c + (u * axes) @ basis.T)


def gauge_min(r1, r2, starts=2, seed=0):
    """min over x in one region of the other's gauge (disjoint iff > 1): an LP for two l1 regions, SLSQP
    otherwise (the gauge side must have all axes > 0; the l1 gauge through split variables). For two flat
    regions: (distance between them) + 1, from SLSQP over both parametrizations."""
    full = [bool((r.axes > 0).all()) for r in (r1, r2)]
    if not full[1] or (full[0] and isinstance(r1, CrossPolytope) and not isinstance(r2, CrossPolytope)):
        r1, r2, full = r2, r1, full[::-1]
    c1, b1, a1, l1_1 = shape(r1)
    c2, b2, a2, l1_2 = shape(r2)
    d = c1.size
    if l1_1 and l1_2:  # variables u+, u-, s+, s- >= 0; x = c1 + a1 (u+ - u-); x - c2 = s+ - s-
        cost = np.concatenate([np.zeros(2 * d), 1 / a2, 1 / a2])
        eye = np.eye(d)
        a_eq = np.hstack([np.diag(a1), -np.diag(a1), -eye, eye])
        a_ub = np.concatenate([np.ones(2 * d), np.zeros(2 * d)])[None]
        res = linprog(cost, A_ub=a_ub, b_ub=[1.0], A_eq=a_eq, b_eq=c2 - c1, bounds=(0, None), method="highs")
        assert res.status == 0
        return res.fun
    n1 = 2 * d if l1_1 else d

    def x_of(v, c, b, a, l1):
        u = v[:d] - v[d:2 * d] if l1 else v[:d]
        return c + b @ (a * u)

    cons = [{"type": "ineq", "fun": (lambda v: 1.0 - v[:n1].sum()) if l1_1 else (lambda v: 1.0 - v[:d] @ v[:d])}]
    bounds = [(0, None)] * n1 if l1_1 else [(None, None)] * d
    if not full[1]:  # both flat: squared distance between the sets over both parametrizations
        cons.append({"type": "ineq", "fun": lambda v: 1.0 - v[n1:] @ v[n1:]})
        bounds += [(None, None)] * d

        def objective(v):
            gap = x_of(v, c1, b1, a1, l1_1) - x_of(v[n1:], c2, b2, a2, False)
            return gap @ gap
    elif l1_2:  # gauge sum (s+ + s-) / a2 with x - c2 = s+ - s-
        cons.append({"type": "eq", "fun": lambda v: x_of(v, c1, b1, a1, l1_1) - c2 - v[n1:n1 + d] + v[n1 + d:]})
        bounds += [(0, None)] * (2 * d)

        def objective(v):
            return ((v[n1:n1 + d] + v[n1 + d:]) / a2).sum() ** 2
    else:
        def objective(v):
            y = b2.T @ (x_of(v, c1, b1, a1, l1_1) - c2) / a2
            return y @ y
    rng = np.random.default_rng(seed)
    best = math.inf
    for _ in range(starts):
        v0 = np.abs(rng.normal(size=len(bounds))) / (4 * len(bounds))
        res = minimize(objective, v0, method="SLSQP", constraints=cons, bounds=bounds,
                       options={"ftol": 1e-13, "maxiter": 500})
        best = min(best, math.sqrt(max(res.fun, 0.0)) + (0.0 if full[1] else 1.0))
    return best


def norm2(v):
    return float(np.linalg.norm(v))


def boundary_distance(point, region, starts=3, seed=0):
    """min ||x - p|| over x = c + U (a * u), ||u|| <= 1 (l2) or ||u||_1 <= 1 (l1): real points of the region,
    so the result is never below the true distance; multi-start Nelder-Mead, polished by SLSQP."""
    c, basis, axes, l1 = shape(region)
    p = point.numpy()
    d = c.size

    def f(s):
        norm = np.abs(s).sum() if l1 else np.linalg.norm(s)
        u = s / max(1.0, norm)
        return np.linalg.norm(c + basis @ (axes * u) - p)

    rng = np.random.default_rng(seed)
    toward = basis.T @ (p - c) / np.maximum(axes, 1e-3)
    best = math.inf
    for i in range(starts):
        s0 = toward if i == 0 else rng.normal(size=d) * 2
        res = minimize(f, s0, method="Nelder-Mead", options={"xatol": 1e-10, "fatol": 1e-13, "maxiter": 4000})
        best = min(best, res.fun)
    # polish: SLSQP over the same points (split variables u = u+ - u- for the l1 region), feasible points only
    lin = basis * axes
    if l1:
        lin = np.hstack([lin, -lin])
        cons = [{"type": "ineq", "fun": lambda v: 1.0 - v.sum(), "jac": lambda v: -np.ones_like(v)}]
    else:
        cons = [{"type": "ineq", "fun": lambda v: 1.0 - v @ v, "jac": lambda v: -2 * v}]
    res = minimize(lambda v: (np.sum((c + lin @ v - p) ** 2), 2 * lin.T @ (c + lin @ v - p)),
                   np.full(lin.shape[1], 0.01), jac=True, method="SLSQP", constraints=cons,
                   bounds=[(0, None)] * lin.shape[1] if l1 else None, options={"ftol": 1e-15, "maxiter": 500})
    v = np.maximum(res.x, 0.0) / max(1.0, np.maximum(res.x, 0.0).sum()) if l1 else res.x / max(1.0, norm2(res.x))
    return min(best, float(np.linalg.norm(c + lin @ v - p)))  # v scaled into the region: a real point


# ----------------------------------------------------------------------------------------------- l1 region


def test_cross_polytope_measures_against_monte_carlo():
    gen = torch.Generator().manual_seed(0)
    for d in (2, 3):
        a = 0.5 + torch.rand(d, generator=gen, dtype=F64)
        region = CrossPolytope(torch.zeros(d, dtype=F64), a)
        n = 200_000
        box = (torch.rand(n, d, generator=gen, dtype=F64) * 2 - 1) * a
        frac = region.contains(box).double().mean().item()
        p = math.exp(region.log_volume) / float(torch.prod(2 * a))
        assert abs(frac - p) < 5 * math.sqrt(p * (1 - p) / n)
        assert region.proxy_radius == pytest.approx(float(torch.exp(torch.log(a).mean())))
        # inscribed l2 radius: a sphere just inside is contained, the facet normal just beyond is not
        r = region.inscribed_radius
        dirs = torch.randn(2000, d, generator=gen, dtype=F64)
        assert bool(region.contains(dirs / dirs.norm(dim=1, keepdim=True) * r * (1 - 1e-9)).all())
        normal = (1 / a) / (1 / a).norm()
        assert not bool(region.contains(normal * r * (1 + 1e-6)).any())
        assert bool(region.contains(normal * r * (1 - 1e-9)).all())
        # inside the l2 ellipsoid with the same axes
        pts = sample_inside(region, 2000, gen)
        assert bool(Ellipsoid(region.center, a).contains(pts * (1 - 1e-12)).all())


def test_cross_polytope_validation_and_degenerate_axes():
    with pytest.raises(ValueError, match="semi-axis per dimension"):
        CrossPolytope(torch.zeros(3), torch.ones(2))
    with pytest.raises(ValueError, match=">= 0"):
        CrossPolytope(torch.zeros(2), torch.tensor([1.0, -1.0]))
    flat = CrossPolytope(torch.zeros(2), torch.tensor([1.0, 0.0]))
    assert flat.contains(torch.tensor([[0.5, 0.0], [0.5, 1e-9]])).tolist() == [True, False]
    assert flat.inscribed_radius == 0.0 and flat.log_volume == -math.inf


# ----------------------------------------------------------------------------------------------- distances


@pytest.mark.parametrize("d", [2, 3])
def test_distance_never_above_boundary_search_and_within_1e6(d):
    gen = torch.Generator().manual_seed(10 + d)
    for kind in KINDS + ["flat"]:
        for _ in range(3):
            region = make_region(kind, torch.randn(d, generator=gen, dtype=F64), gen)
            for scale in (0.3, 1.5, 4.0):
                p = region.center + scale * torch.randn(d, generator=gen, dtype=F64)
                ours = distance_to_region(p, region)
                if bool(region.contains(p)):
                    assert ours == 0.0
                    continue
                ref = boundary_distance(p, region)
                assert ours <= ref, (kind, ours, ref)
                assert ref - ours <= 1e-6, (kind, ours, ref)
                assert ours > 0 or ref < 1e-9, (kind, ours, ref)


def test_distance_degenerate_regions_and_batches():
    gen = torch.Generator().manual_seed(3)
    p = torch.tensor([3.0, 4.0], dtype=F64)
    assert distance_to_region(p, Ball(torch.zeros(2), 0.0)) == pytest.approx(5.0, abs=1e-12)
    assert distance_to_region(p, Ellipsoid(torch.zeros(2), torch.zeros(2))) == pytest.approx(5.0, abs=1e-12)
    assert distance_to_region(p, CrossPolytope(torch.zeros(2), torch.zeros(2))) == pytest.approx(5.0, abs=1e-12)
    assert distance_to_region(torch.zeros(2), Ball(torch.zeros(2), 0.0)) == 0.0
    regions = [make_region(k, torch.randn(3, generator=gen, dtype=F64), gen) for k in KINDS * 3]
    point = torch.randn(3, generator=gen, dtype=F64) * 2
    one_to_many = distances(point, regions)
    assert one_to_many.tolist() == pytest.approx([distance_to_region(point, r) for r in regions], abs=1e-12)
    pts = torch.randn(len(regions), 3, generator=gen, dtype=F64) * 2
    pairwise = distances(pts, regions)
    assert pairwise.tolist() == pytest.approx([distance_to_region(q, r) for q, r in zip(pts, regions)], abs=1e-12)
    many_to_one = distances(pts, regions[2])
    assert many_to_one.tolist() == pytest.approx([distance_to_region(q, regions[2]) for q in pts], abs=1e-12)
    r = largest_ball_outside(point, regions[1])
    assert 0 < r < distance_to_region(point, regions[1])
    assert not intersects(Ball(point, r), regions[1])


def test_distance_is_sound_for_a_nearly_orthonormal_basis():
    """A basis orthonormal only to ~1e-5 (the noise module accepts 1e-4): the region is {c + U (a * u)}
    as given, and the distance must stay below the true one."""
    gen = torch.Generator().manual_seed(4)
    for _ in range(5):
        u = orthonormal(3, gen) + 1e-5 * torch.randn(3, 3, generator=gen, dtype=F64)
        region = Ellipsoid(torch.zeros(3, dtype=F64), 0.2 + torch.rand(3, generator=gen, dtype=F64), u)
        p = torch.randn(3, generator=gen, dtype=F64) * 2
        ref = boundary_distance(p, region)
        ours = distance_to_region(p, region)
        assert ours <= ref and ref - ours < 1e-3
        assert inscribed_lower(region) < region.inscribed_radius
        assert outer_radius(region) > float(region.axes.max())


def test_distance_rejects_bad_input():
    with pytest.raises(TypeError, match="Ball, an Ellipsoid, a CrossPolytope or a LowRankEllipsoid"):
        distance_to_region(torch.zeros(2), "ball")
    with pytest.raises(ValueError, match="d=2"):
        distance_to_region(torch.zeros(3), Ball(torch.zeros(2), 1.0))
    with pytest.raises(ValueError, match="same dimension"):
        intersects(Ball(torch.zeros(2), 1.0), Ball(torch.zeros(3), 1.0))
    with pytest.raises(ValueError, match="NaN"):
        distances(torch.tensor([float("nan"), 0.0]), Ball(torch.zeros(2), 1.0))
    with pytest.raises(ValueError, match="one point per region"):
        distances(torch.zeros(3, 2), [Ball(torch.zeros(2), 1.0)] * 2)


# ----------------------------------------------------------------------------------------------- K(t)


def test_k_function_matches_the_matrix_formula_and_is_convex():
    """K(t) = 1 - (b-a)^T [B^-1/(1-t) + A^-1/t]^-1 (b-a) with A^-1 = U diag(axes^2) U^T (eq. 4.9(3))."""
    gen = torch.Generator().manual_seed(5)
    ts = torch.linspace(0.001, 0.999, 999, dtype=F64)
    full = ["ball", "axis", "rotated", "general"]
    for k1, k2 in itertools.product(full, full + ["flat"]):
        d = 5
        r1 = make_region(k1, torch.zeros(d, dtype=F64), gen)
        r2 = make_region(k2, torch.randn(d, generator=gen, dtype=F64), gen)

        def shape_inv(r):
            b = torch.eye(d, dtype=F64) if getattr(r, "basis", None) is None else r.basis
            return b @ torch.diag(r.axes**2) @ b.T

        a_inv, b_inv, delta = shape_inv(r1), shape_inv(r2), r2.center - r1.center
        k = k_function(r1, r2)
        for t in (0.01, 0.3, 0.5, 0.77, 0.99):
            direct = 1 - delta @ torch.linalg.solve(b_inv / (1 - t) + a_inv / t, delta)
            assert float(k(t)) == pytest.approx(float(direct), abs=1e-10, rel=1e-10)
        values = k(ts)
        assert float((values[2:] - 2 * values[1:-1] + values[:-2]).min()) > -1e-10
        assert float(k(1e-12)) == pytest.approx(1.0, abs=1e-6)
        if k2 != "flat":  # K(1) = 1 needs B^-1 positive definite
            assert float(k(1 - 1e-12)) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(TypeError, match="l1"):
        k_function(CrossPolytope(torch.zeros(2), torch.ones(2)), Ball(torch.zeros(2), 1.0))


def test_k_diagonal_case_is_eq_3_16():
    gen = torch.Generator().manual_seed(6)
    alpha, beta = 0.2 + torch.rand(4, generator=gen, dtype=F64), 0.2 + torch.rand(4, generator=gen, dtype=F64)
    a_c, b_c = torch.zeros(4, dtype=F64), torch.randn(4, generator=gen, dtype=F64)
    k = k_function(Ellipsoid(a_c, alpha), Ellipsoid(b_c, beta))
    a_ii, b_ii = 1 / alpha**2, 1 / beta**2  # the squared shape matrices
    for t in (0.1, 0.5, 0.9):
        eq316 = 1 - ((b_c - a_c) ** 2 * t * (1 - t) * a_ii * b_ii / (t * a_ii + (1 - t) * b_ii)).sum()
        assert float(k(t)) == pytest.approx(float(eq316), abs=1e-12)


# ----------------------------------------------------------------------------------------------- intersection


@pytest.mark.parametrize("d", [2, 3])
def test_intersection_agrees_with_sampling_and_a_convex_solver(d):
    """Sound: a common point found by sampling forces 'intersect'. Exact: a clear gap found by an independent
    solver (gauge of one region minimized over the other > 1 + 1e-3) forces 'disjoint', and clear overlap
    forces 'intersect'. Every kind pair: ball, axis-aligned, rotated, full-covariance, l1, flat."""
    gen = torch.Generator().manual_seed(20 + d)
    counts = {"disjoint": 0, "intersect": 0}
    for k1, k2 in itertools.combinations_with_replacement(KINDS + ["flat"], 2):
        for trial in range(3):
            r1 = make_region(k1, torch.zeros(d, dtype=F64), gen)
            direction = torch.randn(d, generator=gen, dtype=F64)
            reach = outer_radius(r1) + 1.5
            r2 = make_region(k2, direction / direction.norm() * reach * (0.25 + 0.4 * trial), gen)
            verdict = intersects(r1, r2)
            assert verdict == intersects(r2, r1), (k1, k2)
            common = torch.cat([r2.contains(sample_inside(r1, 3000, gen)), r1.contains(sample_inside(r2, 3000, gen))])
            if bool(common.any()):
                assert verdict, (k1, k2, "sampling found a common point")
            m = gauge_min(r1, r2)
            if m > 1 + 1e-3:
                assert not verdict, (k1, k2, m)
            elif m < 1 - 1e-3:
                assert verdict, (k1, k2, m)
            counts["intersect" if verdict else "disjoint"] += 1
    assert min(counts.values()) >= 15, counts


def test_intersection_of_points_and_touching_balls():
    p = torch.tensor([1.0, 0.0], dtype=F64)
    point = Ball(p, 0.0)
    assert intersects(point, Ellipsoid(torch.zeros(2), torch.tensor([1.0, 0.5])))  # on the boundary
    assert not intersects(point, Ellipsoid(torch.zeros(2), torch.tensor([0.99, 0.5])))
    assert intersects(Ball(torch.zeros(2), 0.5), Ball(torch.tensor([1.0, 0.0]), 0.5))  # touching: conservative
    assert not intersects(Ball(torch.zeros(2), 0.5), Ball(torch.tensor([1.0, 0.0]), 0.4999))
    assert intersects(point, Ball(p, 0.0)) and not intersects(point, Ball(torch.zeros(2), 0.0))
    assert intersects(CrossPolytope(torch.zeros(2), torch.ones(2)), point)


def test_batch_intersection_matches_pairs():
    gen = torch.Generator().manual_seed(8)
    region = make_region("rotated", torch.zeros(3, dtype=F64), gen)
    others = [make_region(k, torch.randn(3, generator=gen, dtype=F64) * 1.5, gen) for k in KINDS * 4]
    batch = intersects_each(region, others)
    assert batch.tolist() == [intersects(region, o) for o in others]
    assert 0 < int(batch.sum()) < len(others)


def test_high_dimensional_ellipsoids_against_dense_formulas():
    """d = 784 (MNIST). Rotated pairs: a certain overlap (the midpoint lies in both inscribed balls) is found,
    and a disjoint verdict agrees with K(t) < 0 from the dense matrix formula (no diagonalization).
    Axis-aligned batch: agrees with eq. 3.16 minimized by scipy wherever |min K| > 1e-6."""
    gen = torch.Generator().manual_seed(9)
    d = 784
    u1, u2 = orthonormal(d, gen), orthonormal(d, gen)
    a1 = 0.05 + 0.5 * torch.rand(d, generator=gen, dtype=F64)
    a2 = 0.05 + 0.5 * torch.rand(d, generator=gen, dtype=F64)
    e1 = Ellipsoid(torch.zeros(d, dtype=F64), a1, u1)
    near, far = torch.zeros(d, dtype=F64), torch.zeros(d, dtype=F64)
    near[0], far[0] = 0.09, 1.2
    assert bool(e1.contains(near / 2)) and bool(Ellipsoid(near, a2, u2).contains(near / 2))
    assert intersects(e1, Ellipsoid(near, a2, u2))
    assert not intersects(e1, Ellipsoid(far, a2, u2))
    a_inv, b_inv = u1 @ torch.diag(a1**2) @ u1.T, u2 @ torch.diag(a2**2) @ u2.T
    dense = [float(1 - far @ torch.linalg.solve(b_inv / (1 - t) + a_inv / t, far)) for t in (0.3, 0.5, 0.7)]
    assert min(dense) < 0
    axis = [Ellipsoid(torch.randn(d, generator=gen, dtype=F64) * (0.01 + 0.01 * i / 99),
                      0.05 + 0.3 * torch.rand(d, generator=gen, dtype=F64)) for i in range(100)]
    flags = intersects_each(Ellipsoid(torch.zeros(d, dtype=F64), a1), axis).numpy()
    a_ii = 1 / a1.numpy() ** 2
    mins = []
    for e in axis:
        b_ii, delta = 1 / e.axes.numpy() ** 2, e.center.numpy()

        def eq316(t, b_ii=b_ii, delta=delta):
            return 1 - (delta**2 * t * (1 - t) * a_ii * b_ii / (t * a_ii + (1 - t) * b_ii)).sum()

        mins.append(minimize_scalar(eq316, bounds=(0, 1), method="bounded", options={"xatol": 1e-12}).fun)
    mins = np.array(mins)
    clear = np.abs(mins) > 1e-6
    assert (flags[clear] == (mins[clear] >= 0)).all()
    assert 10 < flags.sum() < 90
