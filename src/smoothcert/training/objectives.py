"""Training objectives that make a base classifier robust to Gaussian noise, as plug-ins of one training loop.

Each objective turns a batch ``(x, y)`` of clean inputs (pixels in [0, 1]) into a loss that the loop minimizes,
and a score per input whose argmax is the objective's own prediction (for the training accuracy). Noise is
always added in the model's input space, ``x + sigma * w`` with ``w ~ N(0, I)``: the same space in which
smoothcert certifies, so a model trained here is certified at the same ``sigma`` without any rescaling.

The standard-normal draws ``w`` of a batch have shape ``(B, m, *input_shape)`` and are drawn as
``torch.randn((B, m, *shape), generator=generator)`` on the input's device; they can also be passed in
(``noise=``), which makes every loss a deterministic function of its inputs (the tests compare each loss to a
direct per-sample computation this way).

Objectives (seed 002 chapter 3-4, seed 001 "adversarial training for smoothed classifier"):

- ``gaussian``: Gaussian augmentation (Cohen et al.).
- ``consistency``: consistency regularization (Jeong and Shin; seed 002 eq. 3.5).
- ``generalized-consistency``: the loose accuracy term on averaged logits (seed 002 eq. 4.3) and the
  consistency term restricted to inputs that the averaged logits classify correctly (seed 002 eq. 4.1).
- ``macer``: MACER (Zhai et al.; seed 002 eq. 3.3 with the hinge on the certified radius), optionally with the
  gradient threshold of seed 002 section 3.2 (eq. 3.4).
- ``smoothadv``: SmoothAdv (Salman et al.; seed 001), PGD against the soft smoothed classifier.
- ``smoothmix`` and ``cat-rs``: SmoothMix (Jeong et al., NeurIPS 2021) and CAT-RS (Jeong et al., NeurIPS 2023),
  in :mod:`smoothcert.training.mixing_objectives`.

:func:`make_objective` builds one by name; unknown names and bad hyperparameters raise ``ValueError``. Each
objective's hyperparameters are a settings dataclass (:mod:`smoothcert.settings`): ``Objective(settings)`` or
``Objective(**hyperparameters)``; the command line builds ``smoothcert train``'s options from them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from smoothcert.settings import Settings, integer, number
from smoothcert.training.objective_base import Objective, copies_setting, noisy_logits, standard_noise
from smoothcert.training.mixing_objectives import CATRS, SmoothMix

__all__ = [
    "Objective", "GaussianAugmentation", "Consistency", "GeneralizedConsistency", "Macer", "SmoothAdv",
    "SmoothMix", "CATRS", "OBJECTIVES", "make_objective", "standard_noise", "GaussianSettings",
    "ConsistencySettings", "MacerSettings", "SmoothAdvSettings",
]


@dataclass(frozen=True)
class GaussianSettings(Settings):
    """Gaussian augmentation: noisy copies per input."""

    m: int = copies_setting(1)


@dataclass(frozen=True)
class ConsistencySettings(Settings):
    """Consistency regularization (and its generalized form): copies, KL weight, entropy weight."""

    m: int = copies_setting(2)
    lbd: float = number(10.0, low=0.0, help="weight of the KL consistency term")
    eta: float = number(0.5, low=0.0, help="weight of the entropy of the mean prediction")


@dataclass(frozen=True)
class MacerSettings(Settings):
    """MACER: copies, hinge weight and threshold, inverse temperature, epochs before the hinge, and the optional
    gradient threshold on the soft probabilities (seed 002 section 3.2)."""

    k: int = copies_setting(16)
    lbd: float = number(12.0, low=0.0, help="weight of the radius hinge")
    gamma: float = number(8.0, low=0.0, help="hinge threshold on Phi^-1(p_A) - Phi^-1(p_B)")
    beta: float = number(16.0, low=0.0, low_open=True, help="inverse temperature")
    warmup: int = integer(0, low=0, help="epochs before the radius hinge joins")
    threshold: float | None = number(None, low=0.5, high=1.0, low_open=True, high_open=True, optional=True,
                                     help="clamp p_A to at most this and p_B to at least 1 - this before Phi^-1 "
                                          "(seed 002 eq. 3.4: the dissertation uses 0.99); default none",
                                     flag="--macer-threshold")


@dataclass(frozen=True)
class SmoothAdvSettings(Settings):
    """SmoothAdv: attack radius, PGD steps, noise draws, epochs of epsilon warm-up."""

    epsilon: float = number(1.0, low=0.0, help="l2 attack radius in input units (0.5 suits MNIST)")
    steps: int = integer(10, low=1, help="PGD steps", flag="--pgd-steps")
    m: int = copies_setting(4)
    warmup: int = integer(10, low=1, help="epochs of linear epsilon warm-up")


class GaussianAugmentation(Objective):
    """Gaussian augmentation (Cohen et al.): ``CE(f(x + sigma w), y)`` with ``w ~ N(0, I)``.

    ``m`` noisy copies per input (default 1) average the cross-entropy over the copies.
    """

    name = "gaussian"
    settings_type = GaussianSettings

    def loss(self, model, x, y, sigma, *, generator=None, noise=None):
        w = self._noise(x, generator, noise)
        logits = noisy_logits(model, x, w, sigma)
        b, m, k = logits.shape
        loss = F.cross_entropy(logits.reshape(b * m, k), y.repeat_interleave(m))
        return loss, logits[:, 0].detach()


def _kl_and_entropy(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per input: ``mean_i KL(p_hat || p_i)``, ``H(p_hat)`` and ``p_hat = mean_i softmax(logits_i)``.

    ``KL(p_hat || p_i) = sum_c p_hat_c (log p_hat_c - log p_i,c)`` (seed 002 eq. 3.5); ``p_hat`` keeps its
    gradient, as in Jeong and Shin's code.
    """
    log_p = F.log_softmax(logits, dim=-1)                       # (B, m, K)
    p_hat = log_p.exp().mean(dim=1)                             # (B, K)
    log_p_hat = torch.log(p_hat.clamp_min(1e-20))
    kl = (p_hat.unsqueeze(1) * (log_p_hat.unsqueeze(1) - log_p)).sum(dim=-1).mean(dim=1)
    entropy = -(p_hat * log_p_hat).sum(dim=-1)
    return kl, entropy, p_hat


def _consistency_terms(logits: torch.Tensor, lbd: float, eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per input: ``lbd * mean_i KL(p_hat || p_i) + eta * H(p_hat)`` and ``p_hat`` (seed 002 eq. 3.5)."""
    kl, entropy, p_hat = _kl_and_entropy(logits)
    return lbd * kl + eta * entropy, p_hat


class Consistency(Objective):
    """Consistency regularization (Jeong and Shin 2020; seed 002 eq. 3.5).

    ``L = 1/m sum_i [CE(f(x + sigma w_i), y) + lbd * KL(p_hat || p_i)] + eta * H(p_hat)``, with
    ``p_i = softmax(f(x + sigma w_i))`` and ``p_hat = 1/m sum_i p_i``. Defaults ``m = 2``, ``lbd = 10`` (10-20
    in the paper; 20 for sigma = 0.5 is common), ``eta = 0.5``. Scores: ``log p_hat``.
    """

    name = "consistency"
    settings_type = ConsistencySettings

    def loss(self, model, x, y, sigma, *, generator=None, noise=None):
        w = self._noise(x, generator, noise)
        logits = noisy_logits(model, x, w, sigma)
        b, m, k = logits.shape
        ce = F.cross_entropy(logits.reshape(b * m, k), y.repeat_interleave(m), reduction="none").view(b, m).mean(1)
        reg, p_hat = _consistency_terms(logits, self.settings.lbd, self.settings.eta)
        return (ce + reg).mean(), torch.log(p_hat.clamp_min(1e-20)).detach()


class GeneralizedConsistency(Consistency):
    """Generalized consistency (seed 002 section 4.1, eq. 4.1-4.3): a loose accuracy term and a restricted KL term.

    - Accuracy (eq. 4.3): the prediction is ``F(E[f(x + sigma w)])``, softmax of the *averaged logits*, so the
      loss is ``CE(1/m sum_i f(x + sigma w_i), y)``: a noisy copy may weigh more than 1 in the vote, unlike the
      average of softmax probabilities (eq. 4.2).
    - Consistency (eq. 4.1): ``lbd * 1[argmax g(x) = y] * 1/m sum_i KL(p_hat || p_i) + eta * H(p_hat)`` with
      ``p_hat = 1/m sum_i softmax(f(x + sigma w_i))`` as in eq. 3.5. The indicator sits on the KL term only:
      eq. 4.1 writes it as the subscript of ``F(x + eps)`` inside the KL, and the entropy term ``eta H(p_hat)``
      stands outside it, for every input. ``g(x)`` is the prediction of eq. 4.3, the argmax of the *averaged
      logits*: section 4.1 introduces eq. 4.3 to loosen the accuracy condition, so that more inputs that are
      "promising to be correctly classified" join the consistency term. (Gating on the argmax of ``p_hat``
      instead, eq. 4.2's prediction, was measured on MNIST: it disagreed with this gate on 0.08-0.37% of
      training inputs and changed the ACR by under 0.01 at sigma 0.25 and 0.5, so it is not offered.)
      Only inputs classified correctly are pushed to a constant prediction; misclassified ones are left free to
      become correct. The term is averaged over the whole batch (the indicator is inside the expectation).

    Defaults as :class:`Consistency` (``m = 2``, ``lbd = 10``, ``eta = 0.5``); seed 002 trains with m = 4.
    Scores: the averaged logits (eq. 4.3).
    """

    name = "generalized-consistency"
    settings_type = ConsistencySettings

    def loss(self, model, x, y, sigma, *, generator=None, noise=None):
        w = self._noise(x, generator, noise)
        logits = noisy_logits(model, x, w, sigma)
        mean_logits = logits.mean(dim=1)
        accuracy = F.cross_entropy(mean_logits, y, reduction="none")
        kl, entropy, _ = _kl_and_entropy(logits)
        correct = (mean_logits.detach().argmax(dim=1) == y).to(kl.dtype)
        s = self.settings
        return (accuracy + correct * s.lbd * kl + s.eta * entropy).mean(), mean_logits.detach()


def _normal_ppf(p: torch.Tensor) -> torch.Tensor:
    """``Phi^-1(p)``, differentiable (torch.special.ndtri)."""
    return torch.special.ndtri(p)


class Macer(Objective):
    """MACER (Zhai et al. 2020; seed 002 eq. 3.3): maximize the certified radius of the soft smoothed classifier.

    With ``k`` noisy copies, ``g(x) = 1/k sum_i softmax(f(x + sigma w_i))`` and the classification loss is
    ``-log g(x)_y``. The robustness term uses the inverse-temperature soft classifier
    ``g_beta(x) = 1/k sum_i softmax(beta * f(x + sigma w_i))``: for inputs where ``g_beta``'s top class is ``y``,
    with ``xi = Phi^-1(p_A) - Phi^-1(p_B)`` (top two of ``g_beta``, so ``sigma/2 * xi`` is the radius of
    seed 002 eq. 2.6), the hinge ``sigma/2 * max(0, gamma - xi)``. As in Zhai et al.'s code, inputs with
    ``xi >= gamma`` (including those whose ``Phi^-1`` is infinite in float32) contribute nothing.

    ``L = mean_x [-log g(x)_y + lbd * 1[top class = y] * sigma/2 * max(0, gamma - xi)]``.
    Defaults ``k = 16``, ``lbd = 12``, ``gamma = 8``, ``beta = 16``. Scores: ``log g(x)``.

    ``warmup`` epochs (default 0) train with ``lbd = 0`` first (the "deferred" option of public MACER code):
    the derivative of ``Phi^-1`` explodes near 0 and 1 (seed 002 eq. 3.4), and a network that starts from
    random weights is more stable when the hinge only joins once it classifies noisy inputs.

    ``threshold`` ``t`` in (1/2, 1) (seed 002 section 3.2, figure 3.1; the dissertation uses 0.99): the gradient
    of the robustness term is ``grad g / phi(Phi^-1(g))`` (eq. 3.4), unbounded as ``g -> 1``. With a threshold the
    soft (softmax) probabilities enter ``Phi^-1`` as ``min(p_A, t)`` and ``max(p_B, 1 - t)``: the gradient is zero
    beyond the threshold and at most ``sqrt(2 pi) exp(Phi^-1(t)^2 / 2)`` times ``|grad p|`` below it (37.5 at
    0.99). With the threshold no ``Phi^-1`` is infinite, so every correctly classified input with ``xi < gamma``
    is in the hinge (``xi <= 2 Phi^-1(t)``, 4.65 at 0.99, below the default ``gamma = 8``); those at the
    threshold add a constant.
    """

    name = "macer"
    settings_type = MacerSettings

    def __init__(self, settings: MacerSettings | None = None, /, **hyperparameters: Any):
        super().__init__(settings, **hyperparameters)
        self.current_lbd = self.settings.lbd

    @property
    def num_noise(self) -> int:
        return self.settings.k

    def start_epoch(self, epoch: int) -> None:
        self.current_lbd = 0.0 if epoch < self.settings.warmup else self.settings.lbd

    def hyperparameters(self) -> dict[str, Any]:
        """The settings, without ``threshold`` when it is off (so configs saved before it existed still match)."""
        values = super().hyperparameters()
        if values.get("threshold") is None:
            values.pop("threshold", None)
        return values

    def loss(self, model, x, y, sigma, *, generator=None, noise=None):
        w = self._noise(x, generator, noise)
        logits = noisy_logits(model, x, w, sigma)
        g = F.softmax(logits, dim=-1).mean(dim=1)
        log_g = torch.log(g + 1e-10)
        classification = F.nll_loss(log_g, y, reduction="sum")
        beta, gamma = self.settings.beta, self.settings.gamma
        g_beta = F.softmax(beta * logits, dim=-1).mean(dim=1)
        top2, index = g_beta.topk(2, dim=1)
        if self.settings.threshold is not None:
            t = self.settings.threshold
            top2 = torch.stack([top2[:, 0].clamp(max=t), top2[:, 1].clamp(min=1 - t)], dim=1)
        with torch.no_grad():
            xi = _normal_ppf(top2[:, 0]) - _normal_ppf(top2[:, 1])
            active = (index[:, 0] == y) & torch.isfinite(xi) & (xi < gamma)
        # select before Phi^-1 so no infinite value enters the backward pass
        p_a, p_b = top2[active, 0], top2[active, 1]
        hinge = gamma - (_normal_ppf(p_a) - _normal_ppf(p_b))
        robustness = sigma / 2 * hinge.sum()
        return (classification + self.current_lbd * robustness) / x.shape[0], log_g.detach()


class SmoothAdv(Objective):
    """SmoothAdv (Salman et al. 2019; seed 001, "adversarial training for smoothed classifier").

    PGD finds ``x' = argmax_{||x' - x||_2 <= epsilon, x' in [0,1]^d} -log(1/m sum_i softmax(f(x' + sigma w_i))_y)``
    (the cross-entropy of the soft smoothed classifier estimated with ``m`` draws); ``steps`` steps of size
    ``2 epsilon / steps`` along the normalized gradient, each followed by projection onto the box and the
    ball. Then the loss is ``1/m sum_i CE(f(x' + sigma w_i), y)`` with the *same* draws (Salman et al.'s
    multi-noise training). The attack runs with the model in eval mode and does not touch parameter
    gradients.

    ``epsilon`` warms up linearly over the first ``warmup`` epochs: ``min(epsilon, (epoch + 1) epsilon /
    warmup)``. Defaults ``epsilon = 1.0``, ``steps = 10``, ``m = 4``, ``warmup = 10`` (CIFAR-10 settings; on
    MNIST with few epochs, a smaller epsilon such as 0.5 and ``warmup`` of 1-2 epochs trains faster).
    Scores: ``log`` of the mean softmax at ``x'``.
    """

    name = "smoothadv"
    settings_type = SmoothAdvSettings

    def __init__(self, settings: SmoothAdvSettings | None = None, /, **hyperparameters: Any):
        super().__init__(settings, **hyperparameters)
        self.current_epsilon = self.settings.epsilon

    def start_epoch(self, epoch: int) -> None:
        epsilon = self.settings.epsilon
        self.current_epsilon = min(epsilon, (epoch + 1) * epsilon / self.settings.warmup)

    def attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, sigma: float, w: torch.Tensor,
               epsilon: float, generator: torch.Generator | None = None) -> torch.Tensor:
        """PGD in the l2 ball of radius ``epsilon`` (and the box [0, 1]) against the soft smoothed classifier."""
        if epsilon == 0:
            return x.detach()
        was_training = model.training
        model.eval()
        steps = self.settings.steps
        step = 2 * epsilon / steps
        x = x.detach()
        view = (-1,) + (1,) * (x.ndim - 1)
        delta = torch.zeros_like(x)
        try:
            for _ in range(steps):
                delta.requires_grad_(True)
                probs = F.softmax(noisy_logits(model, x + delta, w, sigma), dim=-1).mean(dim=1)
                loss = F.nll_loss(torch.log(probs.clamp_min(1e-20)), y, reduction="sum")
                (grad,) = torch.autograd.grad(loss, delta)
                with torch.no_grad():
                    norms = grad.flatten(1).norm(dim=1)
                    zero = norms == 0
                    if bool(zero.any()):
                        # Salman et al.: a random direction where the gradient vanishes
                        grad[zero] = torch.randn(grad[zero].shape, generator=generator, device=x.device)
                        norms = grad.flatten(1).norm(dim=1)
                    delta = delta.detach() + step * grad / norms.view(view)
                    delta = (x + delta).clamp_(0, 1) - x
                    norms = delta.flatten(1).norm(dim=1)
                    delta = delta * (epsilon / norms.clamp_min(epsilon)).view(view)
        finally:
            model.train(was_training)
        return (x + delta).detach()

    def loss(self, model, x, y, sigma, *, generator=None, noise=None):
        w = self._noise(x, generator, noise)
        x_adv = self.attack(model, x, y, sigma, w, self.current_epsilon, generator)
        logits = noisy_logits(model, x_adv, w, sigma)
        b, m, k = logits.shape
        loss = F.cross_entropy(logits.reshape(b * m, k), y.repeat_interleave(m))
        scores = torch.log(F.softmax(logits.detach(), dim=-1).mean(dim=1).clamp_min(1e-20))
        return loss, scores


OBJECTIVES: dict[str, type[Objective]] = {
    cls.name: cls for cls in (GaussianAugmentation, Consistency, GeneralizedConsistency, Macer, SmoothAdv, SmoothMix,
                              CATRS)
}


def make_objective(name: str | Objective, **hyperparameters: Any) -> Objective:
    """The objective called ``name`` with the given hyperparameters (``None`` values mean the default).

    Raises ``ValueError`` for an unknown name (listing the known ones), a hyperparameter the objective does not
    take (listing those it takes) or a bad value.
    """
    if isinstance(name, Objective):
        if any(v is not None for v in hyperparameters.values()):
            raise ValueError("give hyperparameters either to the objective's constructor or by name, not both")
        return name
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; choose one of: {', '.join(OBJECTIVES)}")
    cls = OBJECTIVES[name]
    given = {k: v for k, v in hyperparameters.items() if v is not None}
    allowed = list(cls.settings_type.field_names())
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise ValueError(f"objective {name!r} takes no hyperparameter {', '.join(unknown)}; "
                         f"it takes: {', '.join(allowed)}")
    return cls(cls.settings_type(**given))
