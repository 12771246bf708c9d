"""Low-rank RDDRS (``--rddrs-rank K``): the product-manifold exponential steps, constraints and trust region at every
step, soundness with memory on a linear classifier, and a bad rank refused before any sampling."""

import math

import pytest
import torch

from smoothcert.geometry.lowrank import LowRankEllipsoid
from smoothcert.methods.base import RunContext
from smoothcert.methods.lowrank_rddrs import optimize_rddrs_lowrank, split_params
from smoothcert.methods.rddrs import RDDRS
from smoothcert.noise.lowrank import LowRankGaussian

from soundness import assert_sound, data_dependent_violations, linear_case, linear_problem, plan
from test_dds import Ellipse, gens
from test_rancer_lowrank import Counting
from test_rddrs import Constant

F64 = torch.float64


def basis(d, k, seed=0):
    return torch.linalg.qr(torch.randn(d, k, generator=torch.Generator().manual_seed(seed), dtype=F64))[0][None]


def test_one_step_of_the_geomean_term_is_the_exponential_on_both_factors():
    """dR = 0, kappa = 0: theta dH/dtheta = R P / d and M^1/2 dH/dM M^1/2 = R P I / d, so one step multiplies theta and
    M by exp(lr R P / d) (Exp on diagonal SPD is elementwise; on SPD(k) at M = I it is expm)."""
    d, k, sigma, lr = 4, 2, 0.3, 0.7
    result = optimize_rddrs_lowrank(Constant(), torch.zeros(1, d), torch.tensor([sigma]), basis(d, k),
                                    generators=gens("k"), steps=1, lr=lr, samples=10, kappa=0.0)
    theta, m = split_params(result.params, d, k)
    r = float(torch.special.ndtri(torch.tensor(0.8, dtype=F64)))
    factor = math.exp(lr * r * sigma / d)
    assert torch.allclose(theta[0], torch.full((d,), sigma * factor, dtype=F64), rtol=1e-6)
    assert torch.allclose(m[0], factor * torch.eye(k, dtype=F64), rtol=1e-6)


def test_constraints_and_trust_region_hold_at_every_step_and_the_objective_rises():
    model = Ellipse(angle=0.5)
    x = torch.tensor([[0.5, 0.5], [0.48, 0.53]])
    floor = torch.tensor([0.05, 0.04], dtype=F64)
    q = torch.cat([basis(2, 1, 1), basis(2, 1, 2)])
    seen = []
    result = optimize_rddrs_lowrank(model, x, floor, q, generators=gens("rd", 2), steps=60, lr=1.0, samples=500,
                                    callback=lambda s, t, m: seen.append((t.clone(), m.clone())))
    assert len(seen) == 60 and result.finite.all()
    previous = (floor[:, None].expand(2, 2), torch.eye(1, dtype=F64).expand(2, 1, 1))
    for theta, m in seen:
        assert bool((theta >= floor[:, None] * (1 - 1e-12)).all())
        assert bool((torch.linalg.eigvalsh(m) >= 1 - 1e-12).all())
        # no log-factor of a step above 0.1 (before the floors, which only raise a value to its bound)
        assert bool(((theta / previous[0]).log().abs() <= 0.1 + 1e-9).all())
        previous = (theta, m)
    start, end = result.objective[:5].mean(0), result.objective[-5:].mean(0)
    assert (end > start * 1.1).all(), (start, end)
    theta, m = split_params(result.params, 2, 1)
    for i in range(2):
        ev, rot = torch.linalg.eigh(m[i])
        LowRankGaussian(theta[i], q[i] @ rot, ev - 1.0)  # a valid low-rank scale


def test_low_rank_rddrs_certificates_with_memory_never_cross_a_linear_boundary_beyond_alpha():
    p = plan(0.2)
    case = linear_case(p.trials, 8, seed=6, scale=3.0)
    method = RDDRS(0.3, samples=32, dds_steps=10, steps=10, rddrs_samples=200, rddrs_rank=3)
    violations, rows = data_dependent_violations(method, case, n0=50, n=400, alpha=p.alpha, seed=1000)
    assert sum(r["predict"] != -1 for r in rows) >= p.trials // 2, "the test would be vacuous"
    stored = [region for _, _, region in method.memory.memory.stored]
    assert any(isinstance(r, LowRankEllipsoid) and r.rank == 3 for r in stored)
    assert_sound(violations, p)


def test_bad_rank_is_refused_before_any_sampling():
    model, x0, _ = linear_problem(6)
    counting = Counting(model)
    ctx = RunContext(counting, 2, 20, 200, 0.01, 200, torch.float32, 0, torch.device("cpu"))
    method = RDDRS(0.2, samples=16, dds_steps=3, steps=4, memory=False, rddrs_rank=9)
    match = r"rddrs_rank \(--rddrs-rank\) must be 0 \(the full-matrix path\) or an integer in \[1, d = 6\]"
    with pytest.raises(ValueError, match=match):
        method.choose(ctx, x0[None], [0])
    with pytest.raises(ValueError, match=match):
        method.check_input_shape((6,))
    assert counting.calls == 0
    with pytest.raises((ValueError, TypeError), match="rddrs_rank"):
        RDDRS(0.2, rddrs_rank=-2)
