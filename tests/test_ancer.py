"""ANCER (seed 000 eq. 3.15): objective, constraint at every step, soundness of the certified ellipsoid."""

import math

import pytest
import torch
from scipy import stats

from smoothcert.geometry.regions import CrossPolytope
from smoothcert.methods.base import RunContext
from smoothcert.methods.ancer import ANCER, anisotropic_objective, optimize_ancer
from smoothcert.methods.optimize import mean_probs, objective_gap, standard_draws
from smoothcert.noise.gaussian import DiagonalGaussian
from smoothcert.noise.uniform import UniformDiagonal

from test_dds import Ellipse, gens


def proxy_estimate(model, x, theta, classes, family="gaussian", n=20000):
    """gap(p_A) * geomean(theta) from many samples of an evaluation stream."""
    w = standard_draws(gens("evaluate", x.shape[0], seed=99), n, tuple(x.shape[1:]), family)
    th = theta.float()
    p = mean_probs(model, x, w, lambda v, rows: v * th[rows, None, :])
    return objective_gap(p, classes, family) * torch.exp(torch.log(theta.double()).mean(1)).float()


def test_objective_rises_and_theta_stays_above_theta_iso_at_every_step():
    model = Ellipse()  # axis-aligned: long along x_1
    x = torch.tensor([[0.5, 0.5], [0.45, 0.52]])
    theta_iso = torch.tensor([0.05, 0.04])
    seen = []
    result = optimize_ancer(model, x, theta_iso, generators=gens("ancer", 2), steps=100, samples=100,
                            callback=lambda step, th: seen.append(th.clone()))
    assert len(seen) == 100 and result.params.shape == (2, 2) and result.finite.all()
    assert all(bool((th >= theta_iso[:, None]).all()) for th in seen)
    start = proxy_estimate(model, x, theta_iso[:, None].expand(2, 2), result.classes)
    end = proxy_estimate(model, x, result.params, result.classes)
    assert (end > start * 1.2).all(), (start, end)
    # it stretches along the ellipse's long axis (x_1), not across
    assert (result.params[:, 0] > 2 * result.params[:, 1]).all(), result.params


def test_objective_formula_in_log_space():
    theta = torch.tensor([[0.5, 2.0, 1.0], [1e-3] * 3])
    gap = torch.tensor([1.5, 2.0])
    got = anisotropic_objective(gap, theta, 2.0)
    assert torch.allclose(got, torch.tensor([1.5 * 1.0 + 2 * 1.5 * 0.5, 2.0 * 1e-3 + 2 * 2.0 * 1e-3]))
    big = torch.full((1, 784), 1e-3)  # the product underflows in float32; the log-space mean does not
    assert torch.prod(big) == 0 and torch.isclose(anisotropic_objective(torch.ones(1), big, 0.0), torch.tensor(1e-3))


class Linear(torch.nn.Module):
    """Binary linear classifier: logits (0, k (w . x + b)); class 1 on the side w . x + b > 0."""

    def __init__(self, w, b, k=3.0):
        super().__init__()
        self.register_buffer("w", w)
        self.b, self.k = b, k

    def forward(self, x):
        s = self.k * (x.reshape(x.shape[0], -1) @ self.w + self.b)
        return torch.stack([torch.zeros_like(s), s], 1)


def linear_problem(d=8, seed=0, margin=0.3):
    """A random hyperplane and inputs at distance ``margin`` on its class-1 side."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, generator=g)
    w = w / w.norm()
    x0 = 0.5 + 0.1 * torch.randn(d, generator=g)
    b = -float(x0 @ w) + margin  # w . x0 + b = margin
    return Linear(w, b), x0, w


def extent_along(region, normal):
    """``max_{y in region} (y - c) . n``: ``||diag(a) B^T n||`` for an ellipsoid (support function)."""
    n = normal.double()
    if isinstance(region, CrossPolytope):
        return float((region.semi_axes * n.abs()).max())
    local = n if region.basis is None else region.basis.T @ n
    return float(torch.linalg.vector_norm(region.semi_axes * local))


def soundness_violations(method_factory, trials=40, alpha=0.1, d=8, margin=0.25, n=400):
    """Run a data-dependent method on seeded linear problems; count certificates that cross the boundary.

    For a linear classifier the smoothed classifier (any symmetric noise) predicts the side of ``x``, so a
    region that reaches the other half-space (extent along the normal >= margin), or a wrong prediction,
    is a failed certificate: that happens with probability at most ``alpha`` per trial.
    """
    violations = certified = 0
    for t in range(trials):
        model, x0, w = linear_problem(d, seed=t, margin=margin)
        ctx = RunContext(model, 2, 50, n, alpha, 400, torch.float32, 1000 + t, torch.device("cpu"))
        method = method_factory()
        rows = method.certify(ctx, x0[None], torch.tensor([1]), [t])
        row = rows[0]
        if row["predict"] == -1:
            continue
        certified += 1
        cert_region = method.last_certificates[0].region
        if row["predict"] != 1 or extent_along(cert_region, w) >= margin:
            violations += 1
    return violations, certified


def assert_sound(violations, certified, trials, alpha):
    """P(Binomial(trials, alpha) >= violations) must not be tiny (1e-3): no more failures than alpha allows."""
    assert certified >= trials // 2, f"only {certified} of {trials} certified: the test would be vacuous"
    assert stats.binom.sf(violations - 1, trials, alpha) > 1e-3, (violations, trials)


def test_certified_ellipsoids_never_cross_a_linear_boundary_beyond_alpha():
    alpha, trials = 0.1, 40
    violations, certified = soundness_violations(
        lambda: ANCER(0.3, samples=32, dds_steps=10, steps=20, lr=0.04, memory=False), trials, alpha)
    assert_sound(violations, certified, trials, alpha)


def test_l1_with_uniform_noise():
    alpha, trials = 0.1, 30
    violations, certified = soundness_violations(
        lambda: ANCER(0.3, samples=32, dds_steps=10, steps=20, norm="l1", memory=False), trials, alpha)
    assert_sound(violations, certified, trials, alpha)
    method = ANCER(0.2, samples=16, dds_steps=3, steps=3, norm="l1", memory=False)
    model, x0, _ = linear_problem(4)
    ctx = RunContext(model, 2, 20, 200, 0.01, 200, torch.float32, 0, torch.device("cpu"))
    (row,) = method.certify(ctx, x0[None], torch.tensor([1]), [0])
    region = method.last_certificates[0].region
    assert isinstance(region, CrossPolytope) and row["norm"] == "l1"
    assert row["radius_norm"] == float(region.semi_axes.min()) >= row["radius"] > 0
    assert math.isclose(row["gap"], 2 * row["p_lower"] - 1, rel_tol=1e-12)
    assert row["min_scale"] >= math.sqrt(3) * 0.2 / 100


def test_method_rows_and_noise(tmp_path):
    model, x0, _ = linear_problem(4)
    ctx = RunContext(model, 2, 20, 200, 0.01, 200, torch.float32, 0, torch.device("cpu"))
    method = ANCER(0.2, samples=16, dds_steps=3, steps=4, memory=False)
    method.open(ctx, tmp_path / "r.tsv", [])
    (row,) = method.certify(ctx, x0[None], torch.tensor([1]), [5])
    noise = ANCER.load_noise(tmp_path / "r.tsv", 5)
    assert isinstance(noise, DiagonalGaussian)
    assert float(noise.theta.min()) >= row["scale_iso"] * (1 - 1e-6)
    assert math.isclose(row["min_scale"], float(noise.theta.min()), rel_tol=1e-9)
    assert set(ANCER.columns) <= set(row)
    assert method.config()["kappa"] == 2.0 and method.config()["ancer_steps"] == 4
    with pytest.raises(ValueError, match="kappa"):
        ANCER(0.2, kappa=-1.0)


def test_uniform_family_objective_rises():
    model = Ellipse()
    x = torch.tensor([[0.5, 0.5]])
    lam = torch.tensor([0.08])
    result = optimize_ancer(model, x, lam, generators=gens("u", 1), steps=60, family="uniform")
    assert (result.params >= lam[:, None] - 1e-7).all()
    start = proxy_estimate(model, x, lam[:, None].expand(1, 2), result.classes, "uniform")
    end = proxy_estimate(model, x, result.params, result.classes, "uniform")
    assert (end > start * 1.2).all(), (start, end)
    assert isinstance(UniformDiagonal(result.params[0].double()).region(x[0], 0.5), CrossPolytope)


@pytest.mark.slow
def test_radius_constraint_keeps_the_isotropic_ball_inside_the_certified_ellipsoid():
    """constraint="radius" (seed 000 eq. 3.15): the certified ellipsoid's smallest semi-axis min_i theta_i * gap(theta)
    is at least the isotropic radius r_iso = theta_iso * gap(theta_iso), both gaps estimated from 20,000 independent
    samples (3% tolerance for the optimizer's own 2,000-sample estimates). The elementwise form theta >= theta_iso
    does not imply it: stretching theta lowers the gap."""
    model = Ellipse(k=3.0)
    x = torch.tensor([[0.5, 0.5], [0.5, 0.6], [0.7, 0.5]])
    theta_iso = torch.tensor([0.05, 0.04, 0.06])

    def smallest_axis_over_r_iso(constraint):
        result = optimize_ancer(model, x, theta_iso, generators=gens("ancer", 3), steps=100, samples=2000,
                                constraint=constraint)
        gap_iso = proxy_estimate(model, x, theta_iso[:, None].expand(3, 2), result.classes) / theta_iso
        gap_end = proxy_estimate(model, x, result.params, result.classes) / torch.exp(
            torch.log(result.params.double()).mean(1)).float()
        return result, result.params.min(1).values * gap_end / (theta_iso * gap_iso)

    result, ratio = smallest_axis_over_r_iso("radius")
    assert result.finite.all() and (ratio >= 0.97).all(), ratio
    assert (result.params > theta_iso[:, None] / 100).all()
    _, elementwise = smallest_axis_over_r_iso("elementwise")
    assert (elementwise < 0.99).any(), elementwise
    with pytest.raises(ValueError, match="constraint"):
        optimize_ancer(model, x, theta_iso, generators=gens("ancer", 3), constraint="box")
    assert ANCER(0.25, constraint="radius").config()["ancer_constraint"] == "radius"
