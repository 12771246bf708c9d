"""Uniform noise and its l1 certificate ``||delta / lambda||_1 <= 2 p_A - 1``, checked against exact and Monte
Carlo probabilities on linear classifiers."""

import math

import pytest
import torch

from smoothcert.noise.base import noise_from_parameters
from smoothcert.geometry.regions import CrossPolytope
from smoothcert.engine.sampling import input_generator, sample_counts
from smoothcert.engine.smooth import certify
from smoothcert.noise.uniform import UniformDiagonal, uniform_tv

from soundness import assert_sound, linear_case, plan, violations_of

F64 = torch.float64


def test_draws_range_std_and_parameters():
    lam = torch.tensor([0.1, 0.5, 2.0], dtype=F64)
    noise = UniformDiagonal(lam)
    assert torch.equal(noise.half_width, lam.float().double())  # kept as sampled: rounded to float32
    d = noise.draw(200_000, (3,), torch.Generator().manual_seed(0), dtype=F64)
    assert (d.abs() <= noise.half_width).all()
    std = d.std(0)
    assert torch.allclose(std, lam / math.sqrt(3), rtol=0.01)  # standard error ~0.16 %
    iso = UniformDiagonal.from_std(0.5)  # sigma -> lambda = sqrt(3) sigma
    assert float(iso.half_width) == float(torch.tensor(0.5 * math.sqrt(3)).float())
    assert abs(float(iso.draw(100_000, (2,), torch.Generator().manual_seed(1), dtype=F64).std()) - 0.5) < 0.005
    again = noise_from_parameters("uniform-diagonal", noise.parameters())
    assert torch.equal(again.half_width, noise.half_width)
    iso2 = noise_from_parameters("uniform-diagonal", iso.parameters())
    assert iso2.half_width.numel() == 1 and iso2.region(torch.zeros(4), 0.5).semi_axes.shape == (4,)
    assert noise.gap(0.75) == 0.5 and noise.gap(0.5) == 0.0
    with pytest.raises(ValueError, match="half_width"):
        UniformDiagonal(torch.tensor([0.1, -1.0]))


def test_total_variation_formula_matches_monte_carlo():
    gen = torch.Generator().manual_seed(3)
    noise = UniformDiagonal(torch.tensor([0.3, 0.8, 0.5], dtype=F64))
    lam = noise.half_width  # the half-widths as sampled (float32 values)
    n = 400_000
    for delta in [torch.tensor([0.1, 0.2, -0.3], dtype=F64), torch.tensor([0.55, 0.0, 0.0], dtype=F64)]:
        pts = noise.draw(n, (3,), gen, dtype=F64)  # U_0; fraction outside the shifted box = TV
        outside = ((pts - delta).abs() > lam).any(1).double().mean()
        tv = float(uniform_tv(delta[None], lam)[0])
        assert abs(float(outside) - tv) < 5 * math.sqrt(0.25 / n)
        assert tv <= 0.5 * float((delta.abs() / lam).sum()) + 1e-12  # the union bound behind the l1 region


def axis_probability(x, j, t, lam):
    """Exact P(x_j + eps_j > t) for eps_j ~ U[-lam_j, lam_j]."""
    return torch.clamp((x[..., j] + lam[j] - t) / (2 * lam[j]), 0.0, 1.0)


def test_l1_region_is_exact_along_an_axis_and_sound_inside():
    """Axis-aligned classifier x_j > t: p(x) is linear in x_j, so the region's vertex along e_j has p = 1/2."""
    x = torch.tensor([0.5, 0.5, 0.5], dtype=F64)
    noise = UniformDiagonal(torch.tensor([0.4, 0.25, 0.6], dtype=F64))
    lam = noise.half_width  # exact probabilities of the noise as sampled
    gen = torch.Generator().manual_seed(0)
    for j, t in [(0, 0.3), (1, 0.35), (2, 0.1)]:
        p = float(axis_probability(x, j, t, lam))
        assert 0.5 < p < 1.0
        region = noise.region(x, noise.gap(p))
        vertex = x.clone()
        vertex[j] -= float(region.semi_axes[j])  # toward the boundary
        assert math.isclose(float(axis_probability(vertex, j, t, lam)), 0.5, abs_tol=1e-12)
        # every point of the region keeps p >= 1/2 (random points on the region's boundary)
        u = torch.randn(2000, 3, generator=gen, dtype=F64)
        u = u / u.abs().sum(1, keepdim=True)
        boundary = x + u * region.semi_axes
        assert region.contains(boundary * (1 - 1e-12) + x * 1e-12).all()
        assert (axis_probability(boundary, j, t, lam) >= 0.5 - 1e-12).all()


def test_l1_region_is_sound_for_an_oblique_linear_classifier_by_monte_carlo():
    """w . x > b with unequal half-widths: p at every vertex of the region stays >= 1/2 (Monte Carlo)."""
    n = 200_000
    w = torch.tensor([1.0, -0.7, 0.4])
    b = 0.1
    lam = torch.tensor([0.3, 0.5, 0.2], dtype=F64)
    noise = UniformDiagonal(lam)
    x = torch.tensor([0.3, 0.1, 0.2])

    def model(z):
        s = z.reshape(z.shape[0], -1) @ w - b
        return torch.stack([-s, s], 1)

    def p_hat(points, stream):
        gens = [input_generator(0, i, stream) for i in range(points.shape[0])]
        c = sample_counts(model, points.float(), noise, n, 2, batch_size=50_000, generators=gens)
        return c[:, 1].double() / n

    p = float(p_hat(x[None], "center")[0])
    tol = 4 * math.sqrt(0.25 / n)
    gap = noise.gap(p - tol)  # a (Monte Carlo) lower bound of p_A
    region = noise.region(x, gap)
    vertices = x.double() + torch.cat([torch.diag(region.semi_axes), -torch.diag(region.semi_axes)])
    assert (p_hat(vertices, "vertices") >= 0.5 - tol).all()


def test_certify_with_uniform_noise_gives_l1_regions():
    w = torch.tensor([0.0, 1.0])

    def model(z):
        s = z.reshape(z.shape[0], -1) @ w - 0.2
        return torch.stack([-s, s], 1)

    x = torch.tensor([[0.5, 0.5]])
    noise = UniformDiagonal(torch.tensor([0.2, 0.5], dtype=F64))
    (cert,) = certify(model, x, noise, 2, 100, 5000, 0.001, generators=[input_generator(0, 0, "c")])
    assert cert.prediction == 1 and isinstance(cert.region, CrossPolytope)
    assert math.isclose(cert.gap, 2 * cert.p_lower - 1)
    assert torch.allclose(cert.region.semi_axes, noise.half_width * cert.gap)
    # the exact p along x_2 is (0.5 + 0.5 - 0.2) / 1.0 = 0.8: the certified extent toward the boundary
    # (0.5 * gap) must stay below the true distance 0.3 (= 0.5 * (2 * 0.8 - 1))
    assert 0.5 * cert.gap <= 0.3


@pytest.mark.parametrize("half_width, weight", [
    (0.5, None), ((0.3, 0.9, 0.5, 0.2, 0.7, 0.4), None),
    (0.5, (0.0, 0.0, 1.0, 0.0, 0.0, 0.0)),  # axis-aligned: p is linear in the margin and the l1 radius is exact
])
def test_certified_l1_regions_are_sound_on_linear_classifiers(half_width, weight):
    """Isotropic and anisotropic uniform noise on a linear classifier (exact region: the half-space on the input's
    side): the largest l1 ball in the region (radius ``gap * min lambda``; for isotropic noise Yang et al.'s
    ``lambda (2 p_A - 1)``) against the exact l1 distance ``|w . x + b| / ||w||_inf``, the cross-polytope's reach
    toward the hyperplane, the inscribed l2 radius and the class: claims beyond the truth in at most an alpha
    share of trials. For an oblique boundary the union bound leaves slack; along an axis the certificate is
    tight (``p_A = 1/2 + margin / (2 lambda)``), so there a too-loose bound shows at once."""
    p = plan(0.05)  # 501 trials, at most 41 violations: P(sound passes) 0.9991, P(2 alpha fails) 0.9024
    case = linear_case(p.trials, 6, seed=8, weight=weight)
    noise = UniformDiagonal(torch.as_tensor(half_width, dtype=F64))
    certs = certify(case.model, case.x, noise, 2, 50, 500, p.alpha, batch_size=4000, block=500,
                    generators=[(input_generator(9, i, "select"), input_generator(9, i, "estimate"))
                                for i in range(p.trials)], range_policy="ignore")
    regions = [c.region for c in certs]
    assert all(isinstance(r, CrossPolytope) for r in regions if r is not None)
    assert sum(r is not None for r in regions) > p.trials / 2
    l1_radius = [0.0 if r is None else float(r.semi_axes.min()) for r in regions]
    predicted = [c.prediction for c in certs]
    violations = (violations_of(l1_radius, case.distance("l1"), predicted, case.label)
                  | violations_of(case.reach(regions), case.distance("l2"))
                  | violations_of([c.radius for c in certs], case.distance("l2")))
    assert_sound(violations, p)


# -------------------------------------------------------------------- isotropic radii: one-sided, two-sided, l_inf
def test_isotropic_l1_and_linf_radii_closed_forms():
    """Yang et al.'s l1 radius ``lambda (2 p_A - 1)`` (two-sided ``lambda (p_A - p_B)``) and the exact l_inf radius
    ``2 lambda (1 - (3/2 - p_A)^(1/d))``: at that radius the corner total variation ``1 - (1 - r / (2 lambda))^d``
    spends exactly ``p_A - 1/2`` (two-sided ``(p_A - p_B) / 2``)."""
    from smoothcert.noise.uniform import uniform_half_width, uniform_l1_radius, uniform_linf_radius

    lam = uniform_half_width(0.25)
    assert lam == 0.25 * math.sqrt(3)
    for p_a in (0.5, 0.6, 0.9, 0.999):
        assert math.isclose(uniform_l1_radius(p_a, lam), lam * (2 * p_a - 1), abs_tol=1e-15)
        for d in (1, 3, 784):
            r = uniform_linf_radius(p_a, lam, d)
            assert r <= 2 * lam * (1 - (1.5 - p_a) ** (1 / d)) + 1e-15
            tv = -math.expm1(d * math.log1p(-r / (2 * lam)))  # uniform_tv at the corner, without the product's rounding
            assert tv <= p_a - 0.5 and math.isclose(tv, p_a - 0.5, abs_tol=1e-12)
            assert r >= uniform_l1_radius(p_a, lam) / d * (1 - 1e-12)  # never below the l1 ball's l_inf radius
    for p_a, p_b in ((0.6, 0.1), (0.45, 0.3), (0.9, 0.1)):
        assert math.isclose(uniform_l1_radius(p_a, lam, p_b), lam * (p_a - p_b))
        r = uniform_linf_radius(p_a, lam, 5, p_b)
        tv = float(uniform_tv(torch.full((1, 5), r, dtype=F64), torch.tensor(lam, dtype=F64))[0])
        assert tv <= (p_a - p_b) / 2 + 1e-15 and math.isclose(tv, (p_a - p_b) / 2, abs_tol=1e-12)
    assert math.isclose(uniform_linf_radius(0.9, lam, 5, 0.1), uniform_linf_radius(0.9, lam, 5))
    assert uniform_l1_radius(0.4, lam) == 0.0 and uniform_linf_radius(0.5, lam, 3) == 0.0


def test_linf_radius_is_attained_by_a_worst_case_classifier():
    """d = 3, p_A = 0.8: the classifier that answers c_A on ``U_0 \\ U_delta`` and on a slab of the overlap of mass
    1/2 has p_A = 0.8 at x and exactly 1/2 at ``x + delta``, ``delta = R (1, 1, 1)`` with R the certified l_inf
    radius: no larger l_inf radius is true (Monte Carlo with the family's own sampler)."""
    from smoothcert.noise.uniform import uniform_linf_radius

    lam, d, p_a, n = 1.0, 3, 0.8, 400_000
    noise = UniformDiagonal.isotropic(lam)
    r = uniform_linf_radius(p_a, lam, d)
    side = 2 * lam - r  # the overlap [-lam + r, lam]^d has mass (side / (2 lam))^d = 1 - TV = 1.5 - p_a
    cut = -lam + r + 0.5 / (side / (2 * lam)) ** (d - 1) * (2 * lam)  # overlap slab {z_1 < cut} of mass 1/2

    def is_a(z):  # z: offsets from x; c_A on U_0 minus U_delta and on the overlap's slab, c_B elsewhere
        in_0, in_shift = (z.abs() <= lam).all(1), ((z - r).abs() <= lam).all(1)
        return (in_0 & ~in_shift) | (in_0 & in_shift & (z[:, 0] < cut))

    eps = noise.draw(n, (d,), torch.Generator().manual_seed(5), dtype=F64)
    tol = 5 * math.sqrt(0.25 / n)
    assert abs(float(is_a(eps).double().mean()) - p_a) < tol
    assert abs(float(is_a(eps + r).double().mean()) - 0.5) < tol


def test_uniform_noise_records_native_l1_and_linf():
    noise = UniformDiagonal.from_std(0.25)
    region = noise.region(torch.zeros(784), noise.gap(0.9))
    radii = noise.norm_radii(0.9, noise.gap(0.9), region)
    assert radii["l1"] == region.norm_radius and radii.marker() == "l2"
    assert radii["linf"] > radii["l1"] / 784 and radii["l2"] == region.inscribed_radius
    with pytest.raises(ValueError, match="sigma"):
        UniformDiagonal.from_std(0.0)
