"""Soundness and behaviour of CERTIFY and PREDICT, with exact answers from linear classifiers."""

import numpy as np
import pytest
import torch
from scipy import stats as st

from smoothcert.engine.smooth import ABSTAIN, Smooth, certify, predict
from smoothcert.noise.gaussian import DiagonalGaussian, FullGaussian, IsotropicGaussian, RotatedGaussian
from smoothcert.engine.sampling import input_generator

from conftest import Linear2
from soundness import LinearCase, assert_sound, linear_case, plan, violations_of


def certificate_violations(case, certs):
    """Per trial: a wrong non-abstaining class, an inscribed radius above the exact l2 distance, or a region that
    reaches the hyperplane."""
    predicted = [c.prediction for c in certs]
    exact = case.distance("l2")
    return (violations_of([c.radius for c in certs], exact, predicted, case.label)
            | violations_of(case.reach([c.region for c in certs]), exact))


def test_linear_soundness_over_seeded_trials():
    """Certified radius > exact radius (or a wrong class) happens in at most the share alpha allows."""
    p = plan(0.05)  # 501 trials, at most 41 violations: P(sound passes) 0.9991, P(2 alpha fails) 0.9024
    sigma = 0.5
    case = linear_case(p.trials, 10, seed=0)
    gens = [(input_generator(11, i, "select"), input_generator(11, i, "estimate")) for i in range(p.trials)]
    certs = certify(case.model, case.x, IsotropicGaussian(sigma), 2, 50, 500, p.alpha, batch_size=4000, block=500,
                    generators=gens, range_policy="ignore")
    answered = sum(not c.abstained for c in certs)
    assert answered > p.trials / 2, "the test must exercise certificates, not abstentions"
    assert_sound(certificate_violations(case, certs), p)


def test_linear_tightness_at_large_n():
    """With n = 100,000 and p_A about 0.9 the certified radius is at least 0.9 of the exact one."""
    sigma = 0.25
    w = torch.tensor([1.0, 0.0, 0.0])
    dist = sigma * st.norm.ppf(0.9)  # p_A = 0.9 exactly
    model = Linear2(w, -0.5 + dist)
    x = torch.tensor([[0.5, 0.5, 0.5]])
    smooth = Smooth(model, 2, sigma, seed=3)
    cls, radius = smooth.certify(x[0], 100, 100_000, 0.001, 10_000)
    assert cls == 1
    assert 0.9 * dist <= radius <= dist


def anisotropic_noise(kind):
    theta = torch.tensor([0.2, 0.9, 0.4, 1.3])
    if kind == "diagonal":
        return DiagonalGaussian(theta)
    basis = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(7), dtype=torch.float64))[0]
    if kind == "rotated":
        return RotatedGaussian(basis, theta)
    return FullGaussian((basis * theta.double()) @ basis.T)  # SPD with eigenvalues theta


@pytest.mark.parametrize("kind", ["diagonal", "rotated", "full"])
def test_anisotropic_certificate_is_sound_on_a_linear_classifier(kind):
    """Diagonal, rotated and full Gaussian noise: the ellipsoid's farthest point along the normal stays on the
    certified side (and the class is the smoothed one) in all but the share alpha allows."""
    p = plan(0.05)  # 501 trials, at most 41 violations: P(sound passes) 0.9991, P(2 alpha fails) 0.9024
    case = linear_case(p.trials, 4, seed=1)
    certs = certify(case.model, case.x, anisotropic_noise(kind), 2, 50, 500, p.alpha, batch_size=4000, block=500,
                    generators=[input_generator(2, i, "c") for i in range(p.trials)], range_policy="ignore")
    assert sum(not c.abstained for c in certs) > p.trials / 2
    assert_sound(certificate_violations(case, certs), p)


def test_predict_abstains_on_ties_and_answers_when_one_class_dominates():
    """At a tie (exactly on the boundary: both classes have probability 1/2) every answer is wrong, so PREDICT
    answers there in at most the share alpha of trials; far from the boundary it answers the true class."""
    p = plan(0.05)  # 501 trials, at most 41 answers: P(sound passes) 0.9991, P(2 alpha fails) 0.9024
    model = Linear2(torch.tensor([1.0, 0.0]), 0.0)
    tie = torch.tensor([[0.0, 0.3]]).expand(p.trials, 2)
    clear = torch.tensor([[0.4, 0.3]]).expand(40, 2)
    gens = [input_generator(seed, 0, "p") for seed in range(p.trials)] + \
        [input_generator(seed, 1, "p") for seed in range(40)]
    out = predict(model, torch.cat([tie, clear]), IsotropicGaussian(0.25), 2, 1000, p.alpha, batch_size=20_000,
                  block=1000, generators=gens)
    assert (out[p.trials:] == 1).all()
    assert_sound(out[: p.trials] != ABSTAIN, p)
    assert Smooth(model, 2, 0.25, seed=0).predict(tie[0], 1000, 0.01, 100) == Smooth.ABSTAIN


def test_classic_interface_and_records():
    model = Linear2(torch.tensor([1.0, 0.0]), -0.5)
    smooth = Smooth(model, 2, 0.25, seed=0)
    cls, radius = smooth.certify(torch.tensor([0.9, 0.1]), 100, 2000, 0.001, 500)
    assert cls == 1 and 0 < radius < 0.4
    counts = smooth._sample_noise(torch.tensor([0.9, 0.1]), 300, 100)
    assert counts.shape == (2,) and counts.sum() == 300
    assert smooth._lower_confidence_bound(90, 100, 0.05) == pytest.approx(st.beta.ppf(0.05, 90, 11))
    bf = Smooth(model, 2, 0.25, dtype=torch.bfloat16, seed=0).certify_batch(torch.tensor([[0.9, 0.1]]), 10, 100, 0.01)
    assert bf[0].dtype == "bfloat16" and bf[0].n0 == 10 and bf[0].n == 100 and bf[0].alpha == 0.01
    assert bf[0].counts.sum() == 100


def test_selection_and_estimation_use_fresh_samples():
    """With one generator per input, estimation draws continue after the selection draws."""
    model = Linear2(torch.tensor([1.0]), 0.0)
    x = torch.tensor([[0.1]])
    a = certify(model, x, IsotropicGaussian(1.0), 2, 100, 100, 0.1, generators=[torch.Generator().manual_seed(0)])
    g = torch.Generator().manual_seed(0)
    sel = IsotropicGaussian(1.0).draw(100, (1,), g)
    est = IsotropicGaussian(1.0).draw(100, (1,), g)
    assert a[0].counts[1] == int(((x + est)[:, 0] > 0).sum())
    assert not torch.equal(sel, est)


@pytest.mark.parametrize("kwargs,match", [
    (dict(n0=200, n=100), "n0"),
    (dict(n0=0, n=100), "n0"),
    (dict(alpha=0.0), "alpha"),
    (dict(alpha=1.0), "alpha"),
    (dict(num_classes=1), "num_classes"),
    (dict(batch_size=0), "batch_size"),
])
def test_certify_rejects_bad_arguments(kwargs, match):
    model = Linear2(torch.tensor([1.0, 0.0]), 0.0)
    args = dict(num_classes=2, n0=10, n=100, alpha=0.01, batch_size=100)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        certify(model, torch.rand(1, 2), IsotropicGaussian(0.1), args["num_classes"], args["n0"], args["n"],
                args["alpha"], batch_size=args["batch_size"])


def test_inputs_are_checked():
    model = Linear2(torch.tensor([1.0, 0.0]), 0.0)
    noise = IsotropicGaussian(0.1)
    with pytest.raises(ValueError, match="NaN"):
        certify(model, torch.tensor([[float("nan"), 0.0]]), noise, 2, 10, 10, 0.1)
    with pytest.raises(TypeError, match="floating"):
        certify(model, torch.tensor([[1, 0]]), noise, 2, 10, 10, 0.1)
    with pytest.warns(UserWarning, match=r"outside \[0, 1\]"):
        certify(model, torch.tensor([[3.0, 0.0]]), noise, 2, 10, 10, 0.1)
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        certify(model, torch.tensor([[3.0, 0.0]]), noise, 2, 10, 10, 0.1, range_policy="error")
    with pytest.raises(ValueError, match="exactly one of sigma"):
        Smooth(model, 2)
    with pytest.raises(ValueError, match="dtype"):
        Smooth(model, 2, 0.1, dtype=torch.float16)


def test_certify_matches_cohen_formula_from_counts():
    model = Linear2(torch.tensor([1.0, 0.0]), -0.3)
    certs = certify(model, torch.tensor([[0.5, 0.5]]), IsotropicGaussian(0.4), 2, 100, 5000, 0.001,
                    generators=[input_generator(0, 0, "x")])
    c = certs[0]
    p = st.beta.ppf(0.001, c.counts[1], 5000 - c.counts[1] + 1)
    assert c.p_lower == pytest.approx(p, rel=1e-12)
    sigma = float(torch.tensor(0.4, dtype=torch.float32))  # the noise as sampled: sigma rounded to float32
    assert c.radius == pytest.approx(sigma * st.norm.ppf(p), rel=1e-12)
    assert np.isclose(c.gap, st.norm.ppf(p))


def test_a_model_with_a_pca_first_layer_stays_sound():
    """Linear classifier behind a PCA projection: the composition is linear with weight P w, so its exact
    smoothed radius is the distance to that boundary; certificates exceed it no more often than alpha allows."""
    from smoothcert.models.pca import add_pca, fit_pca

    g = torch.Generator().manual_seed(5)
    p = plan(0.05)  # 501 trials, at most 41 violations: P(sound passes) 0.9991, P(2 alpha fails) 0.9024
    d, sigma = 8, 0.3
    # training data with three strong directions: PCA keeps those, P projects the rest away
    basis = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0][:, :3].float()
    data = 0.5 + (torch.randn(2000, 3, generator=g) * 0.2) @ basis.T + 0.01 * torch.randn(2000, d, generator=g)
    projection = fit_pca(data, sigma, fraction=0.2)
    assert projection.num_components == 3
    w = torch.randn(d, generator=g)
    model = add_pca(Linear2(w, 0.0), projection)
    proj = projection.matrix().double()
    mu = projection.mean.double()
    w_eff = proj @ w.double()
    b_eff = float(w.double() @ (mu - proj @ mu))
    case = LinearCase(model, torch.rand(p.trials, d, generator=g), w_eff, b_eff)
    gens = [(input_generator(4, i, "select"), input_generator(4, i, "estimate")) for i in range(p.trials)]
    certs = certify(model, case.x, IsotropicGaussian(sigma), 2, 50, 500, p.alpha, batch_size=5000, block=500,
                    generators=gens)
    assert sum(not c.abstained for c in certs) > p.trials / 3
    assert_sound(certificate_violations(case, certs), p)
