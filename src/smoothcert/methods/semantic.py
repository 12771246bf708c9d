"""Certificates against cyclic integer translations (``--method translation``), radius in pixels.

Two modes (``--translation-mode``):

- ``smooth`` (default): the smoothed classifier ``g(x) = argmax_c P_k(f(roll(x, k)) = c)`` with ``k`` a discrete
  Gaussian over integer shifts (:class:`~smoothcert.noise.transformations.DiscreteGaussianShift`). CERTIFY as
  Cohen et al. (``n0`` selection, ``n`` fresh estimation samples, one-sided Clopper-Pearson at ``alpha``), then the
  exact discrete Neyman-Pearson worst case per shift (seed 001, "Semantic perturbations", Theorem 4.2 for
  composable transformations, here with the exact discrete bound instead of the Gaussian one). Guarantee: with
  probability at least ``1 - alpha``, ``g(roll(x, t))`` is the reported class for every integer shift ``t`` with
  ``||t||_2 <= radius`` (pixels; ``radius <= max_shift``).
- ``enumerate``: a deterministic certificate of the base classifier itself: ``f(roll(x, t))`` is evaluated at every
  integer shift with ``||t||_2 <= max_shift``; the radius is the largest norm up to which all agree with
  ``f(x)`` (no randomness: ``p_lower`` 1, ``n`` the number of shifts evaluated).

The shifts are cyclic (``torch.roll``: what leaves one side enters on the other); the certificate says nothing
about shifts with zero padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from smoothcert.engine.smooth import Certificate, certify, dtype_name
from smoothcert.geometry.regions import Ball
from smoothcert.methods.base import CertifyMethod, RunContext
from smoothcert.methods.records import MethodRecord
from smoothcert.noise.transformations import DiscreteGaussianShift, Transformed, cyclic_shift, shift_lattice
from smoothcert.settings import Settings, choice, integer, number

__all__ = ["TranslationSettings", "Translation", "check_image", "enumerate_shifts"]


@dataclass(frozen=True)
class TranslationSettings(Settings):
    """Cyclic integer translations: the shift noise, the largest shift considered and the mode."""

    shift_sigma: float = number(2.0, help="translation: standard deviation of the discrete Gaussian over integer "
                                          "shifts, in pixels", low=0.0, low_open=True)
    max_shift: int = integer(8, help="translation: largest shift norm certified, in pixels (below the image "
                                     "size)", low=1)
    translation_mode: str = choice("smooth", ("smooth", "enumerate"),
                                   help="translation: smooth (randomized, discrete Gaussian over shifts) or "
                                        "enumerate (deterministic: every shift of the base classifier)")


def check_image(shape: tuple[int, ...], largest: int, what: str) -> None:
    """A ValueError unless ``shape`` is an image's ``(C, H, W)`` with ``largest < min(H, W)``."""
    if len(shape) != 3:
        raise ValueError(f"{what} acts on images (C, H, W), got inputs of shape {tuple(shape)}")
    size = min(int(shape[1]), int(shape[2]))
    if largest >= size:
        raise ValueError(f"max_shift (--max-shift) = {largest} pixels is not smaller than the image "
                         f"({shape[1]}x{shape[2]}): give a shift below {size}")


def enumerate_shifts(model, x: torch.Tensor, shifts: np.ndarray, batch_size: int, dtype) -> np.ndarray:
    """``argmax f(roll(x, t))`` for each shift row (int64 array); ``x`` is one image (C, H, W)."""
    out = []
    t = torch.as_tensor(shifts, dtype=torch.int64)
    with torch.inference_mode(), torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
        for s in range(0, len(t), batch_size):
            out.append(model(cyclic_shift(x, t[s:s + batch_size])).argmax(dim=1))  # on the device until the end
    return torch.cat(out).cpu().numpy() if out else np.zeros(0, dtype=np.int64)


class Translation(CertifyMethod):
    """``--method translation``: certified radius in pixels against cyclic integer shifts (see the module)."""

    name = "translation"
    columns = ("shift_sigma", "max_shift", "translation_mode", "radius_unit")
    settings_type = TranslationSettings
    samples_only = True

    def __init__(self, settings: TranslationSettings | float | None = None, /, **keywords):
        super().__init__(settings, **keywords)
        self.noise = DiscreteGaussianShift(self.settings.shift_sigma, self.settings.max_shift)

    def _fields(self) -> dict:
        s = self.settings
        return {"shift_sigma": s.shift_sigma, "max_shift": s.max_shift, "translation_mode": s.translation_mode,
                "radius_unit": "pixels"}

    def check_input_shape(self, shape: tuple[int, ...]) -> None:
        check_image(tuple(shape), self.settings.max_shift, "--method translation")

    def certify(self, ctx: RunContext, x, labels, indices) -> list[MethodRecord]:
        self.check_input_shape(tuple(x.shape[1:]))
        if self.settings.translation_mode == "enumerate":
            return [self._enumerate(ctx, x[i]) for i in range(x.shape[0])]
        records = []
        zero = torch.zeros((1, 2), device=x.device)
        for i, gens in enumerate(ctx.certify_generators(indices)):
            h = Transformed(ctx.model, x[i], cyclic_shift)
            (cert,) = certify(h, zero, self.noise, ctx.num_classes, ctx.n0, ctx.n, ctx.alpha,
                              batch_size=ctx.batch_size, block=ctx.block, generators=[gens], dtype=ctx.dtype,
                              seed=ctx.seed, range_policy="ignore")
            records.append(MethodRecord(self.name, cert, cert.region, self._fields()))
        return records

    def _enumerate(self, ctx: RunContext, x: torch.Tensor) -> MethodRecord:
        shifts = np.concatenate([np.zeros((1, 2), dtype=np.int64), shift_lattice(self.settings.max_shift)])
        pred = enumerate_shifts(ctx.model, x, shifts, ctx.batch_size, ctx.dtype)
        norms = np.sqrt((shifts**2).sum(1))
        wrong = norms[pred != pred[0]]
        radius = float(norms[-1]) if wrong.size == 0 else float(norms[norms < wrong.min() - 1e-9].max())
        zero = torch.zeros(2, dtype=torch.float64)
        cert = Certificate(int(pred[0]), 1.0, np.bincount(pred, minlength=ctx.num_classes), float("nan"),
                           Ball(zero, radius), radius, radius, 0, len(shifts), 0.0, dtype_name(ctx.dtype),
                           self.noise, ctx.seed)
        return MethodRecord(self.name, cert, cert.region, self._fields())
