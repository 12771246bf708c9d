"""The soundness harness itself (tests/soundness.py): its plans' stated probabilities against a simulation and a
brute force, a sound certificate passing and an over-certifying one failing as often as the plan says, the
geometry the soundness tests rely on, and bad input."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from smoothcert.engine.sampling import input_generator
from smoothcert.engine.smooth import certify
from smoothcert.geometry.regions import Ball, CrossPolytope, Ellipsoid
from smoothcert.noise.gaussian import IsotropicGaussian

from conftest import Linear2
from soundness import (LinearCase, assert_sound, count_violations, linear_case, plan, region_reach,
                       violations_of)

LEVEL = 1e-6  # confidence intervals of the simulations: a correct harness fails one of them with about this rate


def simulate(alpha, p, reps, seed, chunk_values=4_000_000):
    """Monte Carlo of the plan: ``reps`` runs of ``p.trials`` Bernoulli(alpha) and Bernoulli(2 alpha) outcomes."""
    rng = np.random.default_rng(seed)
    passed = detected = 0
    rows = max(1, chunk_values // p.trials)
    for start in range(0, reps, rows):
        u = rng.random((min(rows, reps - start), p.trials))
        passed += int(((u < alpha).sum(1) <= p.max_violations).sum())
        detected += int(((u < 2 * alpha).sum(1) > p.max_violations).sum())
    return passed, detected


@pytest.mark.parametrize("alpha", [0.02, 0.05, 0.1, 0.2, 0.3])
def test_plan_probabilities_match_a_simulation_of_bernoulli_trials(alpha):
    p = plan(alpha)
    assert p.pass_prob >= 0.999 and p.power >= 0.9 and p.alpha == alpha
    reps = 60_000
    passed, detected = simulate(alpha, p, reps, seed=round(alpha * 1000))
    for name, hits, stated in (("pass_prob", passed, p.pass_prob), ("power", detected, p.power)):
        low, high = stats.binomtest(hits, reps).proportion_ci(1 - LEVEL)
        assert low <= stated <= high, (name, hits / reps, stated, str(p))


@pytest.mark.parametrize("alpha", [0.02, 0.05, 0.1, 0.2, 0.25, 0.3, 0.4])
def test_plan_is_the_smallest_and_its_threshold_the_most_powerful(alpha):
    """Brute force over every (trials, threshold) pair: no smaller number of trials has a threshold meeting both
    probabilities, and at the plan's size any other threshold loses pass probability or power."""
    p = plan(alpha)
    t = np.arange(1, p.trials + 1)[:, None]
    c = np.arange(0, p.trials + 1)[None, :]
    ok = (stats.binom.cdf(c, t, alpha) >= 0.999) & (stats.binom.sf(c, t, 2 * alpha) >= 0.9) & (c <= t)
    assert not ok[:-1].any()
    assert np.flatnonzero(ok[-1]).tolist() == [p.max_violations]
    assert p.pass_prob == pytest.approx(stats.binom.cdf(p.max_violations, p.trials, alpha), rel=1e-12)
    assert p.power == pytest.approx(stats.binom.sf(p.max_violations, p.trials, 2 * alpha), rel=1e-12)
    # other targets are honoured too
    q = plan(alpha, pass_prob=0.99, power=0.5)
    assert q.trials <= p.trials and q.pass_prob >= 0.99 and q.power >= 0.5


# --------------------------------------------------------------------- a sound and an over-certifying method

def cohen_experiment(alpha, sigma, p_true, n0, n, runs, trials, seed=0):
    """``runs * trials`` independent CERTIFY trials of one input at exact class-1 probability ``p_true`` on a linear
    classifier (exact radius ``sigma * Phi^-1(p_true)``): one batched call, one pair of streams per trial."""
    distance = sigma * stats.norm.ppf(p_true)
    model = Linear2(torch.tensor([1.0, 0.0, 0.0]), 0.0)
    total = runs * trials
    x = torch.tensor([[distance, 0.5, 0.5]]).expand(total, 3).contiguous()
    gens = [(input_generator(seed, i, "select"), input_generator(seed, i, "estimate")) for i in range(total)]
    certs = certify(model, x, IsotropicGaussian(sigma), 2, n0, n, alpha, batch_size=20_000, block=n, generators=gens,
                    range_policy="ignore")
    radius = np.array([c.radius for c in certs])
    predicted = np.array([c.prediction for c in certs])
    exact = np.full(total, float(x[0, 0]))  # the distance the float32 input actually has to x_1 = 0
    return radius, predicted, exact


def clopper_pearson(alpha, n):
    """The one-sided lower bound for every count 0..n (scipy's beta quantile; 0 at count 0)."""
    k = np.arange(n + 1)
    return np.where(k == 0, 0.0, stats.beta.ppf(alpha, np.maximum(k, 1), n - k + 1))


def exact_violation_rate(lower, p_true, n0, above):
    """P(violation) of CERTIFY with the radius ``sigma Phi^-1(p_lower)`` made to violate when ``p_lower > above``.

    n0 odd: class 1 is selected iff it has more than n0 / 2 selection counts. Then it violates iff the
    Clopper-Pearson bound ``lower`` of its ``Binomial(n, p)`` count exceeds ``above``; class 0 selected violates
    iff its bound of a ``Binomial(n, 1 - p)`` count reaches 1/2 (a wrong prediction).
    """
    n = len(lower) - 1
    k = np.arange(n + 1)
    select_1 = stats.binom.sf(n0 // 2, n0, p_true)
    return (select_1 * stats.binom.pmf(k, n, p_true)[lower > above].sum()
            + (1 - select_1) * stats.binom.pmf(k, n, 1 - p_true)[lower >= 0.5].sum())


def test_a_sound_method_passes_and_one_over_certifying_at_2_alpha_fails():
    """Cohen's CERTIFY (sound) and the same radius times a factor chosen so that, computed exactly, it exceeds the
    exact radius with probability just above 2 alpha. Over many runs of the plan: both violation rates match the
    exact ones, the sound method passes every run, the inflated one fails as often as the exact power says."""
    alpha, sigma, p_true, n0, n, runs = 0.2, 0.5, 0.8, 51, 1000, 40
    p = plan(alpha)
    z = stats.norm.ppf(p_true)
    lower = clopper_pearson(alpha, n)
    # the largest count threshold j whose violation rate (count >= j) still reaches 2 alpha; the factor puts the
    # inflated radius's threshold between the bounds of counts j - 1 and j
    rates = np.array([exact_violation_rate(lower, p_true, n0, lower[j] - 1e-12) for j in range(1, n + 1)])
    j = 1 + int(np.flatnonzero(rates >= 2 * alpha).max())
    factor = z / stats.norm.ppf(0.5 * (lower[j - 1] + lower[j]))
    sound_rate = exact_violation_rate(lower, p_true, n0, p_true)
    inflated_rate = exact_violation_rate(lower, p_true, n0, stats.norm.cdf(z / factor))
    assert factor > 1 and sound_rate <= alpha and 2 * alpha <= inflated_rate < 2.2 * alpha

    radius, predicted, exact = cohen_experiment(alpha, sigma, p_true, n0, n, runs, p.trials)
    label = np.ones_like(predicted)
    sound = violations_of(radius, exact, predicted, label)
    inflated = violations_of(radius * factor, exact, predicted, label)
    assert (predicted != -1).mean() > 0.9  # the trials exercise certificates
    for bad, rate in ((sound, sound_rate), (inflated, inflated_rate)):
        assert stats.binomtest(int(bad.sum()), bad.size, rate).pvalue > LEVEL, (bad.mean(), rate)

    inflated_fails = 0
    for run in range(runs):
        part = slice(run * p.trials, (run + 1) * p.trials)
        assert_sound(sound[part], p)
        try:
            assert_sound(inflated[part], p)
        except AssertionError:
            inflated_fails += 1
    # exact probabilities of what was just observed
    sound_pass = stats.binom.cdf(p.max_violations, p.trials, sound_rate)
    detect = stats.binom.sf(p.max_violations, p.trials, inflated_rate)
    assert sound_pass >= p.pass_prob and detect >= p.power  # a rate above 2 alpha is detected more often
    assert sound_pass**runs > 0.99  # so "every run passes" was a fair demand
    assert stats.binomtest(inflated_fails, runs, detect).pvalue > LEVEL, (inflated_fails, runs, detect)
    assert inflated_fails > runs / 2


def test_count_violations_runs_every_trial():
    p = plan(0.2)
    seen = []
    assert count_violations(lambda k: seen.append(k) or k % 10 == 0, p) == len(range(0, p.trials, 10))
    assert seen == list(range(p.trials))


# --------------------------------------------------------------------------- the geometry the tests rely on

def boundary_points(region, gen, m=20_000):
    """Points on the region's boundary, drawn independently of :func:`region_reach`."""
    d = region.dim
    if isinstance(region, CrossPolytope):
        u = torch.randn(m, d, generator=gen, dtype=torch.float64)
        u = u / u.abs().sum(1, keepdim=True)
        return region.center + u * region.semi_axes
    u = torch.randn(m, d, generator=gen, dtype=torch.float64)
    u = u / u.norm(dim=1, keepdim=True)
    basis = getattr(region, "basis", None)
    basis = torch.eye(d, dtype=torch.float64) if basis is None else basis
    return region.center + (u * region.axes) @ basis.T


def test_region_reach_is_the_support_function():
    gen = torch.Generator().manual_seed(0)
    d = 3
    c = torch.rand(d, generator=gen, dtype=torch.float64)
    a = 0.1 + torch.rand(d, generator=gen, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    for region in (Ball(c, 0.7), Ellipsoid(c, a), Ellipsoid(c, a, q), CrossPolytope(c, a)):
        for _ in range(5):
            n = torch.randn(d, generator=gen, dtype=torch.float64)
            reach = region_reach(region, n)
            along = (boundary_points(region, gen) - c) @ n
            assert float(along.max()) <= reach * (1 + 1e-12) and float(along.max()) >= reach * 0.97
            # the point of the supporting plane on the normal line through the center, moved outward, is outside
            unit = n / n.norm()
            farthest = c + unit * (reach / float(n.norm()))  # the supporting plane's point on the normal line
            assert not bool(region.contains((farthest + 1e-9 * unit)[None]))
    with pytest.raises(TypeError, match="support function"):
        region_reach(object(), torch.ones(2))


def test_linear_case_labels_and_exact_distances():
    case = linear_case(200, 5, seed=3, scale=3.0)
    logits = case.model(case.x)
    assert np.array_equal((logits[:, 1] > logits[:, 0]).numpy(), case.label.astype(bool))
    assert 0.3 < case.label.mean() < 0.7
    w = case.w.numpy()
    m = case.margin
    # the nearest points of the hyperplane in each norm: along the normal (l2), along the largest |w_i| (l1),
    # along sign(w) (linf); each lies at the stated distance and on the hyperplane
    i = int(np.abs(w).argmax())
    steps = {"l2": -m[:, None] * w / (w @ w), "l1": -m[:, None] * np.eye(5)[i] / w[i],
             "linf": -m[:, None] * np.sign(w) / np.abs(w).sum()}
    for norm, step in steps.items():
        order = {"l2": 2, "l1": 1, "linf": np.inf}[norm]
        assert np.allclose(np.linalg.norm(step, ord=order, axis=1), case.distance(norm), rtol=1e-12)
        assert np.allclose((case.x.double().numpy() + step) @ w + case.b, 0.0, atol=1e-12)
    # and no point closer than that crosses: Hoelder, |w . delta| <= ||w||_* ||delta||
    delta = np.random.default_rng(0).standard_normal((200, 5))
    for norm, order in (("l2", 2), ("l1", 1), ("linf", np.inf)):
        inside = delta / np.linalg.norm(delta, ord=order, axis=1, keepdims=True) * case.distance(norm)[:, None]
        assert (np.abs(inside @ w) <= np.abs(m) * (1 + 1e-12)).all()
    sub = [0, 2]
    assert np.allclose(case.distance("l2", sub), np.abs(m) / np.linalg.norm(w[sub]))
    reach = case.reach([Ball(torch.zeros(5), 0.25), None] + [None] * 198)
    assert reach[0] == pytest.approx(0.25) and (reach[1:] == 0).all()


# ------------------------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("alpha", [0.0, 0.5, -0.1, 1.0, 0.7, float("nan"), float("inf")])
def test_bad_alphas_are_refused(alpha):
    with pytest.raises(ValueError, match="alpha"):
        plan(alpha)


@pytest.mark.parametrize("alpha", ["0.1", None, True, [0.1]])
def test_alphas_that_are_not_numbers_are_refused(alpha):
    with pytest.raises(TypeError, match="alpha"):
        plan(alpha)


def test_bad_targets_and_outcomes_are_refused():
    for kwargs, match in ((dict(pass_prob=1.0), "pass_prob"), (dict(power=0.0), "power"),
                          (dict(max_trials=0), "max_trials"), (dict(max_trials=10), "no plan")):
        with pytest.raises(ValueError, match=match):
            plan(0.1, **kwargs)
    p = plan(0.2)
    with pytest.raises(ValueError, match="trial outcomes"):
        assert_sound(np.zeros(p.trials - 1, dtype=bool), p)
    with pytest.raises(ValueError, match="shape"):
        violations_of([0.1, 0.2], [0.1])
    with pytest.raises(ValueError, match="NaN"):
        violations_of([math.nan], [0.1])
    with pytest.raises(ValueError, match="both"):
        violations_of([0.1], [0.1], predicted=[1])
    with pytest.raises(ValueError, match="distance|norm"):
        linear_case(4, 2, seed=0).distance("l3")
    assert violations_of([0.1, 0.3, 0.2, 0.0], [0.2, 0.2, 0.2, 0.0], [1, 1, 0, -1], [1, 1, 1, 0]).tolist() == \
        [False, True, True, False]
    assert_sound(p.max_violations, p)
    with pytest.raises(AssertionError, match="violations"):
        assert_sound(p.max_violations + 1, p)
    assert isinstance(linear_case(4, 2, seed=0), LinearCase)
