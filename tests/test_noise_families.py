"""Gaussian, Laplace and uniform noise at one per-coordinate sigma; their l1 / l2 / l_inf radii and the norm
conversions, checked against closed forms, one-dimensional integrals, Monte Carlo and the shared soundness harness."""

import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from smoothcert.engine.sampling import input_generator
from smoothcert.engine.smooth import certify
from smoothcert.geometry.norms import NORMS, NormRadii, convert_radius
from smoothcert.geometry.regions import CrossPolytope
from smoothcert.methods.base import RunContext
from smoothcert.methods.fixed import FixedSigma
from smoothcert.noise.base import noise_from_parameters
from smoothcert.noise.families import FAMILIES, family_noise, unit_draws
from smoothcert.noise.gaussian import IsotropicGaussian
from smoothcert.noise.laplace import Laplace, laplace_l1_radius
from smoothcert.noise.uniform import UniformDiagonal, uniform_l1_radius, uniform_linf_radius
from smoothcert.training.objectives import standard_noise

from soundness import assert_sound, linear_case, plan, violations_of

F64 = torch.float64
ORD = {"l1": 1, "l2": 2, "linf": math.inf}


# --------------------------------------------------------------------------------------------- norm conversion
@pytest.mark.parametrize("d", [1, 2, 7, 784])
def test_converted_balls_lie_inside_and_the_factor_is_the_extreme(d):
    """The l_q ball of the converted radius lies in the l_p ball of radius 1: random points of its boundary and the
    extreme points (an axis point, the all-equal point) have l_p norm <= 1, and one of them reaches 1."""
    g = torch.Generator().manual_seed(d)
    for p in NORMS:
        for q in NORMS:
            r = convert_radius(1.0, p, q, d)
            assert r <= 1.0
            u = torch.randn(500, d, generator=g, dtype=F64)
            u = torch.cat([u, torch.eye(d, dtype=F64)[:1], torch.ones(1, d, dtype=F64)])
            boundary = r * u / torch.linalg.vector_norm(u, ord=ORD[q], dim=1, keepdim=True)
            lp = torch.linalg.vector_norm(boundary, ord=ORD[p], dim=1)
            assert float(lp.max()) <= 1.0 + 1e-12  # (the test's own normalization rounds in the last digits)
            assert float(lp.max()) >= 1.0 - 1e-12  # tight: no larger l_q ball follows from the inequalities


def test_norm_radii_take_the_best_certificate_and_mark_conversions():
    d = 16
    radii = NormRadii.from_certified({"l2": 1.0}, d)
    assert radii.radii == {"l1": convert_radius(1.0, "l2", "l1", d), "l2": 1.0,
                           "linf": convert_radius(1.0, "l2", "linf", d)}
    assert radii["l1"] == 1.0 and math.isclose(radii["linf"], 0.25, rel_tol=1e-14) and radii["linf"] < 0.25
    assert radii.marker() == "l1,linf" and radii.native == {"l2"}
    both = NormRadii.from_certified({"l1": 0.8, "linf": 0.001}, d, {"l2": 0.3})
    assert both["l1"] == 0.8 and both["linf"] == convert_radius(0.8, "l1", "linf", d)  # 0.05 beats native 0.001
    assert both["l2"] == 0.3 and both.marker() == "l2,linf"
    assert NormRadii.zero().columns() == {"radius_l1": 0.0, "radius_l2": 0.0, "radius_linf": 0.0, "converted": "none"}
    with pytest.raises(ValueError, match="norms l1, l2, linf"):
        convert_radius(1.0, "l2", "l3", 4)
    with pytest.raises(ValueError, match="at least one native"):
        NormRadii.from_certified({}, 4)


# ------------------------------------------------------------------------------------ samplers, one sigma
@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_family_has_standard_deviation_sigma_and_records_its_scale(name):
    sigma = 0.3
    noise = family_noise(name, sigma)
    draws = noise.draw(200_000, (3,), torch.Generator().manual_seed(1), dtype=F64)
    assert abs(float(draws.std()) / sigma - 1) < 0.01
    w = unit_draws(name, (200_000, 3), torch.Generator().manual_seed(2))
    assert w.dtype == torch.float32 and abs(float(w.double().std()) - 1) < 0.01
    expected = {"gaussian": sigma, "laplace": sigma / math.sqrt(2), "uniform": float(np.float32(sigma * math.sqrt(3)))}
    assert math.isclose(noise.scale, expected[name], rel_tol=1e-12)
    # the distribution itself, against scipy (Kolmogorov-Smirnov on the draws)
    dist = {"gaussian": stats.norm(0, sigma), "laplace": stats.laplace(0, sigma / math.sqrt(2)),
            "uniform": stats.uniform(-noise.scale, 2 * noise.scale)}[name]
    assert stats.kstest(draws[:, 0].numpy()[:50_000], dist.cdf).pvalue > 1e-4


def test_gaussian_unit_draws_are_the_objectives_own():
    x = torch.zeros(4, 1, 3, 3)
    a = standard_noise(x, 5, torch.Generator().manual_seed(7))
    b = unit_draws("gaussian", (4, 5, 1, 3, 3), torch.Generator().manual_seed(7))
    assert torch.equal(a, b)  # training with the default noise is unchanged, bit for bit


def test_laplace_region_gap_and_parameters():
    noise = Laplace.from_std(0.5)
    assert noise.scale == 0.5 / math.sqrt(2) and math.isclose(noise.sigma, 0.5)
    assert noise.gap(0.5) == 0.0 and math.isclose(noise.gap(0.9), -math.log(0.2))
    region = noise.region(torch.zeros(5), noise.gap(0.9))
    assert isinstance(region, CrossPolytope) and torch.allclose(region.semi_axes, torch.full((5,), noise.scale_sampled
                                                                                                   * -math.log(0.2), dtype=F64))
    again = noise_from_parameters("laplace", noise.parameters())
    assert again.scale == noise.scale
    radii = noise.norm_radii(0.9, noise.gap(0.9), region)
    assert radii["l1"] == region.norm_radius and radii.marker() == "l2,linf"
    assert radii["linf"] <= radii["l1"] / 5 and radii["l2"] <= radii["l1"] / math.sqrt(5)


# ---------------------------------------------------------------------------------------- Laplace radii
def test_laplace_one_sided_radius_is_exact_along_an_axis():
    """Classifier 1[x_1 + eps_1 > t]: p_A = P(eps_1 > t - x_1) (scipy's Laplace); the radius is the distance itself,
    and the smoothed probability at x - R e_1 is exactly 1/2."""
    lam = 0.4
    for margin in (0.01, 0.2, 0.7, 1.5):
        p = float(stats.laplace(0, lam).sf(-margin))
        radius = laplace_l1_radius(p, lam)
        assert math.isclose(radius, margin, rel_tol=1e-9)
        assert math.isclose(float(stats.laplace(0, lam).sf(radius - margin)), 0.5, abs_tol=1e-12)
    assert laplace_l1_radius(0.5, lam) == 0.0 and laplace_l1_radius(0.3, lam) == 0.0


def test_laplace_two_sided_radius():
    """Teng et al.'s two-sided radius: equal to the one-sided one at p_B = 1 - p_A, at least as large for smaller
    p_B, and never above the exact one-dimensional radius (F^-1(p_A) - F^-1(p_B)) / 2 (scipy's Laplace quantiles),
    which bounds every d-dimensional certificate (the 1-D classifier is a d-dimensional one)."""
    lam = 0.3
    dist = stats.laplace(0, lam)
    rng = np.random.default_rng(0)
    for p_a in (0.51, 0.6, 0.9, 0.999):
        assert math.isclose(laplace_l1_radius(p_a, lam, 1 - p_a), laplace_l1_radius(p_a, lam), rel_tol=1e-12)
    for _ in range(2000):
        p_a = rng.uniform(0.05, 1.0)
        p_b = rng.uniform(0.0, min(p_a, 1 - p_a))
        r = laplace_l1_radius(p_a, lam, p_b)
        exact_1d = 0.5 * (dist.ppf(p_a) - dist.ppf(p_b))
        assert r <= exact_1d * (1 + 1e-12) + 1e-15
        if p_a > 0.5:
            assert r >= laplace_l1_radius(p_a, lam) * (1 - 1e-12)
        # the derivation's density-ratio bounds at that radius keep c_A strictly on top (d-dimensional)
        if 0 < r < math.inf:
            e = math.exp(r / lam) * (1 - 1e-9)
            lower_a = max(p_a / e, 1 - e * (1 - p_a))
            upper_b = min(e * p_b, 1 - (1 - p_b) / e)
            assert lower_a >= upper_b - 1e-12
    assert laplace_l1_radius(0.4, lam, 0.4) == 0.0


def _laplace_2d_probability(w, margin, lam):
    """P(w . eps > -margin), eps ~ Laplace(0, lam)^2 (w_2 > 0): one 1-D integral over eps_1."""
    dist = stats.laplace(0, lam)
    def f(e):
        return dist.pdf(e) * dist.sf((-margin - w[0] * e) / w[1])

    kink = -margin / w[0] if w[0] != 0 else 0.0  # where the inner argument crosses 0
    cuts = sorted({0.0, kink})
    pieces = [(-np.inf, cuts[0]), *zip(cuts[:-1], cuts[1:]), (cuts[-1], np.inf)]
    return sum(integrate.quad(f, a, b, epsabs=1e-14, epsrel=1e-12, limit=200)[0] for a, b in pieces)


def _uniform_2d_probability(w, margin, lam):
    """P(w . eps > -margin), eps ~ U[-lam, lam]^2 (w_2 > 0): one 1-D integral over eps_1."""
    dist = stats.uniform(-lam, 2 * lam)
    value, _ = integrate.quad(lambda e: dist.sf((-margin - w[0] * e) / w[1]) / (2 * lam), -lam, lam,
                              epsabs=1e-13, epsrel=1e-12, limit=200)
    return value


@pytest.mark.parametrize("w", [(1.0, 1e-9), (0.6, 0.8), (-0.3, 1.0), (1.0, 1.0)])
def test_radii_at_the_exact_probability_never_exceed_the_distance_to_an_oblique_hyperplane(w):
    """Linear classifier in 2-D: the exact smoothed probability by a 1-D integral, then each family's radius at that
    probability against the exact distance (l1: margin / ||w||_inf, l_inf: margin / ||w||_1). Laplace's l1 and the
    uniform l1 radius are equal to it along an axis (w = e_1)."""
    w = np.array(w)
    lam_l, lam_u = 0.35, 0.5
    for margin in (0.05, 0.2, 0.4):
        p_l = _laplace_2d_probability(w, margin, lam_l)
        p_u = _uniform_2d_probability(w, margin, lam_u)
        l1, linf = margin / np.abs(w).max(), margin / np.abs(w).sum()
        assert laplace_l1_radius(p_l, lam_l) <= l1 * (1 + 1e-7)
        assert uniform_l1_radius(p_u, lam_u) <= l1 * (1 + 1e-7)
        assert uniform_linf_radius(p_u, lam_u, 2) <= linf * (1 + 1e-7)
        if w[1] < 1e-6:
            assert math.isclose(laplace_l1_radius(p_l, lam_l), l1, rel_tol=1e-6)
            if margin < lam_u:
                assert math.isclose(uniform_l1_radius(p_u, lam_u), l1, rel_tol=1e-6)


def test_the_integrals_agree_with_the_samplers():
    """The 1-D integrals above against Monte Carlo with the families' own samplers (ties the two together)."""
    w, margin, n = np.array([0.6, 0.8]), 0.2, 400_000
    for noise, exact in ((Laplace(0.35), _laplace_2d_probability(w, margin, 0.35)),
                         (UniformDiagonal.isotropic(0.5), _uniform_2d_probability(w, margin, 0.5))):
        eps = noise.draw(n, (2,), torch.Generator().manual_seed(3), dtype=F64).numpy()
        assert abs(float(np.mean(eps @ w > -margin)) - exact) < 5 * math.sqrt(0.25 / n)


# ---------------------------------------------------------------------------------------- soundness harness
@pytest.mark.parametrize("name, weight", [
    ("laplace", None), ("laplace", (0.0, 0.0, 1.0, 0.0, 0.0, 0.0)),  # axis: the l1 radius is tight
    ("uniform", None), ("gaussian", None), ("gaussian", (1.0,) * 6),  # all-equal w: Gaussian's l_inf is tight
])
def test_certified_radii_in_every_norm_are_sound_on_linear_classifiers(name, weight):
    """CERTIFY with each family on a linear classifier (exact robust region: the half-space on the input's side):
    the l1, l2 and l_inf radii, native or converted, against the exact distances in those norms, and the class;
    claims beyond the truth in at most an alpha share of trials (the harness's stated power)."""
    p = plan(0.05)
    case = linear_case(p.trials, 6, seed=21, weight=weight)
    noise = family_noise(name, 0.4)
    certs = certify(case.model, case.x, noise, 2, 50, 500, p.alpha, batch_size=4000, block=500,
                    generators=[(input_generator(4, i, "select"), input_generator(4, i, "estimate"))
                                for i in range(p.trials)], range_policy="ignore")
    assert sum(not c.abstained for c in certs) > p.trials / 2
    predicted = [c.prediction for c in certs]
    violations = np.zeros(p.trials, dtype=bool)
    for norm in NORMS:
        violations |= violations_of([c.radii[norm] for c in certs], case.distance(norm), predicted, case.label)
    violations |= violations_of([c.radius for c in certs], case.distance("l2"))
    assert_sound(violations, p)


# ---------------------------------------------------------------------------------------- the fixed method
def test_fixed_method_reports_the_radius_in_its_norm():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    torch.nn.init.constant_(model[1].bias, 0.0)
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[1.0, 0, 0, 0], [-1.0, 0, 0, 0]]))
    ctx = RunContext(model, 2, 20, 400, 0.01, 200, torch.float32, 0, torch.device("cpu"))
    x = torch.tensor([[0.9, 0.5, 0.5, 0.5], [0.2, 0.5, 0.5, 0.5]])
    for name in FAMILIES:
        for norm in NORMS:
            method = FixedSigma(0.25, noise=name, norm=norm)
            rows = method.certify_rows(ctx, x, torch.tensor([0, 1]), [0, 1])
            for row in rows:
                assert row["radius"] == row[f"radius_{norm}"] and row["noise"] == name and row["norm"] == norm
                native = family_noise(name, 0.25).native_norms
                if row["predict"] != -1:
                    assert set(row["converted"].split(",")).isdisjoint(native)
            assert rows[0]["predict"] == 0 and rows[0]["radius"] > 0


def test_bad_noise_settings_are_refused_before_sampling():
    for bad in (0.0, -0.1, math.nan, math.inf):
        for name in FAMILIES:
            with pytest.raises(ValueError, match="sigma|scale|half_width"):
                family_noise(name, bad)
        with pytest.raises(ValueError, match="Laplace scale"):
            Laplace(bad)
    with pytest.raises(ValueError, match="gaussian, laplace, uniform"):
        family_noise("cauchy", 0.25)
    with pytest.raises(ValueError, match="l2, l1, linf"):
        FixedSigma(0.25, noise="laplace", norm="l3")
    with pytest.raises(ValueError, match="noise"):
        FixedSigma(0.25, noise="cauchy")
    with pytest.raises(ValueError, match="Laplace scale"):
        laplace_l1_radius(0.9, 0.0)
    with pytest.raises(ValueError, match="half-width"):
        uniform_linf_radius(0.9, -1.0, 4)
    with pytest.raises(ValueError, match="p_a"):
        laplace_l1_radius(1.5, 1.0)
    assert isinstance(family_noise("gaussian", 0.25), IsotropicGaussian)


# ---------------------------------------------------------------------------------------- command line
@pytest.mark.slow
def test_train_with_a_family_records_it_and_resume_keeps_it(tmp_path, capsys):
    import json

    from smoothcert.cli.main import main

    model = tmp_path / "toy"
    assert main(["train", "--dataset", "toy-curved", "--arch", "mlp", "--noise", "uniform", "--sigma", "0.25",
                 "--epochs", "1", "--val-size", "50", "--seed", "0", "--out", str(model), "--no-progress"]) == 0
    config = json.loads(model.with_suffix(".json").read_text())
    assert config["noise"] == "uniform" and config["training"]["noise"] == "uniform"
    capsys.readouterr()
    assert main(["train", "--dataset", "toy-curved", "--arch", "mlp", "--noise", "laplace", "--sigma", "0.25",
                 "--epochs", "2", "--seed", "0", "--out", str(model), "--resume", "--no-progress"]) == 2
    assert "noise (saved 'uniform', now 'laplace')" in capsys.readouterr().err


def test_training_draws_come_from_the_family():
    """The loop hands the objective ``sigma * w`` with ``w`` from the family: uniform draws are bounded by sqrt(3)."""
    from smoothcert.training.loop import train

    seen = []

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)

        def forward(self, z):
            seen.append(z.detach().clone())
            return self.lin(z)

    x = torch.full((64, 2), 0.5)
    data = type("D", (), {"inputs": x, "labels": torch.zeros(64, dtype=torch.int64), "__len__": lambda self: 64})()
    for name, bounded in (("uniform", True), ("laplace", False)):
        seen.clear()
        train(Probe(), data, sigma=0.1, epochs=1, batch_size=64, noise=name, progress=False)
        w = (torch.cat(seen) - 0.5) / 0.1
        assert abs(float(w.std()) - 1) < 0.15
        assert (float(w.abs().max()) <= math.sqrt(3) + 1e-5) == bounded


def test_certify_and_report_with_each_family(tmp_path, capsys):
    import json

    from smoothcert.cli.main import main
    from smoothcert.models.architectures import model_for_dataset
    from smoothcert.models.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = tmp_path / "toy"
    save_checkpoint(model, model_for_dataset("toy-curved", "mlp"), {"dataset": "toy-curved", "sigma": 0.25})
    logs = {}
    for name, norm in (("laplace", "l1"), ("uniform", "linf"), ("gaussian", "l2")):
        logs[name] = tmp_path / f"{name}.tsv"
        assert main(["certify", "--checkpoint", str(model), "--noise", name, "--norm", norm, "--n0", "10", "--n",
                     "200", "--alpha", "0.01", "--max", "6", "--batch-size", "200", "--out", str(logs[name]),
                     "--no-progress"]) == 0
        lines = [line.split("\t") for line in logs[name].read_text().splitlines()]
        rows = [dict(zip(lines[0], r)) for r in lines[1:]]
        assert all(r["radius"] == r[f"radius_{norm}"] and r["noise"] == name for r in rows)
        assert json.loads(logs[name].with_name(logs[name].name + ".json").read_text())["method"]["noise"] == name
    capsys.readouterr()
    assert main(["report", str(logs["laplace"]), str(logs["uniform"]), str(logs["gaussian"]),
                 "--labels", "laplace", "uniform", "gaussian", "--norm", "l1", "--radii", "0", "0.1"]) == 0
    text = capsys.readouterr().out
    assert "laplace (l1)" in text and "uniform (l1)" in text
    assert main(["report", str(logs["laplace"]), "--labels", "laplace", "--norm", "linf"]) == 0
    assert "laplace (linf" in capsys.readouterr().out
    log = tmp_path / "plain.tsv"
    log.write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\n0\t1\t1\t0.5\t1\t0.1\n")
    assert main(["report", str(log), "--norm", "l1"]) == 2
    assert "no radius_l1 column" in capsys.readouterr().err
