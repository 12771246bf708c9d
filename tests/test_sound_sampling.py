"""Sound sampling on the 8-bit grid (smoothcert.noise.discrete): the masses never exceed the exact discretized
Gaussian's (50-digit mpmath), the integer alias table reproduces them exactly, the draws pass a chi-square test,
the sampler computes clip(u + k) = clip(round(L (x + delta))) on the grid, void (leftover) samples count against
the selected class and for the runner-up in PREDICT, and certificates of a linear classifier on grid inputs, whose
exact smoothed probabilities are sums over the discrete noise, pass the shared soundness harness."""

import math

import mpmath
import numpy as np
import pytest
import torch
from scipy import stats

from conftest import Linear2
from soundness import assert_sound, plan, violations_of
from smoothcert.engine.sampling import input_generator, sample_counts
from smoothcert.engine.smooth import certify, predict
from smoothcert.methods.fixed import FixedSigma
from smoothcert.noise import discrete
from smoothcert.noise.base import noise_from_parameters
from smoothcert.noise.discrete import BITS, DiscretizedGaussian, alias_table, discretized_masses

L = 255


def exact_masses(sigma, levels, dps=50):
    """The folded discretized Gaussian's masses, j = -L..L, as mpmath numbers (50 digits)."""
    with mpmath.workdps(dps):
        s = mpmath.mpf(sigma) * levels  # sigma's float64 value, exactly
        cdf = lambda t: mpmath.ncdf(t / s)
        end = cdf(-(levels - mpmath.mpf(1) / 2))
        inner = [cdf(j + mpmath.mpf(1) / 2) - cdf(j - mpmath.mpf(1) / 2) for j in range(-levels + 1, levels)]
        return [end] + inner + [end]


@pytest.mark.parametrize("sigma", [0.004, 0.03, 0.12, 0.25, 0.5, 1.0, 2.5])
@pytest.mark.parametrize("levels", [255, 15])
def test_masses_never_above_the_exact_discretized_gaussian(sigma, levels):
    masses = discretized_masses(sigma, levels)
    exact = exact_masses(sigma, levels)
    unit = mpmath.mpf(2) ** -BITS
    with mpmath.workdps(50):
        assert all(mpmath.mpf(m) * unit <= q for m, q in zip(masses, exact))
        # and they are tight: below the exact mass by at most one unit and the stated float64 error allowance
        slack = [q - mpmath.mpf(m) * unit for m, q in zip(masses, exact)]
        assert max(slack) <= unit + 4e-12
        leftover = 1 - sum(mpmath.mpf(m) for m in masses) * unit
        assert 0 <= leftover <= (2 * levels + 1) * (unit + discrete.MASS_ERROR)  # each a_j + b_j <= 1
    noise = DiscretizedGaussian(sigma, levels)
    assert noise.leftover == pytest.approx(float(leftover), rel=1e-9, abs=1e-30)
    assert sum(noise.weights) == 2**BITS and noise.weights[: 2 * levels + 1] == masses


@pytest.mark.parametrize("sigma, levels", [(0.25, 255), (1.0, 255), (0.3, 3), (0.01, 1)])
def test_the_alias_table_gives_every_outcome_its_mass_exactly(sigma, levels):
    noise = DiscretizedGaussian(sigma, levels)
    k = len(noise.weights)
    capacity = 2**BITS // k
    threshold, alias = alias_table(noise.weights)
    mass = list(threshold)
    for c in range(k):
        if threshold[c] < capacity:
            mass[alias[c]] += capacity - threshold[c]
    assert mass == noise.weights  # integers: exact
    # the tensors the sampler uses hold the same table
    assert noise._threshold.tolist() == threshold
    pick = noise._pick.tolist()
    assert pick[1::2] == [c - levels for c in range(k)] and pick[0::2] == [a - levels for a in alias]


def test_the_bits_map_through_the_table_at_its_boundaries():
    """Bits just below a column's threshold give its own outcome, at the threshold its alias (both exactly)."""
    noise = DiscretizedGaussian(0.25)
    threshold, alias = alias_table(noise.weights)
    low = BITS - noise.column_bits
    columns = [c for c in range(len(threshold)) if 0 < threshold[c] < 2**low]
    assert len(columns) > 100
    bits = torch.tensor([(c << low) + threshold[c] - 1 for c in columns] + [(c << low) + threshold[c] for c in columns])
    got = noise.lookup(bits.clone()).tolist()
    expected = [c - L for c in columns] + [alias[c] - L for c in columns]
    assert [noise.void_value if e == L + 1 else e for e in expected] == got


def test_draws_pass_a_chi_square_test_and_fail_it_for_the_wrong_sigma():
    noise = DiscretizedGaussian(0.25)
    g = input_generator(3, 0, "chi-square")
    k = noise.noise_values((400, 1000), g).reshape(-1).numpy()
    assert np.all(np.abs(k) <= L)  # no leftover in 4e5 draws (its mass is ~1e-10)
    observed = np.bincount(k + L, minlength=2 * L + 1)

    def pooled(masses):
        """Cells expecting >= 20 draws each, every other outcome pooled into one cell."""
        expected = np.asarray(masses, dtype=np.float64) / 2**BITS * k.size
        big = expected >= 20
        o = np.append(observed[big], observed[~big].sum())
        e = np.append(expected[big], expected[~big].sum())
        return o, e * o.sum() / e.sum()

    o, e = pooled(noise.masses)
    assert stats.chisquare(o, e).pvalue > 1e-3
    o, e = pooled(discretized_masses(0.26, L))  # a 4% wider Gaussian is told apart
    assert stats.chisquare(o, e).pvalue < 1e-6


def test_the_sampler_adds_and_clips_on_the_grid():
    """x + k / L == round(x + delta) on the grid, clipped: the identity behind the certificate, and the sampler."""
    g = torch.Generator().manual_seed(0)
    u = torch.randint(0, L + 1, (5000,), generator=g, dtype=torch.int64)
    x = u.double() / L
    delta = 0.25 * torch.randn(5000, generator=g, dtype=torch.float64)
    k = torch.round(L * delta)
    assert torch.equal(torch.round(L * (x + delta)), u + k)  # round(L (x + delta)) = u + round(L delta)

    noise = DiscretizedGaussian(0.25)
    image = (torch.tensor([0, 1, 128, 254, 255] * 20, dtype=torch.uint8).reshape(1, 10, 10).float() / 255)
    out = torch.empty(300, 1, 10, 10)
    void = noise.perturb_(out, image, input_generator(0, 1, "grid"))
    k = noise.noise_values((300, 100), input_generator(0, 1, "grid")).reshape(300, 1, 10, 10)
    start = torch.round(image.double() * L).long()
    assert not void.any() and void.shape == (300,)
    assert torch.equal(out, (start + k).clamp(0, L).to(torch.uint8).float() / 255)  # as a dataset stores pixels
    assert ((out < 0) | (out > 1)).sum() == 0 and torch.equal(out * 255, torch.round(out * 255))
    # the clipped ends carry the folded tails: at u = 0 about half the draws clip to 0
    at_zero = out.reshape(300, -1)[:, 0]
    assert 0.4 < float((at_zero == 0).double().mean()) < 0.6


def test_inputs_off_the_grid_are_refused_before_sampling():
    noise = DiscretizedGaussian(0.25)
    model = Linear2(torch.ones(4), 0.0)
    calls = []
    counted = lambda v: calls.append(1) or model(v)
    bad = torch.tensor([[0.0, 0.5, 1.0, 1.0]])  # 0.5 = 127.5 / 255
    with pytest.raises(ValueError, match=r"grid k/255.*value 0.5 at flat position 1"):
        certify(counted, bad, noise, 2, 10, 10, 0.1)
    with pytest.raises(ValueError, match="grid k/255"):
        predict(counted, bad, noise, 2, 10, 0.1)
    with pytest.raises(ValueError, match="grid k/255"):
        FixedSigma(0.25, sampling="sound").check_inputs(torch.tensor([[1.2, 0.0]]))
    assert calls == []
    noise.check_support(torch.tensor([[0.0, 128 / 255, 1.0]]))  # grid values pass, float32 rounding allowed
    with pytest.raises(ValueError, match="levels"):
        DiscretizedGaussian(0.25, levels=0)
    again = noise_from_parameters(noise.kind, noise.parameters())
    assert (again.sigma, again.levels, again.weights) == (noise.sigma, noise.levels, noise.weights)


def test_the_region_is_the_grid_points_ball_less_the_inputs_distance_to_it():
    """The samples bound p_A at u / L: the ball about x is that ball shrunk by ||x - u / L|| (so it lies inside)."""
    noise = DiscretizedGaussian(0.25)
    for x in (torch.tensor([(128 + 0.0009) / 255, 3 / 255, 1.0]), torch.arange(256, dtype=torch.float32) / 255):
        noise.check_support(x)  # accepted: within the grid tolerance, or on the grid up to float32 rounding
        exact = (x.double() - torch.round(x.double() * 255) / 255).norm().item()
        ball = noise.region(x, 1.5)
        assert noise.offset(x) >= exact and ball.radius + exact <= 0.25 * 1.5
        assert 0.25 * 1.5 - ball.radius <= 2 * exact + 1e-12
    assert noise.region(torch.tensor([(128 + 0.0009) / 255]), 1.5).radius < 0.25 * 1.5 - 3e-6  # 0.0009 / 255


class Leaky(DiscretizedGaussian):
    """The sound family with a leftover coordinate forced into every other sample (its real mass is ~1e-10)."""

    def _draw(self, count, generator, device):
        k = super()._draw(count, generator, device)
        k.view(-1, 4)[::2, 0] = self.void_value  # the tests' inputs have 4 coordinates
        return k


def test_void_samples_count_for_no_class_and_for_the_runner_up():
    model = Linear2(torch.ones(4), 10.0)  # always class 1
    x = torch.zeros(1, 4)
    voids = torch.zeros(1, dtype=torch.int64)
    counts = sample_counts(model, x, Leaky(0.25), 100, 2, batch_size=30, voids=voids)
    assert counts.tolist() == [[0, 50]] and voids.tolist() == [50]
    (cert,) = certify(model, x, Leaky(0.25), 2, 10, 100, 0.01)
    assert cert.counts.tolist() == [0, 50] and cert.n == 100 and cert.abstained  # 50 / 100: p_lower < 1/2
    (whole,) = certify(model, x, DiscretizedGaussian(0.25), 2, 10, 100, 0.01)
    assert whole.prediction == 1 and whole.sampling == "sound"
    # PREDICT: 50 for class 1 against 0 + 50 void for the runner-up is no evidence
    assert predict(model, x, Leaky(0.25), 2, 100, 0.01).tolist() == [-1]
    assert predict(model, x, DiscretizedGaussian(0.25), 2, 100, 0.01).tolist() == [1]


def test_observers_see_void_samples_as_no_class():
    seen = []
    model = Linear2(torch.ones(4), 10.0)
    sample_counts(model, torch.zeros(1, 4), Leaky(0.25), 8, 2, batch_size=8,
                  observers=[lambda rows, noise, pred: seen.append((noise.clone(), pred.clone()))])
    (noise, pred), = seen
    assert pred.tolist() == [[-1, 1] * 4]
    assert torch.equal(noise[0, 1::2] * 255, torch.round(noise[0, 1::2] * 255))  # the noise as it reached f


# ------------------------------------------------------------------------ soundness with an exactly known answer

W = torch.tensor([1.0, -2.0, 3.0, 1.0])  # integer weights: the model's decision is an integer sum
THRESHOLD = int(W.sum()) * 127  # class 1 iff S = sum_i w_i v_i > THRESHOLD (v_i in 0..255)


def grid_linear():
    """f(v / 255) = 1[w . v / 255 - (THRESHOLD + 1/2) / 255 > 0]: the half keeps float32 rounding off the decision."""
    return Linear2(W, -(THRESHOLD + 0.5) / 255)


def exact_p1(u, sigma):
    """P(S > THRESHOLD) for v_i = clip(u_i + round(255 delta_i)), by summing the exact law of S (float64)."""
    s = sigma * L
    lo = 0
    pmf_s = np.array([1.0])
    for ui, wi in zip(u, W.int().tolist()):
        v = np.arange(L + 1)
        cdf_hi = stats.norm.cdf((v - ui + 0.5) / s)
        cdf_lo = stats.norm.cdf((v - ui - 0.5) / s)
        pmf = cdf_hi - cdf_lo
        pmf[0], pmf[-1] = cdf_hi[0], stats.norm.sf((L - ui - 0.5) / s)  # the clipped ends take the tails
        spread = np.zeros(abs(wi) * L + 1)
        spread[np.arange(L + 1) * abs(wi)] = pmf
        if wi < 0:
            spread = spread[::-1]
            lo += wi * L
        pmf_s = np.convolve(pmf_s, spread)
    sums = lo + np.arange(pmf_s.size)
    return float(pmf_s[sums > THRESHOLD].sum())


def test_cohens_radius_holds_for_the_rounded_classifier_at_grid_points():
    """Exact check of the theorem the certificate uses: p(x') >= Phi(Phi^-1(p(x)) - ||x' - x|| / sigma)."""
    g = np.random.default_rng(0)
    sigma = 0.25
    for _ in range(40):
        u = g.integers(60, 196, 4)
        step = g.integers(-40, 41, 4)
        p, q = exact_p1(u, sigma), exact_p1(np.clip(u + step, 0, L), sigma)
        dist = float(np.linalg.norm(np.clip(u + step, 0, L) - u)) / L
        for a, b in ((p, q), (1 - p, 1 - q)):
            if 1e-12 < a < 1 - 1e-12:
                assert b >= stats.norm.cdf(stats.norm.ppf(a) - dist / sigma) - 1e-9


def test_sound_certificates_pass_the_soundness_harness_on_exact_sums():
    alpha = 0.1
    p = plan(alpha)  # 232 trials, at most 38 violations: P(sound passes) 0.9991, P(2 alpha fails) 0.9048
    sigma = 0.25
    g = np.random.default_rng(1)
    u = np.clip(127 + g.integers(-70, 71, (p.trials, 4)), 0, L)
    x = torch.tensor(u, dtype=torch.uint8).float() / 255
    model = grid_linear()
    p1 = np.array([exact_p1(row, sigma) for row in u])
    gens = [(input_generator(5, i, "select"), input_generator(5, i, "estimate")) for i in range(p.trials)]
    certs = certify(model, x, DiscretizedGaussian(sigma), 2, 20, 200, alpha, batch_size=4000, block=200,
                    generators=gens)
    predicted = np.array([c.prediction for c in certs])
    smoothed = (p1 > 0.5).astype(np.int64)
    p_top = np.where(predicted == 1, p1, 1 - p1)
    exact = np.where(p_top > 0.5, sigma * stats.norm.ppf(np.clip(p_top, 0.5, 1 - 1e-16)), 0.0)
    bad = violations_of([c.radius for c in certs], exact, predicted, smoothed)
    assert_sound(bad, p)
    assert 20 < int((predicted != -1).sum()) and np.ptp(p1) > 0.5  # certified inputs across a range of p
    assert all(c.sampling == "sound" for c in certs)
