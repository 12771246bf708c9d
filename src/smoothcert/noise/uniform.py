"""Uniform smoothing noise with l1 certificates (ANCER's l1 version; Yang et al., "Randomized smoothing of all
shapes and sizes"; seed 001 on uniform smoothing for l1).

Noise ``eps_i ~ U[-lambda_i, lambda_i]`` independently per coordinate (half-widths ``lambda``; the standard
deviation is ``lambda / sqrt(3)``, so noise of standard deviation ``sigma`` has ``lambda = sqrt(3) sigma``).

**Certificate.** Let ``p_A`` lower-bound ``P(f(x + eps) = c_A)``. Shifting the box by ``delta`` moves the
probability mass of ``U_x \\ U_{x+delta}``, which is the total variation
``TV(delta) = 1 - prod_i (1 - |delta_i| / (2 lambda_i))_+``; the worst base classifier puts class ``c_A`` there
first (Neyman-Pearson for equal-density boxes), so ``P(f(x + delta + eps) = c_A) >= p_A - TV(delta)`` and every
other class has at most ``1 - p_A + TV(delta)``. The prediction is certified while ``TV(delta) < p_A - 1/2``.
Since ``1 - prod(1 - u_i) <= sum u_i`` (union bound),

    sum_i |delta_i| / lambda_i  <  2 p_A - 1 = gap

suffices: the certified region is the cross-polytope ``{||delta / lambda||_1 <= gap}`` with semi-axes
``gap * lambda`` (:class:`~smoothcert.geometry.CrossPolytope`). For isotropic noise this is the l1 radius
``lambda (2 p_A - 1)`` of Yang et al.; in one dimension (and along a coordinate axis) it is tight.
"""

from __future__ import annotations

import math

import torch

from smoothcert.geometry.regions import CrossPolytope
from smoothcert.noise.base import Noise, as_sampled

__all__ = ["UniformDiagonal", "uniform_tv"]


class UniformDiagonal(Noise):
    """``eps_i ~ U[-lambda_i, lambda_i]``: anisotropic uniform noise; the region is an l1 cross-polytope.

    ``half_width`` ``lambda`` has one entry per input value (any shape with that many entries), or is a single
    value for isotropic noise; it is kept as sampled (rounded to float32), and the region is that noise's.
    :meth:`gap` is ``2 p_A - 1``; :meth:`region` the cross-polytope with semi-axes ``gap * lambda``.
    """

    kind = "uniform-diagonal"

    def __init__(self, half_width: torch.Tensor | float):
        t = torch.as_tensor(half_width).detach()
        if not torch.is_floating_point(t):
            t = t.to(torch.float64)
        name = "half_width (lambda, the uniform noise's half-widths, = sqrt(3) * standard deviation)"
        if t.numel() == 0 or not bool(torch.isfinite(t).all()) or bool((t <= 0).any()):
            raise ValueError(f"{name} must be a non-empty tensor of finite values > 0")
        t = as_sampled(t)
        if not bool(torch.isfinite(t).all()) or bool((t <= 0).any()):
            raise ValueError(f"{name} must be representable in float32 (the sampling dtype)")
        self.half_width = t

    @classmethod
    def isotropic(cls, half_width: float) -> "UniformDiagonal":
        """``U[-lambda, lambda]`` in every coordinate."""
        return cls(torch.tensor(float(half_width), dtype=torch.float64))

    @classmethod
    def from_std(cls, sigma: torch.Tensor | float) -> "UniformDiagonal":
        """Uniform noise of standard deviation ``sigma`` per coordinate: ``lambda = sqrt(3) sigma``."""
        return cls(torch.as_tensor(sigma, dtype=torch.float64) * math.sqrt(3.0))

    def _lam(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        lam = self.on_buffer(self.half_width, like)
        return lam if lam.numel() == 1 else lam.reshape(shape)

    def fill_(self, out, generator=None):
        lam = self._lam(tuple(out.shape[1:]), out)
        torch.rand(out.shape, generator=generator, out=out, device=out.device, dtype=out.dtype)
        return out.mul_(2).sub_(1).mul_(lam)

    def gap(self, p_lower: float) -> float:
        """``2 p_A - 1``: the l1 gap of uniform noise (0 at ``p_A = 1/2``)."""
        return 2.0 * float(p_lower) - 1.0

    def level(self, gap: float) -> float:
        """``(1 + gap) / 2``: the inverse of :meth:`gap`."""
        return (1.0 + float(gap)) / 2.0

    def region(self, center, gap):
        d = int(center.numel())
        lam = self.half_width.reshape(-1)
        if lam.numel() == 1:
            lam = lam.expand(d)
        if lam.numel() != d:
            raise ValueError(f"half_width has {lam.numel()} entries, the input has {d}")
        return CrossPolytope(center, lam * max(float(gap), 0.0))

    def scales(self):
        return self.half_width.reshape(-1) if self.half_width.numel() > 1 else self.half_width.reshape(())

    def parameters(self):
        return {"half_width": self.half_width.reshape(-1)}

    @classmethod
    def from_parameters(cls, params):
        lam = params["half_width"]
        return cls(lam.reshape(()) if lam.numel() == 1 else lam)

    def __repr__(self) -> str:
        return f"UniformDiagonal(d={self.half_width.numel()})"

    # -- the uniform family's reparameterization, for the optimizers -------------------------------------
    @classmethod
    def standard_draws(cls, generators, samples: int, shape, device="cpu") -> torch.Tensor:
        """``(B, samples, *shape)`` float32 draws ``w ~ U[-1, 1]^d``, input ``i`` from ``generators[i]``:
        the noise of half-widths ``lambda`` is ``lambda * w``. One call per input (batch-independent)."""
        return torch.stack([torch.rand((samples, *shape), generator=g, device=device).mul_(2).sub_(1)
                            for g in generators])

    @classmethod
    def differentiable_gap(cls, p_a: torch.Tensor, p_b: torch.Tensor | None = None) -> torch.Tensor:
        """The l1 gap, differentiable: ``p_A - p_B`` (Yang et al.'s l1 radius over the half-width), which is
        the certificate's ``2 p_A - 1`` (:meth:`gap`) for ``p_B = 1 - p_A`` (``p_b=None``)."""
        return 2 * p_a - 1 if p_b is None else p_a - p_b


def uniform_tv(delta: torch.Tensor, half_width: torch.Tensor) -> torch.Tensor:
    """Exact total variation between ``U[x +- lambda]`` and ``U[x + delta +- lambda]`` (rows of ``delta``).

    ``1 - prod_i (1 - |delta_i| / (2 lambda_i))_+``; the l1 certificate bounds it by ``||delta / lambda||_1 / 2``.
    """
    lam = torch.as_tensor(half_width, dtype=torch.float64)
    u = (delta.to(torch.float64).abs() / (2 * lam)).clamp(max=1.0)
    return 1.0 - torch.prod(1.0 - u, dim=-1)
