"""Each training objective against a direct per-sample computation of its formula (values and gradients).

The model runs in float64 and the noise is injected, so the batched losses and the naive loops below must
agree to rounding. The naive versions use independent formulas: softmax as exp / sum exp, KL and entropy
written out, Phi^-1 through erfinv (checked against scipy), PGD one input at a time.
"""

import math

import pytest
import scipy.stats
import torch
from torch import nn

from smoothcert.training.objectives import (OBJECTIVES, Consistency, GaussianAugmentation, GeneralizedConsistency,
                                           Macer, SmoothAdv, make_objective, standard_noise)

SIGMA = 0.3
B, K, D = 6, 3, 5


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, K)).double()


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((B, D), generator=g, dtype=torch.float64)
    y = torch.randint(0, K, (B,), generator=g)
    return x, y


def noise(m, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((B, m, D), generator=g)      # float32, as the objectives draw it


def softmax(v):
    e = torch.exp(v - v.max())
    return e / e.sum()


def ppf(p):
    return math.sqrt(2.0) * torch.erfinv(2.0 * p - 1.0)


def grads(model, loss):
    model.zero_grad()
    loss.backward()
    return [p.grad.detach().clone() for p in model.parameters()]


def assert_same(model, loss_fast, loss_naive):
    assert torch.allclose(loss_fast.detach(), loss_naive.detach(), rtol=1e-10, atol=1e-12), \
        (float(loss_fast.detach()), float(loss_naive.detach()))
    for a, b in zip(grads(model, loss_fast), grads(model, loss_naive)):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-11)


def naive_probs(model, x, y, w, i):
    """Softmax of each noisy copy of input i, and the logits."""
    logits = [model((x[i] + SIGMA * w[i, j].double()).unsqueeze(0))[0] for j in range(w.shape[1])]
    return [softmax(v) for v in logits], logits


def test_gaussian_matches_direct_cross_entropy():
    model, (x, y) = tiny_model(), batch()
    w = noise(2)
    loss, scores = GaussianAugmentation(m=2).loss(model, x, y, SIGMA, noise=w)
    terms = []
    for i in range(B):
        probs, _ = naive_probs(model, x, y, w, i)
        terms += [-torch.log(p[y[i]]) for p in probs]
    assert scores.shape == (B, K)
    assert_same(model, loss, torch.stack(terms).mean())


def naive_consistency_terms(probs, lbd, eta):
    p_hat = torch.stack(probs).mean(0)
    kl = torch.stack([(p_hat * torch.log(p_hat / p)).sum() for p in probs]).mean()
    entropy = -(p_hat * torch.log(p_hat)).sum()
    return lbd * kl + eta * entropy, p_hat


def test_consistency_matches_eq_3_5():
    model, (x, y) = tiny_model(), batch()
    w = noise(3)
    loss, scores = Consistency(m=3, lbd=12.0, eta=0.5).loss(model, x, y, SIGMA, noise=w)
    terms = []
    for i in range(B):
        probs, _ = naive_probs(model, x, y, w, i)
        reg, p_hat = naive_consistency_terms(probs, 12.0, 0.5)
        ce = torch.stack([-torch.log(p[y[i]]) for p in probs]).mean()
        terms.append(ce + reg)
        assert torch.allclose(scores[i], torch.log(p_hat))
    assert_same(model, loss, torch.stack(terms).mean())


def test_generalized_consistency_matches_eq_4_1_and_4_3():
    """CE of the averaged logits (eq. 4.3), the KL term gated on eq. 4.3's prediction (the argmax of the averaged
    logits), the entropy term for every input (eq. 4.1)."""
    model, (x, _) = tiny_model(), batch()
    w = noise(4)

    def vote(i):
        return torch.stack(naive_probs(model, x, None, w, i)[1]).mean(0)
    # labels: the gate's prediction for half the inputs (the KL term applies), another class for the rest
    y = torch.tensor([int(vote(i).argmax()) if i % 2 == 0 else (int(vote(i).argmax()) + 1) % K for i in range(B)])
    loss, scores = GeneralizedConsistency(m=4, lbd=10.0, eta=0.5).loss(model, x, y, SIGMA, noise=w)
    terms = []
    for i in range(B):
        probs, logits = naive_probs(model, x, y, w, i)
        mean_logits = torch.stack(logits).mean(0)
        accuracy = -torch.log(softmax(mean_logits)[y[i]])            # eq. 4.3: softmax of averaged logits
        kl, _ = naive_consistency_terms(probs, 1.0, 0.0)
        entropy, _ = naive_consistency_terms(probs, 0.0, 1.0)
        gated = int(vote(i).argmax()) == int(y[i])
        terms.append(accuracy + (10.0 * kl if gated else 0.0) + 0.5 * entropy)   # eq. 4.1
        assert torch.allclose(scores[i], mean_logits)
    assert_same(model, loss, torch.stack(terms).mean())


def test_generalized_consistency_gates_only_the_kl_term():
    """Where the averaged logits predict a wrong class the KL weight changes nothing, the entropy weight does."""
    model, (x, _) = tiny_model(), batch()
    w = noise(2)
    mean_logits = torch.stack([torch.stack(naive_probs(model, x, None, w, i)[1]).mean(0) for i in range(B)])
    wrong, right = (mean_logits.argmax(1) + 1) % K, mean_logits.argmax(1)

    def loss(y, lbd, eta):
        return GeneralizedConsistency(m=2, lbd=lbd, eta=eta).loss(model, x, y, SIGMA, noise=w)[0].detach()
    assert torch.allclose(loss(wrong, 0.0, 0.5), loss(wrong, 20.0, 0.5))
    assert float(loss(wrong, 0.0, 5.0)) > float(loss(wrong, 0.0, 0.0))
    assert float(loss(right, 20.0, 0.0)) > float(loss(right, 0.0, 0.0))


def test_the_two_gates_disagree_on_synthetic_logits():
    """The argmax of the averaged logits (eq. 4.3) and of the averaged softmax (eq. 4.2) differ on some inputs, so
    the gate that the test above pins is a real choice: the averaged softmax's would fail it for some labels."""
    g = torch.Generator().manual_seed(3)
    logits = 3.0 * torch.randn((2000, 4, K), generator=g)
    by_logits = logits.mean(1).argmax(1)
    by_softmax = torch.softmax(logits, -1).mean(1).argmax(1)
    share = float((by_logits != by_softmax).double().mean())
    assert 0.01 < share < 0.5


def test_erfinv_ppf_is_the_normal_quantile():
    p = torch.tensor([0.01, 0.3, 0.5, 0.9, 0.999], dtype=torch.float64)
    assert torch.allclose(ppf(p), torch.from_numpy(scipy.stats.norm.ppf(p.numpy())), atol=1e-12)


def test_macer_matches_hinge_on_radius():
    model, (x, _) = tiny_model(), batch()
    k, lbd, beta = 8, 12.0, 4.0
    w = noise(k)
    # labels: the beta-classifier's top class for most inputs, so the hinge is active for some
    info = []
    for i in range(B):
        _, logits = naive_probs(model, x, None, w, i)
        gb = torch.stack([softmax(beta * v) for v in logits]).mean(0)
        top = torch.sort(gb, descending=True).values
        info.append((int(gb.argmax()), float((ppf(top[0]) - ppf(top[1])).detach())))
    # mislabel the input with the smallest margin: below gamma, yet outside the hinge since it is misclassified
    wrong = min(range(B), key=lambda i: info[i][1])
    y = torch.tensor([c if i != wrong else (c + 1) % K for i, (c, _) in enumerate(info)])
    xis = sorted(xi for i, (_, xi) in enumerate(info) if i != wrong)
    gamma = (xis[1] + xis[2]) / 2                           # some correct inputs above gamma, some below
    assert info[wrong][1] < gamma
    loss, scores = Macer(k=k, lbd=lbd, gamma=gamma, beta=beta).loss(model, x, y, SIGMA, noise=w)
    terms, active = [], 0
    for i in range(B):
        probs, logits = naive_probs(model, x, y, w, i)
        g = torch.stack(probs).mean(0)
        term = -torch.log(g[y[i]] + 1e-10)
        gb = torch.stack([softmax(beta * v) for v in logits]).mean(0)
        top = torch.sort(gb, descending=True).values
        xi = ppf(top[0]) - ppf(top[1])
        if int(gb.argmax()) == int(y[i]) and float(xi.detach()) < gamma:
            term = term + lbd * SIGMA / 2 * (gamma - xi)
            active += 1
        terms.append(term)
        assert torch.allclose(scores[i], torch.log(g + 1e-10))
    assert 0 < active < B - 1
    assert_same(model, loss, torch.stack(terms).mean())


def test_macer_saturated_probabilities_give_finite_gradients():
    """p_A rounding to 1 makes Phi^-1 infinite; such inputs leave the hinge and no NaN reaches the gradient."""
    model = nn.Sequential(nn.Linear(D, K)).double()
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.copy_(torch.tensor([60.0, 0.0, -5.0]))
    x, _ = batch()
    y = torch.zeros(B, dtype=torch.int64)
    loss, _ = Macer(k=4).loss(model, x, y, SIGMA, noise=noise(4))
    g = grads(model, loss)
    assert torch.isfinite(loss) and all(torch.isfinite(t).all() for t in g)


def test_macer_deferred_hinge():
    """During ``warmup`` epochs MACER is its classification term alone (lbd = 0), then the full loss."""
    model, (x, y) = tiny_model(), batch()
    w = noise(4)
    deferred = Macer(k=4, beta=2.0, warmup=2)
    plain = Macer(k=4, beta=2.0, lbd=0.0)
    full = Macer(k=4, beta=2.0)
    for epoch, reference in ((0, plain), (1, plain), (2, full)):
        deferred.start_epoch(epoch)
        a, _ = deferred.loss(model, x, y, SIGMA, noise=w)
        b, _ = reference.loss(model, x, y, SIGMA, noise=w)
        assert torch.allclose(a, b)
    assert not torch.allclose(plain.loss(model, x, y, SIGMA, noise=w)[0], full.loss(model, x, y, SIGMA, noise=w)[0])


class Recorder(nn.Module):
    """A linear model that records whether each forward pass ran in training mode."""

    def __init__(self):
        super().__init__()
        self.lin, self.modes = nn.Linear(D, K).double(), []

    def forward(self, z):
        self.modes.append(self.training)
        return self.lin(z)


def naive_pgd(model, x, y, w, sigma, epsilon, steps):
    out = []
    for i in range(x.shape[0]):
        delta = torch.zeros_like(x[i])
        for _ in range(steps):
            delta = delta.detach().requires_grad_(True)
            probs = [softmax(model((x[i] + delta + sigma * w[i, j].double()).unsqueeze(0))[0])
                     for j in range(w.shape[1])]
            loss = -torch.log(torch.stack(probs).mean(0)[y[i]])
            (grad,) = torch.autograd.grad(loss, delta)
            with torch.no_grad():
                delta = delta + (2 * epsilon / steps) * grad / grad.norm()
                delta = (x[i] + delta).clamp(0, 1) - x[i]
                if delta.norm() > epsilon:
                    delta = delta * (epsilon / delta.norm())
        out.append((x[i] + delta).detach())
    return torch.stack(out)


def test_smoothadv_matches_per_sample_pgd_and_multi_noise_loss():
    model, (x, y) = tiny_model(), batch()
    m, eps, steps = 3, 0.4, 5
    w = noise(m)
    objective = SmoothAdv(epsilon=eps, steps=steps, m=m, warmup=1)
    objective.start_epoch(0)
    x_adv = objective.attack(model, x, y, SIGMA, w, eps)
    expected = naive_pgd(model, x, y, w, SIGMA, eps, steps)
    assert torch.allclose(x_adv, expected, atol=1e-10)
    assert ((x_adv - x).flatten(1).norm(dim=1) <= eps + 1e-9).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1

    def smoothed_ce(points):
        with torch.no_grad():
            return [float(-torch.log(torch.stack([softmax(model((points[i] + SIGMA * w[i, j].double())[None])[0])
                                                  for j in range(m)]).mean(0)[y[i]])) for i in range(B)]
    assert all(a >= b for a, b in zip(smoothed_ce(x_adv), smoothed_ce(x)))   # the attack raises the loss

    loss, _ = objective.loss(model, x, y, SIGMA, noise=w)
    terms = [-torch.log(softmax(model((expected[i] + SIGMA * w[i, j].double())[None])[0])[y[i]])
             for i in range(B) for j in range(m)]
    assert_same(model, loss, torch.stack(terms).mean())


def test_smoothadv_warmup_and_eval_mode():
    objective = SmoothAdv(epsilon=1.0, warmup=4)
    seen = []
    for epoch in range(6):
        objective.start_epoch(epoch)
        seen.append(objective.current_epsilon)
    assert seen == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]

    model = Recorder().train()
    x, y = batch()
    objective = SmoothAdv(epsilon=0.5, steps=2, m=2, warmup=1)
    objective.loss(model, x, y, SIGMA, noise=noise(2))
    assert model.modes == [False, False, True] and model.training
    assert all(p.grad is None for p in model.parameters())      # the attack leaves parameter gradients alone


def test_injected_noise_equals_generator_draws():
    model, (x, y) = tiny_model(), batch()
    for objective in (GaussianAugmentation(), Consistency(), GeneralizedConsistency(), Macer(k=4), SmoothAdv(m=2)):
        a, _ = objective.loss(model, x, y, SIGMA, generator=torch.Generator().manual_seed(5))
        w = standard_noise(x, objective.num_noise, torch.Generator().manual_seed(5))
        b, _ = objective.loss(model, x, y, SIGMA, noise=w)
        assert torch.allclose(a, b), objective
    with pytest.raises(ValueError, match="noise must have shape"):
        Consistency(m=2).loss(model, x, y, SIGMA, noise=noise(3))


@pytest.mark.parametrize("name, kwargs, match", [
    ("nope", {}, "unknown objective"),
    ("consistency", {"m": 0}, "m"),
    ("consistency", {"lbd": -1.0}, "lbd"),
    ("generalized-consistency", {"eta": -0.5}, "eta"),
    ("macer", {"k": 0}, "k"),
    ("macer", {"gamma": -1.0}, "gamma"),
    ("macer", {"beta": 0.0}, "beta"),
    ("macer", {"warmup": -1}, "warmup"),
    ("smoothadv", {"epsilon": -0.1}, "epsilon"),
    ("smoothadv", {"steps": 0}, "steps"),
    ("smoothadv", {"warmup": 0}, "warmup"),
    ("gaussian", {"beta": 2.0}, "takes no hyperparameter beta"),
    ("consistency", {"m": 2.5}, "integer"),
])
def test_bad_hyperparameters_raise(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_objective(name, **kwargs)


def test_unknown_objective_lists_the_names():
    with pytest.raises(ValueError) as err:
        make_objective("gausian")
    for name in OBJECTIVES:
        assert name in str(err.value)


def test_configs_round_trip_through_make_objective():
    for name, cls in OBJECTIVES.items():
        config = cls().config()
        assert config["objective"] == name
        rebuilt = make_objective(name, **{k: v for k, v in config.items() if k != "objective"})
        assert rebuilt.config() == config
