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
``lambda (2 p_A - 1)`` of Yang et al.; in one dimension (and along a coordinate axis) it is tight. With an upper
bound ``p_B`` of the runner-up (two-sided) the condition is ``TV(delta) < (p_A - p_B) / 2``, so the l1 radius is
``lambda (p_A - p_B)`` (:func:`uniform_l1_radius`).

**l_inf, exact** (Yang et al., "Randomized smoothing of all shapes and sizes", 2020, the uniform/l_inf case).
Over ``||delta||_inf <= r`` the total variation is largest at a corner, ``TV = 1 - (1 - r / (2 lambda))^d`` for
isotropic noise, and the bound ``p_A - TV`` is attained (the base classifier that puts ``c_A`` on all of
``U_x \\ U_{x+delta}`` and on just enough of the overlap). So ``c_A`` is certified exactly while
``(1 - r / (2 lambda))^d > 3/2 - p_A``:

    R_inf = 2 lambda (1 - (3/2 - p_A)^(1/d))       (two-sided: (1 - (p_A - p_B) / 2)^(1/d) in place of (3/2 - p_A)^(1/d))

(:func:`uniform_linf_radius`; computed as ``-2 lambda expm1(log1p(-t) / d)``, ``t = p_A - 1/2``, so it keeps its
digits at d = 784). For anisotropic half-widths the isotropic radius at ``min lambda`` is a lower bound (each
factor ``1 - r / (2 lambda_i)`` is at least ``1 - r / (2 min lambda)``).

So the family certifies l1 and l_inf natively (:meth:`UniformDiagonal.norm_radii`); its l2 radius is the largest l2
ball inside the l1 region (``1 / ||1 / (gap lambda)||_2``, marked converted).
"""

from __future__ import annotations

import math

import torch

from smoothcert.geometry.norms import NormRadii
from smoothcert.geometry.regions import CrossPolytope
from smoothcert.noise.base import Noise, as_sampled
from smoothcert.validation import check_positive

__all__ = ["UniformDiagonal", "uniform_tv", "uniform_l1_radius", "uniform_linf_radius", "uniform_half_width"]

_HALF_WIDTH = "the uniform half-width lambda (= sqrt(3) * sigma, sigma the per-coordinate standard deviation)"
_ROUNDING = 8 * 2.0**-52  # relative margin toward the smaller radius for the float64 evaluation


def uniform_half_width(sigma: float) -> float:
    """``lambda = sqrt(3) sigma``: the half-width of uniform noise of per-coordinate standard deviation ``sigma``."""
    return check_positive("sigma (per-coordinate standard deviation, in input units)", sigma) * math.sqrt(3.0)


def _margin(p_a: float, p_b: float | None) -> float:
    """``(p_A - p_B) / 2``, the total variation the certificate may spend (``p_A - 1/2`` without ``p_b``)."""
    p_a = float(p_a)
    if not 0.0 <= p_a <= 1.0:
        raise ValueError(f"p_a (lower bound of the top class's probability) must lie in [0, 1], got {p_a!r}")
    if p_b is None:
        return p_a - 0.5
    p_b = float(p_b)
    if not 0.0 <= p_b <= 1.0:
        raise ValueError(f"p_b (upper bound of the runner-up's probability) must lie in [0, 1], got {p_b!r}")
    return 0.5 * (p_a - p_b)


def uniform_l1_radius(p_a: float, half_width: float, p_b: float | None = None) -> float:
    """``lambda (2 p_A - 1)`` (one-sided) or ``lambda (p_A - p_B)`` (two-sided): the l1 radius of isotropic uniform
    noise of half-width ``lambda`` (module docstring); 0 when not positive."""
    lam = check_positive(_HALF_WIDTH, half_width)
    return max(2.0 * lam * _margin(p_a, p_b), 0.0)


def uniform_linf_radius(p_a: float, half_width: float, d: int, p_b: float | None = None) -> float:
    """The exact l_inf radius ``2 lambda (1 - (3/2 - p_A)^(1/d))`` of isotropic uniform noise in ``R^d`` (two-sided:
    ``(1 - (p_A - p_B) / 2)^(1/d)`` inside), rounded down; 0 when ``p_A <= 1/2`` (``p_A <= p_B``)."""
    lam = check_positive(_HALF_WIDTH, half_width)
    if isinstance(d, bool) or not isinstance(d, int) or d < 1:
        raise ValueError(f"the input dimension d must be an integer >= 1, got {d!r}")
    t = _margin(p_a, p_b)
    if t <= 0.0:
        return 0.0
    return -2.0 * lam * math.expm1(math.log1p(-t) / d) * (1.0 - _ROUNDING)


class UniformDiagonal(Noise):
    """``eps_i ~ U[-lambda_i, lambda_i]``: anisotropic uniform noise; the region is an l1 cross-polytope.

    ``half_width`` ``lambda`` has one entry per input value (any shape with that many entries), or is a single
    value for isotropic noise; it is kept as sampled (rounded to float32), and the region is that noise's.
    :meth:`gap` is ``2 p_A - 1``; :meth:`region` the cross-polytope with semi-axes ``gap * lambda``.
    """

    kind = "uniform-diagonal"
    native_norms = ("l1", "linf")

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
        if isinstance(sigma, (int, float)):
            return cls.isotropic(uniform_half_width(sigma))
        return cls(torch.as_tensor(sigma, dtype=torch.float64) * math.sqrt(3.0))

    @property
    def scale(self) -> float:
        """The half-width (as sampled) when isotropic: the run's recorded scale; NaN for anisotropic noise."""
        return float(self.half_width) if self.half_width.numel() == 1 else math.nan

    @classmethod
    def unit_draws(cls, shape, generator: torch.Generator | None = None, device="cpu") -> torch.Tensor:
        """float32 draws of standard deviation 1 (``U[-sqrt(3), sqrt(3)]``), for training at ``sigma * w``."""
        out = torch.rand(tuple(shape), generator=generator, device=device, dtype=torch.float32)
        return out.mul_(2).sub_(1).mul_(math.sqrt(3.0))

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

    def norm_radii(self, p_lower, gap, region):
        """l1 native (the region's smallest semi-axis ``gap * min lambda``) and l_inf native
        (:func:`uniform_linf_radius` at ``min lambda``: exact for isotropic noise); l2 from the region."""
        lam_min = float(self.half_width.min())
        native = {"l1": region.norm_radius, "linf": uniform_linf_radius(p_lower, lam_min, region.dim)}
        return NormRadii.from_certified(native, region.dim, {"l2": region.inscribed_radius})

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
