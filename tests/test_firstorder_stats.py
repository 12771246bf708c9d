"""Gradient-norm bounds of seed 004 section 4 (Theorem 4, 5, Table 1): constants, tails, coverage, the observer."""

import math

import numpy as np
import pytest
import torch
from scipy import optimize, stats

import smoothcert.stats.gradients as fs
from smoothcert.engine.sampling import sample_counts
from smoothcert.noise.gaussian import IsotropicGaussian


def _worst_mgf_ratio(h: np.ndarray, t: np.ndarray, weights: np.ndarray) -> float:
    """sup over lambda of 2 log E exp(lam (X - EX)) / lam^2 for X = t h(t), t ~ N(0, 1) (quadrature)."""
    x = t * h
    x = x - weights @ x
    lams = np.concatenate([-np.logspace(-2, 1.3, 40), np.logspace(-2, 1.3, 40)])
    return max(2 * np.log(weights @ np.exp(lam * x)) / lam**2 for lam in lams)


def test_kappa_is_the_theorem_4_constant_and_dominates_extreme_classifiers():
    assert fs.KAPPA == pytest.approx(0.25 + 3 / math.sqrt(8 * math.pi * math.e))
    t = np.linspace(-14, 14, 56001)
    weights = stats.norm.pdf(t) * (t[1] - t[0])
    worst = 0.0
    for a in np.linspace(-3, 3, 25):  # half-spaces, slabs and two-sided sets along one direction
        for h in (np.sign(t - a), np.sign(np.abs(t) - abs(a)), np.where(np.abs(t - a) < 1, 1.0, -1.0)):
            worst = max(worst, _worst_mgf_ratio(0.5 * h, t, weights))
    assert worst <= fs.KAPPA


def test_product_deviation_is_the_exact_chernoff_inversion():
    for dim, k1, k2, delta in [(1, 1.0, 1.0, 0.05), (10, 0.3, 0.7, 1e-3), (784, 1e-5, 2e-5, 1e-4)]:
        t = fs.product_deviation(dim, k1, k2, delta)
        kk = math.sqrt(k1 * k2)
        chernoff = optimize.minimize_scalar(lambda lam: -lam * t - 0.5 * dim * math.log1p(-(lam * kk) ** 2),
                                            bounds=(0, (1 - 1e-12) / kk), method="bounded",
                                            options={"xatol": 1e-14 / kk})
        assert chernoff.fun <= math.log(delta) + 1e-6  # the bound at t is delta (up to the solver's precision)
        assert chernoff.fun >= math.log(delta) - 1e-5  # and t is not larger than needed


def test_product_deviation_bounds_the_gaussian_tail():
    rng = np.random.default_rng(0)
    dim, k1, k2, delta, trials = 5, 0.5, 2.0, 0.05, 20000
    t = fs.product_deviation(dim, k1, k2, delta)
    a = rng.normal(0, math.sqrt(k1), (trials, dim))
    b = rng.normal(0, math.sqrt(k2), (trials, dim))
    exceed = int(((a * b).sum(1) >= t).sum())
    assert stats.binomtest(exceed, trials, delta, alternative="greater").pvalue > 1e-3
    assert exceed > 0  # not absurdly loose either: the Chernoff tail is within a small factor for Gaussians


def _linear_sums(rng, trials, n1, n2, dim, s, sigma):
    """Two halves of sums of u (1[f = 1] - 1/2) for f(x + sigma u) = 1[w.(x + sigma u) + b > 0], w = e_0 ... e_d mix."""
    w = np.linspace(1.0, 0.1, dim)
    w /= np.linalg.norm(w)
    out = []
    for n in (n1, n2):
        u = rng.standard_normal((trials, n, dim))
        f = (s + sigma * (u @ w) > 0).astype(np.float64) - 0.5
        out.append(np.einsum("tn,tnd->td", f, u))
    beta = stats.norm.pdf(s / sigma) * w  # sigma * grad g for g = Phi(s / sigma), ||w|| = 1
    return out[0] / n1, out[1] / n2, beta


@pytest.mark.parametrize("s", [0.0, 0.4])
def test_bounds_cover_the_true_gradient_norms_of_a_linear_classifier(s):
    rng = np.random.default_rng(1 if s else 2)
    trials, n1, n2, dim, sigma, delta = 400, 2400, 1600, 8, 0.5, 0.1
    x, y, beta = _linear_sums(rng, trials, n1, n2, dim, s, sigma)
    pooled = (n1 * x + n2 * y) / (n1 + n2)
    truth = {"l2": np.linalg.norm(beta), "linf": np.abs(beta).max(), "l1": np.abs(beta).sum()}
    checks = {
        "l2_upper": fs.l2_upper(x, y, n1, n2, delta) >= truth["l2"],
        "l2_lower": fs.l2_lower(x, y, n1, n2, delta) <= truth["l2"],
        "linf_upper": fs.linf_upper(pooled, n1 + n2, delta) >= truth["linf"],
        "linf_lower": fs.linf_lower(pooled, n1 + n2, delta) <= truth["linf"],
        "l1_upper": fs.l1_upper(pooled, n1 + n2, delta) >= truth["l1"],
        "l1_lower": fs.l1_lower(pooled, n1 + n2, delta) <= truth["l1"],
    }
    for name, covered in checks.items():
        misses = int((~covered).sum())
        assert stats.binomtest(misses, trials, delta, alternative="greater").pvalue > 1e-3, name
    # informative: the l2 bounds are tighter than the a-priori range [0, 1/sqrt(2 pi)]
    if s == 0.0:
        assert np.median(fs.l2_lower(x, y, n1, n2, delta)) > 0
    else:
        assert np.median(fs.l2_upper(x, y, n1, n2, delta)) < 1 / math.sqrt(2 * math.pi)


def test_x_dot_y_is_unbiased_for_the_squared_norm():
    rng = np.random.default_rng(3)
    x, y, beta = _linear_sums(rng, 3000, 200, 200, 4, 0.2, 0.5)
    xy = (x * y).sum(1)
    se = xy.std(ddof=1) / math.sqrt(len(xy))
    assert abs(xy.mean() - beta @ beta) < 4 * se


def test_l2_bounds_solve_their_quadratics():
    x = np.array([[0.2, -0.1, 0.05]])
    y = np.array([[0.18, -0.12, 0.02]])
    n1, n2, delta = 1000, 800, 0.01
    k1, k2 = fs.KAPPA / n1, fs.KAPPA / n2
    t = fs.product_deviation(3, k1, k2, delta / 2)
    c = math.sqrt(2 * (k1 + k2) * math.log(2 / delta))
    xy = float((x * y).sum())
    up = float(fs.l2_upper(x, y, n1, n2, delta)[0])
    lo = float(fs.l2_lower(x, y, n1, n2, delta)[0])
    assert up**2 - c * up - (xy + t) == pytest.approx(0, abs=1e-12)
    assert lo**2 + c * lo - (xy - t) == pytest.approx(0, abs=1e-12)
    assert lo < math.sqrt(xy) < up


def test_table_1_constants():
    """Lower bounds: Table 1 (unions over 2 d coordinates and 2^d sign vectors); upper bounds: one fixed tail."""
    m = np.array([[0.1, -0.3, 0.2]])
    n, delta, k = 500, 0.01, fs.KAPPA
    assert fs.linf_upper(m, n, delta)[0] == pytest.approx(0.3 + math.sqrt(2 * k * math.log(1 / delta) / n))
    assert fs.linf_lower(m, n, delta)[0] == pytest.approx(
        max(0.3 - math.sqrt(2 * k * (math.log(6) - math.log(delta)) / n), 0))
    assert fs.l1_upper(m, n, delta)[0] == pytest.approx(0.6 + math.sqrt(2 * k * 3 * math.log(1 / delta) / n))
    assert fs.l1_upper(m, n, delta, sign_norm2=1.5)[0] == pytest.approx(
        0.6 + math.sqrt(2 * k * 1.5 * math.log(1 / delta) / n))
    t1 = math.sqrt(2 * k * 3 * (3 * math.log(2) - math.log(delta)) / n)
    assert fs.l1_lower(m, n, delta)[0] == pytest.approx(max(0.6 - t1, 0))


def test_observer_sums_match_the_per_sample_formula():
    torch.manual_seed(0)
    seen = []
    w = torch.randn(6)

    def model(z):
        seen.append(z.clone())
        s = z.reshape(len(z), -1) @ w
        return torch.stack([-s, s, 0.3 * s.abs()], 1)

    x = torch.rand(3, 2, 3)
    sigma = 0.4
    classes = torch.tensor([0, 1, 2])
    obs = fs.GradientObserver(sigma, classes=classes)
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    counts = sample_counts(model, x, IsotropicGaussian(sigma), 50, 3, batch_size=60, block=20, generators=gens,
                           observers=[obs])
    noisy = torch.cat(seen).reshape(-1, 6).double()
    # replay: each forward pass holds up to 3 inputs x 20 samples, in input-major order
    expected = torch.zeros(3, 6, dtype=torch.float64)
    offset = 0
    for m in (20, 20, 10):
        chunk = noisy[offset:offset + 3 * m].reshape(3, m, 6)
        offset += 3 * m
        pred = (chunk.float() @ w)
        logits = torch.stack([-pred, pred, 0.3 * pred.abs()], -1).argmax(-1)
        u = (chunk - x.reshape(3, 1, 6).double()) / sigma
        expected += ((logits == classes[:, None]).double() - 0.5).unsqueeze(-1).mul(u).sum(1)
    assert torch.allclose(obs.sums, expected, atol=1e-5)
    assert obs.count.tolist() == [50, 50, 50]
    assert counts.sum(1).tolist() == [50, 50, 50]


def test_bad_input():
    with pytest.raises(ValueError, match="alpha"):
        fs.linf_upper(np.zeros((1, 3)), 10, 1.5)
    with pytest.raises(ValueError, match="shape"):
        fs.l2_upper(np.zeros((1, 3)), np.zeros((1, 4)), 10, 10, 0.1)
    with pytest.raises(ValueError, match="n1"):
        fs.l2_upper(np.zeros((1, 3)), np.zeros((1, 3)), 0, 10, 0.1)
