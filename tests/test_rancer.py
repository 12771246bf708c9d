"""RANCER (seed 000 ch. 4): Hessian basis, clipping window at every step, soundness, best-of on its own streams."""

import math

import pytest
import torch

from smoothcert.methods.hessian import hessian_basis
from smoothcert.methods.base import RunContext
from smoothcert.methods.ancer import optimize_ancer
from smoothcert.methods.datadependent import DataDependentMethod
from smoothcert.methods.rancer import RANCER, RANCERBest, eigen_scales
from smoothcert.noise.gaussian import DiagonalGaussian, RotatedGaussian

from soundness import assert_sound, data_dependent_violations, linear_case, linear_problem, plan
from test_dds import Ellipse, gens


def test_hessian_basis_follows_a_rotated_boundary_and_theta_stays_in_the_window():
    angle = 0.6
    model = Ellipse(angle=angle, axes=(0.5, 0.12))
    x = torch.tensor([[0.5, 0.5], [0.53, 0.5]])
    basis, _, finite, form = hessian_basis(model, x)
    assert finite.all() and form == "double"  # a quadratic model: second derivatives matter
    axis = torch.tensor([math.cos(angle), math.sin(angle)], dtype=torch.float64)
    # at the centre one eigenvector is the ellipse's long axis (up to sign); off-centre, close to it
    alignment = (basis.transpose(1, 2) @ axis).abs().amax(1)
    assert math.isclose(float(alignment[0]), 1.0, abs_tol=1e-9) and float(alignment[1]) > 0.99
    theta_iso = torch.tensor([0.05, 0.04])
    seen = []
    result = optimize_ancer(model, x, theta_iso, generators=gens("r", 2), lower=theta_iso * 0.5,
                            upper=theta_iso * 1.5, basis=basis, steps=60, callback=lambda s, t: seen.append(t.clone()))
    assert len(seen) == 60
    low, high = (theta_iso * 0.5)[:, None], (theta_iso * 1.5)[:, None]
    assert all(bool(((t >= low) & (t <= high)).all()) for t in seen)
    # along the long axis theta grows to the top of the window, across it stays smaller
    along = (basis.transpose(1, 2) @ axis).abs().argmax(1)
    for i in range(2):
        assert math.isclose(float(result.params[i, along[i]]), float(high[i]), rel_tol=1e-5)
        assert float(result.params[i, 1 - along[i]]) < float(high[i]) * 0.9


@pytest.mark.parametrize("method_class", [RANCER, RANCERBest])
def test_rotated_certificates_never_cross_a_linear_boundary_beyond_alpha(method_class):
    """RANCER (and its best-of with ANCER) with memory on, all inputs of a linear problem in one run: the rows, the
    rotated ellipsoids and what the memory stored claim more than the exact half-space in at most an alpha share."""
    p = plan(0.2)  # 97 trials, at most 32 violations: P(sound passes) 0.9991, P(2 alpha fails) 0.9052
    case = linear_case(p.trials, 8, seed=4, scale=3.0)
    extra = dict(select_samples=200) if method_class is RANCERBest else {}
    method = method_class(0.3, samples=32, dds_steps=10, steps=20, **extra)
    violations, rows = data_dependent_violations(method, case, n0=50, n=400, alpha=p.alpha, seed=1000)
    assert sum(r["predict"] != -1 for r in rows) >= p.trials // 2, "the test would be vacuous"
    assert_sound(violations, p)


def test_rows_saved_basis_and_fall_back_to_the_axes(tmp_path):
    model, x0, _ = linear_problem(5)
    ctx = RunContext(model, 2, 20, 200, 0.01, 200, torch.float32, 0, torch.device("cpu"))
    method = RANCER(0.2, samples=16, dds_steps=3, steps=4, memory=False)
    method.open(ctx, tmp_path / "r.tsv", [])
    (row,) = method.certify_rows(ctx, x0[None], torch.tensor([1]), [2])
    noise = DataDependentMethod.load_noise(tmp_path / "r.tsv", 2)
    assert isinstance(noise, RotatedGaussian) and row["basis"] == "hessian"
    iso = row["scale_iso"]
    assert iso * 0.5 * (1 - 1e-6) <= float(noise.theta.min()) <= float(noise.theta.max()) <= iso * 1.5 * (1 + 1e-6)
    assert method.config()["rancer_lambda1"] == 0.5 and method.config()["hessian"] == "auto"

    class Exploding(torch.nn.Module):
        def forward(self, v):
            return model(v) * torch.where(v[:, :1] > 10, float("inf"), 1.0).detach()

    # non-finite Hessian at the input (first coordinate moved beyond 10): the axis-aligned basis is used
    x_bad = x0.clone()
    x_bad[0] = 10.5
    basis, _, finite, _ = hessian_basis(Exploding(), x_bad[None])
    assert not finite[0] and torch.equal(basis[0], torch.eye(5, dtype=torch.float64))


def test_best_of_chooses_on_its_own_streams_and_certifies_only_the_winner(tmp_path):
    model = Ellipse(angle=0.7, axes=(0.5, 0.12))
    x = torch.tensor([[0.5, 0.5], [0.52, 0.49]])
    ctx = RunContext(model, 2, 30, 300, 0.01, 300, torch.float32, 0, torch.device("cpu"))
    kw = dict(samples=40, dds_steps=20, dds_lr=0.002, steps=30, memory=False)
    best = RANCERBest(0.1, select_samples=500, **kw)
    best.open(ctx, tmp_path / "b.tsv", [])
    rows = best.certify_rows(ctx, x, torch.tensor([1, 1]), [0, 1])
    for i, row in enumerate(rows):
        assert row["chosen"] == ("rancer" if row["proxy_rancer"] > row["proxy_ancer"] else "ancer")
        noise = DataDependentMethod.load_noise(tmp_path / "b.tsv", i)
        assert isinstance(noise, RotatedGaussian if row["chosen"] == "rancer" else DiagonalGaussian)
    assert any(row["chosen"] == "rancer" for row in rows)  # the rotated boundary favours RANCER
    # the candidates are exactly what ANCER and RANCER alone produce (same optimization streams) ...
    plain = RANCER(0.1, **kw)
    plain.open(ctx, tmp_path / "r.tsv", [])
    rancer_rows = plain.certify_rows(ctx, x, torch.tensor([1, 1]), [0, 1])
    for i, (row, r) in enumerate(zip(rows, rancer_rows)):
        if row["chosen"] == "rancer":  # ... and the winner is certified on the usual certification streams
            assert row["radius"] == r["radius"] and row["p_lower"] == r["p_lower"]
    # the choice streams are not the certification streams
    choose = torch.randn(6, generator=ctx.generators([0], "choose-rancer")[0])
    sel, est = ctx.certify_generators([0])[0]
    assert not torch.equal(choose, torch.randn(6, generator=sel))
    assert not torch.equal(choose, torch.randn(6, generator=est))


# ------------------------------------------------------------------- scale variants (seed 000 sections 4.3.1-4.3.3)

def test_curvature_map_maximizes_the_volume_at_the_isotropic_curvature_cost():
    """sigma sqrt(mean|lambda| / |lambda_i|) against a numerical maximization of sum log theta subject to
    sum |lambda_i| theta_i^2 = sigma^2 sum |lambda_i| (the quadratic model of seed 000 eq. 4.6)."""
    import numpy as np
    import scipy.optimize

    sigma = 0.3
    lam = torch.tensor([[0.5, -2.0, 0.1, 3.0, -0.7]], dtype=torch.float64)
    theta = eigen_scales(lam, sigma, 1e-9, 1e9)[0].numpy()
    size = lam.abs()[0].numpy()
    budget = sigma ** 2 * size.sum()
    res = scipy.optimize.minimize(lambda v: -np.sum(v), np.log(np.full(5, sigma)), method="SLSQP",
                                  constraints=[{"type": "eq", "fun": lambda v: (size * np.exp(2 * v)).sum() - budget}],
                                  options={"ftol": 1e-14, "maxiter": 500})
    assert res.success and np.allclose(theta, np.exp(res.x), rtol=1e-5)
    # the window clips; flat directions take its top, an all-zero Hessian gives sigma, direct is |lambda|
    lam = torch.tensor([[0.0, 1e-6, 4.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    clipped = eigen_scales(lam, sigma, 0.5 * sigma, 1.5 * sigma)
    third = sigma * math.sqrt((4.0 + 1e-6) / 3 / 4.0)                # inside the window
    assert torch.allclose(clipped[0], torch.tensor([1.5 * sigma, 1.5 * sigma, third], dtype=torch.float64))
    assert float(eigen_scales(lam * 100, sigma, 0.5 * sigma, 1.5 * sigma)[0, 1]) == 1.5 * sigma
    assert torch.allclose(clipped[1], torch.full((3,), sigma, dtype=torch.float64))
    direct = eigen_scales(torch.tensor([[-0.2, 0.01, 0.3]], dtype=torch.float64), sigma, 0.15, 0.45, "direct")
    assert torch.allclose(direct, torch.tensor([[0.2, 0.15, 0.3]], dtype=torch.float64))
    with pytest.raises(ValueError, match="eigenvalue map"):
        eigen_scales(lam, sigma, 0.1, 1.0, "inverse")


@pytest.mark.slow
@pytest.mark.parametrize("scales", ["eigen-init", "eigen-final"])
def test_eigen_variants_never_cross_a_linear_boundary_beyond_alpha(scales):
    """The eigenvalue-scaled variants with memory on, all inputs of a linear problem in one run: the rows, the
    rotated ellipsoids and what the memory stored claim more than the exact half-space in at most an alpha share."""
    p = plan(0.2)  # 97 trials, at most 32 violations: P(sound passes) 0.9991, P(2 alpha fails) 0.9052
    case = linear_case(p.trials, 8, seed=5, scale=3.0)
    method = RANCER(0.3, samples=32, steps=20, scales=scales, eigen_map="curvature")
    violations, rows = data_dependent_violations(method, case, n0=50, n=400, alpha=p.alpha, seed=1000)
    assert sum(r["predict"] != -1 for r in rows) >= p.trials // 2, "the test would be vacuous"
    assert_sound(violations, p)


def test_eigen_final_uses_the_mapped_eigenvalues_and_eigen_init_optimizes_from_them(tmp_path):
    model, x0, _ = linear_problem(5)
    ctx = RunContext(model, 2, 20, 200, 0.01, 200, torch.float32, 0, torch.device("cpu"))
    x = x0[None]
    basis, eigenvalues, _, _ = hessian_basis(model, x)
    expected = eigen_scales(eigenvalues, 0.2, 0.1, 0.3)[0]
    thetas = {}
    for scales, steps in (("eigen-final", 30), ("eigen-init", 0), ("eigen-init", 30), ("isotropic", 30)):
        method = RANCER(0.2, samples=16, dds_steps=3, steps=steps, memory=False, scales=scales, eigen_map="curvature")
        method.open(ctx, tmp_path / f"{scales}-{steps}.tsv", [])
        (row,) = method.certify_rows(ctx, x, torch.tensor([1]), [2])
        noise = DataDependentMethod.load_noise(tmp_path / f"{scales}-{steps}.tsv", 2)
        assert isinstance(noise, RotatedGaussian) and row["basis"] == "hessian"
        assert torch.allclose(noise.basis.abs(), basis[0].abs())
        assert math.isnan(row["scale_iso"]) == (scales != "isotropic")   # no DDS stage for the eigen variants
        thetas[scales, steps] = noise.theta.double()
    assert torch.allclose(thetas["eigen-final", 30], expected, rtol=1e-6)   # the map, clipped, no optimization
    assert torch.allclose(thetas["eigen-init", 0], expected, rtol=1e-6)
    moved = thetas["eigen-init", 30]
    assert not torch.allclose(moved, expected) and bool(((moved >= 0.1 - 1e-7) & (moved <= 0.3 + 1e-7)).all())
    assert RANCER(0.2, scales="eigen-init").config()["rancer_scales"] == "eigen-init"
    with pytest.raises(ValueError, match="rancer_scales"):
        RANCER(0.2, scales="hessian")
    with pytest.raises(ValueError, match="rancer_eigen_map"):
        RANCER(0.2, eigen_map="log")
