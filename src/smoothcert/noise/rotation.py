"""Rotation with bilinear interpolation and zero padding, and the joint angle-and-pixel Gaussian that smooths it.

**The rotation** :func:`rotate` (``R_a``, ``a`` in degrees about the image centre ``((H - 1) / 2, (W - 1) / 2)``,
clockwise on the screen for ``a > 0`` with rows counted downwards: ``R_90 = torch.rot90(x, -1, (1, 2))``): output pixel ``p`` takes the value at ``c + Rot(-a)(p - c)`` of the *bilinear
interpolant of the image padded with zeros outside* (``grid_sample``, ``align_corners=True``, ``zeros``). Every
certificate of ``--method rotation`` is about exactly this map: an attacker's image is ``R_gamma(x)``.

**The smoothing** (Fischer, Baader and Vechev, NeurIPS 2020, section 5; seed 001 "Semantic perturbations"):
``g(x) = argmax_c P(f(R_beta(x) + eps) = c)`` with ``beta ~ N(0, sigma_angle^2)`` (degrees) and
``eps ~ N(0, sigma^2 I)`` (pixels in [0, 1]). :class:`AngleAndPixelGaussian` draws ``z = (beta, eps)`` for the
base classifier on the joint space ``h(z) = f(R_{z_0}(x) + z_{1:})`` (:func:`rotated_plus_noise`); its ``gap`` is
Cohen's ``Phi^-1(p_A)`` in the joint space scaled by ``(sigma_angle, sigma, ..., sigma)``. Rotations do not compose
under interpolation (``R_b R_a != R_{a + b}``); :mod:`smoothcert.methods.rotation` turns the gap into an angle
with a proven bound of that interpolation error.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from smoothcert.geometry.regions import Ball
from smoothcert.noise.base import Noise, as_sampled

__all__ = ["rotate", "rotated_plus_noise", "AngleAndPixelGaussian", "radii_from_centre"]


def radii_from_centre(h: int, w: int, device=None) -> torch.Tensor:
    """Distance of every pixel centre to the rotation centre, float64 ``(H, W)`` (pixels)."""
    rows = torch.arange(h, dtype=torch.float64, device=device) - (h - 1) / 2
    cols = torch.arange(w, dtype=torch.float64, device=device) - (w - 1) / 2
    return torch.sqrt(rows[:, None] ** 2 + cols[None, :] ** 2)


def rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """``x`` (C, H, W) rotated by each of ``angles`` (m,) degrees: ``(m, C, H, W)``, bilinear, zero padding.

    ``x`` may also be a batch ``(m, C, H, W)``: image ``i`` is rotated by ``angles[i]``.
    """
    if x.ndim not in (3, 4):
        raise ValueError(f"rotations act on images (C, H, W), got shape {tuple(x.shape)}")
    c, h, w = x.shape[-3:]
    if h < 2 or w < 2:
        raise ValueError(f"rotations need images of at least 2x2 pixels, got {h}x{w}")
    theta = angles.to(device=x.device, dtype=torch.float32).reshape(-1, 1, 1) * (math.pi / 180)
    v = (torch.arange(h, device=x.device, dtype=torch.float32) - (h - 1) / 2).reshape(1, h, 1)
    u = (torch.arange(w, device=x.device, dtype=torch.float32) - (w - 1) / 2).reshape(1, 1, w)
    cos, sin = torch.cos(theta), torch.sin(theta)
    su = cos * u + sin * v  # source column offset
    sv = -sin * u + cos * v  # source row offset
    grid = torch.stack([su * (2 / (w - 1)), sv * (2 / (h - 1))], dim=-1)  # (m, H, W, 2), (x, y) order
    src = x.to(torch.float32)
    src = src.unsqueeze(0).expand(grid.shape[0], c, h, w) if x.ndim == 3 else src
    return F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def rotated_plus_noise(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``R_{z_0}(x) + z_{1:}`` for each row of ``z`` (m, 1 + C H W): the joint-space input of the base classifier."""
    return rotate(x, z[:, 0]) + z[:, 1:].reshape(z.shape[0], *x.shape).to(torch.float32)


class AngleAndPixelGaussian(Noise):
    """``(beta, eps) ~ N(0, sigma_angle^2) x N(0, sigma^2 I_d)`` on the joint space of ``1 + d`` values.

    ``sigma_angle`` in degrees, ``sigma`` in pixel units ([0, 1]); both rounded to float32 once (as sampled).
    ``gap`` is ``Phi^-1(p_A)``; ``region`` the ball of radius ``gap`` in the joint space scaled by the two sigmas
    (the angle itself comes from :mod:`smoothcert.methods.rotation`).
    """

    kind = "angle-and-pixel-gaussian"

    def __init__(self, sigma_angle: float, sigma: float):
        for name, value in (("sigma_angle (degrees)", sigma_angle), ("sigma (pixels in [0, 1])", sigma)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        self.sigma_angle = float(as_sampled(torch.tensor(float(sigma_angle))))
        self.sigma = float(as_sampled(torch.tensor(float(sigma))))

    def fill_(self, out, generator=None):
        self.check_buffer(out)
        torch.randn(out.shape, generator=generator, out=out, device=out.device, dtype=out.dtype)
        out[..., 0].mul_(self.sigma_angle)
        out[..., 1:].mul_(self.sigma)
        return out

    def region(self, center, gap):
        return Ball(center, max(float(gap), 0.0))

    def scales(self):
        return torch.tensor(1.0, dtype=torch.float64)

    def parameters(self):
        return {"sigma_angle": torch.tensor([self.sigma_angle], dtype=torch.float64),
                "sigma": torch.tensor([self.sigma], dtype=torch.float64)}

    @classmethod
    def from_parameters(cls, params):
        return cls(float(params["sigma_angle"][0]), float(params["sigma"][0]))

    def __repr__(self) -> str:
        return f"AngleAndPixelGaussian(sigma_angle={self.sigma_angle}, sigma={self.sigma})"
