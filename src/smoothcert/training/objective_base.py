"""The base of every training objective: the ``Objective`` interface, its noise draws and the batched noisy pass.

An objective turns a batch ``(x, y)`` of clean inputs (pixels in [0, 1]) into a loss that the training loop
minimizes, and a score per input whose argmax is the objective's own prediction. Noise is always added in the
model's input space, ``x + sigma * w`` with ``w ~ N(0, I)`` of shape ``(B, m, *input_shape)``, drawn as
``torch.randn((B, m, *shape), generator=generator)`` on the input's device or passed in (``noise=``), which makes
every loss a deterministic function of its inputs. The objectives themselves live in
:mod:`smoothcert.training.objectives` (registry, Gaussian, consistency, MACER, SmoothAdv) and
:mod:`smoothcert.training.mixing_objectives` (SmoothMix, CAT-RS).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import nn

from smoothcert.settings import Settings, integer

__all__ = ["Objective", "standard_noise", "noisy_logits", "copies_setting"]


def standard_noise(x: torch.Tensor, m: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``m`` standard-normal draws per input: ``(B, m, *shape)`` on ``x``'s device, float32."""
    return torch.randn((x.shape[0], m, *x.shape[1:]), generator=generator, device=x.device, dtype=torch.float32)


def noisy_logits(model: nn.Module, x: torch.Tensor, w: torch.Tensor, sigma: float) -> torch.Tensor:
    """Logits of ``f(x_i + sigma w_ij)`` as ``(B, m, K)``: one forward pass over all ``B * m`` noisy copies."""
    b, m = w.shape[:2]
    noisy = (x.unsqueeze(1) + sigma * w.to(x.dtype)).reshape(b * m, *x.shape[1:])
    logits = model(noisy)
    return logits.view(b, m, -1)


def copies_setting(default: int) -> Any:
    """Noisy copies per input (``m``, MACER's ``k``): one ``--num-noise`` option for every objective."""
    return integer(default, low=1, help="noisy copies per input", flag="--num-noise")


class Objective(ABC):
    """A training objective: ``loss(model, x, y, sigma) -> (loss, scores)``.

    ``loss`` is a scalar to minimize (mean over the batch); ``scores`` is ``(B, K)``, one row per clean input,
    whose argmax is the objective's prediction (for the training accuracy). ``config()`` gives the name and
    hyperparameters (saved with every checkpoint); :meth:`start_epoch` lets an objective follow the epoch
    (SmoothAdv's epsilon warm-up).
    """

    name: ClassVar[str]
    settings_type: ClassVar[type[Settings]]

    def __init__(self, settings: Settings | None = None, /, **hyperparameters: Any):
        """From the objective's settings, or from its hyperparameters by name (defaults for those not given)."""
        if settings is None:
            settings = self.settings_type(**hyperparameters)
        elif hyperparameters or type(settings) is not self.settings_type:
            raise TypeError(f"{type(self).__name__} is built from {self.settings_type.__name__} or from keywords")
        self.settings = settings

    @property
    def num_noise(self) -> int:
        """Standard-normal draws per input that :meth:`loss` consumes (the second dimension of ``noise``)."""
        return self.settings.m

    @abstractmethod
    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, sigma: float, *,
             generator: torch.Generator | None = None,
             noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss on ``x + sigma * w``; ``noise`` (``(B, num_noise, *shape)`` standard normal) overrides the
        draws from ``generator``."""

    def hyperparameters(self) -> dict[str, Any]:
        return self.settings.to_dict()

    def config(self) -> dict[str, Any]:
        return {"objective": self.name, **self.hyperparameters()}

    def start_epoch(self, epoch: int) -> None:
        """Called by the training loop before epoch ``epoch`` (0-based)."""

    def _noise(self, x: torch.Tensor, generator, noise) -> torch.Tensor:
        if noise is None:
            return standard_noise(x, self.num_noise, generator)
        expected = (x.shape[0], self.num_noise, *x.shape[1:])
        if tuple(noise.shape) != expected:
            raise ValueError(f"noise must have shape {expected} (B, num_noise, *input_shape), got {tuple(noise.shape)}")
        return noise.to(device=x.device, dtype=torch.float32)

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.hyperparameters().items())
        return f"{type(self).__name__}({params})"
