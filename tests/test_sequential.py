"""Sequential and anytime-valid certification: exact coverage by dynamic programming, the randomized
Clopper-Pearson bound's exact coverage, and seeded end-to-end soundness on linear classifiers in every mode."""

import math

import numpy as np
import pytest
import torch
from scipy import integrate
from scipy import stats as st

from smoothcert.engine.sampling import input_generator
from smoothcert.engine.sequential import Mode, certify_sequential, target_level
from smoothcert.engine.smooth import certify
from smoothcert.methods.base import RunContext
from smoothcert.methods.dds import DDS
from smoothcert.methods.fixed import FixedSigma
from smoothcert.noise.base import Noise
from smoothcert.noise.discrete import DiscretizedGaussian
from smoothcert.noise.gaussian import DiagonalGaussian, IsotropicGaussian
from smoothcert.noise.laplace import Laplace
from smoothcert.noise.transformations import DiscreteGaussianShift
from smoothcert.noise.uniform import UniformDiagonal
from smoothcert.stats.bounds import clopper_pearson_lower
from smoothcert.stats.sequential import (CERTIFIED, FUTILE, UNDECIDED, anytime_decisions, check_schedule,
                                         kt_log_wealth, randomized_cp_lower, spending, target_decisions, target_step,
                                         union_cp_bounds)

from conftest import Linear2
from soundness import assert_sound, linear_case, plan, violations_of

ALPHA = 0.05
SCHEDULE = check_schedule(2000, first=20)  # 20, 40, ..., 1280, 2000: 8 checks


def dp(p, schedule, decide):
    """Exact ``(P(the run ever stops CERTIFIED), E[samples])`` for Bernoulli(p) draws: the law of the successes
    after each check, by convolution with the binomial law of the next batch; mass that stops leaves."""
    law, prev, hit, expected = np.array([1.0]), 0, 0.0, 0.0
    for k, n_k in enumerate(schedule.tolist()):
        m = n_k - prev
        law = np.convolve(law, st.binom.pmf(np.arange(m + 1), m, p))
        dec = decide(np.arange(n_k + 1), n_k, k)
        hit += law[dec == CERTIFIED].sum()
        stop = dec != UNDECIDED if k < len(schedule) - 1 else np.ones(n_k + 1, bool)
        expected += n_k * law[stop].sum()
        law = np.where(stop, 0.0, law)
        prev = n_k
    return hit, expected


def target(level, sequence, schedule=SCHEDULE, alpha=ALPHA):
    """The target test exactly as the engine runs it (both futility rules included)."""
    alphas = spending(alpha, len(schedule))
    return lambda s, n, k: target_step(s, k, schedule, alphas, level, alpha, sequence)


def naive_target(level, alpha=ALPHA):
    """The negative control: fixed-n Clopper-Pearson at the full alpha after every batch."""
    return lambda s, n, k: np.where(np.atleast_1d(clopper_pearson_lower(s, np.full(s.shape, n), alpha)) >= level,
                                    CERTIFIED, UNDECIDED)


@pytest.mark.parametrize("sequence", ["cp", "betting"])
@pytest.mark.parametrize("level", [0.6, 0.8413447460685429, 0.97])
def test_target_test_exact_type_one_error_by_dynamic_programming(sequence, level):
    """For every true p <= p* on a grid (the null), P(the test ever certifies) <= alpha, computed exactly."""
    grid = np.concatenate([np.linspace(0.5, level, 12), [np.nextafter(level, 0), level]])
    errors = [dp(p, SCHEDULE, target(level, sequence))[0] for p in grid]
    assert max(errors) <= ALPHA * (1 + 1e-9), (sequence, level, max(errors))
    assert errors[-1] > ALPHA / 50  # the test spends its error, it is not trivially conservative


@pytest.mark.parametrize("sequence", ["cp", "betting"])
@pytest.mark.parametrize("first, growth", [(Mode.first, Mode.growth), (10, 1.2), (300, 5.0)])
def test_every_schedule_keeps_the_exact_error_of_the_target_test(sequence, first, growth):
    """The default checks (50, 75, 112, ...) and a fine and a coarse schedule: P(ever certifies) <= alpha at every
    null p, computed exactly; with the default checks the test at p = p* still spends a real share of it."""
    level = 0.8413447460685429
    schedule = check_schedule(2000, first, growth)
    errors = [dp(p, schedule, target(level, sequence, schedule))[0] for p in np.linspace(0.6, level, 8)]
    assert max(errors) <= ALPHA * (1 + 1e-9), (sequence, first, growth, max(errors))
    if first == Mode.first:
        assert errors[-1] > ALPHA / 50
    assert len(schedule) > 20 if first == 10 else True  # the fine schedule really looks often


@pytest.mark.parametrize("level", [0.6, 0.8413447460685429, 0.97])
def test_negative_control_recomputing_fixed_n_bound_fails(level):
    """Fixed-n Clopper-Pearson at the full alpha after every batch certifies a p = p* input too often."""
    error, _ = dp(level, SCHEDULE, naive_target(level))
    assert error > 1.5 * ALPHA, error


def test_union_bound_confidence_sequence_covers_uniformly_and_the_naive_one_does_not():
    """P(exists check k: L_k > p) <= alpha for every p on a grid (so any stopping rule is covered); the fixed-n
    bound at the full alpha at every check violates that at some p."""
    alphas = spending(ALPHA, len(SCHEDULE))
    worst = worst_naive = 0.0
    for p in np.linspace(0.02, 0.995, 40):
        ours = dp(p, SCHEDULE, lambda s, n, k: np.where(union_cp_bounds(s, np.full(s.shape, n), alphas[k])[0] > p,
                                                         CERTIFIED, UNDECIDED))[0]
        naive = dp(p, SCHEDULE, lambda s, n, k: np.where(
            np.atleast_1d(clopper_pearson_lower(s, np.full(s.shape, n), ALPHA)) > p, CERTIFIED, UNDECIDED))[0]
        worst, worst_naive = max(worst, ours), max(worst_naive, naive)
    assert worst <= ALPHA * (1 + 1e-9)
    assert worst_naive > 1.5 * ALPHA


@pytest.mark.parametrize("late", [True, False])
def test_anytime_stopping_rule_reports_a_covered_bound(late):
    """With the anytime mode's stopping rule, P(the bound reported at the stop exceeds p) <= alpha (exact DP), with
    the mode's late spending and with the early one."""
    alphas = spending(ALPHA, len(SCHEDULE), late=late)
    assert np.allclose(Mode("anytime", n_max=2000, first=20, growth=2.0).spending(ALPHA), spending(ALPHA, 8, True))
    for p in (0.55, 0.8, 0.95, 0.99):
        def decide(s, n, k):
            dec = anytime_decisions(s, n, int(SCHEDULE[-1]), alphas[k], alphas[-1], 0.05, [st.norm.ppf] * s.size)
            low = union_cp_bounds(s, np.full(s.shape, n), alphas[k])[0]
            # CERTIFIED here: stopped with a bound above p (a violation); other stops leave
            return np.where(dec == UNDECIDED, UNDECIDED, np.where(low > p, CERTIFIED, FUTILE))
        assert dp(p, SCHEDULE, decide)[0] <= ALPHA


def test_unreachable_levels_abstain_without_sampling_and_futility_costs_no_power():
    big = check_schedule(100_000)
    shares = spending(0.001, len(big))
    ceiling = float(clopper_pearson_lower(100_000, 100_000, shares[-1]))
    assert target_step([0], -1, big, shares, [min(ceiling * 1.000001, 0.9999999)], 0.001)[0] == FUTILE
    assert target_step([0], -1, big, shares, [st.norm.cdf(3.0)], 0.001)[0] == UNDECIDED
    # all successes so far, level reachable: continue; a run that can no longer reach it stops
    assert target_step([100], 0, big, shares, [0.99], 0.001)[0] in (UNDECIDED, CERTIFIED)
    assert target_step([40_000], 9, big, shares, [0.99], 0.001)[0] == FUTILE
    # with and without the reachability rule, the certification probability is the same
    level = 0.8413447460685429
    alphas = spending(ALPHA, len(SCHEDULE))
    plain = lambda s, n, k: target_decisions(s, np.full(s.shape, n), np.full(s.shape, level), ALPHA, alphas[k], "cp")
    for p in (0.8, level, 0.9):
        assert math.isclose(dp(p, SCHEDULE, plain)[0], dp(p, SCHEDULE, target(level, "cp"))[0], rel_tol=1e-9)


def test_schedule_and_spending():
    assert SCHEDULE.tolist() == [20, 40, 80, 160, 320, 640, 1280, 2000]
    assert check_schedule(100, first=100).tolist() == [100]
    for late in (False, True):
        assert math.isclose(spending(0.001, 11, late).sum(), 0.001, rel_tol=1e-12)
    assert np.array_equal(spending(0.001, 11, late=True), spending(0.001, 11)[::-1])
    for bad in (dict(growth=1.0), dict(first=0)):
        with pytest.raises(ValueError):
            check_schedule(1000, **bad)
    # the target test spends exactly the shares it is given: one per check, summing to at most alpha
    for shares in (spending(ALPHA, len(SCHEDULE) - 1), spending(2 * ALPHA, len(SCHEDULE))):
        with pytest.raises(ValueError, match="one share of alpha per check"):
            target_step([10], 0, SCHEDULE, shares, [0.6], ALPHA)


def test_anytime_bound_at_n_max_is_close_to_fixed_n_certify():
    """The anytime mode's last check keeps 0.63 alpha (20 default checks to n_max = 100,000): the bound's gap there is
    within 0.02 of fixed-n CERTIFY's at the full alpha at success rates from 70% to all. With the target mode's
    early spending the last check has alpha / 638 and, at all successes, the gap falls short by 0.17."""
    mode = Mode("anytime", n_max=100_000)
    last, early = mode.spending(0.001)[-1], spending(0.001, len(mode.schedule()))[-1]
    for s in (100_000, 99_990, 99_000, 90_000, 70_000):
        fixed = st.norm.ppf(clopper_pearson_lower(s, 100_000, 0.001))
        assert fixed - 0.02 <= st.norm.ppf(clopper_pearson_lower(s, 100_000, last)) <= fixed
    assert st.norm.ppf(clopper_pearson_lower(100_000, 100_000, early)) < st.norm.ppf(clopper_pearson_lower(
        100_000, 100_000, 0.001)) - 0.15


@pytest.mark.parametrize("s,n,level", [(30, 40, 0.6), (0, 5, 0.3), (199, 200, 0.97), (900, 1000, 0.95)])
def test_kt_wealth_matches_quadrature(s, n, level):
    """The closed form of the truncated KT mixture against numerical integration of its definition."""
    num = integrate.quad(lambda q: q ** (s - 0.5) * (1 - q) ** (n - s - 0.5), level, 1, limit=200, points=[s / n])[0]
    den = integrate.quad(lambda q: q ** -0.5 * (1 - q) ** -0.5, level, 1)[0]
    expected = math.log(num / den) - s * math.log(level) - (n - s) * math.log1p(-level)
    assert math.isclose(float(kt_log_wealth(s, n, level)), expected, rel_tol=1e-7, abs_tol=1e-9)


def test_randomized_clopper_pearson_has_exact_coverage():
    """P(L > p) = alpha exactly: the law of X and a fine grid of U (an independent computation)."""
    n, alpha = 30, 0.1
    u = (np.arange(1000) + 0.5) / 1000  # midpoints: the U-integral of each step is off by < 1/2000
    ks, us = np.meshgrid(np.arange(n + 1), u, indexing="ij")
    low = randomized_cp_lower(ks.ravel(), np.full(ks.size, n), alpha, us.ravel()).reshape(ks.shape)
    for p in (0.05, 0.3, 0.5, 0.77, 0.95):
        miss = (st.binom.pmf(np.arange(n + 1), n, p) * (low > p).mean(axis=1)).sum()
        assert abs(miss - alpha) < 2e-3, (p, miss)
        plain = (st.binom.pmf(np.arange(n + 1), n, p) * (clopper_pearson_lower(np.arange(n + 1), n, alpha) > p)).sum()
        assert plain < alpha  # Clopper-Pearson is conservative; the randomized bound spends all of alpha
    # the bracket: U = 1 gives Clopper-Pearson's bound, U = 0 the bound of k + 1
    assert np.allclose(randomized_cp_lower([7], [20], 0.05, [1.0]), clopper_pearson_lower(7, 20, 0.05), atol=1e-14)
    assert np.allclose(randomized_cp_lower([7], [20], 0.05, [0.0]), clopper_pearson_lower(8, 20, 0.05), atol=1e-14)


def test_target_level_inverts_each_familys_gap():
    x = torch.zeros(4)
    g, level = target_level(IsotropicGaussian(0.25), x, 0.5)
    assert math.isclose(level, st.norm.cdf(2.0), rel_tol=1e-12) and IsotropicGaussian(0.25).gap(level) >= g
    assert IsotropicGaussian(0.25).region(x, IsotropicGaussian(0.25).gap(level)).inscribed_radius >= 0.5
    theta = torch.tensor([0.2, 0.5, 0.3, 0.9])
    g, level = target_level(DiagonalGaussian(theta), x, 0.4)  # inscribed radius = gap * min theta
    assert math.isclose(g, 0.4 / float(theta.float().min()), rel_tol=1e-6)
    noise = UniformDiagonal.isotropic(0.5)
    g, level = target_level(noise, x, 0.1)
    assert noise.gap(level) >= g and math.isclose(level, (1 + g) / 2, rel_tol=1e-12)
    assert noise.region(x, noise.gap(level)).inscribed_radius >= 0.1


@pytest.mark.parametrize("noise", [IsotropicGaussian(0.25), Laplace(0.3), UniformDiagonal.isotropic(0.5),
                                   DiscretizedGaussian(0.25), DiscreteGaussianShift(1.5, 3)], ids=repr)
def test_every_familys_level_is_the_least_probability_reaching_the_gap(noise):
    """``level`` inverts the family's own ``gap``: ``gap(level(g)) >= g`` and, one step below, short of ``g``
    (within 1e-9 for the continuous gaps). A family defining ``gap`` without ``level`` is refused."""
    top = noise.gap(1 - 1e-12)
    for g in np.linspace(0.0, top, 9)[1:-1]:
        p = noise.level(g)
        reached = p
        for _ in range(64):  # up to the rounding of p (target_level raises it so)
            if noise.gap(reached) >= g:
                break
            reached = np.nextafter(reached, 1.0)
        assert 0.5 <= p <= reached < 1 and noise.gap(reached) >= g
        assert noise.gap(max(0.5, p - 1e-9)) < g or isinstance(noise, DiscreteGaussianShift)
    if isinstance(noise, DiscreteGaussianShift):  # a step function: its level is the least p of each step
        for g in sorted(set(noise.gap(q) for q in np.linspace(0.51, 0.999, 40)) - {0.0}):
            p = noise.level(g)
            assert noise.gap(p) >= g and noise.gap(np.nextafter(p, 0) - 1e-12) < g
    assert math.isclose(Laplace(0.3).level(0.25), 1 - math.exp(-0.25) / 2, rel_tol=1e-15)
    with pytest.raises(TypeError, match="gap without level"):
        type("HalfDone", (IsotropicGaussian,), {"kind": "half-done", "gap": lambda self, p: 2 * p - 1})


def test_target_level_reaches_the_radius_when_regions_are_not_proportional_to_the_gap():
    """A region of radius ``gap - 0.1`` (an offset, as for an input just off the grid): the search finds the gap."""
    class Offset(IsotropicGaussian):
        kind = "offset-test"

        def region(self, center, gap):
            return super().region(center, max(float(gap) - 0.1, 0.0))

    noise = Offset(1.0)
    g, p = target_level(noise, torch.zeros(3), 0.5)
    assert math.isclose(g, 0.6, rel_tol=1e-12) and noise.region(torch.zeros(3), g).inscribed_radius >= 0.5
    assert noise.gap(p) >= g
    del Noise.registry["offset-test"]


def test_target_mode_with_laplace_noise_is_sound_at_the_level():
    """d = 1, a threshold classifier: Laplace's l1 certificate is tight there, so inputs whose exact radius is just
    below r must certify r at most as alpha allows. (Testing ``p_A >= Phi(g)``, the Gaussian level, for Laplace's
    gap ``g`` certifies most of them: Phi(0.25) = 0.599 against the level 1 - exp(-0.25) / 2 = 0.611.)"""
    p = plan(0.1)
    noise = Laplace(0.2)
    r = 0.25 * noise.scale_sampled
    model, x, exact = near_level_case(p.trials, r, 0.2, slack=1e-3, d=1, seed=4)
    gens = [(input_generator(6, i, "select"), input_generator(6, i, "estimate")) for i in range(p.trials)]
    mode = Mode("target", radius=r, n_max=20_000, first=200)
    certs = certify_sequential(model, x, noise, 2, 20, mode, p.alpha, batch_size=20_000, block=2000,
                               generators=gens, range_policy="ignore")
    claimed = [r if c.extra["decision"] == "certified" else 0.0 for c in certs]
    assert all(c.radius >= r for c in certs if c.extra["decision"] == "certified")
    assert_sound(violations_of(claimed, exact, [c.prediction for c in certs], np.ones(p.trials, int)), p)


def test_mode_validation_before_sampling():
    for bad in (dict(name="target", n_max=100), dict(name="target", radius=-1.0, n_max=100),
                dict(name="target", radius=math.inf, n_max=100), dict(name="anytime"),
                dict(name="fixed", radius=0.5), dict(name="fixed", n_max=100), dict(name="anytime", n_max=10,
                                                                                    precision=0.0),
                dict(name="target", radius=0.5, n_max=100, randomized=True), dict(name="nope"),
                dict(name="anytime", n_max=100, sequence="betting"),
                dict(name="target", radius=0.5, n_max=100, growth=1.0), dict(name="anytime", n_max=100, growth=True),
                dict(name="anytime", n_max=100, growth=math.nan), dict(name="anytime", n_max=100, first=0),
                dict(name="fixed", growth=3.0), dict(name="fixed", first=100)):
        with pytest.raises(ValueError):
            Mode(**bad)
    with pytest.raises(ValueError, match="n-max"):
        Mode("target", radius=0.5, n_max=50).check_sampling(100, 1000)
    assert Mode().config() == {} and Mode("anytime", n_max=10).precision == 0.02


def near_level_case(trials, radius, sigma, slack, d=4, seed=0):
    """Inputs whose exact l2 radius is ``radius * (1 - slack)``: p_A sits just below the level of ``radius``."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, generator=g)
    w = w / w.norm()
    x = torch.rand(trials, d, generator=g)
    model = Linear2(w, 0.0)
    wd = model.w.double()
    dist = radius * (1 - slack)
    # shift each input along w so that w . x + b = dist, b = 0
    x = (x.double() - ((x.double() @ wd - dist) / (wd @ wd))[:, None] * wd[None, :]).float()
    exact = np.abs((x.double() @ wd).numpy()) / float(wd.norm())
    return model, x, exact


@pytest.mark.parametrize("sequence", ["cp", "betting"])
def test_target_mode_end_to_end_soundness_at_the_level(sequence):
    """Inputs whose exact radius is just below r: certifying r is a violation; it happens at most as alpha allows."""
    p = plan(0.1)  # 232 trials, at most 38 violations
    sigma, r = 0.5, 0.5
    model, x, exact = near_level_case(p.trials, r, sigma, slack=1e-3)
    gens = [(input_generator(5, i, "select"), input_generator(5, i, "estimate")) for i in range(p.trials)]
    mode = Mode("target", radius=r, n_max=2000, sequence=sequence, first=20)
    certs = certify_sequential(model, x, IsotropicGaussian(sigma), 2, 20, mode, p.alpha, batch_size=4000, block=200,
                               generators=gens, range_policy="ignore")
    bad = violations_of([c.radius for c in certs], exact, [c.prediction for c in certs], np.ones(p.trials, int))
    assert sum(c.n_used < 2000 for c in certs) > 0  # some runs stop early
    assert all(c.extra["decision"] in ("certified", "futile", "undecided") for c in certs)
    assert bad.sum() > 0 or sequence == "betting"  # the case is at the edge: the cp test does spend its error
    assert_sound(bad, p)


def test_anytime_and_randomized_fixed_end_to_end_soundness():
    """Random linear cases: the anytime radius and the randomized-bound radius exceed the exact one at most as
    alpha allows."""
    p = plan(0.1)
    case = linear_case(p.trials, 6, seed=3)
    gens = [(input_generator(9, i, "select"), input_generator(9, i, "estimate")) for i in range(p.trials)]
    certs = certify_sequential(case.model, case.x, IsotropicGaussian(0.5), 2, 20,
                               Mode("anytime", n_max=2000, precision=0.05, first=20), p.alpha, batch_size=4000,
                               block=200, generators=gens, range_policy="ignore")
    assert sum(not c.abstained for c in certs) > p.trials / 3
    assert_sound(violations_of([c.radius for c in certs], case.distance(), [c.prediction for c in certs],
                               case.label), p)
    uniforms = [float(torch.rand((), generator=input_generator(9, i, "cp-uniform"), dtype=torch.float64))
                for i in range(p.trials)]
    fixed = certify(case.model, case.x, IsotropicGaussian(0.5), 2, 20, 300, p.alpha, batch_size=4000, block=300,
                    generators=gens, uniforms=uniforms, range_policy="ignore")
    assert fixed[0].extra["cp_uniform"] == uniforms[0]
    assert_sound(violations_of([c.radius for c in fixed], case.distance(), [c.prediction for c in fixed],
                               case.label), p)


def test_fixed_mode_through_the_context_is_unchanged_bit_for_bit():
    case = linear_case(6, 5, seed=2)
    ctx = RunContext(case.model, 2, 20, 500, 0.01, 500, torch.float32, 3, torch.device("cpu"))
    method = FixedSigma(0.4)
    records = method.certify(ctx, case.x, torch.as_tensor(case.label), list(range(6)))
    direct = certify(case.model, case.x, IsotropicGaussian(0.4), 2, 20, 500, 0.01, batch_size=500, block=ctx.block,
                     generators=ctx.certify_generators(range(6)), seed=3)
    assert [r.certificate.p_lower for r in records] == [c.p_lower for c in direct]
    assert all(r.values()["n_used"] == 500 for r in records)


def test_target_mode_with_memory_certifies_regions_at_r_only():
    """DDS in target mode: every region (before memory and stored by it) is the one at radius r, and the trials
    stay sound on a linear case (memory never enlarges a region)."""
    p = plan(0.2)  # 97 trials
    case = linear_case(p.trials, 6, seed=4)
    r = 0.3
    ctx = RunContext(case.model, 2, 20, 500, p.alpha, 2000, torch.float32, 1, torch.device("cpu"),
                     mode=Mode("target", radius=r, n_max=1000, first=50))
    method = DDS(0.4, dds_steps=3, samples=16)
    records = method.certify(ctx, case.x, torch.as_tensor(case.label), list(range(p.trials)))
    certified = [rec for rec in records if not rec.certificate.abstained]
    assert certified and all(abs(rec.certificate.radius - r) < 1e-9 * r + 1e-12 or rec.certificate.radius >= r
                             for rec in certified)
    assert all(rec.certificate.radius <= r * (1 + 1e-9) for rec in certified)
    stored = {i: region for i, _, region in method.memory.memory.stored}
    reach = case.reach([stored.get(i) for i in range(p.trials)])
    assert np.all(reach <= r * (1 + 1e-9))
    bad = violations_of([rec.radius for rec in records], case.distance(), [rec.prediction for rec in records],
                        case.label) | violations_of(reach, case.distance())
    assert_sound(bad, p)
    assert {rec.values()["decision"] for rec in records} <= {"certified", "futile", "undecided"}


def test_sequential_modes_sample_the_model_in_eval_mode_and_restore_its_mode():
    """A model left in train mode (dropout on) is certified as in eval mode, like fixed-n CERTIFY, and every
    submodule's mode is restored afterwards."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Dropout(0.9), torch.nn.Linear(16, 2))
    x = torch.randn(3, 4)
    mode = Mode("target", radius=0.05, n_max=800)

    def run():
        gens = [(input_generator(0, i, "select"), input_generator(0, i, "estimate")) for i in range(3)]
        return certify_sequential(net, x, IsotropicGaussian(0.3), 2, 20, mode, 0.01, batch_size=400, generators=gens)

    net.eval()
    expected = run()
    net.train()
    net[1].eval()  # a mixed state, to be restored exactly
    got = run()
    assert [m.training for m in net.modules()] == [True, True, False, True]
    assert [(c.prediction, c.n_used, c.p_lower) for c in got] == [(c.prediction, c.n_used, c.p_lower) for c in expected]
