"""First order is Cohen's CERTIFY plus an observer and a radius step: ``certify``'s observers and estimation parts,
and a replay of the protocol from the engine's parts (``sample_counts`` on each stream) that
``certify_first_order`` must match exactly."""

import numpy as np
import pytest
import torch
from scipy import stats

import smoothcert.stats.gradients as fs
from smoothcert.engine.sampling import input_generator, sample_counts
from smoothcert.engine.smooth import certify
from smoothcert.methods.firstorder.certificate import FirstOrderPlan, certify_first_order
from smoothcert.methods.firstorder.radii import l2_radius
from smoothcert.noise.gaussian import IsotropicGaussian
from smoothcert.stats.bounds import clopper_pearson_lower

STREAMS = ("select", "estimate", "estimate-2")


class ThreeClass(torch.nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.w = torch.linspace(-1.0, 1.5, dim)

    def forward(self, z):
        s = z.reshape(len(z), -1) @ self.w - 0.2
        return torch.stack([-s, s, 0.4 * s.abs()], 1)


class Recorder:
    """Keeps every block it sees (a test-only observer)."""

    def __init__(self):
        self.classes, self.blocks = None, []

    def begin(self, classes):
        self.classes = classes.clone()

    def __call__(self, rows, noise, predictions):
        self.blocks.append((rows.clone(), noise.clone(), predictions.clone()))


def _triples(indices, seed=4):
    return [tuple(input_generator(seed, i, s) for s in STREAMS) for i in indices]


def test_certify_observers_see_the_estimation_parts_in_order():
    model, sigma, n0, n, inputs = ThreeClass(6), 0.4, 30, 501, 3
    x = torch.rand(inputs, 2, 3, generator=torch.Generator().manual_seed(0))
    noise = IsotropicGaussian(sigma)
    recorder = Recorder()
    certs = certify(model, x, noise, 3, n0, n, 0.01, batch_size=64, block=20, generators=_triples(range(inputs)),
                    observers=[recorder])
    # the same streams, replayed part by part through the engine
    gens = _triples(range(inputs))
    top = sample_counts(model, x, noise, n0, 3, batch_size=64, block=20, generators=[g[0] for g in gens]).argmax(1)
    parts = [sample_counts(model, x, noise, size, 3, batch_size=64, block=20, generators=[g[k] for g in gens])
             for k, size in ((1, n // 2), (2, n - n // 2))]
    assert torch.equal(recorder.classes, top)
    counts = (parts[0] + parts[1]).numpy()
    for i, c in enumerate(certs):
        assert np.array_equal(c.counts, counts[i])
        assert c.p_lower == float(clopper_pearson_lower(counts[i, top[i]], n, 0.01))
    seen = np.zeros(inputs, dtype=int)
    for rows, noise_block, predictions in recorder.blocks:
        assert noise_block.shape[:2] == predictions.shape
        seen[rows.numpy()] += predictions.shape[1]
    assert seen.tolist() == [n] * inputs  # every estimation sample once, no selection sample
    # the observer saw the noise the classifier was evaluated on: its predictions reproduce the counts
    replay = np.zeros((inputs, 3), dtype=int)
    for rows, noise_block, _ in recorder.blocks:
        pred = model((x[rows].unsqueeze(1) + noise_block).reshape(-1, 2, 3)).argmax(1).view(len(rows), -1)
        for r, p in zip(rows.tolist(), pred):
            replay[r] += np.bincount(p.numpy(), minlength=3)
    assert np.array_equal(replay, counts)


def test_certify_rejects_bad_observers_and_streams():
    x = torch.rand(2, 4)
    model = ThreeClass(4)
    with pytest.raises(TypeError, match="observers"):
        certify(model, x, IsotropicGaussian(0.5), 3, 10, 100, 0.01, observers=[3])
    gens = _triples(range(2))
    with pytest.raises(ValueError, match="one length"):
        certify(model, x, IsotropicGaussian(0.5), 3, 10, 100, 0.01, generators=[gens[0], gens[1][:2]])


def test_gradient_observer_parts_split_the_samples_in_drawing_order():
    sigma, dim = 0.5, 5
    classes = torch.tensor([1, 0])
    whole = fs.GradientObserver(sigma, classes=classes)
    split = fs.GradientObserver(sigma, parts=(7, 6), classes=classes)
    rng = torch.Generator().manual_seed(1)
    noise = torch.randn(2, 13, dim, generator=rng, dtype=torch.float64)
    pred = torch.randint(0, 2, (2, 13), generator=rng)
    rows = torch.arange(2)
    for lo, hi in ((0, 4), (4, 9), (9, 13)):  # the middle block straddles the boundary
        whole(rows, noise[:, lo:hi], pred[:, lo:hi])
        split(rows, noise[:, lo:hi], pred[:, lo:hi])
    sign = (pred == classes[:, None]).double() - 0.5
    expect = [(sign[:, a:b, None] * noise[:, a:b]).sum(1) / sigma for a, b in ((0, 7), (7, 13))]
    assert torch.allclose(split.part_sums[:, 0], expect[0]) and torch.allclose(split.part_sums[:, 1], expect[1])
    assert torch.allclose(split.sums, whole.sums)
    split(rows, noise[:, :1], pred[:, :1])
    with pytest.raises(ValueError, match="parts"):
        split.part_sums


@pytest.mark.parametrize("subspace", [None, "coords:1-3"])
def test_first_order_is_cohen_plus_an_observer(subspace):
    """The replay of the first-order protocol (selection on stream 1, one GradientObserver per half on streams 2
    and 3, p_A at alpha_p) gives exactly the certificate's counts, p_A bound and l2 gradient bounds. sigma = 0.3 is
    not a float32 number: the noise sampled is ``sigma_sampled`` = float32(0.3), and the observer's standard
    draws, the bounds and the radii are that noise's."""
    model, sigma, n0, n, alpha, inputs = ThreeClass(6), 0.3, 40, 1201, 0.05, 4
    x = torch.rand(inputs, 6, generator=torch.Generator().manual_seed(2))
    certs = certify_first_order(model, x, sigma, 3, n0, n, alpha, subspace=subspace, batch_size=96, block=30,
                                generators=_triples(range(inputs)))
    plan = FirstOrderPlan.make(alpha, n, subspace=subspace is not None)
    gens = _triples(range(inputs))
    noise = IsotropicGaussian(sigma)
    sampled = noise.sigma_sampled
    assert sampled != sigma
    kw = dict(batch_size=96, block=30)
    top = sample_counts(model, x, noise, n0, 3, generators=[g[0] for g in gens], **kw).argmax(1)
    counts, means = 0, []
    for k, size in zip((1, 2), plan.halves):
        observer = fs.GradientObserver(sampled, classes=top)
        counts = counts + sample_counts(model, x, noise, size, 3, generators=[g[k] for g in gens],
                                        observers=[observer], **kw)
        means.append(observer.sums.numpy() / size)
    counts = counts.numpy()
    n1, n2 = plan.halves
    up = fs.l2_upper(means[0], means[1], n1, n2, plan.alpha_each)
    low = fs.l2_lower(means[0], means[1], n1, n2, plan.alpha_each)
    for i, c in enumerate(certs):
        assert np.array_equal(c.counts, counts[i])
        assert c.p_lower == float(clopper_pearson_lower(counts[i, top[i]], n, plan.alpha_p))
        assert c.grad_bounds["l2_upper"] == up[i] / sampled and c.grad_bounds["l2_lower"] == low[i] / sampled
        assert c.prediction == (int(top[i]) if c.p_lower > 0.5 else -1)
        if c.p_lower > 0.5:  # the radius in units of the sampled noise
            assert c.radius == sampled * max(l2_radius(c.p_lower, up[i]), float(stats.norm.ppf(c.p_lower)))
