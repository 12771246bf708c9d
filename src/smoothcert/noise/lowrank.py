"""Low-rank anisotropic Gaussian noise: ``A w`` with ``A = diag(theta) (I + Q diag(gamma) Q^T)``, O(d k) numbers.

The covariance ``A A^T = diag(theta^2) + U H U^T`` (``U = diag(theta) Q``, ``H = 2 G + G Q^T Q G``,
``G = diag(gamma)``) is "diagonal plus rank k": RANCER's rotated noise restricted to the top-k Hessian
eigenvectors ``Q`` (seed 000 chapter 4) with ``theta = sigma_perp`` off that subspace and the scale
``sigma_perp (1 + gamma_i)`` along eigenvector ``i``. Sampling costs O(d k) per draw
(``theta (w + Q (gamma * (Q^T w)))``, two matrix products per batch) and nothing of size d x d is ever formed, so
CIFAR-sized inputs (d = 3,072) keep per-certificate memory at ``d (k + 2)`` numbers.

Like every family (:mod:`smoothcert.noise.base`) the parameters are rounded to float32 once and the region is
that of exactly the sampled values: ``Q_32`` is only orthonormal up to float32 rounding, and
:class:`~smoothcert.geometry.lowrank.LowRankEllipsoid` computes its spectrum from ``Q_32`` itself (the
certified region is ``{c + A_32 v : ||v|| <= gap}``, seed 000 eq. 4.4 with the scale ``A_32``). A basis that is not
orthonormal to float32 precision on entry is replaced by its polar factor first (as
:class:`~smoothcert.noise.gaussian.RotatedGaussian` does), so the directions stay where the caller put them.
"""

from __future__ import annotations

import torch

from smoothcert.geometry.lowrank import LowRankEllipsoid, gram
from smoothcert.geometry.reductions import fixed_norm
from smoothcert.noise.base import Noise, as_sampled
from smoothcert.noise.gaussian import float32_skew_bound

__all__ = ["LowRankGaussian", "check_rank", "sampled_factor"]


def check_rank(rank, d: int, name: str = "rank (--rancer-rank)") -> int:
    """``rank`` as an int in ``[1, d]``; a clear ValueError otherwise (before any sampling)."""
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise ValueError(f"{name} must be an integer in [1, d = {d}], got {rank!r}")
    if not 1 <= rank <= d:
        raise ValueError(f"{name} must be an integer in [1, d = {d}] (the input's dimension), got {rank}")
    return rank


def sampled_factor(name: str, q: torch.Tensor, tol: float = 1e-4) -> torch.Tensor:
    """The float32 (d, k) factor the sampler multiplies by: ``q`` rounded, or its polar factor rounded.

    ``q`` must have orthonormal columns up to ``tol`` (entries of ``Q^T Q - I``). Kept as it is when rounding leaves
    ``||Q^T Q - I||_F`` within :func:`~smoothcert.noise.gaussian.float32_skew_bound` (a saved noise rebuilds
    bitwise), else replaced by the nearest matrix with orthonormal columns (``W V^T`` of the thin SVD).
    """
    q = torch.as_tensor(q).detach().to(torch.float64)
    if q.ndim != 2 or q.shape[1] > q.shape[0] or q.shape[1] < 1:
        raise ValueError(f"{name} must be a (d, k) matrix with 1 <= k <= d, got shape {tuple(q.shape)}")
    if not bool(torch.isfinite(q).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    eye = torch.eye(q.shape[1], dtype=q.dtype, device=q.device)
    err = float((q.T @ q - eye).abs().max())
    if err > tol:
        raise ValueError(f"{name} must have orthonormal columns (max |Q^T Q - I| = {err:.2e} > {tol})")
    rounded = as_sampled(q)
    if float(fixed_norm((gram(rounded) - eye).reshape(-1))) > float32_skew_bound(q.shape[0]):
        w, _, vh = torch.linalg.svd(q, full_matrices=False)
        rounded = as_sampled(w @ vh)
    return rounded


class LowRankGaussian(Noise):
    """Noise ``diag(theta) (I + Q diag(gamma) Q^T) w``, ``w ~ N(0, I_d)``: diagonal-plus-low-rank covariance.

    ``theta``: scalar or (d,) scales > 0 (a scalar is ``sigma_perp`` on every coordinate); ``basis`` Q: (d, k) with
    orthonormal columns up to 1e-4; ``gamma``: (k,) with ``1 + gamma_i > 0`` (the scale along column ``i`` is
    ``theta (1 + gamma_i)`` for a constant ``theta``). All kept as sampled (float32 values, float64 tensors).
    """

    kind = "lowrank"

    def __init__(self, theta, basis: torch.Tensor, gamma: torch.Tensor):
        self.basis = sampled_factor("basis Q (d, k)", basis)
        d, k = self.basis.shape
        theta = torch.as_tensor(theta, dtype=torch.float64).detach().reshape(-1)
        if theta.numel() == 1:
            theta = theta.expand(d).clone()
        if theta.numel() != d:
            raise ValueError(f"theta has {theta.numel()} entries, the basis is {tuple(self.basis.shape)}")
        sampled = as_sampled(theta)
        if not bool(torch.isfinite(sampled).all()) or bool((sampled <= 0).any()):
            raise ValueError("theta (noise scales) must be finite and > 0 in float32 (the sampling dtype)")
        gamma = as_sampled(torch.as_tensor(gamma, dtype=torch.float64).detach().reshape(-1))
        if gamma.numel() != k or not bool(torch.isfinite(gamma).all()) or bool((gamma <= -1).any()):
            raise ValueError(f"gamma must hold k = {k} finite values > -1 (scales theta (1 + gamma) > 0)")
        self.theta, self.gamma = sampled, gamma
        self._unit = LowRankEllipsoid(torch.zeros(d, dtype=torch.float64), sampled, self.basis, gamma, 1.0)

    @property
    def rank(self) -> int:
        return int(self.basis.shape[1])

    def fill_(self, out, generator=None):
        m, d = out.shape[0], self.theta.numel()
        theta, basis = self.on_buffer(self.theta, out), self.on_buffer(self.basis, out)
        gamma = self.on_buffer(self.gamma, out)
        w = torch.randn((m, d), generator=generator, device=out.device, dtype=out.dtype)
        flat = out.view(m, d)
        torch.matmul((w @ basis) * gamma, basis.T, out=flat)
        return flat.add_(w).mul_(theta).view(out.shape)

    def region(self, center, gap):
        return LowRankEllipsoid(center, self.theta, self.basis, self.gamma, max(float(gap), 0.0))

    def scales(self):
        """Lower bounds of the singular values of ``A`` (ascending; exact for a constant ``theta``)."""
        return self._unit.axes

    def parameters(self):
        return {"theta": self.theta, "basis": self.basis, "gamma": self.gamma}

    def __repr__(self) -> str:
        return f"LowRankGaussian(d={self.theta.numel()}, k={self.rank})"
