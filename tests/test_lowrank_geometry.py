"""Low-rank ellipsoids against the full-matrix path at d = 64: radii, distances, intersection verdicts, sampling,
soundness on a linear classifier.

The full-matrix reference of a low-rank region ``{c + g A v : ||v|| <= 1}`` is the same set as a dense
:class:`Ellipsoid`: ``g A = W diag(S) V^T`` (float64 SVD of the dense ``A`` built from the region's own numbers) gives
``{c + W (g S * u) : ||u|| <= 1}``, handled by the existing secular-equation distance and dense K(t) test.
"""

import math

import numpy as np
import pytest
import torch
from scipy.optimize import brentq

from smoothcert.engine.sampling import input_generator
from smoothcert.engine.smooth import certify
from smoothcert.geometry import Ball, Ellipsoid, LowRankEllipsoid, distances, intersects, intersects_each
from smoothcert.noise.base import noise_from_parameters
from smoothcert.noise.lowrank import LowRankGaussian, check_rank

from soundness import assert_sound, plan, violations_of

F64 = torch.float64
D, K = 64, 6


def lowrank_noise(gen, d=D, k=K, theta=None, spread=1.5):
    q = torch.linalg.qr(torch.randn(d, k, generator=gen, dtype=F64))[0]
    gamma = torch.rand(k, generator=gen, dtype=F64) * spread * 2 - 0.6  # scales 0.4 .. 1 + 2 spread - 0.6
    if theta is None:
        theta = 0.1 + 0.2 * float(torch.rand(1, generator=gen))
    return LowRankGaussian(theta, q, gamma)


def full_of(region: LowRankEllipsoid) -> Ellipsoid:
    w, s, _ = torch.linalg.svd(region.gap * region.dense_scale())
    return Ellipsoid(region.center, s, w)


def exact_distance_upper(p: torch.Tensor, full: Ellipsoid) -> float:
    """An upper bound of the true distance: the distance to a point of the region, the nearest point found by
    brentq on the secular equation (independent of the library's solver), mu raised and the point pulled 1e-12
    toward the center so that it lies inside."""
    y = (full.basis.T @ (p - full.center)).numpy()
    a = full.semi_axes.numpy()
    if np.sum((y / a) ** 2) <= 1.0:
        return 0.0
    f = lambda mu: np.sum((a * y / (a * a + mu)) ** 2) - 1.0  # noqa: E731
    mu = brentq(f, 0.0, float(np.linalg.norm(a * y)) + 1.0, xtol=1e-300, rtol=1e-15, maxiter=500) * (1.0 + 1e-12)
    local = y * a * a / (a * a + mu) * (1.0 - 1e-12)
    q = full.center + full.basis @ torch.as_tensor(local)
    return float(torch.linalg.vector_norm(p - q))


def test_radii_volume_and_spectrum_match_the_dense_svd():
    gen = torch.Generator().manual_seed(0)
    for trial in range(8):
        theta = None if trial % 2 == 0 else 0.1 + 0.3 * torch.rand(D, generator=gen, dtype=F64)
        noise = lowrank_noise(gen, theta=theta)
        region = noise.region(torch.rand(D, generator=gen, dtype=F64), 0.5 + trial / 4)
        s = torch.linalg.svdvals(region.gap * region.dense_scale())
        assert region.inscribed_radius <= float(s.min()) and region.outer_radius >= float(s.max())
        logdet = float(torch.log(s).sum())
        assert region.log_det + D * math.log(region.gap) <= logdet + 1e-9
        assert math.isclose(region.proxy_radius, math.exp(logdet / D), rel_tol=1e-9)
        assert bool((region.axes <= torch.sort(s).values * (1 + 1e-12)).all())  # lower bounds, ascending
        if theta is None:  # exact for a constant theta
            assert math.isclose(region.inscribed_radius, float(s.min()), rel_tol=1e-9)
            assert torch.allclose(region.axes, torch.sort(s).values, rtol=1e-9)
            assert math.isclose(region.outer_radius, float(s.max()), rel_tol=1e-9)


def test_distances_match_the_full_path_within_1e_6_and_never_exceed_the_truth():
    gen = torch.Generator().manual_seed(1)
    worst, count = 0.0, 0
    for _ in range(6):
        noise = lowrank_noise(gen)
        region = noise.region(torch.rand(D, generator=gen, dtype=F64), 1.3)
        full = full_of(region)
        # points inside, near the boundary (along the axes and at random) and far away
        dirs = torch.randn(30, D, generator=gen, dtype=F64)
        dirs = dirs / dirs.norm(dim=1, keepdim=True)
        scale = torch.cat([torch.linspace(0.05, 3.0, 20, dtype=F64), torch.tensor([30.0] * 10, dtype=F64)])
        pts = torch.cat([region.center + dirs * scale[:, None] * region.outer_radius,
                         region.center + (full.basis[:, :8] * full.semi_axes[:8] * 1.0001).T])
        low, dense = distances(pts, region), distances(pts, full)
        for i in range(pts.shape[0]):
            upper = exact_distance_upper(pts[i], full)
            assert float(low[i]) <= upper, (i, float(low[i]), upper)
            assert abs(float(low[i]) - float(dense[i])) <= 1e-6
            assert float(low[i]) <= float(dense[i])  # (its rounding allowance is the wider of the two)
            worst = max(worst, abs(float(low[i]) - float(dense[i])))
            count += float(low[i]) > 0
    assert count > 60 and worst < 1e-9  # most points outside; far tighter than the 1e-6 asked


def test_distance_is_a_lower_bound_for_a_skewed_float32_basis():
    """The region is that of ``Q_32`` as sampled; the distance is checked against the dense ``A`` of those numbers."""
    gen = torch.Generator().manual_seed(2)
    d, k = 300, 12
    noise = lowrank_noise(gen, d, k)
    assert float((noise.basis.T @ noise.basis - torch.eye(k, dtype=F64)).abs().max()) > 0  # really skewed
    region = noise.region(torch.zeros(d, dtype=F64), 2.0)
    full = full_of(region)
    pts = torch.randn(10, d, generator=gen, dtype=F64) * region.outer_radius
    for p, dist in zip(pts, distances(pts, region)):
        assert float(dist) <= exact_distance_upper(p, full)


def pair_cases(gen):
    """(low-rank region, other region) pairs: low-rank, ball and axis-aligned ellipsoid, centres from overlapping to
    well apart."""
    out = []
    for i in range(30):
        a = lowrank_noise(gen).region(torch.rand(D, generator=gen, dtype=F64), 1.0)
        c = a.center + torch.randn(D, generator=gen, dtype=F64) * (0.005 + 0.01 * (i % 10))
        kind = i % 3
        if kind == 0:
            b = lowrank_noise(gen).region(c, 1.0)
        elif kind == 1:
            b = Ball(c, 0.1 + 0.2 * float(torch.rand(1, generator=gen)))
        else:
            b = Ellipsoid(c, 0.05 + 0.3 * torch.rand(D, generator=gen, dtype=F64))
        out.append((a, b))
    return out


def dense(r):
    return full_of(r) if isinstance(r, LowRankEllipsoid) else r


def moved(r, center):
    if isinstance(r, LowRankEllipsoid):
        return LowRankEllipsoid(center, r.theta, r.basis, r.gamma, r.gap)
    if isinstance(r, Ball):
        return Ball(center, r.radius)
    return Ellipsoid(center, r.semi_axes, r.basis)


def test_intersection_verdicts_equal_the_full_path_on_random_pairs_both_orders():
    pairs = pair_cases(torch.Generator().manual_seed(3))
    verdicts = []
    for a, b in pairs:
        expected = intersects(dense(a), dense(b))
        assert intersects(a, b) == expected and intersects(b, a) == expected
        verdicts.append(expected)
    assert 5 <= sum(verdicts) <= len(verdicts) - 5  # both verdicts occur


def test_intersection_verdicts_equal_the_full_path_on_near_touching_pairs():
    """Move the second region along a line until the full path's verdict flips (bisection), then test both paths at
    relative offsets 1e-3 .. 1e-6 on either side of the touching point: the same verdict, and the expected one."""
    gen = torch.Generator().manual_seed(4)
    checked = 0
    for a, b in pair_cases(gen)[:12]:
        u = torch.randn(D, generator=gen, dtype=F64)
        u = u / u.norm()
        lo, hi = 0.0, 2.0 * (a.outer_radius + max(float(dense(b).axes.max()), 0.0)) + 1.0
        if not intersects(dense(a), dense(moved(b, a.center))):
            continue
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if intersects(dense(a), dense(moved(b, a.center + mid * u))) else (lo, mid)
        for rel in (1e-3, 1e-4, 1e-5, 1e-6):
            for side, expected in ((1.0 - rel, True), (1.0 + rel, False)):
                other = moved(b, a.center + side * hi * u)
                assert intersects(dense(a), dense(other)) == expected
                assert intersects(a, other) == expected and intersects(other, a) == expected
                checked += 1
    assert checked >= 64


def test_intersects_each_is_the_same_alone_or_batched_and_dense_basis_pairs_may_intersect():
    pairs = pair_cases(torch.Generator().manual_seed(5))
    query = pairs[0][0]
    others = [moved(b, query.center + (b.center - a.center)) for a, b in pairs]
    alone = [bool(intersects_each(query, [r])[0]) for r in others]
    assert intersects_each(query, others).tolist() == alone
    assert intersects_each(query, others[::-1]).tolist() == alone[::-1]
    near_dense = full_of(moved(pairs[3][0], query.center + 1e-3))
    assert bool(intersects_each(query, [near_dense])[0])  # no low-rank form: the safe answer


def test_sampler_multiplies_by_the_regions_numbers_and_the_covariance_matches():
    gen = torch.Generator().manual_seed(6)
    noise = lowrank_noise(gen, 8, 3, theta=torch.linspace(0.2, 0.6, 8, dtype=F64))
    region = noise.region(torch.zeros(8), 1.0)
    for dtype in (torch.float32, torch.float64):
        drawn = noise.draw(40, (8,), torch.Generator().manual_seed(4), dtype=dtype)
        w = torch.randn((40, 8), generator=torch.Generator().manual_seed(4), dtype=dtype)
        q, g, t = (v.to(dtype) for v in (region.basis, region.gamma, region.theta))
        assert torch.equal(drawn, (((w @ q) * g) @ q.T + w) * t)
    big = noise.draw(200_000, (8,), torch.Generator().manual_seed(1), dtype=F64)
    a = region.dense_scale()
    assert torch.allclose(big.T @ big / big.shape[0], a @ a.T, atol=0.02 * float((a @ a.T).abs().max()))
    again = noise_from_parameters(noise.kind, noise.parameters())
    assert all(torch.equal(x, y) for x, y in zip(again.parameters().values(), noise.parameters().values()))


@pytest.mark.parametrize("bad, match", [
    (lambda: LowRankGaussian(0.2, torch.ones(5, 2), torch.zeros(2)), "orthonormal"),
    (lambda: LowRankGaussian(0.2, torch.eye(5)[:, :2], torch.tensor([0.5, -1.0])), "> -1"),
    (lambda: LowRankGaussian(-0.2, torch.eye(5)[:, :2], torch.zeros(2)), "theta"),
    (lambda: LowRankGaussian(0.2, torch.eye(5)[:, :2], torch.zeros(3)), "k = 2"),
    (lambda: check_rank(7, 5), r"\[1, d = 5\]"),
    (lambda: check_rank(0, 5), r"\[1, d = 5\]"),
    (lambda: check_rank(2.5, 5), "integer"),
])
def test_bad_low_rank_input_is_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        bad()


def test_low_rank_certificates_never_cross_a_linear_boundary_beyond_alpha():
    """``f(x) = 1[w . x + b > 0]`` under noise ``A w``: the smoothed classifier is ``f`` and the region at gap ``g``
    reaches ``g ||A^T n||`` toward the hyperplane (``n = w / ||w||``), so it is sound iff ``g <= margin / ||A^T w||``
    (the exact gap, ``margin / ||Sigma^{1/2} w||``). ``w`` mixes the stretched subspace and its complement; each trial
    is an independent CERTIFY on its own streams, checked against the dense ``A``."""
    d, alpha = D, 0.2
    p = plan(alpha)
    noise = lowrank_noise(torch.Generator().manual_seed(7))
    a = noise.region(torch.zeros(d), 1.0).dense_scale()
    w = noise.basis[:, 0] + 0.5 * torch.randn(d, generator=torch.Generator().manual_seed(8), dtype=F64) / d ** 0.5
    exact_gap = 1.5
    margin = exact_gap * float(torch.linalg.vector_norm(a.T @ w))
    x = torch.full((d,), 0.5, dtype=F64)
    bias = margin - float(w @ x)

    class Linear(torch.nn.Module):
        def forward(self, z):
            s = z.reshape(z.shape[0], -1).double() @ w + bias
            return torch.stack([torch.zeros_like(s), s], 1).float()

    xs = x.float().expand(p.trials, d).contiguous()
    gens = [(input_generator(k, 0, "select"), input_generator(k, 0, "estimate")) for k in range(p.trials)]
    certs = certify(Linear(), xs, noise, 2, 20, 2000, alpha, batch_size=2000, block=2000, generators=gens)
    unit = w / torch.linalg.vector_norm(w)
    reach = [0.0 if c.prediction < 0 else c.region.gap * float(torch.linalg.vector_norm(a.T @ unit)) for c in certs]
    exact = margin / float(torch.linalg.vector_norm(w))
    bad = violations_of(reach, np.full(p.trials, exact), [c.prediction for c in certs], np.ones(p.trials, dtype=int))
    bad |= violations_of([c.radius for c in certs], np.full(p.trials, exact))
    assert_sound(bad, p)
    assert np.mean(reach) > 0.8 * exact  # the certificates are not vacuous


def test_a_zero_gap_region_is_a_point():
    noise = lowrank_noise(torch.Generator().manual_seed(9))
    point = noise.region(torch.zeros(D, dtype=F64), 0.0)
    p = torch.full((D,), 0.1, dtype=F64)
    assert math.isclose(float(distances(p, point)[0]), float(p.norm()), rel_tol=1e-9)
    assert float(distances(torch.zeros(D, dtype=F64), point)[0]) == 0.0
    assert point.inscribed_radius == 0.0 and point.log_volume == -math.inf


def test_full_rank_factor_gives_the_rotated_gaussians_region():
    """k = d, constant theta: ``sigma (I + Q G Q^T) = Q diag(sigma (1 + gamma)) Q^T``, RANCER's full-path noise
    (RotatedGaussian) with the same float32 numbers: the same radii, distances and verdicts up to rounding."""
    from smoothcert.noise.gaussian import RotatedGaussian

    d, sigma = 16, 0.2
    gen = torch.Generator().manual_seed(10)
    low_noise = lowrank_noise(gen, d, d, theta=sigma)
    rotated = RotatedGaussian(low_noise.basis, sigma * (1.0 + low_noise.gamma))
    assert torch.equal(rotated.basis, low_noise.basis)  # the same float32 basis
    center = torch.rand(d, generator=gen, dtype=F64)
    a, b = low_noise.region(center, 1.1), rotated.region(center, 1.1)
    assert math.isclose(a.inscribed_radius, b.inscribed_radius, rel_tol=1e-5)
    assert math.isclose(a.proxy_radius, b.proxy_radius, rel_tol=1e-5)
    pts = center + torch.randn(40, d, generator=gen, dtype=F64) * 0.5
    assert torch.allclose(distances(pts, a), distances(pts, b), atol=1e-5)
    others = [Ball(center + torch.randn(d, generator=gen, dtype=F64) * 0.15, 0.05 + 0.1 * i / 20) for i in range(20)]
    verdicts = [intersects(b, o) for o in others]
    assert [intersects(a, o) for o in others] == verdicts and 0 < sum(verdicts) < len(verdicts)
