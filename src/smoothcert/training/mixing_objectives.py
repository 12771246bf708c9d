"""SmoothMix and CAT-RS: two objectives that train on adversarially moved noisy inputs, for the one training loop.

- ``smoothmix``: SmoothMix (Jeong, Park, Kim, Lee and Shin, "SmoothMix: Training Confidence-calibrated Smoothed
  Classifiers for Certified Robustness", NeurIPS 2021; public code ``jh-jeong/smoothmix``, ``code/train.py``).
- ``cat-rs``: CAT-RS (Jeong, Kim and Shin, "Confidence-aware Training of Smoothed Classifiers for Certified
  Robustness", NeurIPS 2023 / AAAI 2023; public code ``alinlab/smoothing-catrs``, ``code/train_catrs.py``).

Both follow the public code line by line except where said, with the noise ``sigma * w`` drawn as every objective
here draws it (:mod:`smoothcert.training.objective_base`) and their other random draws (SmoothMix's mixing
weights, CAT-RS's binomial count) taken from the same generator after the noise, so a loss with ``noise=`` and
a seeded ``generator`` is deterministic. The public code splits each loader batch into ``m`` mini-batches of
``B / m`` inputs (one optimizer step each); here each batch is one step with ``m`` copies of every input, as
the other objectives do. Attacks run with the model in eval mode and leave parameter gradients alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from smoothcert.settings import Settings, choice, integer, number, text
from smoothcert.training.objective_base import Objective, copies_setting, noisy_logits, standard_noise

__all__ = ["SmoothMix", "SmoothMixSettings", "CATRS", "CATRSSettings"]


@dataclass(frozen=True)
class SmoothMixSettings(Settings):
    """SmoothMix (the public MNIST defaults: m = 4, step 1.0, eta 5.0; T = 2 / 4 / 8 steps at sigma 0.25 / 0.5 / 1)."""

    m: int = copies_setting(4)
    steps: int = integer(4, low=1, help="PGD steps", flag="--pgd-steps")
    step_size: float = number(1.0, low=0.0, low_open=True, help="l2 length of each SmoothMix attack step (alpha)",
                              flag="--smoothmix-step-size")
    eta: float = number(5.0, low=0.0, help="weight of the SmoothMix mixup loss")
    warmup: int = integer(10, low=1, help="epochs of linear eta warm-up (SmoothMix)")


@dataclass(frozen=True)
class CATRSSettings(Settings):
    """CAT-RS (the public defaults: m = 4, epsilon 1.0 = 256/256, 4 steps, lbd 1.0; lbd 0.5 / 1 / 2 at sigma 0.25 /
    0.5 / 1 on CIFAR; the KL target from a Gaussian-trained teacher)."""

    m: int = copies_setting(4)
    epsilon: float = number(1.0, low=0.0, low_open=True, help="l2 radius of the CAT-RS noise attack",
                            flag="--epsilon")
    steps: int = integer(4, low=1, help="PGD steps", flag="--pgd-steps")
    lbd: float = number(1.0, low=0.0, help="weight of the CAT-RS worst-noise term L^high")
    teacher: str | None = text(None, optional=True, flag="--catrs-teacher",
                               help="checkpoint of a Gaussian-trained model whose smoothed prediction (class "
                                    "frequencies under noise) is the CAT-RS KL target q, as in the public code; "
                                    "default: the one-hot label")
    teacher_samples: int = integer(32, low=1, flag="--teacher-samples",
                                   help="noisy copies per input, each step, from which the teacher's class "
                                        "frequencies q are counted (CAT-RS)")
    confidence: str = choice("model", ("model", "teacher"), flag="--catrs-confidence",
                             help="whose accuracy under noise c sets K ~ Binomial(m, c) in CAT-RS: the model being "
                                  "trained (public default) or the teacher's q_y (the public --confidence_mask, "
                                  "which avoids the cold start of a model trained from scratch)")


def _normalized(grad: torch.Tensor) -> torch.Tensor:
    """``grad / (||grad||_2 + 1e-8)`` per row of the leading dimension (the public code's step direction)."""
    norms = grad.flatten(1).norm(dim=1)
    return grad / (norms + 1e-8).view((-1,) + (1,) * (grad.ndim - 1))


class _EvalMode:
    """The model in eval mode for an attack, restored afterwards."""

    def __init__(self, model: nn.Module):
        self.model, self.was = model, model.training

    def __enter__(self):
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was)


class SmoothMix(Objective):
    """SmoothMix (Jeong et al. 2021): Gaussian augmentation plus a mixup between each input and an adversary of
    the soft smoothed classifier, with a label mixed towards the uniform distribution.

    With ``delta_i = sigma w_i`` (``i = 1..m``) and ``F_hat(z) = 1/m sum_i softmax(f(z + delta_i))``:

    1. the adversary: ``x^0 = x``, ``x^{t+1} = clip_[0,1](x^t + alpha g / (||g||_2 + 1e-8))`` with
       ``g = grad_z -log F_hat(z)_y`` at ``x^t``, ``T = steps`` times (unbounded; ``mix_step = 0``, no radius);
    2. ``lam ~ U[0, 1/2]`` per input, ``x_mix = (1 - lam) x + lam x^T``, ``y_mix = (1 - lam) F_hat(x) + lam / K``;
    3. ``L = 1/(Bm) sum_{b,i} CE(f(x + delta_i), y) + eta_e 1/(Bm) sum_{b,i} 1[argmax F_hat(x) = y]
       KL(y_mix || softmax(f(x_mix + delta_i)))`` with ``eta_e = eta * min(1, (epoch + 1) / warmup)``.

    As in the public code the target ``y_mix`` keeps its gradient (through ``F_hat(x)``). Defaults: ``m = 4``,
    ``steps = 4``, ``step_size = 1.0``, ``eta = 5.0``, ``warmup = 10`` (the public MNIST settings use
    ``T = 2`` at sigma 0.25, 4 at 0.5, 8 at 1.0; eta 1 or 5). Scores: ``log F_hat(x)``.
    """

    name = "smoothmix"
    settings_type = SmoothMixSettings

    def __init__(self, settings: SmoothMixSettings | None = None, /, **hyperparameters: Any):
        super().__init__(settings, **hyperparameters)
        self.current_eta = self.settings.eta / self.settings.warmup

    def start_epoch(self, epoch: int) -> None:
        self.current_eta = self.settings.eta * min(1.0, (epoch + 1) / self.settings.warmup)

    def attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, sigma: float, w: torch.Tensor
               ) -> torch.Tensor:
        """The SmoothMix adversary ``x^T`` (step 1 above)."""
        adv = x.detach()
        with _EvalMode(model):
            for _ in range(self.settings.steps):
                adv = adv.detach().requires_grad_(True)
                probs = F.softmax(noisy_logits(model, adv, w, sigma), dim=-1).mean(dim=1)
                loss = F.nll_loss(torch.log(probs.clamp_min(1e-20)), y, reduction="sum")
                (grad,) = torch.autograd.grad(loss, adv)
                adv = (adv.detach() + self.settings.step_size * _normalized(grad)).clamp(0, 1)
        return adv.detach()

    def loss(self, model, x, y, sigma, *, generator=None, noise=None):
        w = self._noise(x, generator, noise)
        adv = self.attack(model, x, y, sigma, w)
        logits = noisy_logits(model, x, w, sigma)
        b, m, k = logits.shape
        clean = F.softmax(logits, dim=-1).mean(dim=1)
        ce = F.cross_entropy(logits.reshape(b * m, k), y.repeat_interleave(m))
        lam = torch.rand(b, generator=generator, device=x.device).to(x.dtype) / 2
        view = (-1,) + (1,) * (x.ndim - 1)
        mixed = (1 - lam).view(view) * x + lam.view(view) * adv
        target = (1 - lam)[:, None] * clean + lam[:, None] / k
        log_mixed = F.log_softmax(noisy_logits(model, mixed, w, sigma), dim=-1)       # (B, m, K)
        kl = F.kl_div(log_mixed, target.unsqueeze(1).expand_as(log_mixed), reduction="none").sum(-1)
        correct = (clean.detach().argmax(dim=1) == y).to(kl.dtype)
        mixup = (correct[:, None] * kl).mean()
        return ce + self.current_eta * mixup, torch.log(clean.detach().clamp_min(1e-20))


class CATRS(Objective):
    """CAT-RS (Jeong et al. 2023): a sample-wise, confidence-aware mix of two losses on the noisy copies.

    With ``delta_i = sigma w_i`` (``i = 1..m``) and a target distribution ``q`` over the classes for each input:

    - ``L^low``: the confidence of ``x`` is ``c = 1/m #{i : argmax f(x + delta_i) = y}`` (``confidence =
      "teacher"``: ``c = q_y``, the public ``--confidence_mask``); ``K ~ Binomial(m, c)``, at least 1;
      ``L^low = 1/m`` times the sum of the ``K`` smallest of ``CE(f(x + delta_i), y)`` (the ``m - K`` hardest
      noisy copies are dropped: low-confidence inputs are not forced onto every copy);
    - ``L^high``, only where ``K = m``: ``max_i KL(q || softmax(f(x + delta_i*)))``, the worst of ``m`` noise
      vectors moved adversarially: ``steps`` ascent steps of length ``2 epsilon / steps`` along the normalized
      gradient of ``1/m sum_i KL(q || softmax(f(x + delta_i)))``, each followed by projection onto the l2 ball of
      radius ``epsilon`` around ``delta_i`` and by the re-standardization ``delta <- mu_0 + (delta - mu) / rms *
      rms_0`` (mean and root mean square over the coordinates of each noise vector; ``_0`` at the start), which
      keeps ``delta_i*`` a plausible Gaussian draw;
    - ``L = mean_x [L^low + lbd * 1[K = m] * L^high]``.

    The target ``q``: as in the public code, the smoothed prediction of a separately trained Gaussian model
    (``teacher``, a checkpoint): ``q_k = 1/N #{j : argmax teacher(x + sigma v_j) = k}`` with ``N =
    teacher_samples`` Gaussian draws ``v_j``. The public code counts ``q`` once per training input with ``N =
    10,000`` (``smooth_prediction.py``); here it is counted afresh at each step from ``N`` new draws, an unbiased
    estimate of the same frequencies (the KL's gradient is linear in ``q``). Without a teacher ``q`` is the one-hot
    label ``y``, for which the KL is the cross-entropy ``-log softmax(f(x + delta_i*))_y``. Random draws after the
    noise, from the same generator: the ``m`` uniforms ``u`` with ``K = #{j : u_j < c}``, then the teacher's
    ``(B, N)`` draws. Defaults (public code): ``m = 4``, ``epsilon = 1.0``, ``steps = 4``, ``lbd = 1.0`` (0.5 / 1 /
    2 at sigma 0.25 / 0.5 / 1 on CIFAR-100). The public runs train from scratch for 150 epochs; from scratch ``c``
    starts near ``1 / K`` so ``K = 1`` and only ``1/m`` of the easiest copy's loss trains the model (the cold start
    that ``--confidence_mask`` or a warm start, ``smoothcert train --init``, avoids). Scores: ``log`` of the mean
    softmax of the noisy copies.
    """

    name = "cat-rs"
    settings_type = CATRSSettings

    def __init__(self, settings: CATRSSettings | None = None, /, **hyperparameters: Any):
        super().__init__(settings, **hyperparameters)
        self.teacher: nn.Module | None = None
        if self.settings.teacher is not None:
            from smoothcert.models.checkpoint import load_checkpoint

            try:
                self.teacher = load_checkpoint(self.settings.teacher)[0].requires_grad_(False)
            except ValueError as err:
                raise ValueError(f"teacher (--catrs-teacher) must be a saved checkpoint, got "
                                 f"{self.settings.teacher!r}: {err}") from err
        if self.settings.confidence == "teacher" and self.teacher is None:
            raise ValueError("confidence (--catrs-confidence) 'teacher' needs a teacher (--catrs-teacher), got none")

    def target(self, x: torch.Tensor, y: torch.Tensor, sigma: float, num_classes: int,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """``q`` (B, K): the teacher's class frequencies over ``teacher_samples`` Gaussian copies, or one-hot ``y``."""
        if self.teacher is None:
            return F.one_hot(y, num_classes).to(x.dtype)
        v = standard_noise(x, self.settings.teacher_samples, generator)
        with torch.no_grad(), _EvalMode(self.teacher.to(x.device)):
            votes = noisy_logits(self.teacher, x, v, sigma).argmax(dim=-1)                # (B, N)
        return F.one_hot(votes, num_classes).to(x.dtype).mean(dim=1)

    def attack(self, model: nn.Module, x: torch.Tensor, q: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """The worst noise vectors ``delta*`` (B, m, *shape) from ``delta`` = ``sigma w`` against the target ``q``
        (B, K) (see the class docstring)."""
        b, m = delta.shape[:2]
        flat0 = delta.detach().reshape(b * m, -1)
        mu0 = flat0.mean(dim=1, keepdim=True)
        rms0 = flat0.square().mean(dim=1, keepdim=True).sqrt()
        epsilon, steps = self.settings.epsilon, self.settings.steps
        step = 2 * epsilon / steps
        current = flat0
        target = q.repeat_interleave(m, dim=0)
        with _EvalMode(model):
            for _ in range(steps):
                current = current.detach().requires_grad_(True)
                noisy = (x.unsqueeze(1) + current.view(delta.shape).to(x.dtype)).reshape(b * m, *x.shape[1:])
                loss = _kl(target, model(noisy)).sum() / m
                (grad,) = torch.autograd.grad(loss, current)
                with torch.no_grad():
                    moved = current + step * _normalized(grad)
                    eta = moved - flat0
                    norms = eta.norm(dim=1, keepdim=True)
                    eta = eta * (epsilon / norms.clamp_min(epsilon))
                    moved = flat0 + eta
                    mu = moved.mean(dim=1, keepdim=True)
                    rms = moved.square().mean(dim=1, keepdim=True).sqrt()
                    current = mu0 + (moved - mu) / rms * rms0
        return current.detach().view(delta.shape)

    def loss(self, model, x, y, sigma, *, generator=None, noise=None):
        w = self._noise(x, generator, noise)
        logits = noisy_logits(model, x, w, sigma)
        b, m, k = logits.shape
        ce = F.cross_entropy(logits.reshape(b * m, k), y.repeat_interleave(m), reduction="none").view(b, m)
        uniforms = torch.rand((b, m), generator=generator, device=x.device).to(ce.dtype)
        q = self.target(x, y, sigma, k, generator)
        if self.settings.confidence == "teacher":
            confidence = q.gather(1, y[:, None])[:, 0].to(ce.dtype)
        else:
            confidence = (logits.detach().argmax(dim=-1) == y[:, None]).to(ce.dtype).mean(dim=1)
        accept = (uniforms < confidence[:, None]).sum(dim=1).clamp(min=1)          # K ~ Binomial(m, c), >= 1
        ranks = torch.arange(m, device=x.device)
        low = (ce.sort(dim=1).values * (ranks[None, :] < accept[:, None]).to(ce.dtype)).sum(dim=1) / m
        full = accept == m
        high = torch.zeros_like(low)
        if self.settings.lbd > 0 and bool(full.any()):
            worst = self.attack(model, x[full], q[full], sigma * w[full].to(x.dtype))
            adv = (x[full].unsqueeze(1) + worst).reshape(-1, *x.shape[1:])
            adv_kl = _kl(q[full].repeat_interleave(m, dim=0), model(adv)).view(-1, m)
            high = high.index_put((full.nonzero()[:, 0],), adv_kl.max(dim=1).values)
        scores = torch.log(F.softmax(logits.detach(), dim=-1).mean(dim=1).clamp_min(1e-20))
        return (low + self.settings.lbd * high).mean(), scores


def _kl(q: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``KL(q || softmax(logits))`` per row, ``0 log 0 = 0`` (one-hot ``q``: the cross-entropy)."""
    return F.kl_div(F.log_softmax(logits, dim=-1), q, reduction="none").sum(dim=-1)
