"""Data-dependent isotropic smoothing, DDS (Alfarra et al.; seed 000 section 3.2, eq. 3.6-3.7).

Per input, the noise level ``sigma_x`` maximizes the reparameterized certified radius

    R(sigma) = sigma * gap(E_w[softmax f(x + sigma w)]),   w ~ N(0, I)   (eq. 3.7),

by gradient ascent from ``sigma_0 = --sigma`` (learning rate 0.04, up to 900 steps, 100 samples per step;
seed 000 / public code; each step taken in log sigma within a trust region, :func:`optimize_dds`), with ``gap = Phi^-1(p_A)`` of the class ``c_A`` on top at ``sigma_0`` (or the
published ``(Phi^-1(p_A) - Phi^-1(p_B)) / 2``, ``--opt-gap top2``). The smoothed classifier then uses
``N(0, sigma_x^2 I)`` and is certified like Cohen's on fresh samples; memory-based certification makes the
per-input choice sound across inputs (:mod:`.datadependent`). ``--norm l1`` runs the same ascent for the
half-width ``lambda`` of uniform noise ``U[-lambda, lambda]^d`` (start ``sqrt(3) sigma``) with the l1 gap
``2 p_A - 1``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from smoothcert.noise.gaussian import IsotropicGaussian
from smoothcert.noise.uniform import UniformDiagonal
from smoothcert.methods.base import RunContext
from smoothcert.methods.datadependent import Choice, DataDependentMethod, DataDependentSettings
from smoothcert.methods.optimize import fallback_reason, optimize_dds

__all__ = ["optimize_dds", "DDS"]


class DDS(DataDependentMethod):
    """``--method dds``: per-input isotropic sigma (seed 000 eq. 3.7), certified with memory."""

    name = "dds"
    settings_type = DataDependentSettings

    def choose(self, ctx: RunContext, x: torch.Tensor, indices: Sequence[int]) -> list[Choice]:
        result = self.dds_stage(ctx, x, indices)
        choices = []
        for i, scale in enumerate(result.params.tolist()):
            if fallback_reason(i, result):
                choices.append(Choice(self.base_noise(), {}, fallback_reason(i, result)))
                continue
            if self.family == "uniform":
                noise = UniformDiagonal.isotropic(scale)
            else:
                noise = IsotropicGaussian(scale)
            choices.append(Choice(noise, {"scale_iso": scale}))
        return choices
