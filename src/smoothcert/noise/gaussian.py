"""Gaussian smoothing distributions, each described by a scale matrix ``S``: noise ``= S w``, ``w ~ N(0, I_d)``.

For an input ``x`` and a lower bound ``p_A`` of the top class's probability under ``x + S w``, the smoothed
classifier is constant on ``{x + delta : ||S^-1 delta||_2 <= gap}`` with ``gap = Phi^-1(p_A)`` (Cohen
et al. for ``S = sigma I``, seed 000 eq. 3.3; ANCER seed 000 eq. 3.12 for diagonal ``S``; RANCER seed 000
eq. 4.4 for ``S = U diag(theta)``; RDDRS seed 003 eq. 2 for a full SPD ``S``). Each noise draws on the
device and dtype of the buffer it fills, from a caller's ``torch.Generator``, and turns a gap into its
certified :mod:`~smoothcert.regions` region.

One noise object describes the smoothing of one input; the engine takes one per input or one shared by all.
All scales are in the model's input units (pixels in [0, 1]).
"""

from __future__ import annotations

import torch

from smoothcert.geometry.regions import Ball, Ellipsoid
from smoothcert.noise.base import Noise
from smoothcert.validation import check_positive

__all__ = ["IsotropicGaussian", "DiagonalGaussian", "RotatedGaussian", "FullGaussian"]


class IsotropicGaussian(Noise):
    """``N(0, sigma^2 I)``: Cohen et al.'s noise; the region is the ball of radius ``sigma * gap``."""

    kind = "isotropic"

    def __init__(self, sigma: float):
        self.sigma = check_positive("sigma (noise level, in input units where pixels lie in [0, 1])", sigma)

    def fill_(self, out, generator=None):
        torch.randn(out.shape, generator=generator, out=out, device=out.device, dtype=out.dtype)
        return out.mul_(self.sigma)

    def region(self, center, gap):
        return Ball(center, self.sigma * max(float(gap), 0.0))

    def scales(self):
        return torch.tensor(self.sigma, dtype=torch.float64)

    def parameters(self):
        return {"sigma": torch.tensor([self.sigma], dtype=torch.float64)}

    @classmethod
    def from_parameters(cls, params):
        return cls(float(params["sigma"].reshape(-1)[0]))

    def __repr__(self) -> str:
        return f"IsotropicGaussian(sigma={self.sigma})"

    # -- the Gaussian family's reparameterization, for the optimizers (seed 000 eq. 3.7) -------------------
    @classmethod
    def standard_draws(cls, generators, samples: int, shape, device="cpu") -> torch.Tensor:
        """``(B, samples, *shape)`` float32 draws ``w ~ N(0, I)``, input ``i`` from ``generators[i]``.

        Every Gaussian noise of this module is ``S w`` for such ``w`` (the reparameterization of seed 000
        eq. 3.7). One call per input, so an input's draws do not depend on which inputs share its batch.
        """
        return torch.stack([torch.randn((samples, *shape), generator=g, device=device) for g in generators])

    @classmethod
    def differentiable_gap(cls, p_a: torch.Tensor, p_b: torch.Tensor | None = None) -> torch.Tensor:
        """The Gaussian gap of probabilities in (0, 1), differentiable: ``(Phi^-1(p_A) - Phi^-1(p_B)) / 2``
        (seed 000 eq. 3.6 / 3.12), which is ``Phi^-1(p_A)`` for ``p_B = 1 - p_A`` (``p_b=None``, the gap the
        certificate uses, seed 000 eq. 3.3)."""
        if p_b is None:
            return torch.special.ndtri(p_a)
        return 0.5 * (torch.special.ndtri(p_a) - torch.special.ndtri(p_b))


def _positive_tensor(name: str, t: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(t).detach()
    if not torch.is_floating_point(t):
        t = t.to(torch.float64)
    if t.numel() == 0 or not bool(torch.isfinite(t).all()) or bool((t <= 0).any()):
        raise ValueError(f"{name} must be a non-empty tensor of finite values > 0")
    return t


class DiagonalGaussian(Noise):
    """``N(0, diag(theta)^2)``: ANCER's axis-aligned noise; region semi-axes ``theta * gap`` (seed 000 eq. 3.12).

    ``theta`` has the input's shape (or is flat with one entry per input value).
    """

    kind = "diagonal"

    def __init__(self, theta: torch.Tensor):
        self.theta = _positive_tensor("theta (per-coordinate noise scales)", theta)

    def fill_(self, out, generator=None):
        torch.randn(out.shape, generator=generator, out=out, device=out.device, dtype=out.dtype)
        theta = self.theta.to(device=out.device, dtype=out.dtype).reshape(out.shape[1:])
        return out.mul_(theta)

    def region(self, center, gap):
        return Ellipsoid(center, self.theta.reshape(-1).to(torch.float64) * max(float(gap), 0.0))

    def scales(self):
        return self.theta.reshape(-1).to(torch.float64)

    def parameters(self):
        return {"theta": self.theta.reshape(-1).to(torch.float64)}

    def __repr__(self) -> str:
        return f"DiagonalGaussian(d={self.theta.numel()})"


def _orthonormal(name: str, u: torch.Tensor, tol: float = 1e-4) -> torch.Tensor:
    u = torch.as_tensor(u).detach().to(torch.float64)
    if u.ndim != 2 or u.shape[0] != u.shape[1]:
        raise ValueError(f"{name} must be a square (d, d) matrix, got shape {tuple(u.shape)}")
    if not bool(torch.isfinite(u).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    err = float((u.T @ u - torch.eye(u.shape[0], dtype=u.dtype, device=u.device)).abs().max())
    if err > tol:
        raise ValueError(f"{name} must have orthonormal columns (max |U^T U - I| = {err:.2e} > {tol})")
    return u


class RotatedGaussian(Noise):
    """Noise ``U diag(theta) w``: RANCER's rotated anisotropic Gaussian (seed 000 eq. 4.4).

    ``basis`` U is (d, d) with orthonormal columns (e.g. Hessian eigenvectors); the region is the ellipsoid
    with semi-axes ``theta * gap`` along those columns.
    """

    kind = "rotated"

    def __init__(self, basis: torch.Tensor, theta: torch.Tensor):
        self.basis = _orthonormal("basis U", basis)
        self.theta = _positive_tensor("theta (noise scales along the basis)", theta).reshape(-1)
        if self.theta.numel() != self.basis.shape[0]:
            raise ValueError(f"theta has {self.theta.numel()} entries, basis is {tuple(self.basis.shape)}")

    def fill_(self, out, generator=None):
        m, d = out.shape[0], self.theta.numel()
        w = torch.randn((m, d), generator=generator, device=out.device, dtype=out.dtype)
        theta = self.theta.to(device=out.device, dtype=out.dtype)
        basis = self.basis.to(device=out.device, dtype=out.dtype)
        torch.matmul(w * theta, basis.T, out=out.view(m, d))
        return out

    def region(self, center, gap):
        return Ellipsoid(center, self.theta.to(torch.float64) * max(float(gap), 0.0), self.basis)

    def scales(self):
        return self.theta.to(torch.float64)

    def parameters(self):
        return {"basis": self.basis, "theta": self.theta.to(torch.float64)}

    def __repr__(self) -> str:
        return f"RotatedGaussian(d={self.theta.numel()})"


class FullGaussian(Noise):
    """Noise ``C w`` with ``C`` symmetric positive definite (RDDRS, seed 003): covariance ``C^2``.

    The region ``{||C^-1 delta|| <= gap}`` is the ellipsoid whose semi-axes are ``C``'s eigenvalues times
    ``gap`` along its eigenvectors.
    """

    kind = "full"

    def __init__(self, scale: torch.Tensor):
        c = torch.as_tensor(scale).detach().to(torch.float64)
        if c.ndim != 2 or c.shape[0] != c.shape[1]:
            raise ValueError(f"scale C must be a square (d, d) matrix, got shape {tuple(c.shape)}")
        if not bool(torch.isfinite(c).all()):
            raise ValueError("scale C contains NaN or infinite values")
        asym = float((c - c.T).abs().max())
        if asym > 1e-6 * max(1.0, float(c.abs().max())):
            raise ValueError(f"scale C must be symmetric (max |C - C^T| = {asym:.2e})")
        c = 0.5 * (c + c.T)
        eigenvalues, eigenvectors = torch.linalg.eigh(c)
        if float(eigenvalues.min()) <= 0:
            raise ValueError(f"scale C must be positive definite (smallest eigenvalue {float(eigenvalues.min()):.3g})")
        self.scale, self.eigenvalues, self.eigenvectors = c, eigenvalues, eigenvectors

    def fill_(self, out, generator=None):
        m, d = out.shape[0], self.scale.shape[0]
        w = torch.randn((m, d), generator=generator, device=out.device, dtype=out.dtype)
        torch.matmul(w, self.scale.to(device=out.device, dtype=out.dtype), out=out.view(m, d))
        return out

    def region(self, center, gap):
        return Ellipsoid(center, self.eigenvalues * max(float(gap), 0.0), self.eigenvectors)

    def scales(self):
        return self.eigenvalues

    def parameters(self):
        return {"scale": self.scale}

    def __repr__(self) -> str:
        return f"FullGaussian(d={self.scale.shape[0]})"
