"""First-order subspace radii in the ambient norm of the perturbation (seed 004 Definition 1, Corollary 3.4), for
any description of the subspace: the geometry constants against brute force, exact-information radii against
the exact radius of a linear classifier (a linear program), and the pipeline through the soundness harness."""

import itertools
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import optimize, stats

from smoothcert.engine.sampling import input_generator
from smoothcert.methods.firstorder.certificate import FirstOrderPlan, Subspace, certify_first_order, normalized_radii

sys.path.insert(0, str(Path(__file__).parent))
from soundness import assert_sound, plan as soundness_plan, violations_of  # noqa: E402

ROT45 = np.array([[1.0, -1.0], [1.0, 1.0]]) / math.sqrt(2.0)


def _random_basis(rng, d, k):
    q, _ = np.linalg.qr(rng.standard_normal((d, k)))
    return q


def _rotation(rng, k):
    r, _ = np.linalg.qr(rng.standard_normal((k, k)))
    return r


def dual_sup(w, q, p):
    """sup of w^T delta over delta in span(q) with ||delta||_p <= 1 (scipy's linear program; p = 2 in closed form)."""
    d, k = q.shape
    if p == 2:
        return float(np.linalg.norm(q.T @ w))
    if p == "inf":
        res = optimize.linprog(-(q.T @ w), A_ub=np.vstack([q, -q]), b_ub=np.ones(2 * d), bounds=[(None, None)] * k)
    else:  # variables (c, t): |Q c| <= t, sum t <= 1
        eye = np.eye(d)
        a_ub = np.block([[q, -eye], [-q, -eye], [np.zeros((1, k)), np.ones((1, d))]])
        b_ub = np.concatenate([np.zeros(2 * d), [1.0]])
        cost = np.concatenate([-(q.T @ w), np.zeros(d)])
        res = optimize.linprog(cost, A_ub=a_ub, b_ub=b_ub, bounds=[(None, None)] * k + [(0, None)] * d)
    assert res.status == 0
    return float(-res.fun)


def _descriptions(q, r):
    return {"Q": q, "QR": q @ r, "P": q @ q.T}


# ------------------------------------------------------------------------------------------ geometry constants

def test_geometry_constants_bound_the_brute_force_values_and_do_not_depend_on_the_basis():
    rng = np.random.default_rng(0)
    for d, k in ((2, 2), (6, 1), (6, 3), (8, 5)):
        q = _random_basis(rng, d, k)
        geos = [Subspace(m).geometry((d,)) for m in _descriptions(q, _rotation(rng, k)).values()]
        for g in geos[1:]:
            assert g.dim == geos[0].dim == k
            for name in ("max_leverage", "sign_norm2", "l2_per_l1", "l2_per_linf"):
                assert getattr(g, name) == pytest.approx(getattr(geos[0], name), rel=1e-12)
        geo = geos[0]
        assert geo.max_leverage >= (q * q).sum(1).max()
        signs = np.array(list(itertools.product((-1.0, 1.0), repeat=d)))
        assert geo.sign_norm2 >= ((signs @ q) ** 2).sum(1).max()
        # rho_p: the longest l2 length of the section {delta in S : ||delta||_p <= 1}, by sampling the section
        c = rng.standard_normal((20000, k))
        delta = c @ q.T
        for p, rho in ((1, geo.l2_per_l1), (np.inf, geo.l2_per_linf)):
            lengths = np.linalg.norm(delta, axis=1) / np.linalg.norm(delta, ord=p, axis=1)
            assert lengths.max() <= rho
        if k == 1:  # exact for a line: delta = q / ||q||_inf
            assert geo.l2_per_linf == pytest.approx(1 / np.abs(q).max(), rel=1e-8)
        if k == d:  # the whole space in a rotated basis: the constants of the coordinates
            assert geo.l2_per_l1 == pytest.approx(1.0) and geo.l2_per_linf == pytest.approx(math.sqrt(d))
    coords = Subspace("coords:0-3").geometry((10,))
    assert (coords.l2_per_l1, coords.l2_per_linf, coords.sign_norm2, coords.max_leverage) == (1.0, 2.0, 4.0, 1.0)


def test_a_basis_orthonormal_within_the_tolerance_gives_the_subspaces_own_constants():
    """A basis accepted within the tolerance (a short line, a float32-rounded unit vector) describes its span: the
    constants equal those of an exactly orthonormal basis of it, none larger and none zero."""
    rng = np.random.default_rng(1)
    e1 = np.eye(4)[:, :1]
    cases = [(e1 * (1 - 5e-6), e1), (e1 * (1 - 1e-7), e1)]
    for _ in range(5):
        v = rng.standard_normal((3072, 1))
        v32 = (torch.as_tensor(v, dtype=torch.float32) / torch.as_tensor(v, dtype=torch.float32).norm()).double()
        cases.append((v32.numpy(), v32.numpy() / np.linalg.norm(v32.numpy())))  # its span, exactly normalized
    for given, exact in cases:
        geo, ref = Subspace(given).geometry((len(given),)), Subspace(exact).geometry((len(exact),))
        for name in ("max_leverage", "sign_norm2", "l2_per_l1", "l2_per_linf"):
            assert getattr(geo, name) == pytest.approx(getattr(ref, name), rel=1e-9) and getattr(geo, name) > 0
    plan = FirstOrderPlan.make(0.001, 200_000, "l2,l1,linf", True)
    bounds = {"l2_upper": 0.1, "l2_lower": 0.0, "linf_upper": 0.1, "l1_upper": 0.2, "sub_l2_upper": 0.1,
              "sub_linf_upper": 0.1, "sub_l1_upper": 0.1}
    radii = normalized_radii(0.9, bounds, plan, 4, Subspace(e1 * (1 - 5e-6)).geometry((4,)))
    assert radii["sub_l1_0"] <= stats.norm.ppf(0.9) and radii["sub_linf_0"] <= stats.norm.ppf(0.9)


# ------------------------------------------------------------------------------ exact information, exact radius

@pytest.mark.parametrize("case", ["rot45", "random-3-of-5", "line-of-4"])
def test_exact_information_subspace_radii_lie_inside_the_exact_ambient_radius(case):
    """A linear classifier with exact q and beta: the subspace radii are at most the exact ambient radius
    |s| / sup_{delta in S, ||delta||_p <= 1} w^T delta, and for the whole space in a rotated basis they are
    the whole space's radii (tight for l2 and l1)."""
    rng = np.random.default_rng(3)
    d, k = {"rot45": (2, 2), "random-3-of-5": (5, 3), "line-of-4": (4, 1)}[case]
    q = ROT45 if case == "rot45" else _random_basis(rng, d, k)
    w = np.array([1.0, 0.0]) if case == "rot45" else rng.standard_normal(d)
    sigma, a = 0.5, 0.8  # s / (sigma ||w||) = a: q = Phi(a), beta = phi(a) w / ||w||
    s = a * sigma * np.linalg.norm(w)
    beta = stats.norm.pdf(a) * w / np.linalg.norm(w)
    proj = (q @ q.T) @ beta
    bounds = {"l2_upper": np.linalg.norm(beta), "l2_lower": np.linalg.norm(beta),
              "linf_upper": np.abs(beta).max(), "l1_upper": np.abs(beta).sum(),
              "sub_l2_upper": np.linalg.norm(proj), "sub_linf_upper": np.abs(proj).max(),
              "sub_l1_upper": np.abs(proj).sum()}
    plan = FirstOrderPlan.make(0.1, 1000, subspace=True)
    radii = {key: sigma * v for key, v in
             normalized_radii(float(stats.norm.cdf(a)), bounds, plan, d, Subspace(q).geometry((d,))).items()}
    for p, name in ((2, "l2"), (1, "l1"), ("inf", "linf")):
        exact = s / dual_sup(w, q, p)
        assert radii[f"sub_{name}_1"] <= exact * (1 + 1e-9), name
        assert radii[f"sub_{name}_0"] <= radii[f"sub_{name}_1"]
        if case == "rot45":  # the whole space in a rotated basis: the radii of the whole space
            assert radii[f"sub_{name}_1"] == pytest.approx(radii[f"{name}_1"], rel=1e-9)
            if name != "linf":  # tight (the l_inf solver is conservative where the gradient is extreme)
                assert radii[f"sub_{name}_1"] == pytest.approx(exact, rel=1e-3)


# ------------------------------------------------------------------------------------------- the pipeline

class Linear(torch.nn.Module):
    def __init__(self, w, b):
        super().__init__()
        self.w, self.b = torch.as_tensor(w, dtype=torch.float32), float(b)

    def forward(self, z):
        s = z.reshape(len(z), -1) @ self.w + self.b
        return torch.stack([-s, s], 1)


def _subspace_cases(rng):
    """(name, d, orthonormal basis Q, the Subspace as described) for the 45-degree basis of R^2 and random
    rotations: a random 2-dimensional subspace of R^5 as Q, as Q R and as Q Q^T."""
    q = _random_basis(rng, 5, 2)
    r = _rotation(rng, 2)
    return [("rot45", 2, ROT45, Subspace(ROT45)), ("Q", 5, q, Subspace(q)), ("QR", 5, q, Subspace(q @ r)),
            ("P", 5, q, Subspace(q @ q.T))]


def _understated(sub, d, norm, rng):
    """A w in S whose dual norm (l_inf for the l1 radius, l1 for the l_inf radius) the coordinates ``c`` of the
    basis that describes S understate most (of 256 random directions): where a radius measured in those
    coordinates would claim too much."""
    basis = sub.resolve((d,))
    c = rng.standard_normal((256, basis.shape[1]))
    w = c @ basis.T
    dual = np.inf if norm == "l1" else 1
    return w[np.argmax(np.linalg.norm(w, ord=dual, axis=1) / np.linalg.norm(c, ord=dual, axis=1))]


@pytest.mark.slow
def test_rotated_subspace_radii_are_sound_through_the_pipeline():
    """The 45-degree basis of R^2 and a random plane of R^5 as Q, Q R and Q Q^T, each with the l1 and the l_inf
    radius (the l2 subspace radius always) and a classifier whose gradient lies in the plane where the basis'
    coordinates understate its dual norm: no radius above the exact ambient one beyond what alpha allows."""
    alpha, sigma, n = 0.25, 0.5, 20000
    p = soundness_plan(alpha)
    rng = np.random.default_rng(11)
    cases = [(*case, norm) for case in _subspace_cases(rng) for norm in ("l1", "linf")]
    groups = np.array_split(np.arange(p.trials), len(cases))
    bad = np.zeros(p.trials, dtype=bool)
    for (name, d, q, sub, norm), trials in zip(cases, groups):
        w = _understated(sub, d, norm, rng)
        x = rng.uniform(0.3, 0.7, (len(trials), d))
        b = -float(x.mean(0) @ w) + rng.normal(0, 0.3)
        gens = [tuple(input_generator(5, int(t), s) for s in ("select", "estimate", "estimate-2")) for t in trials]
        certs = certify_first_order(Linear(w, b), torch.tensor(x, dtype=torch.float32), sigma, 2, 64, n, alpha,
                                    norms=norm, subspace=sub, batch_size=20000, generators=gens,
                                    range_policy="ignore")
        s = x.astype(np.float32).astype(np.float64) @ w + b
        for key, pp in (("l2", 2), (norm, {"l1": 1, "linf": "inf"}[norm])):
            exact = np.abs(s) / dual_sup(w, q, pp)
            for order in (0, 1):
                bad[trials] |= violations_of([c.radii[f"sub_{key}_{order}"] for c in certs], exact,
                                             [c.prediction for c in certs], (s > 0).astype(int))
    assert_sound(bad, p)


def test_q_and_q_r_and_the_projection_give_one_certificate():
    rng = np.random.default_rng(2)
    _, d, q, _ = _subspace_cases(rng)[1]
    w = rng.standard_normal(d)
    x = torch.tensor(rng.uniform(0.3, 0.7, (3, d)), dtype=torch.float32)
    model = Linear(w, -float(x.double().numpy().mean(0) @ w) + 0.2)
    out = []
    for m in _descriptions(q, _rotation(rng, 2)).values():
        gens = [tuple(input_generator(1, i, s) for s in ("select", "estimate", "estimate-2")) for i in range(3)]
        out.append(certify_first_order(model, x, 0.5, 2, 64, 4000, 0.1, subspace=Subspace(m), batch_size=4000,
                                       generators=gens, range_policy="ignore"))
    for certs in out[1:]:
        for a, b in zip(out[0], certs):
            assert b.radii == pytest.approx(a.radii, rel=1e-6)
            assert b.grad_bounds == pytest.approx(a.grad_bounds, rel=1e-9)
