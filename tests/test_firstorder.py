"""First-order certification end to end (seed 004): soundness on classifiers whose smoothed version is known in
closed form, first order >= zeroth order, the alpha budget, bad input, subspaces and the ``first-order`` method."""

import argparse
import math

import numpy as np
import pytest
import torch
from scipy import stats

from smoothcert.methods.firstorder.certificate import FirstOrderPlan, Subspace, certify_first_order, normalized_radii
from smoothcert.methods.firstorder.radii import directional_radius, zeroth_order_radius
from smoothcert.methods.base import COMMON_COLUMNS, RunContext, method_class
from smoothcert.engine.sampling import input_generator

SQRT_2PI = math.sqrt(2 * math.pi)


def _gens(indices, seed=0):
    return [tuple(input_generator(seed, i, s) for s in ("select", "estimate", "estimate-2")) for i in indices]


# ------------------------------------------------------------------------------------------ linear classifier

class Linear(torch.nn.Module):
    """f(x) = 1[w.x + b > 0]: g_1(x) = Phi((w.x + b) / (sigma ||w||)), grad g_1 = phi(.) w / (sigma ||w||)."""

    def __init__(self, w, b):
        super().__init__()
        self.w, self.b = w, b

    def forward(self, z):
        s = z.reshape(len(z), -1) @ self.w + self.b
        return torch.stack([-s, s], 1)


def test_linear_classifier_radii_and_gradient_bounds_are_sound():
    d, sigma, alpha, n, inputs = 16, 0.5, 0.1, 4000, 20
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(d, generator=gen, dtype=torch.float64).float()
    x = torch.rand(inputs, d, generator=gen) * 0.4 + 0.3
    b = -float((x @ w).mean())
    model = Linear(w, b)
    sub = list(range(0, d, 2))
    certs = certify_first_order(model, x, sigma, 2, 100, n, alpha, subspace=Subspace(sub), batch_size=8000,
                                generators=_gens(range(inputs)), range_policy="ignore")
    wn = w.double().numpy()
    ws = wn[sub]
    fails = 0
    for xi, c in zip(x.double().numpy(), certs):
        s = float(xi @ wn + b)
        if c.abstained:
            continue
        assert c.prediction == int(s > 0)
        dist = {"l2": abs(s) / np.linalg.norm(wn), "l1": abs(s) / np.abs(wn).max(), "linf": abs(s) / np.abs(wn).sum(),
                "sub_l2": abs(s) / np.linalg.norm(ws), "sub_l1": abs(s) / np.abs(ws).max(),
                "sub_linf": abs(s) / np.abs(ws).sum()}
        g = stats.norm.cdf(abs(s) / (sigma * np.linalg.norm(wn)))
        grad = stats.norm.pdf(abs(s) / (sigma * np.linalg.norm(wn))) / (sigma * np.linalg.norm(wn)) * np.abs(wn)
        truth = {"l2_upper": np.linalg.norm(grad), "l2_lower": np.linalg.norm(grad), "linf_upper": grad.max(),
                 "l1_upper": grad.sum(), "sub_l2_upper": np.linalg.norm(grad[sub]),
                 "sub_linf_upper": grad[sub].max(), "sub_l1_upper": grad[sub].sum()}
        ok = c.p_lower <= g
        ok &= all(c.radii[f"{k}_1"] <= v + 1e-9 for k, v in dist.items())
        ok &= all((c.grad_bounds[k] >= v) if k.endswith("upper") else (c.grad_bounds[k] <= v)
                  for k, v in truth.items())
        fails += not ok
        for k in dist:
            assert c.radii[f"{k}_1"] >= c.radii[f"{k}_0"]  # first order never below zeroth order, same q
        assert c.radius == c.radii["l2_1"]
    # all radii and bounds hold at once with probability >= 1 - alpha per input
    assert stats.binomtest(fails, inputs, alpha, alternative="greater").pvalue > 1e-3
    assert certs[0].alpha_p + certs[0].alpha_each * 7 == pytest.approx(alpha)


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


POINTS = [(np.array([0.0, 0.0]), 1), (np.array([0.45, 0.2]), 1), (np.array([0.1, 0.7]), 1),
          (np.array([1.9, 0.3]), 0), (np.array([-1.5, 1.2]), 0)]


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


def test_disc_pipeline_balls_lie_inside_the_true_region():
    alpha, inputs = 0.1, 12
    rng = np.random.default_rng(7)
    pts = rng.uniform(-1.8, 1.8, (inputs, 2))
    certs = certify_first_order(Disc(), torch.tensor(pts, dtype=torch.float32), SIGMA, 2, 200, 20000, alpha,
                                batch_size=20000, generators=_gens(range(inputs)), range_policy="ignore")
    s = np.linspace(0, 2 * np.pi, 400)
    circle = np.stack([np.cos(s), np.sin(s)], 1)
    diamond = circle / np.abs(circle).sum(1, keepdims=True)
    square = circle / np.abs(circle).max(1, keepdims=True)
    fails = certified = 0
    for x, c in zip(pts, certs):
        if c.abstained:
            continue
        certified += 1
        ok = True
        for name, shape in (("l2", circle), ("l1", diamond), ("linf", square)):
            g1 = g_inside(x + c.radii[f"{name}_1"] * shape)
            gc = g1 if c.prediction == 1 else 1 - g1
            ok &= gc.min() > 0.5
        fails += not ok
    assert certified >= inputs // 2
    assert stats.binomtest(fails, certified, alpha, alternative="greater").pvalue > 1e-3


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
    cls.add_arguments(parser)
    args = parser.parse_args(["--sigma", "0.5", "--n", "2000", "--alpha", "0.01", "--norms", "l1,l2",
                              "--subspace", "coords:0-3", "--alpha-split", "0.6"])
    method = cls.from_args(args)
    assert method.config() == {"name": "first-order", "sigma": 0.5, "norms": ["l2", "l1"],
                               "subspace": "coords:0-3", "alpha_split": 0.6}
    w = torch.linspace(-1, 1, 8)
    ctx = RunContext(Linear(w, 0.1), 2, 50, 2000, 0.01, 4000, torch.float32, 0, torch.device("cpu"), 2)
    x = torch.rand(2, 8, generator=torch.Generator().manual_seed(0))
    rows = method.certify(ctx, x, torch.tensor([0, 1]), [3, 9])
    again = method.certify(ctx, x, torch.tensor([0, 1]), [3, 9])
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
            cls.from_args(parser.parse_args(["--sigma", "0.5", "--n", "2000", "--alpha", "0.01", *bad]))
