"""The certified region is exactly the sampled noise's region, and every input's random streams are distinct.

* A basis that is orthonormal only up to the accepted tolerance is orthonormalized on entry; the sampler and
  the region use that one float32 basis, whose remaining skew the region's radii allow for.
* Every family keeps its parameters as sampled (float32 values): the sampler multiplies by exactly the
  numbers the region is computed from, and a saved noise rebuilds the same region.
* :func:`input_generator` sets the whole generator state from the key ``(seed, index, stream)``.
"""

import math
import warnings
import zlib

import numpy as np
import pytest
import torch
from scipy import stats

from smoothcert.engine.sampling import input_generator, sample_counts, stream_id
from smoothcert.engine.smooth import certify
from smoothcert.geometry.linalg import basis_error, geometric_mean, nearest_orthonormal
from smoothcert.geometry.regions import Ball, CrossPolytope, Ellipsoid
from smoothcert.methods.noise_store import NoiseStore
from smoothcert.noise.gaussian import (DiagonalGaussian, FullGaussian, IsotropicGaussian, RotatedGaussian,
                                       float32_skew_bound)
from smoothcert.noise.uniform import UniformDiagonal
from soundness import assert_sound, plan, violations_of

F64 = torch.float64


def skewed_basis(d: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U, Q, v)``: ``U = Q (I - beta v v^T)`` with ``v = 1/sqrt(d)``, the largest ``beta`` the 1e-4 check accepts.

    ``U^T U - I = -(2 beta - beta^2) v v^T`` has entries ``(2 beta - beta^2) / d``; ``sigma_min(U) = 1 - beta``
    (0.96 at d = 784) along ``v``, whose image is ``(1 - beta) Q v``; ``Q`` is ``U``'s polar factor.
    """
    q = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=F64))[0]
    v = torch.full((d,), 1.0 / math.sqrt(d), dtype=F64)
    beta = 1.0 - math.sqrt(1.0 - 0.999e-4 * d)
    u = q @ (torch.eye(d, dtype=F64) - beta * torch.outer(v, v))
    return u, q, v


def test_a_skewed_basis_is_orthonormalized_on_entry_and_rebuilds_bitwise():
    d = 784
    u, q, _ = skewed_basis(d, torch.Generator().manual_seed(0))
    assert float((u.T @ u - torch.eye(d, dtype=F64)).abs().max()) <= 1e-4  # accepted as a basis
    assert float(torch.linalg.svdvals(u).min()) == pytest.approx(0.96, abs=1e-3)
    theta = torch.linspace(0.1, 0.5, d, dtype=F64)
    noise = RotatedGaussian(u, theta)
    assert torch.equal(noise.basis, nearest_orthonormal(u).float().double())  # polar factor, as sampled
    assert float((noise.basis - q).abs().max()) < 1e-6  # = Q up to float32 rounding
    assert basis_error(noise.basis) <= float32_skew_bound(d)
    region = noise.region(torch.zeros(d), 1.7)
    exact = 1.7 * float(torch.linalg.svdvals(noise.basis * noise.theta).min())  # sigma_min(U_32 diag(theta_32))
    assert region.inscribed_radius <= exact and region.inscribed_radius > exact * (1 - 1e-5)
    again = RotatedGaussian(**noise.parameters())
    assert torch.equal(again.basis, noise.basis) and torch.equal(again.theta, noise.theta)
    assert again.region(torch.zeros(d), 1.7).inscribed_radius == region.inscribed_radius


@pytest.mark.slow
def test_skewed_basis_certificates_stay_below_the_exact_radius():
    """Linear classifier along the skewed basis's weakest direction: the exact robust radius is its margin.

    For ``f(x) = 1[w . x + b > 0]`` and any symmetric noise the smoothed classifier is ``f`` itself, so the
    exact l2 robust radius is ``(w . x + b) / ||w||``. With ``w = Q v`` and the skewed basis kept as given, the
    noise would shrink along ``w`` by ``sigma_min(U) = 0.96`` while the region claimed ``min(theta) * gap``: an
    over-claim of 4%, a violation in 93% of the trials (exact binomial computation), so the code before the
    fix passes this plan with probability 1e-4. Each trial is an independent CERTIFY (own streams).
    """
    d, theta0, alpha = 784, 0.25, 0.4
    p = plan(alpha)
    u, q, v = skewed_basis(d, torch.Generator().manual_seed(1))
    w = q @ v
    margin = 1.5 * theta0 * 0.96  # Phi^-1(p) = 1.5 under the skewed noise, 1.44 under the orthonormal one
    x = torch.full((d,), 0.5, dtype=F64)
    bias = margin - float(w @ x)

    class Linear(torch.nn.Module):
        def forward(self, z):
            s = z.reshape(z.shape[0], -1).double() @ w + bias
            return torch.stack([torch.zeros_like(s), s], 1).float()

    noise = RotatedGaussian(u, torch.full((d,), theta0, dtype=F64))
    xs = x.float().expand(p.trials, d).contiguous()
    gens = [(input_generator(k, 0, "select"), input_generator(k, 0, "estimate")) for k in range(p.trials)]
    certs = certify(Linear(), xs, noise, 2, 20, 3000, alpha, batch_size=3000, block=3000, generators=gens)
    exact = margin / float(torch.linalg.vector_norm(w))
    bad = violations_of([c.radius for c in certs], np.full(p.trials, exact), [c.prediction for c in certs],
                        np.ones(p.trials, dtype=int))
    assert_sound(bad, p)
    assert np.mean([c.radius for c in certs]) > 0.8 * exact  # the certificates are not vacuous


def test_ellipsoid_radii_and_volume_allow_for_a_skewed_basis():
    """An ellipsoid ``{B (a * u)}`` with ``B`` 3% off orthonormal: radii and volume stay below the exact ones."""
    d = 40
    gen = torch.Generator().manual_seed(2)
    b = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=F64))[0] + 0.03 / math.sqrt(d) * torch.randn(
        d, d, generator=gen, dtype=F64)
    a = torch.rand(d, generator=gen, dtype=F64) + 0.5
    region = Ellipsoid(torch.zeros(d), a, b)
    s = torch.linalg.svdvals(b * a)
    assert region.inscribed_radius <= float(s.min())
    assert region.inscribed_radius < float(a.min())  # min(a) alone would over-claim here
    log_unit = 0.5 * d * math.log(math.pi) - math.lgamma(0.5 * d + 1)
    exact_log_volume = float(torch.log(s).sum()) + log_unit
    assert -math.inf < region.log_volume <= exact_log_volume
    assert region.proxy_radius <= float(stats.gmean(s.numpy()))
    # membership is exact for the image set: B (a * u) is inside for ||u|| < 1, outside for ||u|| > 1
    dirs = torch.randn(200, d, generator=gen, dtype=F64)
    dirs = dirs / dirs.norm(dim=1, keepdim=True)
    assert bool(region.contains((dirs * (1 - 1e-9)) * a @ b.T).all())
    assert not bool(region.contains((dirs * (1 + 1e-9)) * a @ b.T).any())


def random_spd(d: int, generator: torch.Generator) -> torch.Tensor:
    q = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=F64))[0]
    return (q * torch.linspace(0.1, 0.9, d, dtype=F64)) @ q.T


def families(d: int, generator: torch.Generator) -> list:
    q = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=F64))[0]
    theta = torch.rand(d, generator=generator, dtype=F64) * 0.4 + 0.1
    return [IsotropicGaussian(0.12), DiagonalGaussian(theta), RotatedGaussian(q, theta),
            FullGaussian(random_spd(d, generator)), UniformDiagonal(theta), UniformDiagonal.isotropic(0.3)]


@pytest.mark.parametrize("family", range(6))
def test_the_sampler_multiplies_by_exactly_the_regions_values(family):
    """Draws (float32 and float64 buffers) equal ``S w`` with ``S`` built from the region's own numbers, bitwise."""
    d, m = 6, 50
    noise = families(d, torch.Generator().manual_seed(3))[family]
    region = noise.region(torch.zeros(d), 1.0)
    for dtype in (torch.float32, torch.float64):
        drawn = noise.draw(m, (d,), torch.Generator().manual_seed(4), dtype=dtype)
        if isinstance(noise, FullGaussian):  # the region is C_32's eigen-decomposition (checked below)
            w = torch.randn((m, d), generator=torch.Generator().manual_seed(4), dtype=dtype)
            assert torch.equal(drawn, w @ noise.scale.to(dtype))
            continue
        if isinstance(region, CrossPolytope):
            e = torch.rand((m, d), generator=torch.Generator().manual_seed(4), dtype=dtype) * 2 - 1
            assert torch.equal(drawn, e * region.semi_axes.to(dtype))
            assert torch.equal(region.semi_axes.float().double(), region.semi_axes)
            continue
        w = torch.randn((m, d), generator=torch.Generator().manual_seed(4), dtype=dtype)
        if isinstance(region, Ball):
            expected = w * torch.tensor(region.radius, dtype=dtype)
        elif region.basis is None:
            expected = w * region.semi_axes.to(dtype)
        else:
            expected = (w * region.semi_axes.to(dtype)) @ region.basis.to(dtype).T
        assert torch.equal(drawn, expected)
        for values in (region.axes, region.basis if isinstance(region, Ellipsoid) else None):
            if values is not None:  # float32 values: the float64 region describes them exactly
                assert torch.equal(values.float().double(), values)


def test_full_gaussian_region_lies_inside_the_sampled_noise_region_at_784():
    """``{V (a * u)}`` inside ``{C_32 v : ||v|| <= 1}`` iff ``||C_32^-1 V diag(a)||_2 <= 1`` (float64 SVD)."""
    d = 784
    c = random_spd(d, torch.Generator().manual_seed(5))
    noise = FullGaussian(c)
    assert torch.equal(noise.scale, (0.5 * (c + c.T)).float().double())  # the float32 matrix multiplied
    region = noise.region(torch.zeros(d), 1.0)
    reach = float(torch.linalg.matrix_norm(torch.linalg.solve(noise.scale, region.basis * region.semi_axes), 2))
    assert 1 - 1e-6 < reach <= 1.0
    values, vectors = torch.linalg.eigh(c)  # the float64 matrix's axes (not what is sampled) reach outside
    assert float(torch.linalg.matrix_norm(torch.linalg.solve(noise.scale, vectors * values), 2)) > 1.0
    exact_inscribed = float(torch.linalg.eigvalsh(noise.scale).min())
    assert region.inscribed_radius <= exact_inscribed and region.inscribed_radius > exact_inscribed * (1 - 1e-6)


def test_saved_noises_rebuild_the_same_region(tmp_path):
    d = 5
    store = NoiseStore(tmp_path / "log.tsv", "test")
    store.create()
    center = torch.rand(d, dtype=F64)
    for index, noise in enumerate(families(d, torch.Generator().manual_seed(6))):
        store.save(index, noise)
        again = NoiseStore.load(tmp_path / "log.tsv", index)
        a, b = noise.region(center, 1.3), again.region(center, 1.3)
        assert type(a) is type(b) and torch.equal(a.axes, b.axes) and torch.equal(a.center, b.center)
        assert (a.inscribed_radius, a.proxy_radius, a.log_volume) == (b.inscribed_radius, b.proxy_radius, b.log_volume)
        if isinstance(a, Ellipsoid) and a.basis is not None:
            assert torch.equal(a.basis, b.basis)
        assert all(torch.equal(v, again.parameters()[k]) for k, v in noise.parameters().items())


def test_parameters_are_kept_as_sampled_and_must_fit_float32():
    noise = IsotropicGaussian(0.12)
    assert noise.sigma == 0.12 and noise.sigma_sampled == float(np.float32(0.12))
    assert noise.region(torch.zeros(2), 2.0).radius == 2.0 * float(np.float32(0.12))
    with pytest.raises(ValueError, match="float32"):
        IsotropicGaussian(1e-50)
    with pytest.raises(ValueError, match="float32"):
        DiagonalGaussian(torch.tensor([1.0, 1e39], dtype=F64))
    with pytest.raises(TypeError, match="float32 or float64"):
        DiagonalGaussian(torch.ones(3)).draw(4, (3,), dtype=torch.bfloat16)


# ------------------------------------------------------------------------------------------------ streams
def mt_state(generator: torch.Generator) -> np.ndarray:
    """The 624 MT19937 words a CPU generator keeps."""
    return generator.get_state().numpy()[24:24 + 8 * 624].view(np.uint64)


def test_streams_are_distinct_by_construction():
    keys = [(s, i, name) for s in (0, 1, 2**32 - 1) for i in (0, 1, 2, 2**32 - 1)
            for name in ("select", "estimate", "optimize", "choose-ancer")]
    states, firsts = {}, {}
    for key in keys:
        g = input_generator(*key)
        words = mt_state(g)
        assert words[1:4].tolist() == [key[0], key[1], zlib.crc32(key[2].encode())]  # the key itself
        # the 19937 bits MT19937 runs on: the top bit of word 0 and words 1-623
        states[key] = (int(words[0]) >> 31, words[1:].tobytes())
        firsts[key] = torch.randn(4, generator=g)
    assert len(set(states.values())) == len(keys)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            assert not torch.equal(firsts[a], firsts[b]), (a, b)
    again = input_generator(1, 2, "select")
    assert torch.equal(torch.randn(4, generator=again), firsts[(1, 2, "select")])


def test_the_generator_runs_mt19937_from_the_state_it_was_given():
    """numpy's MT19937 started from the same 624 words gives the same 32-bit outputs."""
    g = input_generator(7, 11, "estimate")
    words = mt_state(g).astype(np.uint32)
    reference = np.random.MT19937()
    reference.state = {"bit_generator": "MT19937", "state": {"key": words, "pos": 624}}
    ours = torch.empty(64, dtype=torch.int64).random_(0, 2**24, generator=g)
    assert ours.tolist() == (reference.random_raw(64) % 2**24).tolist()


def test_stream_keys_are_checked():
    for bad in (-1, 2**32, 2**40 + 5):
        with pytest.raises(ValueError, match=r"\[0, 2\*\*32\)"):
            input_generator(bad, 0, "select")
        with pytest.raises(ValueError, match=r"\[0, 2\*\*32\)"):
            input_generator(0, bad, "select")
    with pytest.raises(TypeError, match="integer"):
        input_generator(1.5, 0, "select")
    with pytest.raises(ValueError, match="stream"):
        input_generator(0, 0, "")
    assert zlib.crc32(b"plumless") == zlib.crc32(b"buckeroo")  # a known crc32 collision
    stream_id("plumless")
    with pytest.raises(ValueError, match="share the id"):
        stream_id("buckeroo")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_streams_use_distinct_keys_and_counters():
    a, b = input_generator(3, 4, "select", "cuda"), input_generator(3, 4, "estimate", "cuda")
    c = input_generator(3, 5, "select", "cuda")
    assert a.initial_seed() == b.initial_seed() == 3 + 2**32 * 4 and c.initial_seed() != a.initial_seed()
    assert a.get_offset() != b.get_offset()
    draws = [torch.randn(1000, generator=g, device="cuda") for g in (a, b, c)]
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_sampling_loop_waits_on_the_host_once_whatever_the_passes():
    """Counts and the finiteness flag stay on the device: one host read per call (the flag), for 2 or 40 passes."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).cuda()
    x = torch.rand(3, 1, 8, 8, device="cuda")
    gens = [input_generator(0, i, "estimate", "cuda") for i in range(3)]
    sample_counts(model, x, IsotropicGaussian(0.25), 10, 10, generators=gens)  # warm-up (lazy CUDA init)
    syncs = []
    for num in (200, 4000):
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                counts = sample_counts(model, x, IsotropicGaussian(0.25), num, 10, batch_size=300, generators=gens)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs.append(sum("synchroniz" in str(w.message) for w in caught))
        assert counts.sum(dim=1).tolist() == [num] * 3
    assert syncs == [1, 1]


# --------------------------------------------------------------------------------------------- clean-ups
def test_geometric_mean_matches_scipy_and_does_not_underflow():
    gen = torch.Generator().manual_seed(8)
    a = torch.rand(3, 784, generator=gen, dtype=F64) * 1e-3 + 1e-4  # the product underflows to 0
    assert float(torch.prod(a[0])) == 0.0
    assert torch.allclose(geometric_mean(a, dim=1), torch.from_numpy(stats.gmean(a.numpy(), axis=1)), rtol=1e-12)
    region = Ellipsoid(torch.zeros(784), a[0])
    assert region.proxy_radius == pytest.approx(float(stats.gmean(a[0].numpy())), rel=1e-12)
