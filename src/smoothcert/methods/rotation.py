"""Certificates against rotations (``--method rotation``), radius in degrees.

**What is certified.** The attacker rotates the image by ``gamma`` degrees with :func:`~smoothcert.noise.rotation.
rotate` (bilinear interpolation of the image padded with zeros, about the image centre). The smoothed classifier
is ``g(x) = argmax_c P(f(R_beta(x) + eps) = c)``, ``beta ~ N(0, sigma_angle^2)``, ``eps ~ N(0, sigma^2 I)``
(:mod:`smoothcert.noise.rotation`). Guarantee: with probability at least ``1 - alpha`` (the Clopper-Pearson bound
of ``p_A``; every other step is deterministic), ``g(R_gamma(x))`` is the reported class for every real ``gamma``
with ``|gamma| <= radius`` (degrees, at most ``max_angle``).

**Why (Fischer, Baader and Vechev, NeurIPS 2020, section 5, derived here for a deterministic error bound).**
``R_beta(R_gamma x) = R_{beta + gamma}(x) + e(beta, gamma)``: the interpolation error ``e``. With ``h(b, z) =
f(R_b(x) + z)``, ``g(R_gamma x)`` smooths ``h`` at the moved point ``(beta + gamma, eps + e(beta, gamma))``. If
``||e(beta, gamma)||_2 <= E`` for all ``|beta| <= T sigma_angle``, then conditioning on ``beta`` and applying
Cohen's bound to each slice over ``eps`` (shift at most ``E``), and then the two-dimensional Neyman-Pearson bound
to the resulting threshold set in ``(beta / sigma_angle, w)`` space, gives

    P(h at the moved point = c_A) >= Phi(Phi^-1(p_A) - sqrt((gamma / sigma_angle)^2 + (E / sigma)^2)) - tau,

``tau = 2 Phi(-T)`` the probability of ``|beta| > T sigma_angle`` (where no bound of ``e`` is used). The class is
certified at ``gamma`` when this exceeds 1/2.

**The bound E** (:func:`interpolation_bounds`), for each cell ``[j h, (j + 1) h]`` of the angle grid (``h =
max_angle / angle_cells``; both signs): ``||e||`` is computed at the corners ``(beta_k, gamma_j)`` of a grid of
``beta`` steps ``beta_step`` over ``[-T sigma_angle, T sigma_angle]``, plus a Lipschitz bound between them. The
bilinear interpolant of a zero-padded image with largest neighbour difference ``D`` is ``sqrt(2) D``-Lipschitz
in the sampling point, and pixel ``p`` moves ``|p - c| pi / 180`` pixels per degree, so ``||R_a y - R_b y||_2 <=
sqrt(2) D(y) rho |a - b|``, ``rho = pi / 180 sqrt(sum_p |p - c|^2)``; ``D(R_gamma x) <= max(sqrt(2) D(x),
max |x|)``; and ``||R_b||_2 <= sqrt(max column sum)`` (rows sum to at most 1). A small allowance covers float32
rounding of the rotations.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import norm

from smoothcert.engine.smooth import certify
from smoothcert.methods.base import CertifyMethod, RunContext, sigma_setting
from smoothcert.methods.records import MethodRecord
from smoothcert.noise.rotation import AngleAndPixelGaussian, radii_from_centre, rotate, rotated_plus_noise
from smoothcert.noise.transformations import Transformed
from smoothcert.settings import Settings, integer, number

__all__ = ["RotationSettings", "Rotation", "interpolation_bounds", "angle_radius", "neighbour_difference"]

_FLOAT_ALLOWANCE = 1e-4  # per sqrt(pixel): float32 rounding of rotations and norms is far below this


@dataclass(frozen=True)
class RotationSettings(Settings):
    """Rotation smoothing: pixel noise (``--sigma``), angle noise, the certified range and its grids."""

    sigma: float = sigma_setting()
    angle_sigma: float = number(10.0, help="rotation: standard deviation of the angle noise, in degrees",
                                low=0.0, low_open=True)
    max_angle: float = number(10.0, help="rotation: largest angle certified, in degrees, in (0, 180]",
                              low=0.0, high=180.0, low_open=True)
    angle_cells: int = integer(10, help="rotation: cells of the angle grid on each side of 0 (each cell gets "
                                        "its own interpolation-error bound)", low=1)
    beta_step: float = number(0.05, help="rotation: step of the grid of noise angles on which the interpolation "
                                         "error is evaluated, in degrees", low=0.0, low_open=True)
    angle_tail: float = number(4.0, help="rotation: the error is bounded for noise angles within this many "
                                         "angle sigmas; the rest (2 Phi(-T)) is subtracted from p_A", low=1.0,
                               high=10.0)


def neighbour_difference(x: torch.Tensor) -> float:
    """Largest absolute difference of 4-neighbours in ``x`` (C, H, W) padded with zeros (any channel)."""
    padded = torch.nn.functional.pad(x.double(), (1, 1, 1, 1))
    dv = (padded[:, 1:, :] - padded[:, :-1, :]).abs().max()
    dh = (padded[:, :, 1:] - padded[:, :, :-1]).abs().max()
    return float(torch.maximum(dv, dh))


def _operator_norm(betas: torch.Tensor, shape) -> float:
    """``max_b ||R_b||_2`` over ``betas``, from ``||R z||^2 <= max column sum ||z||^2`` (rows sum to <= 1, Jensen)."""
    worst = 1.0
    for chunk in betas.split(512):
        z = torch.zeros((len(chunk), *shape), dtype=torch.float32, requires_grad=True)
        rotate(z, chunk).sum().backward()  # z.grad[i] = the column sums of R_{chunk[i]}
        worst = max(worst, float(z.grad.max()))
    return math.sqrt(worst) * (1 + 1e-5)


def interpolation_bounds(x: torch.Tensor, settings: RotationSettings) -> np.ndarray:
    """``E[s, j]``: a bound of ``||e(beta, gamma)||_2`` for ``|beta| <= T sigma_angle`` and ``gamma`` in cell ``j`` of
    side ``s`` (0: positive angles, 1: negative), float64 ``(2, angle_cells)`` (see the module)."""
    c, h, w = x.shape
    cell = settings.max_angle / settings.angle_cells
    limit = settings.angle_tail * settings.angle_sigma
    steps = max(1, math.ceil(2 * limit / settings.beta_step))
    step = 2 * limit / steps
    betas = torch.linspace(-limit, limit - step, steps, dtype=torch.float64).float()  # cell corners
    d_x = neighbour_difference(x)
    d_y = max(math.sqrt(2) * d_x, float(x.abs().max()))
    rho = math.pi / 180 * math.sqrt(float((radii_from_centre(h, w) ** 2).sum()) * c)
    op = _operator_norm(betas, (c, h, w)) if d_x > 0 else 1.0
    slack = math.sqrt(2) * rho * ((d_y + d_x) * step + (op + 1) * d_x * cell)
    slack += _FLOAT_ALLOWANCE * math.sqrt(x.numel()) * (1 + float(x.abs().max()))
    out = np.zeros((2, settings.angle_cells))
    with torch.no_grad():
        for s, sign in enumerate((1.0, -1.0)):
            for j in range(settings.angle_cells):
                gamma = sign * j * cell
                y = rotate(x, torch.tensor([gamma]))[0]
                worst = 0.0
                for chunk in betas.split(2048):
                    e = rotate(y, chunk) - rotate(x, chunk + gamma)
                    worst = max(worst, float(e.double().flatten(1).norm(dim=1).max()))
                out[s, j] = worst + slack
    return out


def angle_radius(gap: float, bounds: np.ndarray, settings: RotationSettings) -> float:
    """The certified angle (degrees) for ``gap = Phi^-1(p_A)``: on each side the end of the last cell of a run of
    passing cells from 0 (each checked at its outer end ``(j + 1) h``); the smaller side."""
    cell = settings.max_angle / settings.angle_cells
    tau = 2 * norm.cdf(-settings.angle_tail)
    need = float(norm.ppf(0.5 + tau))
    radius = math.inf
    for side in bounds:
        reach = 0.0
        for j, e in enumerate(side):
            move = math.hypot((j + 1) * cell / settings.angle_sigma, e / settings.sigma)
            if not gap - move > need + 1e-12:
                break
            reach = (j + 1) * cell
        radius = min(radius, reach)
    return float(radius)


class Rotation(CertifyMethod):
    """``--method rotation``: certified radius in degrees against bilinear rotations with zero padding."""

    name = "rotation"
    columns = ("sigma", "angle_sigma", "max_angle", "max_error", "radius_unit")
    settings_type = RotationSettings
    samples_only = True

    def __init__(self, settings: RotationSettings | float | None = None, /, **keywords):
        super().__init__(settings, **keywords)
        s = self.settings
        self.noise = AngleAndPixelGaussian(s.angle_sigma, s.sigma)

    def check_input_shape(self, shape: tuple[int, ...]) -> None:
        if len(shape) != 3 or min(shape[1:]) < 2:
            raise ValueError(f"--method rotation acts on images (C, H, W) of at least 2x2 pixels, got inputs of "
                             f"shape {tuple(shape)}")

    def certify(self, ctx: RunContext, x, labels, indices) -> list[MethodRecord]:
        self.check_input_shape(tuple(x.shape[1:]))
        s, records = self.settings, []
        for i, gens in enumerate(ctx.certify_generators(indices)):
            h = Transformed(ctx.model, x[i], rotated_plus_noise)
            zero = torch.zeros((1, 1 + x[i].numel()), device=x.device)
            (cert,) = certify(h, zero, self.noise, ctx.num_classes, ctx.n0, ctx.n, ctx.alpha,
                              batch_size=ctx.batch_size, block=ctx.block, generators=[gens], dtype=ctx.dtype,
                              seed=ctx.seed, range_policy="ignore")
            max_error = float("nan")
            if not cert.abstained:
                bounds = interpolation_bounds(x[i].detach().cpu(), s)
                radius = angle_radius(cert.gap, bounds, s)
                max_error = float(bounds.max())
                cert = dataclasses.replace(cert, radius=radius, radius_proxy=radius, region=None)
            fields = {"sigma": s.sigma, "angle_sigma": s.angle_sigma, "max_angle": s.max_angle,
                      "max_error": max_error, "radius_unit": "degrees"}
            records.append(MethodRecord(self.name, cert, None, fields))
        return records
