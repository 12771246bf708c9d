"""Gaussian smoothing distributions, each described by a scale matrix ``S``: noise ``= S w``, ``w ~ N(0, I_d)``.

For an input ``x`` and a lower bound ``p_A`` of the top class's probability under ``x + S w``, the smoothed
classifier is constant on ``{x + delta : ||S^-1 delta||_2 <= gap}`` with ``gap = Phi^-1(p_A)`` (Cohen
et al. for ``S = sigma I``, seed 000 eq. 3.3; ANCER seed 000 eq. 3.12 for diagonal ``S``; RANCER seed 000
eq. 4.4 for ``S = U diag(theta)``; RDDRS seed 003 eq. 2 for a full SPD ``S``). Each noise draws on the
device and dtype of the buffer it fills, from a caller's ``torch.Generator``, and turns a gap into its
certified :mod:`~smoothcert.regions` region.

One noise object describes the smoothing of one input; the engine takes one per input or one shared by all.
All scales are in the model's input units (pixels in [0, 1]).

Every family keeps its parameters as sampled (rounded to float32 once, see :mod:`~smoothcert.noise.base`) and
certifies the region of exactly that scale ``S``: ``sigma_32``; ``theta_32``; ``U_32 diag(theta_32)``, where
``U_32`` is only orthonormal up to float32 rounding and the region accounts for that
(:attr:`~smoothcert.geometry.Ellipsoid.inscribed_radius`); ``C_32``, whose float64 eigen-decomposition is
checked against ``C_32`` and its region shrunk by the proven residual bound.
"""

from __future__ import annotations

import math

import torch

from smoothcert.geometry.linalg import EPS, basis_error, nearest_orthonormal, rounding_allowance
from smoothcert.geometry.regions import Ball, Ellipsoid
from smoothcert.noise.base import Noise, as_sampled
from smoothcert.validation import check_positive

__all__ = ["IsotropicGaussian", "DiagonalGaussian", "RotatedGaussian", "FullGaussian"]

_EPS32 = float(torch.finfo(torch.float32).eps)


class IsotropicGaussian(Noise):
    """``N(0, sigma^2 I)``: Cohen et al.'s noise; the region is the ball of radius ``sigma_32 * gap``.

    ``sigma`` is kept as given (it names the run); the sampler multiplies by ``sigma_sampled``, ``sigma``
    rounded to float32, and the region is that noise's.
    """

    kind = "isotropic"
    native_norms = ("l2",)

    def __init__(self, sigma: float):
        self.sigma = check_positive("sigma (noise level, in input units where pixels lie in [0, 1])", sigma)
        self.sigma_sampled = float(as_sampled(torch.tensor(self.sigma, dtype=torch.float64)))
        if not 0.0 < self.sigma_sampled < math.inf:
            raise ValueError(f"sigma = {self.sigma!r} is not representable in float32 (the sampling dtype)")

    @classmethod
    def from_std(cls, sigma: float) -> "IsotropicGaussian":
        """The Gaussian of per-coordinate standard deviation ``sigma``: its scale is ``sigma`` itself."""
        return cls(sigma)

    @property
    def scale(self) -> float:
        return self.sigma

    @classmethod
    def unit_draws(cls, shape, generator: torch.Generator | None = None, device="cpu") -> torch.Tensor:
        """float32 draws ``w ~ N(0, I)`` of ``shape``, for training at ``sigma * w`` (the draws the training loop
        has always used: ``torch.randn(shape, generator=generator, device=device)``)."""
        return torch.randn(tuple(shape), generator=generator, device=device, dtype=torch.float32)

    def fill_(self, out, generator=None):
        self.check_buffer(out)
        torch.randn(out.shape, generator=generator, out=out, device=out.device, dtype=out.dtype)
        return out.mul_(self.sigma_sampled)

    def region(self, center, gap):
        return Ball(center, self.sigma_sampled * max(float(gap), 0.0))

    def scales(self):
        return torch.tensor(self.sigma_sampled, dtype=torch.float64)

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
    """``t`` as sampled (float32 values in a float64 tensor); every value finite and > 0 in float32."""
    t = torch.as_tensor(t).detach()
    if not torch.is_floating_point(t):
        t = t.to(torch.float64)
    if t.numel() == 0 or not bool(torch.isfinite(t).all()) or bool((t <= 0).any()):
        raise ValueError(f"{name} must be a non-empty tensor of finite values > 0")
    sampled = as_sampled(t)
    if not bool(torch.isfinite(sampled).all()) or bool((sampled <= 0).any()):
        raise ValueError(f"{name} must be representable in float32 (the sampling dtype): values in "
                         f"[{float(torch.finfo(torch.float32).tiny):.3g}, {float(torch.finfo(torch.float32).max):.3g}]")
    return sampled


class DiagonalGaussian(Noise):
    """``N(0, diag(theta)^2)``: ANCER's axis-aligned noise; region semi-axes ``theta * gap`` (seed 000 eq. 3.12).

    ``theta`` has the input's shape (or is flat with one entry per input value); it is kept as sampled
    (rounded to float32).
    """

    kind = "diagonal"

    def __init__(self, theta: torch.Tensor):
        self.theta = _positive_tensor("theta (per-coordinate noise scales)", theta)

    def fill_(self, out, generator=None):
        theta = self.on_buffer(self.theta, out).reshape(out.shape[1:])
        torch.randn(out.shape, generator=generator, out=out, device=out.device, dtype=out.dtype)
        return out.mul_(theta)

    def region(self, center, gap):
        return Ellipsoid(center, self.theta.reshape(-1) * max(float(gap), 0.0))

    def scales(self):
        return self.theta.reshape(-1)

    def parameters(self):
        return {"theta": self.theta.reshape(-1)}

    def __repr__(self) -> str:
        return f"DiagonalGaussian(d={self.theta.numel()})"


def float32_skew_bound(d: int) -> float:
    """``2 eps_32 sqrt(d)``: above :func:`~smoothcert.geometry.linalg.basis_error` of any orthonormal basis
    rounded to float32.

    ``U_32 = Q + E`` with ``|E_ij| <= eps_32 / 2 |Q_ij|``, so ``||E||_F <= eps_32 sqrt(d) / 2`` and
    ``||U_32^T U_32 - I||_F <= 2 ||E||_F + ||E||_F^2 + ||Q^T Q - I||_F``, about ``eps_32 sqrt(d)``: the bound
    leaves a factor 2 for the float64 part.
    """
    return 2.0 * _EPS32 * math.sqrt(d)


def _sampled_basis(name: str, u: torch.Tensor, tol: float = 1e-4) -> torch.Tensor:
    """The float32 basis the sampler multiplies by: ``u`` rounded, or its nearest orthonormal matrix rounded.

    ``u`` must have orthonormal columns up to ``tol`` (entries of ``U^T U - I``). If rounding ``u`` to float32
    leaves it orthonormal to float32 precision (:func:`float32_skew_bound`) it is kept; otherwise it is replaced
    by its polar factor (:func:`~smoothcert.geometry.linalg.nearest_orthonormal`) before rounding. The result
    is kept as it is when passed in again (a saved noise rebuilds bitwise).
    """
    u = torch.as_tensor(u).detach().to(torch.float64)
    if u.ndim != 2 or u.shape[0] != u.shape[1]:
        raise ValueError(f"{name} must be a square (d, d) matrix, got shape {tuple(u.shape)}")
    if not bool(torch.isfinite(u).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    err = float((u.T @ u - torch.eye(u.shape[0], dtype=u.dtype, device=u.device)).abs().max())
    if err > tol:
        raise ValueError(f"{name} must have orthonormal columns (max |U^T U - I| = {err:.2e} > {tol})")
    rounded = as_sampled(u)
    if basis_error(rounded) > float32_skew_bound(u.shape[0]):
        rounded = as_sampled(nearest_orthonormal(u))
    return rounded


class RotatedGaussian(Noise):
    """Noise ``U diag(theta) w``: RANCER's rotated anisotropic Gaussian (seed 000 eq. 4.4).

    ``basis`` U is (d, d) with orthonormal columns (e.g. Hessian eigenvectors) up to 1e-4 in ``U^T U - I``;
    one that is not orthonormal to float32 precision is replaced by the nearest orthonormal matrix (its polar
    factor) on entry. ``basis`` and ``theta`` are kept as sampled (float32 values), and the region is the
    ellipsoid ``{U diag(theta * gap) u : ||u|| <= 1}`` of exactly those values; its radii allow for the
    float32 basis's remaining skew (seed 000 eq. 4.4 with ``sigma_min(U) >= sqrt(1 - basis_error(U))``).
    """

    kind = "rotated"

    def __init__(self, basis: torch.Tensor, theta: torch.Tensor):
        self.basis = _sampled_basis("basis U", basis)
        self.theta = _positive_tensor("theta (noise scales along the basis)", theta).reshape(-1)
        if self.theta.numel() != self.basis.shape[0]:
            raise ValueError(f"theta has {self.theta.numel()} entries, basis is {tuple(self.basis.shape)}")

    def fill_(self, out, generator=None):
        m, d = out.shape[0], self.theta.numel()
        theta, basis = self.on_buffer(self.theta, out), self.on_buffer(self.basis, out)
        w = torch.randn((m, d), generator=generator, device=out.device, dtype=out.dtype)
        torch.matmul(w * theta, basis.T, out=out.view(m, d))
        return out

    def region(self, center, gap):
        return Ellipsoid(center, self.theta * max(float(gap), 0.0), self.basis)

    def scales(self):
        return self.theta

    def parameters(self):
        return {"basis": self.basis, "theta": self.theta}

    def __repr__(self) -> str:
        return f"RotatedGaussian(d={self.theta.numel()})"


def _eigen_shrink(c: torch.Tensor, eigenvalues: torch.Tensor, eigenvectors: torch.Tensor) -> float:
    """A factor ``s <= 1`` with ``{V diag(s lambda) u : ||u|| <= g}`` inside ``{C v : ||v|| <= g}``.

    With ``M = V diag(lambda) V^T``, ``R = C - M`` and ``e = basis_error(V)``: ``V diag(lambda) = M V^-T``, so
    ``C^-1 V diag(lambda) = (I - C^-1 R) V^-T`` has norm at most ``(1 + r / ((1 - e) lambda_min - r)) /
    sqrt(1 - e)`` for any ``r >= ||R||_2`` (``sigma_min(C) >= sigma_min(V)^2 lambda_min - ||R||_2``); ``s`` is
    its inverse. ``r`` is the computed residual's Frobenius norm plus the error of computing it in float64:
    ``2 gamma_(d+2) (|C| + |V| diag(lambda) |V|^T)``, at most ``2 (d + 2) eps (||C||_F + lambda_max d (1 + e))``
    in Frobenius norm (Higham, *Accuracy and Stability of Numerical Algorithms*, section 3.5). 0 when the bound
    fails (``r >= (1 - e) lambda_min``).
    """
    d = c.shape[0]
    skew = basis_error(eigenvectors)
    if skew >= 1.0:
        return 0.0
    residual = float(torch.linalg.matrix_norm(c - (eigenvectors * eigenvalues) @ eigenvectors.T))
    product = float(torch.linalg.matrix_norm(c)) + float(eigenvalues.abs().max()) * d * (1.0 + skew)
    r = residual * (1.0 + rounding_allowance(d)) + 2.0 * (d + 2) * EPS * product
    floor = (1.0 - skew) * float(eigenvalues.min()) - r
    if floor <= 0.0:
        return 0.0
    return math.sqrt(1.0 - skew) / (1.0 + r / floor)


class FullGaussian(Noise):
    """Noise ``C w`` with ``C`` symmetric positive definite (RDDRS, seed 003): covariance ``C^2``.

    ``C`` is kept as sampled (symmetrized, rounded to float32: still exactly symmetric). The region
    ``{||C^-1 delta|| <= gap}`` is the ellipsoid whose semi-axes are ``C``'s eigenvalues times ``gap`` along
    its eigenvectors (seed 003 eq. 2), computed in float64 from exactly the float32 ``C`` and shrunk by
    :func:`_eigen_shrink` (about ``1e-10`` times ``C``'s condition number at d = 784) so the computed
    decomposition's error is on the safe side.
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
        c = as_sampled(0.5 * (c + c.T))
        if not bool(torch.isfinite(c).all()):
            raise ValueError("scale C must be representable in float32 (the sampling dtype)")
        eigenvalues, eigenvectors = torch.linalg.eigh(c)
        shrink = _eigen_shrink(c, eigenvalues, eigenvectors) if float(eigenvalues.min()) > 0 else 0.0
        if shrink <= 0:
            raise ValueError(f"scale C must be positive definite (smallest eigenvalue {float(eigenvalues.min()):.3g}, "
                             "in float32)")
        self.scale, self.eigenvectors = c, eigenvectors
        self.eigenvalues = eigenvalues * shrink  #: the region's semi-axes per unit gap (C's, shrunk)

    def fill_(self, out, generator=None):
        m, d = out.shape[0], self.scale.shape[0]
        scale = self.on_buffer(self.scale, out)
        w = torch.randn((m, d), generator=generator, device=out.device, dtype=out.dtype)
        torch.matmul(w, scale, out=out.view(m, d))
        return out

    def region(self, center, gap):
        return Ellipsoid(center, self.eigenvalues * max(float(gap), 0.0), self.eigenvectors)

    def scales(self):
        return self.eigenvalues

    def parameters(self):
        return {"scale": self.scale}

    def __repr__(self) -> str:
        return f"FullGaussian(d={self.scale.shape[0]})"
