import math

import pytest
import torch

from smoothcert.noise.gaussian import DiagonalGaussian, FullGaussian, IsotropicGaussian, RotatedGaussian
from smoothcert.engine.sampling import input_generator, sample_counts
from smoothcert.noise.base import noise_from_parameters
from smoothcert.geometry.regions import Ball, Ellipsoid


def threshold_model(x):
    """Class 1 iff the first coordinate is positive; 3 classes, class 2 never wins."""
    s = x.reshape(x.shape[0], -1)[:, 0]
    return torch.stack([-s, s, torch.full_like(s, -1e3)], dim=1)


def test_counts_sum_and_match_a_naive_loop():
    x = torch.tensor([[0.0, 0.0], [0.3, 0.0], [-0.2, 0.5]])
    noise = IsotropicGaussian(0.5)
    counts = sample_counts(threshold_model, x, noise, 1000, 3, batch_size=64, block=16,
                           generators=[input_generator(7, i, "t") for i in range(3)])
    assert counts.shape == (3, 3) and counts.dtype == torch.int64
    assert torch.equal(counts.sum(1), torch.full((3,), 1000))
    assert torch.all(counts[:, 2] == 0)
    # the same draws, one sample at a time, in the same blocks of 16
    for i in range(3):
        g = input_generator(7, i, "t")
        ones = 0
        for start in range(0, 1000, 16):
            m = min(16, 1000 - start)
            d = noise.draw(m, (2,), g)
            ones += int(((x[i] + d)[:, 0] > 0).sum())
        assert counts[i, 1] == ones


def test_counts_do_not_depend_on_grouping():
    x = torch.rand(7, 1, 4, 4)
    noise = IsotropicGaussian(0.3)

    def model(z):
        return torch.stack([z.sum((1, 2, 3)) - 8, z[:, 0, 0, 0], -z.sum((1, 2, 3)) + 8], 1)

    gens = lambda: [input_generator(1, i, "s") for i in range(7)]  # noqa: E731
    whole = sample_counts(model, x, noise, 500, 3, batch_size=70, block=10, generators=gens())
    parts = torch.cat([sample_counts(model, x[i : i + 1], noise, 500, 3, batch_size=10, block=10,
                                     generators=gens()[i : i + 1]) for i in range(7)])
    assert torch.equal(whole, parts)


def test_streams_are_independent_and_reproducible():
    a = torch.randn(5, generator=input_generator(3, 10, "select"))
    b = torch.randn(5, generator=input_generator(3, 10, "estimate"))
    c = torch.randn(5, generator=input_generator(3, 11, "select"))
    d = torch.randn(5, generator=input_generator(3, 10, "select"))
    assert not torch.equal(a, b) and not torch.equal(a, c) and torch.equal(a, d)


@pytest.mark.parametrize("noise_factory", [
    lambda d: IsotropicGaussian(0.7),
    lambda d: DiagonalGaussian(torch.linspace(0.2, 1.5, d)),
    lambda d: RotatedGaussian(torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(0)))[0],
                              torch.linspace(0.2, 1.5, d)),
    lambda d: FullGaussian(torch.tensor([[1.0, 0.3, 0.0], [0.3, 0.5, 0.1], [0.0, 0.1, 0.8]])),
])
def test_noise_covariance_matches_scale(noise_factory):
    """Empirical covariance of S w equals S S^T (sampling check, 200k draws)."""
    d = 3
    noise = noise_factory(d)
    draws = noise.draw(200_000, (d,), torch.Generator().manual_seed(1), dtype=torch.float64)
    cov = draws.T @ draws / draws.shape[0]
    if isinstance(noise, IsotropicGaussian):
        expected = noise.sigma**2 * torch.eye(d, dtype=torch.float64)
    elif isinstance(noise, DiagonalGaussian):
        expected = torch.diag(noise.theta.double() ** 2)
    elif isinstance(noise, RotatedGaussian):
        expected = noise.basis @ torch.diag(noise.theta.double() ** 2) @ noise.basis.T
    else:
        expected = noise.scale @ noise.scale
    assert torch.allclose(cov, expected, atol=0.02 * float(expected.abs().max()))
    rebuilt = noise_from_parameters(noise.kind, noise.parameters())
    assert torch.allclose(rebuilt.draw(4, (d,), torch.Generator().manual_seed(5), dtype=torch.float64),
                          noise.draw(4, (d,), torch.Generator().manual_seed(5), dtype=torch.float64))


def test_regions_from_noise():
    c = torch.zeros(3)
    ball = IsotropicGaussian(0.5).region(c, 2.0)
    assert isinstance(ball, Ball) and ball.radius == 1.0 and ball.proxy_radius == 1.0
    assert math.isclose(ball.log_volume, math.log(4 / 3 * math.pi))
    ell = DiagonalGaussian(torch.tensor([1.0, 2.0, 4.0])).region(c, 0.5)
    assert isinstance(ell, Ellipsoid)
    assert ell.inscribed_radius == 0.5 and math.isclose(ell.proxy_radius, 1.0)
    assert math.isclose(ell.log_volume, math.log(4 / 3 * math.pi * 0.5 * 1 * 2))
    pts = torch.tensor([[0.49, 0, 0], [0, 0.99, 0], [0, 0, 1.99], [0.4, 0.6, 0.0], [0, 0, 2.01]])
    assert ell.contains(pts).tolist() == [True, True, True, False, False]
    full = FullGaussian(torch.tensor([[2.0, 1.0], [1.0, 2.0]])).region(torch.zeros(2), 1.0)
    # eigenvalues 1 and 3 along (1,-1)/sqrt2 and (1,1)/sqrt2
    assert sorted(full.semi_axes.tolist()) == pytest.approx([1.0, 3.0])
    s = 2**-0.5
    assert full.contains(torch.tensor([[2.9 * s, 2.9 * s], [1.1 * s, -1.1 * s], [0.9 * s, -0.9 * s]])).tolist() == [
        True, False, True]
    # proxy radius in log space does not underflow in 784 dimensions
    big = DiagonalGaussian(torch.full((784,), 1e-3)).region(torch.zeros(784), 1.0)
    assert big.proxy_radius == pytest.approx(1e-3) and big.log_volume < -5000


def test_model_output_is_checked():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"expected \(\d+, 4\)"):
        sample_counts(lambda z: torch.zeros(z.shape[0], 3), x, IsotropicGaussian(0.1), 10, 4)
    with pytest.raises(ValueError, match="NaN or infinite"):
        sample_counts(lambda z: torch.full((z.shape[0], 4), float("nan")), x, IsotropicGaussian(0.1), 10, 4)
    passes = []

    def late_inf(z):  # finite scores but one, on the third of five forward passes
        passes.append(z.shape[0])
        out = torch.zeros(z.shape[0], 4)
        out[0, 1] = float("inf") if len(passes) == 3 else 0.0
        return out

    with pytest.raises(ValueError, match="NaN or infinite"):
        sample_counts(late_inf, x, IsotropicGaussian(0.1), 50, 4, batch_size=20)
    assert passes == [20] * 5


@pytest.mark.parametrize("bad,match", [
    (lambda: IsotropicGaussian(0.0), "sigma"),
    (lambda: IsotropicGaussian(-1.0), "sigma"),
    (lambda: IsotropicGaussian(float("nan")), "sigma"),
    (lambda: DiagonalGaussian(torch.tensor([1.0, -1.0])), "theta"),
    (lambda: RotatedGaussian(torch.ones(2, 2), torch.ones(2)), "orthonormal"),
    (lambda: RotatedGaussian(torch.eye(3), torch.ones(2)), "theta"),
    (lambda: FullGaussian(torch.tensor([[1.0, 2.0], [0.0, 1.0]])), "symmetric"),
    (lambda: FullGaussian(torch.tensor([[1.0, 2.0], [2.0, 1.0]])), "positive definite"),
])
def test_bad_noise(bad, match):
    with pytest.raises(ValueError, match=match):
        bad()


def test_sample_counts_samples_in_eval_mode_for_every_caller_and_restores_the_modes():
    """The engine itself puts the model in eval mode (so top-k, the sequential modes and every other caller get
    the smoothed classifier of the eval-mode model), and each submodule's own mode comes back afterwards."""
    from smoothcert.noise.gaussian import IsotropicGaussian as Iso

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Dropout(0.9), torch.nn.Linear(16, 3))
    x = torch.rand(2, 4)

    def counts():
        return sample_counts(net, x, Iso(0.3), 500, 3, generators=[input_generator(0, i, "t") for i in range(2)])

    net.eval()
    expected = counts()
    net.train()
    net[1].eval()
    assert torch.equal(counts(), expected)
    assert [m.training for m in net.modules()] == [True, True, False, True]
