"""Semantic certificates: cyclic translations (radius in pixels) and rotations (radius in degrees).

Translations: the discrete Neyman-Pearson worst case equals a linear program solved by scipy; for cyclic integer
shifts the smoothed classifier is computable exactly (every shift with its probability), and on test digits the
certified radii stay within the exact robust radii but in the share alpha allows (the shared harness); the
enumeration mode agrees with a brute-force loop over ``torch.roll``. Rotations: the interpolation-error bound holds
at thousands of random angle pairs, and on smooth images with a linear classifier (whose smoothed classifier is a
one-dimensional integral over the angle, computed by quadrature) the certified class holds at ten times the angle
grid inside each certified range, but in the share alpha allows.
"""

import math

import numpy as np
import pytest
import torch
from scipy import optimize, stats

from conftest import Linear2
from soundness import assert_sound, plan
from smoothcert.data.datasets import load_dataset
from smoothcert.engine.sampling import input_generator
from smoothcert.cli.main import main
from smoothcert.methods.base import RunContext
from smoothcert.methods.rotation import Rotation, RotationSettings, interpolation_bounds
from smoothcert.methods.semantic import Translation
from smoothcert.models.architectures import model_for_dataset
from smoothcert.models.checkpoint import save_checkpoint
from smoothcert.noise.rotation import rotate
from smoothcert.noise.transformations import DiscreteGaussianShift, cyclic_shift, shift_lattice
from smoothcert.training.loop import train


@pytest.fixture(scope="module")
def digits_model():
    """The small CNN on the 8x8 digits, trained with random cyclic shifts (a few seconds)."""
    torch.manual_seed(0)
    model = model_for_dataset("digits")
    x, y = load_dataset("digits", "train").batch(list(range(1438)))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(12):
        for rows in torch.randperm(len(x), generator=g).split(64):
            a, b = (int(v) for v in torch.randint(-2, 3, (2,), generator=g))
            loss = torch.nn.functional.cross_entropy(model(torch.roll(x[rows], (a, b), (2, 3))), y[rows])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def test_cyclic_shift_is_torch_roll():
    x = torch.rand(3, 5, 7)
    shifts = torch.tensor([[0, 0], [1, -2], [-6, 9], [5, 7]])
    out = cyclic_shift(x, shifts)
    for i, (a, b) in enumerate(shifts.tolist()):
        assert torch.equal(out[i], torch.roll(x, (a, b), dims=(1, 2)))


def test_discrete_gaussian_draws_follow_its_pmf():
    noise = DiscreteGaussianShift(1.3, 4)
    draws = noise.draw(40_000, (2,), torch.Generator().manual_seed(0)).long().reshape(-1).numpy()
    observed = np.bincount(draws + noise.K, minlength=2 * noise.K + 1)
    expected = noise.pmf * draws.size
    keep = expected > 5
    chi2 = float((((observed - expected) ** 2) / expected)[keep].sum())
    assert stats.chi2.sf(chi2, keep.sum() - 1) > 1e-3
    assert set(np.unique(draws)) <= set(range(-noise.K, noise.K + 1))


@pytest.mark.parametrize("p,t", [(0.7, (1, 0)), (0.9, (2, -1)), (0.99, (3, 3)), (0.55, (0, 1))])
def test_worst_case_is_the_linear_program(p, t):
    """min nu_t(A) over fractional sets with mu(A) >= p, by scipy's linprog on the union of both supports."""
    noise = DiscreteGaussianShift(1.0, 4, support=4.0)
    r = np.arange(-noise.K - 4, noise.K + 5)
    pts = np.stack(np.meshgrid(r, r, indexing="ij"), -1).reshape(-1, 2)
    mu, nu = noise.mu(pts), noise.mu(pts - np.array(t))
    res = optimize.linprog(nu, A_ub=-mu[None], b_ub=[-p], bounds=(0, 1), method="highs")
    assert res.status == 0
    assert noise.worst_case(p, np.array(t)) == pytest.approx(res.fun, abs=1e-9)


def test_radius_reduces_to_about_cohen_for_wide_noise():
    """For sigma >> 1 pixel the discrete Gaussian is nearly continuous: the radius is Cohen's sigma Phi^-1(p) within
    the lattice spacing (and never above it by more than rounding)."""
    noise = DiscreteGaussianShift(3.0, 7, support=5.0)
    for p in (0.8, 0.95, 0.99):
        cohen = 3.0 * stats.norm.ppf(p)
        assert cohen - 1.5 <= noise.gap(p) <= cohen + 0.05


def exact_translation(model, x, noise, max_shift):
    """The exact smoothed classifier at every shift t with ||t|| <= max_shift: (shifts incl. 0, class probabilities).

    f is evaluated once per residue (the H W distinct cyclic shifts); P(g = c at roll(x, t)) = sum_j mu(j) [f(roll(x,
    j + t)) = c] over the whole box of j."""
    _, h, w = x.shape
    residues = np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing="ij"), -1).reshape(-1, 2)
    with torch.no_grad():
        classes = model(cyclic_shift(x, torch.as_tensor(residues))).argmax(1).numpy().reshape(h, w)
    r = np.arange(-noise.K, noise.K + 1)
    box = np.stack(np.meshgrid(r, r, indexing="ij"), -1).reshape(-1, 2)
    mu = noise.mu(box)
    shifts = np.concatenate([np.zeros((1, 2), dtype=np.int64), shift_lattice(max_shift)])
    probs = np.zeros((len(shifts), 10))
    for i, t in enumerate(shifts):
        j = box + t
        np.add.at(probs[i], classes[j[:, 0] % h, j[:, 1] % w], mu)
    return shifts, probs


@pytest.mark.slow
def test_translation_certificates_are_sound_against_the_exact_smoothed_classifier(digits_model):
    p = plan(0.1)
    test = load_dataset("digits", "test")
    method = Translation(shift_sigma=1.0, max_shift=3)
    noise = method.noise
    ctx = RunContext(digits_model, 10, 20, 300, p.alpha, 1000, torch.float32, 9, torch.device("cpu"))
    exact_cache = {}
    bad = np.zeros(p.trials, dtype=bool)
    certified = 0
    for k in range(p.trials):
        digit = k % len(test)
        x, y = test.batch([digit])
        if digit not in exact_cache:
            exact_cache[digit] = exact_translation(digits_model, x[0], noise, 3)
        shifts, probs = exact_cache[digit]
        (rec,) = method.certify(ctx, x, y, [k])  # trial k draws from its own streams (index k)
        if rec.abstained:
            continue
        certified += rec.radius > 0
        top = probs.argmax(1)
        second = np.sort(probs, 1)[:, -2]
        holds = (top == rec.prediction) & (probs.max(1) > second)  # the exact smoothed class at each shift
        norms = np.sqrt((shifts**2).sum(1))
        bad[k] = not holds[norms <= rec.radius + 1e-9].all()
    assert certified > p.trials / 3, "the test must exercise radii, not abstentions"
    assert_sound(bad, p)


def test_enumeration_is_a_brute_force_check():
    torch.manual_seed(2)
    digits_model = model_for_dataset("digits").eval()  # any classifier: its predictions change under shifts
    test = load_dataset("digits", "test")
    x, y = test.batch(list(range(6)))
    ctx = RunContext(digits_model, 10, 1, 1, 0.1, 100, torch.float32, 0, torch.device("cpu"))
    records = Translation(max_shift=4, translation_mode="enumerate").certify(ctx, x, y, range(6))
    for i, rec in enumerate(records):
        with torch.no_grad():
            base = int(digits_model(x[i:i + 1]).argmax())
            agree = []
            for a in range(-4, 5):
                for b in range(-4, 5):
                    if 0 < math.hypot(a, b) <= 4:
                        same = int(digits_model(torch.roll(x[i:i + 1], (a, b), (2, 3))).argmax()) == base
                        agree.append((math.hypot(a, b), same))
        first_bad = min([n for n, ok in agree if not ok], default=math.inf)
        expected = max([n for n, _ in agree if n < first_bad], default=0.0)
        assert rec.prediction == base and rec.radius == pytest.approx(expected)
        assert rec.certificate.p_lower == 1.0


class Refuse(torch.nn.Module):
    def forward(self, x):
        raise AssertionError("sampled before checking the input")


def test_bad_semantic_input_is_refused_before_sampling(tmp_path, capsys):
    x = torch.rand(1, 1, 8, 8)
    ctx = RunContext(Refuse(), 10, 10, 20, 0.1, 20, torch.float32, 0, torch.device("cpu"))
    with pytest.raises(ValueError, match="not smaller than the image"):
        Translation(max_shift=8).certify(ctx, x, torch.zeros(1), [0])
    with pytest.raises(ValueError, match="images"):
        Translation(max_shift=2).certify(ctx, torch.rand(1, 64), torch.zeros(1), [0])
    for bad in (0.0, -5.0, 181.0):
        with pytest.raises(ValueError, match=r"max_angle \(--max-angle\) must be a finite number in \(0, 180\]"):
            Rotation(sigma=0.5, max_angle=bad)
    Rotation(sigma=0.5, max_angle=180.0)
    stem = save_checkpoint(tmp_path / "clf", model_for_dataset("digits"), {"dataset": "digits", "sigma": 0.25})
    out = tmp_path / "r.tsv"
    common = ["certify", "--checkpoint", stem, "--n0", "10", "--n", "20", "--max", "2", "--out", str(out),
              "--no-progress", "--device", "cpu"]
    assert main([*common, "--method", "translation", "--max-shift", "8"]) == 2
    assert "max_shift" in capsys.readouterr().err and not out.exists()
    assert main([*common, "--method", "rotation", "--max-angle", "200"]) == 2
    assert "max_angle" in capsys.readouterr().err and not out.exists()
    assert main([*common, "--method", "translation", "--max-shift", "2"]) == 0
    assert "pixels" in out.read_text()


def test_rotation_conventions():
    x = torch.rand(2, 9, 9)
    assert float((rotate(x, torch.tensor([0.0]))[0] - x).abs().max()) < 1e-5
    assert float((rotate(x, torch.tensor([90.0]))[0] - torch.rot90(x, -1, (1, 2))).abs().max()) < 1e-5
    # zero padding: corners rotated out of the image are lost
    assert float(rotate(torch.ones(1, 9, 9), torch.tensor([45.0]))[0, 0, 0, 0]) == 0.0


def smooth_images(count, size, seed):
    g = torch.Generator().manual_seed(seed)
    r = torch.arange(size, dtype=torch.float32)
    centres = 2 + (size - 4) * torch.rand(count, 2, 2, generator=g)
    yy, xx = r.reshape(1, 1, size, 1), r.reshape(1, 1, 1, size)
    blobs = torch.exp(-((yy - centres[:, :, 0, None, None]) ** 2 + (xx - centres[:, :, 1, None, None]) ** 2) / 8)
    return (0.8 * blobs.sum(1, keepdim=True)).clamp(0, 1)


def test_interpolation_bound_holds_at_random_angles():
    settings = RotationSettings(sigma=0.5, angle_sigma=3.0, max_angle=2.0, angle_cells=4, beta_step=0.1)
    g = torch.Generator().manual_seed(1)
    for x in list(smooth_images(2, 10, 0)) + [load_dataset("digits", "test").batch([0])[0][0]]:
        bounds = interpolation_bounds(x, settings)
        cell = settings.max_angle / settings.angle_cells
        beta = (torch.rand(4000, generator=g) * 2 - 1) * settings.angle_tail * settings.angle_sigma
        j = torch.randint(0, settings.angle_cells, (4000,), generator=g)
        side = torch.randint(0, 2, (4000,), generator=g)
        gamma = (j + torch.rand(4000, generator=g)) * cell * (1 - 2 * side)
        once = rotate(x, gamma)  # R_gamma x for each gamma, then each rotated by its own beta
        err = (rotate(once, beta) - rotate(x, beta + gamma)).flatten(1).norm(dim=1).double().numpy()
        assert (err <= bounds[side.numpy(), j.numpy()]).all()
        assert err.max() > 0  # interpolation errors are real, and all of them lie below the bound


@pytest.mark.slow
def test_rotation_certificates_hold_on_ten_times_the_grid():
    """Linear f on smooth images: P(f(R_beta(R_gamma x) + eps) = 1) = E_beta Phi((w . R_beta R_gamma x + b) / (sigma
    ||w||)), a one-dimensional integral computed with 80 Gauss-Hermite nodes; checked at 10 x the angle grid."""
    p = plan(0.1)
    size, sigma = 10, 0.5
    settings = RotationSettings(sigma=sigma, angle_sigma=3.0, max_angle=2.0, angle_cells=8, beta_step=0.05,
                                angle_tail=3.0)
    xs = smooth_images(p.trials, size, 3)
    g = torch.Generator().manual_seed(5)
    w = torch.nn.functional.avg_pool2d(torch.randn(1, 1, size, size, generator=g), 3, 1, 1).reshape(-1) * 10
    margins = xs.reshape(p.trials, -1) @ w
    model = Linear2(w, -float(margins.median()))
    ctx = RunContext(model, 2, 20, 300, p.alpha, 1000, torch.float32, 2, torch.device("cpu"))
    method = Rotation(settings)
    nodes, weights = np.polynomial.hermite_e.hermegauss(80)
    betas = torch.tensor(nodes * settings.angle_sigma, dtype=torch.float32)
    bad = np.zeros(p.trials, dtype=bool)
    reached = 0
    for k in range(p.trials):
        (rec,) = method.certify(ctx, xs[k:k + 1], torch.zeros(1), [k])
        if rec.abstained or rec.radius == 0:
            continue
        reached += 1
        steps = round(rec.radius / (settings.max_angle / settings.angle_cells) * 10)
        gammas = torch.linspace(-rec.radius, rec.radius, 2 * steps + 1)
        for gamma in gammas:
            once = rotate(xs[k, 0:1], gamma.reshape(1))[0]
            score = (rotate(once, betas).reshape(len(betas), -1) @ w).double().numpy() + model.b
            p1 = float((weights * stats.norm.cdf(score / (sigma * float(w.norm())))).sum() / weights.sum())
            if (p1 > 0.5) != (rec.prediction == 1):
                bad[k] = True
                break
    assert reached > p.trials / 4, "the test must exercise angle radii"
    assert_sound(bad, p)
