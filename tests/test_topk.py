"""Top-k certificates (Jia, Cao, Wang, Gong, ICLR 2020; seed 001 Theorem 1): the radius formula against Cohen's
two-sided radius, an independent brute force of the paper's condition and high-precision roots; soundness on a
1-D classifier of intervals whose smoothed probabilities are exact Gaussian integrals; PREDICT of a top-k set;
bad input before sampling; the command line and the report."""

import itertools
import json
import math

import mpmath
import numpy as np
import pytest
import torch
from scipy import optimize, special, stats

from smoothcert.cli.main import main
from smoothcert.engine.sampling import input_generator
from smoothcert.methods.base import RunContext
from smoothcert.methods.topk import TopK, certify_topk, predict_topk
from smoothcert.models.architectures import model_for_dataset
from smoothcert.models.checkpoint import save_checkpoint
from smoothcert.stats.topk import label_bounds, simultaneous_bounds, topk_radius, topk_set_test
from soundness import assert_sound, plan, violations_of


# ------------------------------------------------------------------------------------------------ the formula

def test_k1_is_cohens_two_sided_radius():
    rng = np.random.default_rng(0)
    for sigma in (1e-3, 0.25, 1.0, 37.0):
        p_a = rng.uniform(0.05, 1.0 - 1e-9, 2000)
        p_b = rng.uniform(0.0, 1.0, 2000) * (1.0 - p_a)  # p_A + p_B <= 1, as bounds of two classes must be
        p_b = np.maximum(p_b, 1e-300)
        others = np.stack([p_b, p_b * rng.uniform(0, 1, 2000), p_b * rng.uniform(0, 1, 2000)], 1)  # p_B the largest
        cohen = sigma / 2 * (stats.norm.ppf(p_a) - stats.norm.ppf(p_b))
        got = topk_radius(p_a, others, 1, sigma)
        assert np.all(np.abs(got - np.maximum(cohen, 0.0)) <= 1e-9 * max(1.0, sigma))
        assert np.all(got <= np.maximum(cohen, 0.0) * (1 + 1e-12) + 1e-300)  # never above the closed form
    # p_B = 1 - p_A: the one-sided radius sigma Phi^-1(p_A) of Cohen's CERTIFY
    assert topk_radius(0.9, [0.1, 0.0], 1, 0.5) == pytest.approx(0.5 * stats.norm.ppf(0.9), rel=1e-12)
    # upper bounds above 1 - p_A are capped there: the same radius
    assert topk_radius(0.9, [0.7, 0.2], 1, 0.5) == pytest.approx(0.5 * stats.norm.ppf(0.9), rel=1e-12)


def brute_force_radius(p_l, p_upper, k, sigma):
    """The paper's condition without Theorem 1's sorting: every set T of k other classes could overtake l, and
    for each T the bound min over every non-empty T' of T of Phi(Phi^-1(min(sum_T' P, 1 - p_l)) + R / sigma) / |T'|
    (the proof's Neyman-Pearson step on the event f in T'); R is the largest radius where p_l's bound beats the
    worst T. Solved with scipy's plain normal cdf (no logarithms) and brentq after doubling a bracket."""
    m = len(p_upper)
    # every (T, T') pair: T' as the quantile of its capped sum, with its size
    pairs = [[(special.ndtri(min(sum(p_upper[j] for j in sub), 1 - p_l)), len(sub))
              for size in range(1, k + 1) for sub in itertools.combinations(t_set, size)]
             for t_set in itertools.combinations(range(m), k)]
    a = special.ndtri(p_l)

    def worst(r):
        best_t = max(min(special.ndtr(q + r) / size for q, size in bounds) for bounds in pairs)
        return special.ndtr(a - r) - best_t

    if worst(0.0) <= 0:
        return 0.0
    hi = 0.5
    while worst(hi) > 0:
        hi *= 2
    return sigma * optimize.brentq(worst, 0.0, hi, xtol=1e-14, rtol=1e-14)


def test_radius_against_a_brute_force_of_the_papers_condition():
    rng = np.random.default_rng(1)
    checked = 0
    for trial in range(40):
        c = 6
        p = rng.dirichlet(np.full(c, 0.7))
        p_l = float(np.clip(p[0] + rng.uniform(-0.05, 0.05), 1e-3, 0.999))
        p_upper = np.clip(p[1:] + rng.uniform(0, 0.05, c - 1), 0, 1)
        for k in (1, 2, 3, 4):
            sigma = float(rng.choice([0.12, 0.5, 2.0]))
            exact = brute_force_radius(p_l, list(p_upper), k, sigma)
            got = topk_radius(p_l, p_upper, k, sigma)
            assert got == pytest.approx(exact, rel=1e-7, abs=1e-12), (trial, k)
            checked += exact > 0
    assert checked > 40  # most cases certify something


def test_the_radius_is_the_conservative_end_of_the_root():
    """At the returned radius eq. (3) still holds in 40-digit arithmetic; just above it, it fails."""
    mpmath.mp.dps = 40
    phi = lambda z: mpmath.ncdf(z)  # noqa: E731
    rng = np.random.default_rng(2)
    for _ in range(150):
        k = int(rng.integers(1, 5))
        p_l = float(rng.uniform(0.2, 0.9))
        p_upper = rng.uniform(0, 1, 6) * (1 - p_l) / 2
        sigma = float(rng.uniform(0.1, 3))
        got = topk_radius(p_l, p_upper, k, sigma)
        top = sorted(p_upper, reverse=True)[:k][::-1]
        sums = [min(mpmath.mpf(sum(top[:t])), 1 - mpmath.mpf(p_l)) for t in range(1, k + 1)]
        a = mpmath.sqrt(2) * mpmath.erfinv(2 * mpmath.mpf(p_l) - 1)
        b = [mpmath.sqrt(2) * mpmath.erfinv(2 * s - 1) for s in sums]
        f = lambda r: phi(a - r) - min(phi(bt + r) / t for t, bt in enumerate(b, 1))  # noqa: E731
        if got == 0:
            assert f(0) <= 0
            continue
        root = mpmath.findroot(f, (mpmath.mpf(0), mpmath.mpf(got / sigma) * 2 + 1), solver="bisect", tol=1e-35)
        assert got / sigma <= root  # never above the root (a relative margin covers the float64 rounding)
        assert got / sigma >= root * (1 - mpmath.mpf(1e-11))


def test_a_tie_certifies_nothing():
    """p_l = P_{S_1} (h_1(0) = 0): Theorem 1's radius is 0, so the label is not certified in the top k."""
    assert topk_radius(0.5, [0.5, 0.0], 1) == 0.0
    assert topk_radius(0.3, [0.3, 0.3, 0.1], 1) == 0.0
    assert topk_radius(0.5, [0.5 - 1e-9, 0.0], 1) > 0


def test_the_bracket_scales_with_sigma():
    p_l, p_upper = np.array([0.999999]), np.array([[1e-7, 1e-8, 1e-9]])
    base = topk_radius(p_l, p_upper, 3, 1.0)[0]
    assert base > 4  # a root far beyond any fixed small interval
    for sigma in (1e-6, 1e-2, 10.0, 1e6):
        assert topk_radius(p_l, p_upper, 3, sigma)[0] == pytest.approx(sigma * base, rel=1e-13)
    # larger k certifies at least as far (eq. (3)'s min runs over more t and the k-th class has less mass)
    for k in (1, 2):
        assert topk_radius(p_l, p_upper, k, 1.0)[0] <= base


def test_bounds_are_clopper_pearson_at_alpha_over_c():
    counts = np.array([[700, 200, 100, 0], [0, 1, 2, 997]])
    lower, upper = simultaneous_bounds(counts, 0.01)
    assert lower[0, 0] == pytest.approx(stats.beta.ppf(0.0025, 700, 301), rel=1e-12)
    assert upper[0, 3] == pytest.approx(1 - 0.0025 ** (1 / 1000), rel=1e-9)  # k = 0: 1 - (alpha/c)^(1/n)
    from statsmodels.stats.proportion import proportion_confint
    lo, hi = proportion_confint(200, 1000, alpha=2 * 0.01 / 4, method="beta")
    assert (lower[0, 1], upper[0, 1]) == pytest.approx((lo, hi), rel=1e-10)
    p_lower, p_upper = label_bounds(counts, np.array([1, 3]), 0.01)
    assert p_lower.tolist() == [lower[0, 1], lower[1, 3]]
    assert p_upper.shape == (2, 3) and np.all(p_upper <= 1 - p_lower[:, None])
    assert p_upper[0].tolist() == [min(upper[0, 0], 1 - p_lower[0]), upper[0, 2], upper[0, 3]]


# ------------------------------------------------------------------------- a classifier of intervals on a line

class Intervals(torch.nn.Module):
    """f(z) on a line: class ``classes[j]`` on ``[cuts[j-1], cuts[j])`` (cuts in input units, float64)."""

    def __init__(self, cuts, classes, num_classes):
        super().__init__()
        self.cuts = torch.as_tensor(cuts, dtype=torch.float64)
        self.classes = torch.as_tensor(classes)
        self.num_classes = num_classes

    def forward(self, z):
        idx = torch.bucketize(z.reshape(-1).double(), self.cuts, right=True)
        return torch.nn.functional.one_hot(self.classes[idx], self.num_classes).float()


def interval_case(probabilities, classes, x0=0.5, sigma=0.5):
    """Cuts at ``x0 + sigma Phi^-1(cumulative probability)``: at ``x0`` class ``classes[j]`` has probability
    ``probabilities[j]`` under N(0, sigma^2); returns the model and ``p(delta)``, every class's exact
    probability at ``x0 + delta`` (a difference of two normal cdfs)."""
    u = stats.norm.ppf(np.cumsum(probabilities)[:-1])
    c = len(classes)
    model = Intervals(x0 + sigma * u, classes, c)
    edges = np.concatenate([[-np.inf], u, [np.inf]])

    def exact(delta):  # delta scalar, or (m, 1) for m shifts at once
        delta = np.asarray(delta, dtype=np.float64)
        mass = special.ndtr(edges[1:] - delta / sigma) - special.ndtr(edges[:-1] - delta / sigma)
        out = np.zeros(mass.shape)
        out[..., list(classes)] = mass
        return out

    return model, exact


def exact_topk_radius(exact, label, k, reach):
    """The smallest |delta| at which ``label`` leaves the top k of the exact smoothed classifier (a scan over a
    fine grid on both sides, refined by brentq on p_label minus the k-th largest other probability)."""
    def margin(d):
        p = exact(d)
        return p[..., label] - np.sort(np.delete(p, label, axis=-1), axis=-1)[..., -k]

    assert margin(0.0) > 0
    best = math.inf
    for side in (1.0, -1.0):
        grid = side * np.linspace(0, reach, 4001)
        values = margin(grid[:, None])
        below = np.flatnonzero(values <= 0)
        if below.size:
            j = below[0]
            best = min(best, abs(optimize.brentq(margin, grid[j - 1], grid[j], xtol=1e-15)))
    return best


# classes in interval order on the line: 0 (the label, left tail), 4, 2, 3, 1 (right tail)
TOP3 = dict(probabilities=[0.2, 0.08, 0.30, 0.32, 0.1], classes=[0, 4, 2, 3, 1])


def test_the_interval_classifier_is_theorem_1s_worst_case():
    """Exactly known top-3 radius: class 1 overtakes the label at 0.22 sigma while 2 and 3 stay above it; Theorem
    1 at the exact probabilities gives the same radius, so the soundness test below is sharp."""
    sigma = 0.5
    _, exact = interval_case(**TOP3, sigma=sigma)
    p = exact(0.0)
    assert p.tolist() == pytest.approx([0.2, 0.1, 0.30, 0.32, 0.08])
    r_exact = exact_topk_radius(exact, 0, 3, 3 * sigma)
    closed = sigma / 2 * (stats.norm.ppf(0.2) - stats.norm.ppf(0.1))
    assert r_exact == pytest.approx(closed, rel=1e-9)
    assert topk_radius(p[0], np.delete(p, 0), 3, sigma) == pytest.approx(r_exact, rel=1e-9)
    # and the model computes that classifier
    model, _ = interval_case(**TOP3, sigma=sigma)
    z = 0.5 + sigma * torch.randn(200_000, 1, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(model(z).argmax(1), minlength=5).double() / z.shape[0]
    assert np.abs(freq.numpy() - p).max() < 0.005


@pytest.mark.parametrize("case, k, label", [(TOP3, 3, 0),
                                            (dict(probabilities=[0.35, 0.4, 0.05, 0.2], classes=[0, 2, 3, 1]), 2, 0),
                                            (dict(probabilities=[0.45, 0.1, 0.1, 0.35], classes=[0, 2, 3, 1]), 1, 0)])
def test_certified_topk_radius_is_sound_on_intervals(case, k, label):
    """Each trial an independent CERTIFY of the true label (own streams); a violation is a radius above the exact
    top-k radius (through the shared harness). In each case the class on the far tail overtakes the label while
    the middle classes stay above it, so Theorem 1 at the exact probabilities is the exact radius (checked)."""
    p = plan(0.2)  # 97 trials, at most 32 violations: P(sound passes) 0.9991, P(2 alpha fails) 0.9052
    sigma = 0.5
    model, exact = interval_case(**case, sigma=sigma)
    r_exact = exact_topk_radius(exact, label, k, 3 * sigma)
    p0 = exact(0.0)
    assert topk_radius(p0[label], np.delete(p0, label), k, sigma) == pytest.approx(r_exact, rel=1e-9)  # sharp
    xs = torch.full((p.trials, 1), 0.5)
    gens = [(input_generator(k, t, "select"), input_generator(k, t, "estimate")) for t in range(p.trials)]
    certs = certify_topk(model, xs, sigma, len(case["classes"]), k, 10, 4000, p.alpha, [label] * p.trials,
                         batch_size=4000, generators=gens)
    radii = np.array([c.radius for c in certs])
    assert_sound(violations_of(radii, np.full(p.trials, r_exact)), p)
    assert np.mean(radii) > 0.6 * r_exact  # not vacuous: the test is sharp
    assert all(c.prediction in (label, -1) and c.label == label and c.alpha_each == p.alpha / len(case["classes"])
               for c in certs)


def test_certify_selected_class_and_k1_radius_from_counts():
    """``labels=None`` certifies the top class of the n0 selection samples; k = 1 gives Cohen's two-sided radius of
    the bounds."""
    model, _ = interval_case(probabilities=[0.45, 0.1, 0.1, 0.35], classes=[0, 2, 3, 1])
    gens = [(input_generator(0, t, "select"), input_generator(0, t, "estimate")) for t in range(4)]
    certs = certify_topk(model, torch.full((4, 1), 0.5), 0.5, 4, 1, 50, 3000, 0.05, None, generators=gens)
    for c in certs:
        assert c.label == c.topk_set[0] and len(c.topk_set) == 1
        lower, upper = simultaneous_bounds(c.counts[None], 0.05)
        p_b = min(np.delete(upper[0], c.label).max(), 1 - lower[0, c.label])
        cohen = 0.25 * (stats.norm.ppf(lower[0, c.label]) - stats.norm.ppf(p_b))
        assert c.radius == pytest.approx(max(cohen, 0.0), abs=1e-9)


# -------------------------------------------------------------------------------------- PREDICT of a top-k set

def test_predicted_topk_sets_are_sound():
    """A near tie at the set's boundary (0.25 against 0.22): a returned set other than {0, 1} is a violation."""
    p = plan(0.2)
    model, exact = interval_case(probabilities=[0.35, 0.22, 0.25, 0.18], classes=[0, 2, 1, 3])
    assert exact(0.0).tolist() == pytest.approx([0.35, 0.25, 0.22, 0.18])
    gens = [input_generator(7, t, "predict") for t in range(p.trials)]
    out = predict_topk(model, torch.full((p.trials, 1), 0.5), 0.5, 4, 2, 6000, p.alpha, batch_size=6000,
                       generators=gens)
    code = np.array([sum(2**c for c in o.classes) if o.classes else -1 for o in out])
    assert_sound(violations_of(np.zeros(p.trials), np.zeros(p.trials), code, np.full(p.trials, 0b11)), p)
    assert 0.2 < np.mean(code != -1) < 1.0  # the test answers often, and abstains sometimes: near the boundary
    assert all(o.values()["topk_set"] in ("0,1", "-1") for o in out)


def test_topk_set_test_separates_lower_from_upper_bounds():
    counts = np.array([[500, 480, 15, 5], [300, 290, 280, 130]])
    sets, answered = topk_set_test(counts, 2, 0.01)
    assert sets.tolist() == [[0, 1], [0, 1]] and answered.tolist() == [True, False]
    lower, upper = simultaneous_bounds(counts, 0.01)
    assert lower[0, :2].min() > upper[0, 2:].max() and not lower[1, :2].min() > upper[1, 2:].max()


# ------------------------------------------------------------------------------------------------ bad input

class Refuses(torch.nn.Module):
    def forward(self, z):
        raise AssertionError("sampled before the input was checked")


@pytest.mark.parametrize("k", [0, -1, 4, 5])
def test_k_outside_1_to_classes_minus_1_is_refused_before_sampling(k):
    x = torch.full((2, 1), 0.5)
    with pytest.raises(ValueError, match=r"top_k \(--top-k\) must be an integer in \[1, 3\]"):
        certify_topk(Refuses(), x, 0.5, 4, k, 10, 100, 0.01, [0, 1])
    with pytest.raises(ValueError, match=r"top_k \(--top-k\) must be an integer in \[1, 3\]"):
        predict_topk(Refuses(), x, 0.5, 4, k, 100, 0.01)
    ctx = RunContext(Refuses(), 4, 10, 100, 0.01, 100, torch.float32, 0, torch.device("cpu"))
    if k >= 1:
        with pytest.raises(ValueError, match=r"must be an integer in \[1, 3\]"):
            TopK(0.5, top_k=k).certify(ctx, x, torch.tensor([0, 1]), [0, 1])
    else:
        with pytest.raises(ValueError, match=r"top_k \(--top-k\) must be an integer >= 1"):
            TopK(0.5, top_k=k)
    with pytest.raises(TypeError):
        certify_topk(Refuses(), x, 0.5, 4, 1.5, 10, 100, 0.01)
    with pytest.raises(ValueError, match="labels must be"):
        certify_topk(Refuses(), x, 0.5, 4, 1, 10, 100, 0.01, [0, 7])
    with pytest.raises(ValueError):
        topk_radius([0.5], [[0.1, 0.2]], 3)


# ---------------------------------------------------------------------------------- command line and report

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "toy3"
    save_checkpoint(path, model_for_dataset("toy-3class", "mlp"), {"dataset": "toy-3class", "sigma": 0.25})
    return path


def run(checkpoint, out, command="certify", *extra):
    more = ["--n0", "10"] if command == "certify" else []
    return main([command, "--checkpoint", str(checkpoint), *more, "--n", "300", "--alpha", "0.01", "--max", "4",
                 "--batch-size", "300", "--seed", "1", "--no-progress", "--out", str(out), *extra])


def test_certify_and_predict_topk_through_the_command_line(checkpoint, tmp_path, capsys):
    out = tmp_path / "c.tsv"
    assert run(checkpoint, out, "certify", "--method", "topk", "--top-k", "2") == 0
    lines = [line.split("\t") for line in out.read_text().splitlines()]
    header, rows = lines[0], [dict(zip(lines[0], r)) for r in lines[1:]]
    assert header[:6] == ["idx", "label", "predict", "radius", "correct", "time"]
    assert header[12:] == ["sampling", "n_used", "sigma", "top_k", "topk_label", "topk_class", "topk_set", "p_upper",
                           "alpha_each"]
    assert json.loads((tmp_path / "c.tsv.json").read_text())["method"] == {
        "name": "topk", "sigma": 0.25, "top_k": 2, "topk_label": "label"}
    from smoothcert.cli.common import load_base_classifier
    from smoothcert.data.datasets import load_dataset

    model, _, _ = load_base_classifier([str(checkpoint)], torch.device("cpu"))
    x, y = load_dataset("toy-3class", "test").batch([0, 1, 2, 3])
    gens = [(input_generator(1, i, "select"), input_generator(1, i, "estimate")) for i in range(4)]
    certs = certify_topk(model, x, 0.25, 3, 2, 10, 300, 0.01, y, batch_size=300, block=300, generators=gens)
    for row, c, label in zip(rows, certs, y.tolist()):
        assert float(row["radius"]) == c.radius and int(row["predict"]) == c.prediction
        assert int(row["topk_class"]) == label and row["topk_set"] == ",".join(map(str, c.topk_set))
        assert int(row["correct"]) == int(c.radius > 0)
    assert any(c.radius > 0 for c in certs)
    pred = tmp_path / "p.tsv"
    assert run(checkpoint, pred, "predict", "--top-k", "2") == 0
    lines = pred.read_text().splitlines()
    assert lines[0].split("\t") == ["idx", "label", "predict", "correct", "time", "sampling", "top_k", "topk_set"]
    assert all(r.split("\t")[7].count(",") == 1 or r.split("\t")[7] == "-1" for r in lines[1:])
    capsys.readouterr()
    assert main(["report", str(out), str(pred), "--radii", "0", "0.25"]) == 0
    text = capsys.readouterr().out
    assert "| top-k CERTIFY | k | label | r=0 | r=0.25 | ACR |" in text and "| top-k PREDICT |" in text


@pytest.mark.parametrize("command, extra, message", [
    ("certify", ("--method", "topk", "--top-k", "3"), "top_k (--top-k) must be an integer in [1, 2]"),
    ("certify", ("--method", "topk", "--top-k", "0"), "top_k (--top-k) must be an integer >= 1, got 0"),
    ("certify", ("--top-k", "2"), "--top-k is a setting of --method topk, not of --method fixed"),
    ("predict", ("--top-k", "3"), "top_k (--top-k) must be an integer in [1, 2]"),
])
def test_bad_k_exits_2_before_any_file(checkpoint, tmp_path, capsys, command, extra, message):
    assert run(checkpoint, tmp_path / "r.tsv", command, *extra) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
