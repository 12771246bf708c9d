"""First-order certification end to end (seed 004): soundness on classifiers whose smoothed version is known in
closed form, first order >= zeroth order, the alpha budget, bad input, subspaces and the ``first-order`` method."""

import argparse
import math

import numpy as np
import pytest
import torch
from scipy import optimize, stats

from smoothcert.methods.firstorder.certificate import FirstOrderPlan, Subspace, certify_first_order, normalized_radii
from smoothcert.methods.firstorder.radii import directional_radius, zeroth_order_radius
from smoothcert.cli.options import add_method_options, build_method
from smoothcert.methods.base import COMMON_COLUMNS, RunContext, method_class
from smoothcert.engine.sampling import input_generator

from conftest import Linear2
from soundness import assert_sound, linear_case, plan, violations_of

SQRT_2PI = math.sqrt(2 * math.pi)


def _gens(indices, seed=0):
    return [tuple(input_generator(seed, i, s) for s in ("select", "estimate", "estimate-2")) for i in indices]


# ------------------------------------------------------------------------------------------ linear classifier

def linear_violations(case, certs, sigma, sub=None):
    """Per input: any claim of a non-abstaining first-order certificate beyond the truth of the linear classifier.

    ``g_c(x) = Phi(t)``, ``t = |w . x + b| / (sigma ||w||)``, and ``|grad g_c| = phi(t) |w| / (sigma ||w||)`` per
    coordinate; the exact radii are the distances to the hyperplane in each norm (within the subspace ``sub``:
    of perturbations of those coordinates). A violation: a wrong class, ``p_lower > g_c(x)``, a zeroth- or
    first-order radius above the exact one, an upper gradient-norm bound below the true norm or a lower one above.
    """
    answered = np.array([not c.abstained for c in certs])
    w = case.w.numpy()
    t = np.abs(case.margin) / (sigma * np.linalg.norm(w))
    grad = (stats.norm.pdf(t) / (sigma * np.linalg.norm(w)))[:, None] * np.abs(w)
    truth = {"l2_upper": np.linalg.norm(grad, axis=1), "l2_lower": np.linalg.norm(grad, axis=1),
             "linf_upper": grad.max(1), "l1_upper": grad.sum(1)}
    exact = {k: case.distance(k) for k in ("l2", "l1", "linf")}
    if sub is not None:
        truth.update(sub_l2_upper=np.linalg.norm(grad[:, sub], axis=1), sub_linf_upper=grad[:, sub].max(1),
                     sub_l1_upper=grad[:, sub].sum(1))
        exact.update({f"sub_{k}": case.distance(k, sub) for k in ("l2", "l1", "linf")})
    claimed = lambda values: np.where(answered, values, 0.0)  # noqa: E731 - an abstention claims nothing
    bad = violations_of(claimed([c.p_lower for c in certs]), stats.norm.cdf(t),
                        [c.prediction for c in certs], case.label)
    for key, distance in exact.items():
        if f"{key}_1" in certs[0].radii:
            for order in (0, 1):
                bad |= violations_of(claimed([c.radii[f"{key}_{order}"] for c in certs]), distance)
    for key, value in truth.items():
        if key in certs[0].grad_bounds:
            bound = np.array([c.grad_bounds[key] for c in certs])
            wrong = bound < value * (1 - 1e-12) if key.endswith("upper") else bound > value * (1 + 1e-12)
            bad |= answered & wrong
    return bad


@pytest.mark.slow
def test_linear_classifier_radii_and_gradient_bounds_are_sound():
    """Every radius (l2, l1, l_inf, and in a subspace) and every gradient-norm bound at once, per input."""
    p = plan(0.2)  # 97 trials, at most 32 violations: P(sound passes) 0.9991, P(2 alpha fails) 0.9052
    d, sigma, n = 16, 0.5, 4000
    case = linear_case(p.trials, d, seed=5)
    sub = list(range(0, d, 2))
    certs = certify_first_order(case.model, case.x, sigma, 2, 100, n, p.alpha, subspace=Subspace(sub),
                                batch_size=8000, block=n // 2, generators=_gens(range(p.trials)),
                                range_policy="ignore")
    for c, y in zip(certs, case.label):
        if c.abstained:
            continue
        assert c.prediction == y
        for k in c.radii:
            assert c.radii[k.replace("_0", "_1")] >= c.radii[k]  # first order never below zeroth order, same q
        assert c.radius == c.radii["l2_1"]
    assert sum(not c.abstained for c in certs) > p.trials / 2
    # all radii and bounds hold at once with probability >= 1 - alpha per input
    assert_sound(linear_violations(case, certs, sigma, sub), p)
    assert certs[0].alpha_p + certs[0].alpha_each * 7 == pytest.approx(p.alpha)


def test_linear_classifier_l2_radius_and_bounds_are_sound():
    """The l2 certificate alone (Corollary 3.1 with the Theorem 4 upper bound): its radius and bound, per input.
    A linear classifier has the largest gradient its ``g`` allows, so here the first-order l2 radius is Cohen's
    from ``q``: with 0.9 of alpha on ``q`` the test is nearly as sharp as Cohen's."""
    p = plan(0.1)  # 232 trials, at most 38 violations: P(sound passes) 0.9991, P(2 alpha fails) 0.9048
    d, sigma, n = 16, 0.5, 4000
    case = linear_case(p.trials, d, seed=6)
    certs = certify_first_order(case.model, case.x, sigma, 2, 100, n, p.alpha, norms="l2", alpha_split=0.9,
                                batch_size=8000, block=n // 2, generators=_gens(range(p.trials)),
                                range_policy="ignore")
    assert set(certs[0].radii) == {"l2_0", "l2_1"} and set(certs[0].grad_bounds) == {"l2_upper"}
    assert sum(not c.abstained for c in certs) > p.trials / 2
    assert_sound(linear_violations(case, certs, sigma), p)


# ------------------------------------------------------------------------------- disc: a nonlinear classifier

RHO, SIGMA = 1.0, 0.5


def g_inside(points):
    """g_1(x) = P(||x + sigma u|| <= rho) for f = 1[||x|| <= rho] in 2-D: a noncentral chi-square cdf."""
    nc = (np.asarray(points, dtype=np.float64) ** 2).sum(-1) / SIGMA**2
    return stats.ncx2.cdf(RHO**2 / SIGMA**2, 2, np.maximum(nc, 1e-300))


def disc_truth(x, cls):
    """Exact q = g_c(x) and beta = sigma * grad g_c(x) (central differences of the closed form)."""
    sign = 1.0 if cls == 1 else -1.0
    h = 1e-6
    grad = np.array([(g_inside(x + h * e) - g_inside(x - h * e)) / (2 * h) for e in np.eye(2)])
    q = g_inside(x) if cls == 1 else 1 - g_inside(x)
    return float(q), sign * SIGMA * grad


class Disc(torch.nn.Module):
    def forward(self, z):
        s = RHO**2 - (z.reshape(len(z), -1) ** 2).sum(1)
        return torch.stack([-s, s], 1)


POINTS = [pytest.param(np.array([0.0, 0.0]), 1, marks=pytest.mark.slow),  # the slowest radius searches
          (np.array([0.45, 0.2]), 1), (np.array([0.1, 0.7]), 1), (np.array([1.9, 0.3]), 0), (np.array([-1.5, 1.2]), 0)]


@pytest.mark.parametrize("x, cls", POINTS)
def test_exact_first_order_region_lies_inside_the_true_region(x, cls):
    q, beta = disc_truth(x, cls)
    assert q > 0.5
    norm = np.linalg.norm(beta)
    grown = 0
    for theta in np.linspace(0, 2 * np.pi, 36, endpoint=False):
        v = np.array([math.cos(theta), math.sin(theta)])
        m1 = float(v @ beta)
        m2 = float(np.linalg.norm(beta - m1 * v))
        r = directional_radius(q, m1, m2)
        ray = x + SIGMA * np.linspace(0, r, 12)[:, None] * v  # the whole segment, not only its end
        gc = g_inside(ray) if cls == 1 else 1 - g_inside(ray)
        assert gc.min() >= 0.5 - 1e-7, (theta, r)
        grown += r > zeroth_order_radius(q) + 1e-3
    assert grown > 0 or norm == 0  # the first-order region is larger than Cohen's ball somewhere
    # polytope balls from exact norms (Cor. 3.1-3.3): their whole boundary lies in the true region
    plan = FirstOrderPlan.make(0.1, 1000, ("l2", "l1", "linf"))
    bounds = {"l2_upper": norm, "l2_lower": norm, "linf_upper": np.abs(beta).max(), "l1_upper": np.abs(beta).sum()}
    radii = normalized_radii(q, bounds, plan, dim=2)
    s = np.linspace(-1, 1, 201)
    shapes = {"l2": np.stack([np.cos(np.pi * s), np.sin(np.pi * s)], 1),
              "l1": np.concatenate([np.stack([1 - abs(s), sign * s], 1) for sign in (1, -1)] +
                                   [np.stack([abs(s) - 1, sign * s], 1) for sign in (1, -1)]),
              "linf": np.concatenate([np.stack([s, np.full_like(s, e)], 1) for e in (1, -1)] +
                                     [np.stack([np.full_like(s, e), s], 1) for e in (1, -1)])}
    for name, boundary in shapes.items():
        pts = x + SIGMA * radii[f"{name}_1"] * boundary
        gc = g_inside(pts) if cls == 1 else 1 - g_inside(pts)
        assert gc.min() >= 0.5 - 1e-7, name
        assert radii[f"{name}_1"] >= radii[f"{name}_0"]


def disc_exact_radii(points):
    """The exact robust radii of the smoothed disc classifier at ``points`` in l2, l1 and l_inf, and its class.

    ``g_1`` is radial and decreasing, so the smoothed classifier predicts 1 inside the circle of radius ``R*``
    (``g_inside(R*) = 1/2``, brentq) and 0 outside: the exact radius in a norm is the distance from ``x`` to that
    circle, ``min_theta ||x - R* (cos theta, sin theta)||`` (closed form in l2; a grid of 4096 angles refined by a
    bounded scalar minimization in l1 and l_inf).
    """
    r_star = optimize.brentq(lambda r: g_inside([r, 0.0]) - 0.5, 1e-9, 5.0, xtol=1e-14)
    grid = np.linspace(0, 2 * np.pi, 4096, endpoint=False)
    step = grid[1]
    out = {"l2": np.abs(np.linalg.norm(points, axis=1) - r_star)}
    for name, order in (("l1", 1), ("linf", np.inf)):
        def dist(theta, x):
            return np.linalg.norm(x - r_star * np.stack([np.cos(theta), np.sin(theta)], -1), ord=order, axis=-1)

        radii = []
        for x in points:
            t0 = grid[int(np.argmin(dist(grid, x)))]
            best = optimize.minimize_scalar(dist, bounds=(t0 - step, t0 + step), args=(x,), method="bounded",
                                            options={"xatol": 1e-12})
            radii.append(min(best.fun, dist(t0, x)))
        out[name] = np.array(radii)
    return out, (np.linalg.norm(points, axis=1) < r_star).astype(np.int64)


def disc_violations(certs, exact, label):
    """Per input: a wrong class, or a first-order radius of a non-abstaining certificate above the exact radius
    of the smoothed disc in any norm of ``exact`` (from :func:`disc_exact_radii`)."""
    answered = np.array([not c.abstained for c in certs])
    predicted = [c.prediction for c in certs]
    bad = np.zeros(len(certs), dtype=bool)
    for name, distance in exact.items():
        radii = np.where(answered, [c.radii[f"{name}_1"] for c in certs], 0.0)
        bad |= violations_of(radii, distance, predicted, label)
    return bad


def test_disc_pipeline_balls_lie_inside_the_true_region():
    """A nonlinear classifier (the disc) end to end: the l2, l1 and l_inf first-order radii against the exact
    radii of its smoothed version (noncentral chi-square), and the class, per input."""
    p = plan(0.2)  # 97 trials, at most 32 violations: P(sound passes) 0.9991, P(2 alpha fails) 0.9052
    rng = np.random.default_rng(7)
    pts = rng.uniform(-1.8, 1.8, (p.trials, 2))
    certs = certify_first_order(Disc(), torch.tensor(pts, dtype=torch.float32), SIGMA, 2, 200, 20000, p.alpha,
                                batch_size=20000, block=10000, generators=_gens(range(p.trials)),
                                range_policy="ignore")
    exact, label = disc_exact_radii(pts.astype(np.float32).astype(np.float64))
    assert sum(not c.abstained for c in certs) >= p.trials // 2
    assert_sound(disc_violations(certs, exact, label), p)


# ----------------------------------------------------------------------------------------------- bad input

class Exploding(torch.nn.Module):
    def forward(self, z):
        raise AssertionError("sampling started before the input was validated")


@pytest.mark.parametrize("kwargs, message", [
    ({"norms": "l2,l3"}, "norms"),
    ({"norms": ""}, "norms"),
    ({"subspace": "coords:"}, "subspace"),
    ({"subspace": "coords:5-2"}, "empty range"),
    ({"subspace": "coords:0-99"}, "out of range"),
    ({"subspace": "channel:1"}, "out of range"),
    ({"subspace": "nonsense"}, "subspace"),
    ({"alpha_split": 1.0}, "alpha_split"),
    ({"n": 3}, "halves"),
    ({"n": 10, "alpha": 0.001}, "cannot certify"),
])
def test_bad_input_is_rejected_before_sampling(kwargs, message):
    args = dict(n=1000, alpha=0.01)
    args.update(kwargs)
    n, alpha = args.pop("n"), args.pop("alpha")
    with pytest.raises(ValueError, match=message):
        certify_first_order(Exploding(), torch.rand(2, 1, 4, 4), 0.25, 10, 10 if n >= 10 else 1, n, alpha, **args)


def test_subspace_specs(tmp_path):
    shape = (3, 2, 2)
    assert Subspace("channel:1").resolve(shape).tolist() == [4, 5, 6, 7]
    assert Subspace("channel:0,2").dim(shape) == 8
    assert Subspace("coords:0-2,7,2").resolve(shape).tolist() == [0, 1, 2, 7]
    v = np.arange(12.0)[None]
    assert Subspace("channel:2").coordinates(v, shape).tolist() == [[8, 9, 10, 11]]
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((12, 3)))
    np.save(tmp_path / "basis.npy", q)
    torch.save(torch.tensor(q @ q.T), tmp_path / "proj.pt")
    for spec in (str(tmp_path / "basis.npy"), f"file:{tmp_path / 'proj.pt'}"):
        sub = Subspace(spec)
        coords = sub.coordinates(np.ones((1, 12)), shape)
        assert sub.dim(shape) == 3
        assert np.linalg.norm(coords) == pytest.approx(np.linalg.norm(q.T @ np.ones(12)))
    with pytest.raises(ValueError, match="orthonormal"):
        Subspace(np.ones((12, 2)))
    with pytest.raises(ValueError, match="rows"):
        Subspace(q[:6, :1] / np.linalg.norm(q[:6, :1])).resolve(shape)


# ------------------------------------------------------------------------------------------- the method

def test_first_order_method_rows_and_options():
    cls = method_class("first-order")
    parser = argparse.ArgumentParser()
    parser.add_argument("--sigma", type=float)
    parser.add_argument("--n", type=int)
    parser.add_argument("--alpha", type=float)
    add_method_options(parser, [cls])
    args = parser.parse_args(["--sigma", "0.5", "--n", "2000", "--alpha", "0.01", "--norms", "l1,l2",
                              "--subspace", "coords:0-3", "--alpha-split", "0.6"])
    method = build_method(cls, args)
    assert method.config() == {"name": "first-order", "sigma": 0.5, "norms": ["l2", "l1"],
                               "subspace": "coords:0-3", "alpha_split": 0.6}
    w = torch.linspace(-1, 1, 8)
    ctx = RunContext(Linear2(w, 0.1), 2, 50, 2000, 0.01, 4000, torch.float32, 0, torch.device("cpu"), 2)
    x = torch.rand(2, 8, generator=torch.Generator().manual_seed(0))
    rows = method.certify_rows(ctx, x, torch.tensor([0, 1]), [3, 9])
    again = method.certify_rows(ctx, x, torch.tensor([0, 1]), [3, 9])
    same = [{k: v for k, v in r.items() if not (isinstance(v, float) and math.isnan(v))} for r in (*rows, *again)]
    assert same[:2] == same[2:]  # per-input streams: reproducible (nan, e.g. the gap of an abstention, != nan)
    for row in rows:
        assert set(COMMON_COLUMNS) | {"predict", "radius"} | set(cls.columns) <= set(row)
        assert row["alpha_p"] == pytest.approx(0.006) and row["alpha_grad"] == pytest.approx(0.004)
        assert row["alpha_each"] == pytest.approx(0.004 / 5)  # l2 up, l2 low, linf up, sub l2 up, sub linf up
        assert math.isnan(row["radius_linf_1"]) and row["radius_l1_1"] >= row["radius_l1_0"]
        assert row["radius"] == row["radius_l2_1"] and row["n_half"] == 1000 and row["subspace_dim"] == 4
    for bad in (["--norms", "l5"], ["--alpha-split", "0"], ["--n", "5"], ["--subspace", "coords:"]):
        with pytest.raises(ValueError):
            build_method(cls, parser.parse_args(["--sigma", "0.5", "--n", "2000", "--alpha", "0.01", *bad]))
