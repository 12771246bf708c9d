"""SmoothMix, CAT-RS and MACER's gradient threshold against direct per-sample computations (values and gradients).

As in test_objectives: the model runs in float64, the noise is injected, and the naive versions loop over inputs
and noisy copies with softmax, KL and Phi^-1 written out; the objectives' other random draws (SmoothMix's mixing
weights, CAT-RS's binomial count) come from a seeded generator that the reference replays.
"""

import math

import pytest
import torch
from torch import nn

from smoothcert.training.mixing_objectives import CATRS, SmoothMix
from smoothcert.training.objectives import Macer, make_objective, standard_noise

from test_objectives import (B, D, K, SIGMA, Recorder, assert_same, batch, grads, naive_probs, noise, ppf, softmax,
                             tiny_model)


def uniforms(shape, seed):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)).double()


def labels_half_right(model, x, w):
    """The mean prediction's class for even inputs, another class for odd ones."""
    top = [int(torch.stack(naive_probs(model, x, None, w, i)[0]).mean(0).argmax()) for i in range(B)]
    return torch.tensor([c if i % 2 == 0 else (c + 1) % K for i, c in enumerate(top)])


def naive_smoothmix_adversary(model, x, y, w, steps, step_size):
    out = []
    for i in range(B):
        adv = x[i].clone()
        for _ in range(steps):
            adv = adv.detach().requires_grad_(True)
            probs = [softmax(model((adv + SIGMA * w[i, j].double())[None])[0]) for j in range(w.shape[1])]
            loss = -torch.log(torch.stack(probs).mean(0)[y[i]])
            (grad,) = torch.autograd.grad(loss, adv)
            adv = (adv.detach() + step_size * grad / (grad.norm() + 1e-8)).clamp(0, 1)
        out.append(adv.detach())
    return torch.stack(out)


def test_smoothmix_matches_per_sample_adversary_mixup_and_loss():
    model, (x, _) = tiny_model(), batch()
    m, steps, step_size, eta = 3, 3, 0.5, 5.0
    w = noise(m)
    y = labels_half_right(model, x, w)
    objective = SmoothMix(m=m, steps=steps, step_size=step_size, eta=eta, warmup=4)
    objective.start_epoch(1)                                        # eta warm-up: 2/4 of eta
    adv = objective.attack(model, x, y, SIGMA, w)
    expected = naive_smoothmix_adversary(model, x, y, w, steps, step_size)
    assert torch.allclose(adv, expected, atol=1e-10)
    assert adv.min() >= 0 and adv.max() <= 1 and (adv - x).abs().max() > 0.1
    loss, scores = objective.loss(model, x, y, SIGMA, generator=torch.Generator().manual_seed(7), noise=w)
    lam = uniforms(B, 7) / 2
    ce_terms, mix_terms, gated = [], [], 0
    for i in range(B):
        probs, _ = naive_probs(model, x, y, w, i)
        clean = torch.stack(probs).mean(0)
        ce_terms += [-torch.log(p[y[i]]) for p in probs]
        mixed = (1 - lam[i]) * x[i] + lam[i] * expected[i]
        target = (1 - lam[i]) * clean + lam[i] / K
        right = int(clean.argmax()) == int(y[i])
        gated += right
        for j in range(m):
            q = softmax(model((mixed + SIGMA * w[i, j].double())[None])[0])
            mix_terms.append((target * (torch.log(target) - torch.log(q))).sum() * float(right))
        assert torch.allclose(scores[i], torch.log(clean))
    assert 0 < gated < B
    naive = torch.stack(ce_terms).mean() + eta * 2 / 4 * torch.stack(mix_terms).mean()
    assert_same(model, loss, naive)


def naive_catrs_noise(model, x_i, y_i, delta0, epsilon, steps, m):
    """CAT-RS's attack on one noise vector (the public code's KL-PGD with the one-hot target)."""
    mu0, rms0 = delta0.mean(), delta0.square().mean().sqrt()
    current = delta0.clone()
    for _ in range(steps):
        current = current.detach().requires_grad_(True)
        loss = -torch.log(softmax(model((x_i + current)[None])[0])[y_i]) / m
        (grad,) = torch.autograd.grad(loss, current)
        with torch.no_grad():
            moved = current + 2 * epsilon / steps * grad / (grad.norm() + 1e-8)
            eta = moved - delta0
            if eta.norm() > epsilon:
                eta = eta * (epsilon / eta.norm())
            moved = delta0 + eta
            current = mu0 + (moved - moved.mean()) / moved.square().mean().sqrt() * rms0
    return current.detach()


def test_catrs_matches_per_sample_confidence_mask_and_worst_noise():
    model, (x, _) = tiny_model(), batch()
    m, epsilon, steps, lbd = 4, 0.6, 3, 2.0
    w = noise(m)
    y = labels_half_right(model, x, w)
    objective = CATRS(m=m, epsilon=epsilon, steps=steps, lbd=lbd)
    loss, scores = objective.loss(model, x, y, SIGMA, generator=torch.Generator().manual_seed(11), noise=w)
    u = uniforms((B, m), 11)
    terms, counts = [], []
    for i in range(B):
        probs, logits = naive_probs(model, x, y, w, i)
        ce = torch.stack([-torch.log(p[y[i]]) for p in probs])
        confidence = sum(int(v.argmax()) == int(y[i]) for v in logits) / m
        accept = max(1, int((u[i] < confidence).sum()))                 # K ~ Binomial(m, confidence), >= 1
        counts.append(accept)
        term = torch.sort(ce).values[:accept].sum() / m
        if accept == m:
            worst = [naive_catrs_noise(model, x[i], int(y[i]), SIGMA * w[i, j].double(), epsilon, steps, m)
                     for j in range(m)]
            adv_ce = torch.stack([-torch.log(softmax(model((x[i] + d)[None])[0])[y[i]]) for d in worst])
            assert all(float(a) >= float(c) - 1e-12 for a, c in zip(adv_ce.detach(), ce.detach()))  # the attack raises the loss
            for d, j in zip(worst, range(m)):                       # re-standardized: the noise's own mean
                assert math.isclose(float(d.mean()), float(SIGMA * w[i, j].double().mean()), abs_tol=1e-12)
            term = term + lbd * adv_ce.max()
        terms.append(term)
        assert torch.allclose(scores[i], torch.log(torch.stack(probs).mean(0)))
    assert m in counts and min(counts) < m, counts                  # both branches are exercised
    assert_same(model, loss, torch.stack(terms).mean())


def test_mixing_objectives_draw_from_the_generator_after_the_noise():
    model, (x, y) = tiny_model(), batch()
    for objective in (SmoothMix(m=2, steps=2), CATRS(m=2, steps=2)):
        g = torch.Generator().manual_seed(5)
        a, _ = objective.loss(model, x, y, SIGMA, generator=g)
        g = torch.Generator().manual_seed(5)
        w = standard_noise(x, objective.num_noise, g)
        b, _ = objective.loss(model, x, y, SIGMA, generator=g, noise=w)
        assert torch.allclose(a, b), objective


def test_smoothmix_eta_warmup_and_eval_mode():
    objective = SmoothMix(eta=4.0, warmup=4)
    seen = []
    for epoch in range(6):
        objective.start_epoch(epoch)
        seen.append(objective.current_eta)
    assert seen == [1.0, 2.0, 3.0, 4.0, 4.0, 4.0]

    for objective in (SmoothMix(m=2, steps=2), CATRS(m=2, steps=2)):
        model = Recorder().train()
        x, y = batch()
        objective.loss(model, x, y, SIGMA, generator=torch.Generator().manual_seed(0))
        assert model.training and False in model.modes
        assert all(p.grad is None for p in model.parameters())   # attacks leave parameter gradients alone


def naive_macer(model, x, y, w, k, lbd, gamma, beta, threshold):
    terms = []
    for i in range(B):
        probs, logits = naive_probs(model, x, y, w, i)
        g = torch.stack(probs).mean(0)
        term = -torch.log(g[y[i]] + 1e-10)
        gb = torch.stack([softmax(beta * v) for v in logits]).mean(0)
        top = torch.sort(gb, descending=True).values
        p_a, p_b = torch.clamp(top[0], max=threshold), torch.clamp(top[1], min=1 - threshold)
        xi = ppf(p_a) - ppf(p_b)
        if int(gb.argmax()) == int(y[i]) and float(xi.detach()) < gamma:
            term = term + lbd * SIGMA / 2 * (gamma - xi)
        terms.append(term)
    return torch.stack(terms).mean()


@pytest.mark.parametrize("threshold", [0.6, 0.99])
def test_macer_threshold_matches_clamped_probabilities(threshold):
    """Seed 002 eq. 3.4: p_A enters Phi^-1 as min(p_A, t), p_B as max(p_B, 1 - t)."""
    model, (x, _) = tiny_model(), batch()
    k, beta = 8, 4.0
    w = noise(k)
    y = labels_half_right(model, x, w)
    loss, _ = Macer(k=k, beta=beta, threshold=threshold).loss(model, x, y, SIGMA, noise=w)
    assert_same(model, loss, naive_macer(model, x, y, w, k, 12.0, 8.0, beta, threshold))
    if threshold == 0.6:   # the clamp acts on this model: the loss differs from MACER without it
        plain, _ = Macer(k=k, beta=beta).loss(model, x, y, SIGMA, noise=w)
        assert not torch.allclose(plain, loss)


def test_macer_threshold_stops_the_gradient_of_saturated_inputs():
    """Above the threshold the robustness term is the constant gamma - 2 Phi^-1(t): only the classification term
    moves the weights, and every number stays finite."""
    model = nn.Sequential(nn.Linear(5, K)).double()
    with torch.no_grad():
        model[0].weight.normal_(0, 0.1)
        model[0].bias.copy_(torch.tensor([8.0, 0.0, -5.0]))
    x, _ = batch()
    y = torch.zeros(B, dtype=torch.int64)
    w = noise(4)
    t = 0.99
    loss, _ = Macer(k=4, threshold=t).loss(model, x, y, SIGMA, noise=w)
    classification, _ = Macer(k=4, lbd=0.0).loss(model, x, y, SIGMA, noise=w)
    constant = 12.0 * SIGMA / 2 * (8.0 - 2 * float(ppf(torch.tensor(t, dtype=torch.float64))))
    assert math.isclose(float(loss.detach()), float(classification.detach()) + constant, rel_tol=1e-10)
    for a, b in zip(grads(model, loss), grads(model, classification)):
        assert torch.isfinite(a).all() and torch.allclose(a, b, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("name, kwargs, match", [
    ("macer", {"threshold": 0.5}, "threshold"),
    ("macer", {"threshold": 1.0}, "threshold"),
    ("macer", {"threshold": 1.5}, "threshold"),
    ("generalized-consistency", {"gate": "logits"}, "takes no hyperparameter gate"),  # eq. 4.3 only
    ("smoothmix", {"m": 0}, "m"),
    ("smoothmix", {"steps": 0}, "steps"),
    ("smoothmix", {"step_size": 0.0}, "step_size"),
    ("smoothmix", {"eta": -1.0}, "eta"),
    ("smoothmix", {"warmup": 0}, "warmup"),
    ("cat-rs", {"epsilon": 0.0}, "epsilon"),
    ("cat-rs", {"steps": 0}, "steps"),
    ("cat-rs", {"lbd": -0.5}, "lbd"),
    ("cat-rs", {"eta": 1.0}, "takes no hyperparameter eta"),
])
def test_bad_hyperparameters_of_the_new_options_raise(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_objective(name, **kwargs)


def kl(q, p):
    """``KL(q || p)`` written out, ``0 log 0 = 0``."""
    return sum(float(q[c]) * (math.log(float(q[c])) - torch.log(p[c])) for c in range(K) if q[c] > 0)


def naive_catrs_noise_kl(model, x_i, q_i, delta0, epsilon, steps, m):
    """CAT-RS's attack on one noise vector against the target distribution ``q_i`` (the public KL-PGD)."""
    mu0, rms0 = delta0.mean(), delta0.square().mean().sqrt()
    current = delta0.clone()
    for _ in range(steps):
        current = current.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(kl(q_i, softmax(model((x_i + current)[None])[0])) / m, current)
        with torch.no_grad():
            moved = current + 2 * epsilon / steps * grad / (grad.norm() + 1e-8)
            eta = moved - delta0
            if eta.norm() > epsilon:
                eta = eta * (epsilon / eta.norm())
            moved = delta0 + eta
            current = mu0 + (moved - moved.mean()) / moved.square().mean().sqrt() * rms0
    return current.detach()


@pytest.mark.parametrize("confidence", ["model", "teacher"])
def test_catrs_with_a_teacher_matches_per_sample_kl_to_its_class_frequencies(confidence):
    model, (x, _) = tiny_model(), batch()
    teacher = tiny_model(seed=4)
    with torch.no_grad():
        teacher[0].weight.mul_(10.0)                                 # votes that the noise splits: a soft q
    m, epsilon, steps, lbd, n = 4, 0.6, 3, 2.0, 9
    w = noise(m)
    y = labels_half_right(model, x, w)
    objective = CATRS(m=m, epsilon=epsilon, steps=steps, lbd=lbd, teacher_samples=n)
    objective.teacher = teacher
    if confidence == "teacher":
        objective.settings = type(objective.settings)(**{**objective.settings.to_dict(), "confidence": "teacher"})
    loss, _ = objective.loss(model, x, y, SIGMA, generator=torch.Generator().manual_seed(11), noise=w)
    g = torch.Generator().manual_seed(11)
    u = torch.rand((B, m), generator=g).double()                    # the uniforms, then the teacher's draws
    v = torch.randn((B, n, D), generator=g)
    terms, counts, soft = [], [], False
    for i in range(B):
        votes = [int(teacher((x[i] + SIGMA * v[i, j].double())[None])[0].argmax()) for j in range(n)]
        q = torch.tensor([votes.count(c) / n for c in range(K)], dtype=torch.float64)
        soft |= bool(q.max() < 1)
        probs, logits = naive_probs(model, x, y, w, i)
        ce = torch.stack([-torch.log(p[y[i]]) for p in probs])
        c = float(q[y[i]]) if confidence == "teacher" else sum(int(z.argmax()) == int(y[i]) for z in logits) / m
        accept = max(1, int((u[i] < c).sum()))
        counts.append(accept)
        term = torch.sort(ce).values[:accept].sum() / m
        if accept == m:
            worst = [naive_catrs_noise_kl(model, x[i], q, SIGMA * w[i, j].double(), epsilon, steps, m)
                     for j in range(m)]
            adv = torch.stack([kl(q, softmax(model((x[i] + d)[None])[0])) for d in worst])
            clean = torch.stack([kl(q, p) for p in probs])
            assert all(float(a) >= float(b) - 1e-12 for a, b in zip(adv.detach(), clean.detach()))
            term = term + lbd * adv.max()
        terms.append(term)
    assert m in counts and min(counts) < m and soft, counts         # both branches, a target that is not one-hot
    assert_same(model, loss, torch.stack(terms).mean())


def test_catrs_teacher_from_a_checkpoint_and_bad_teachers(tmp_path):
    from smoothcert.models.architectures import build_model
    from smoothcert.models.checkpoint import save_checkpoint

    torch.manual_seed(0)
    saved = build_model("mlp", num_classes=K, input_shape=(D,), hidden=(8,), mean=0.5, std=0.25)
    path = save_checkpoint(tmp_path / "teacher", saved)
    objective = CATRS(m=2, steps=1, teacher=path)
    x, _ = batch()
    assert torch.equal(objective.teacher(x.float()), saved.eval()(x.float()))
    assert all(not p.requires_grad for p in objective.teacher.parameters())
    with pytest.raises(ValueError, match=r"teacher \(--catrs-teacher\) must be a saved checkpoint"):
        CATRS(teacher=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match=r"confidence \(--catrs-confidence\) 'teacher' needs a teacher"):
        CATRS(confidence="teacher")
    with pytest.raises(ValueError, match="teacher_samples|teacher-samples"):
        CATRS(teacher_samples=0)
