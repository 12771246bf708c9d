"""Low-rank RANCER (``--rancer-rank K``): top-K eigenvectors by Hessian-vector products against the full Hessian,
the clipped ascent, soundness with memory on a linear classifier, and bad ranks refused before any sampling."""

import pytest
import torch

from smoothcert.geometry.lowrank import LowRankEllipsoid
from smoothcert.methods.base import RunContext
from smoothcert.methods.hessian import loss_hessian, top_eigenvectors
from smoothcert.methods.lowrank_rancer import optimize_lowrank
from smoothcert.methods.rancer import RANCER
from smoothcert.noise.lowrank import LowRankGaussian

from soundness import assert_sound, data_dependent_violations, linear_case, linear_problem, plan
from test_dds import gens

F64 = torch.float64


class Smooth(torch.nn.Module):
    """A twice-differentiable net (tanh): the Hessian has a full spectrum."""

    def __init__(self, d, k=4, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.a, self.b = torch.nn.Linear(d, 16), torch.nn.Linear(16, k)

    def forward(self, x):
        return self.b(torch.tanh(3 * self.a(x.reshape(x.shape[0], -1))))


@pytest.mark.parametrize("relu", [False, True])
def test_top_eigenvectors_match_the_full_hessian(relu):
    d, k = 30, 4
    model = Smooth(d) if not relu else torch.nn.Sequential(torch.nn.Linear(d, 32), torch.nn.ReLU(),
                                                          torch.nn.Linear(32, 6))
    x = torch.rand(3, d, generator=torch.Generator().manual_seed(1))
    q, values, finite = top_eigenvectors(model, x, k, generators=gens("h", 3), iters=6)
    hess, _ = loss_hessian(model, x)
    assert finite.all() and q.shape == (3, d, k)
    for i in range(3):
        ev, vec = torch.linalg.eigh(hess[i])
        order = ev.abs().argsort(descending=True)[:k]
        assert torch.allclose(values[i], ev[order], rtol=1e-4, atol=1e-6 * float(ev.abs().max()))
        # the same subspace: the projection of the exact eigenvectors onto span(Q) keeps their norm
        assert torch.allclose(q[i].T @ q[i], torch.eye(k, dtype=F64), atol=1e-12)
        kept = torch.linalg.vector_norm(q[i].T @ vec[:, order], dim=0)
        assert bool((kept > 1 - 1e-4).all()), kept
    # input i's start comes from its own stream: the same alone as in the batch
    alone = top_eigenvectors(model, x[1:2], k, generators=gens("h", 3)[1:2], iters=6)[0]
    assert torch.allclose(alone[0].abs(), q[1].abs(), atol=1e-6)


def test_the_ascent_stays_in_the_window_and_stretches_along_the_flat_subspace():
    model, x0, w = linear_problem(12, margin=0.1, scale=30.0)
    x = x0[None]
    # a basis orthogonal to the classifier's normal: noise along it never changes the class
    q = torch.linalg.qr(torch.cat([w[:, None], torch.randn(12, 3, generator=torch.Generator().manual_seed(0))], 1)
                        .double())[0][:, 1:][None]
    seen = []
    theta = torch.tensor([0.1])
    result = optimize_lowrank(model, x, theta, q, generators=gens("o", 1), lower=theta * 0.5, upper=theta * 1.5,
                              steps=40, callback=lambda s, p: seen.append(p.clone()))
    assert all(bool(((p >= 0.05 - 1e-7) & (p <= 0.15 + 1e-7)).all()) for p in seen) and len(seen) == 40
    s, perp = result.params[0, :3], result.params[0, 3]
    assert bool((s > 0.149).all()) and float(perp) < 0.149  # the flat directions go to the top of the window


def test_low_rank_rancer_certificates_with_memory_never_cross_a_linear_boundary_beyond_alpha():
    p = plan(0.2)
    case = linear_case(p.trials, 8, seed=4, scale=3.0)
    method = RANCER(0.3, samples=32, dds_steps=10, steps=20, rancer_rank=3)
    violations, rows = data_dependent_violations(method, case, n0=50, n=400, alpha=p.alpha, seed=1000)
    assert sum(r["predict"] != -1 for r in rows) >= p.trials // 2, "the test would be vacuous"
    assert {r["basis"] for r in rows if r["fallback"] == "none"} == {"hessian-lowrank"}
    stored = [region for _, _, region in method.memory.memory.stored]
    assert any(isinstance(r, LowRankEllipsoid) and r.rank == 3 for r in stored)
    assert_sound(violations, p)


def test_low_rank_noise_of_a_run_is_saved_and_rebuilt(tmp_path):
    model, x0, _ = linear_problem(6)
    ctx = RunContext(model, 2, 20, 200, 0.01, 200, torch.float32, 0, torch.device("cpu"))
    method = RANCER(0.2, samples=16, dds_steps=3, steps=4, memory=False, rancer_rank=2)
    choices = method.choose(ctx, torch.stack([x0, x0 + 0.01]), [0, 1])
    for c in choices:
        assert isinstance(c.noise, LowRankGaussian) and c.noise.rank == 2
        params = c.noise.parameters()
        assert params["basis"].shape == (6, 2) and params["theta"].shape == (6,)
        again = LowRankGaussian(**params)
        assert all(torch.equal(a, b) for a, b in zip(again.parameters().values(), params.values()))


class Counting(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


@pytest.mark.parametrize("keywords, match", [
    ({"rancer_rank": 7}, r"rancer_rank \(--rancer-rank\) must be 0 \(the full-matrix path\) or an integer in \[1, d = 6\]"),
    ({"rancer_rank": 2, "rancer_scales": "eigen-final"}, "--rancer-scales isotropic"),
])
def test_bad_rank_is_refused_before_any_sampling(keywords, match):
    model, x0, _ = linear_problem(6)
    counting = Counting(model)
    ctx = RunContext(counting, 2, 20, 200, 0.01, 200, torch.float32, 0, torch.device("cpu"))
    method = RANCER(0.2, samples=16, dds_steps=3, steps=4, memory=False, **keywords)
    with pytest.raises(ValueError, match=match):
        method.choose(ctx, x0[None], [0])
    with pytest.raises(ValueError, match=match):
        method.check_input_shape((6,))
    assert counting.calls == 0


@pytest.mark.parametrize("rank, match", [(-1, "rancer_rank"), (1.5, "rancer_rank")])
def test_negative_or_fractional_rank_is_a_settings_error(rank, match):
    with pytest.raises((ValueError, TypeError), match=match):
        RANCER(0.2, rancer_rank=rank)
