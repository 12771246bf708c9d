"""Low-rank anisotropic ellipsoids: the certified region of a diagonal-plus-low-rank Gaussian, in O(d k) memory.

A noise ``A w`` with the scale matrix ``A = diag(theta) (I + Q diag(gamma) Q^T)`` (``theta`` in ``R^d``, > 0;
``Q`` (d, k) with orthonormal columns up to float32 rounding; ``gamma_i > -1``) has the covariance

    A A^T = diag(theta^2) + U H U^T,  U = diag(theta) Q,  H = 2 diag(gamma) + diag(gamma) Q^T Q diag(gamma),

"diagonal plus rank k". Its certified region at gap ``g`` is ``{c + A v : ||v||_2 <= g}`` (ANCER / RANCER
eq. 3.12 / 4.4 with the scale ``A``; RANCER's low-rank form: ``theta = sigma_perp`` everywhere, ``Q`` the top-k
Hessian eigenvectors, ``1 + gamma_i`` the optimized scales along them divided by ``sigma_perp``).
:class:`LowRankEllipsoid` keeps ``theta``, ``Q``, ``gamma`` and ``g`` (never a d x d matrix) and computes, from
exactly those values (``Q`` as sampled, not exactly orthonormal):

* the spectrum of ``I + Q G Q^T`` (``G = diag(gamma)``): 1 (multiplicity ``d - k``) and
  ``1 + lambda_i``, ``lambda = eig(S^{1/2} G S^{1/2})`` with ``S = Q^T Q`` (k x k, float64; ``Q G Q^T`` and
  ``G^{1/2}``-free ``S^{1/2} G S^{1/2}`` share their nonzero eigenvalues);
* ``sigma_min(A) >= min(theta) * min(1, 1 + lambda_min)`` and ``sigma_max(A) <= max(theta) max(1, 1 + lambda_max)``
  (``sigma_i(XY)`` lies between ``sigma_i(X) sigma_min(Y)`` and ``sigma_i(X) sigma_max(Y)``): the inscribed
  radius from below, the enclosing radius from above, exact when ``theta`` is constant;
* ``log|det A| = sum log theta + sum log(1 + lambda_i)`` (the matrix-determinant lemma): the proxy radius
  ``g |det A|^{1/d}`` (ANCER eq. 3.14) and the log-volume;
* the support function ``h(w) = g ||A^T w||``, ``A^T w = theta w + Q (gamma * (Q^T (theta w)))`` in O(d k), with
  the canonical reductions (:mod:`smoothcert.geometry.reductions`): every distance and "disjoint" verdict is
  checked through it (:mod:`smoothcert.geometry.lowrank_ops`).

Each eigenvalue from ``eigh`` carries an error of at most ``~k eps ||S^{1/2} G S^{1/2}||``; the radii and the
log-volume are shrunk by :func:`~smoothcert.geometry.linalg.rounding_allowance` of that size, so they err small.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from smoothcert.geometry.linalg import rounding_allowance
from smoothcert.geometry.reductions import fixed_norm, fixed_sum
from smoothcert.geometry.regions import Region

__all__ = ["LowRankEllipsoid", "Factored", "factor_spectrum", "support", "gram"]


def gram(q: torch.Tensor) -> torch.Tensor:
    """``Q^T Q`` (k x k) by canonical sums over the d rows (the same bits whatever tensor holds ``Q``)."""
    return fixed_sum(q[:, :, None] * q[:, None, :], dim=0)


def factor_spectrum(q: torch.Tensor, gamma: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``(lambda, err)``: the k nonzero-candidate eigenvalues of ``Q diag(gamma) Q^T`` and an error bound.

    ``lambda = eig(S^{1/2} G S^{1/2})`` with ``S = Q^T Q`` (PSD: ``S^{1/2}`` from its eigen-decomposition), float64.
    ``err`` bounds the error of each computed eigenvalue (Weyl: the pairwise sums behind ``S`` err by at most
    ``log2(d) eps`` per entry, ``k log2(d) eps`` in norm; the two ``eigh`` and the products add ``O(k eps)``
    backward errors relative to ``||S|| max|gamma|``): ``rounding_allowance(d + k) (1 + k) (1 + ||S|| max|gamma|)``
    covers them with a wide margin, so ``1 + lambda_i`` lies within ``err`` of the true value.
    """
    k = q.shape[1]
    if k == 0:
        return torch.zeros(0, dtype=torch.float64, device=q.device), 0.0
    s = gram(q)
    s = 0.5 * (s + s.T)
    ev, vec = torch.linalg.eigh(s)
    root = (vec * ev.clamp_min(0.0).sqrt()) @ vec.T
    m = root * gamma[None, :] @ root
    lam = torch.linalg.eigvalsh(0.5 * (m + m.T))
    scale = float(ev.abs().max()) * float(gamma.abs().max())
    err = rounding_allowance(q.shape[0] + k) * (1.0 + k) * (1.0 + scale)
    return lam, err


@dataclass(frozen=True)
class Factored:
    """``{c + diag(s) (I + Q diag(gamma) Q^T) v : ||v|| <= 1}`` (``s = g theta``, may hold zeros): the form the
    distance and intersection code shares; a ball is ``s = r``, ``k = 0``; an axis-aligned ellipsoid ``s = a``."""

    center: torch.Tensor
    s: torch.Tensor
    q: torch.Tensor
    gamma: torch.Tensor
    outer: float  #: an upper bound of the farthest point's distance from the center

    @property
    def dim(self) -> int:
        return int(self.center.numel())

    @property
    def rank(self) -> int:
        return int(self.q.shape[1])

    def shape_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W, H)`` with ``Sigma = A A^T = diag(s^2) + W H W^T``: ``W = diag(s) Q``, ``H = 2G + G Q^T Q G``."""
        g = torch.diag(self.gamma)
        return self.s[:, None] * self.q, 2.0 * g + g @ gram(self.q) @ g


def support(f: Factored, w: torch.Tensor) -> torch.Tensor:
    """``max_{y in region - c} w . y = ||A^T w||`` per row of ``w`` (n, d), canonical per row."""
    sw = f.s * w
    if f.rank == 0:
        return fixed_norm(sw)
    proj = fixed_sum(sw[:, :, None] * f.q[None, :, :], dim=1)  # (n, k) = Q^T (s w)
    back = fixed_sum((proj * f.gamma)[:, None, :] * f.q[None, :, :], dim=2)  # (n, d) = Q (gamma * .)
    return fixed_norm(sw + back)


def _check_factor(q: torch.Tensor, gamma: torch.Tensor, d: int) -> None:
    if q.ndim != 2 or q.shape[0] != d:
        raise ValueError(f"a low-rank ellipsoid's basis must be (d, k) = ({d}, k), got {tuple(q.shape)}")
    if gamma.numel() != q.shape[1]:
        raise ValueError(f"gamma has {gamma.numel()} entries for a basis of rank {q.shape[1]}")
    if not (bool(torch.isfinite(q).all()) and bool(torch.isfinite(gamma).all())):
        raise ValueError("a low-rank ellipsoid's basis and gamma must be finite")


@dataclass(frozen=True, eq=False)
class LowRankEllipsoid(Region):
    """``{center + gap * diag(theta) (I + basis diag(gamma) basis^T) v : ||v||_2 <= 1}``: O(d k) numbers.

    ``theta`` (d,) > 0, ``basis`` (d, k), ``gamma`` (k,) with ``I + basis diag(gamma) basis^T`` positive definite
    (checked from the spectrum), ``gap >= 0``. All radii are bounds on the safe side (module docstring).
    """

    center: torch.Tensor
    theta: torch.Tensor
    basis: torch.Tensor
    gamma: torch.Tensor
    gap: float

    def __post_init__(self) -> None:
        c = self.center.detach().reshape(-1).to(torch.float64)
        d = c.numel()
        theta = self.theta.detach().reshape(-1).to(dtype=torch.float64, device=c.device)
        if theta.numel() != d or not bool(torch.isfinite(theta).all()) or bool((theta <= 0).any()):
            raise ValueError(f"a low-rank ellipsoid needs d = {d} finite scales theta > 0")
        q = self.basis.detach().to(dtype=torch.float64, device=c.device)
        gamma = self.gamma.detach().reshape(-1).to(dtype=torch.float64, device=c.device)
        _check_factor(q, gamma, d)
        if not math.isfinite(self.gap) or self.gap < 0:
            raise ValueError(f"a low-rank ellipsoid's gap must be finite and >= 0, got {self.gap}")
        for name, value in (("center", c), ("theta", theta), ("basis", q), ("gamma", gamma)):
            object.__setattr__(self, name, value)
        object.__setattr__(self, "gap", float(self.gap))
        lam, err = factor_spectrum(q, gamma)
        low = min(1.0, float(lam.min()) + 1.0 if lam.numel() else 1.0) - err
        if low <= 0:
            raise ValueError("I + basis diag(gamma) basis^T must be positive definite (its smallest eigenvalue, "
                             f"from the float32 basis, is {low + err:.3g})")
        high = max(1.0, float(lam.max()) + 1.0 if lam.numel() else 1.0) + err
        object.__setattr__(self, "_lam", lam)
        object.__setattr__(self, "_err", err)
        object.__setattr__(self, "_floor", low)
        object.__setattr__(self, "_ceil", high)
        # log|det(I + Q G Q^T)| from below: each log(1 + lambda_i) with lambda_i lowered by err
        object.__setattr__(self, "_logdet_factor", float(torch.log((1.0 + lam - err).clamp_min(1e-300)).sum()))

    @property
    def rank(self) -> int:
        return int(self.basis.shape[1])

    @property
    def axes(self) -> torch.Tensor:
        """Lower bounds of the semi-axes (singular values of ``g A``), ascending: ``g * max(theta_(i) f_min,
        theta_min * f_(i))`` with ``f`` the spectrum of ``I + Q G Q^T`` (exact for a constant ``theta``)."""
        d = self.dim
        theta = torch.sort(self.theta).values
        f = torch.ones(d, dtype=torch.float64, device=self.center.device)
        if self.rank:
            f[:self.rank] = (1.0 + self._lam - self._err).clamp_min(0.0)  # type: ignore[attr-defined]
        f = torch.sort(f).values
        return self.gap * torch.maximum(theta * self._floor, float(theta[0]) * f)  # type: ignore[attr-defined]

    @property
    def inscribed_radius(self) -> float:
        """``g sigma_min(A)`` from below: ``g min(theta) min(1, 1 + lambda_min)``, less rounding."""
        return self.gap * float(self.theta.min()) * self._floor * (1.0 - rounding_allowance(self.dim))  # type: ignore

    @property
    def outer_radius(self) -> float:
        """``g sigma_max(A)`` from above: ``g max(theta) max(1, 1 + lambda_max)``, plus rounding."""
        return self.gap * float(self.theta.max()) * self._ceil * (1.0 + rounding_allowance(self.dim))  # type: ignore

    @property
    def log_det(self) -> float:
        """``log|det A|`` from below (the matrix-determinant lemma), ``sum log theta + sum log(1 + lambda_i)``."""
        lt = float(fixed_sum(torch.log(self.theta)))
        return lt + self._logdet_factor - rounding_allowance(self.dim) * (abs(lt) + 1.0)  # type: ignore

    @property
    def proxy_radius(self) -> float:
        """``g |det A|^{1/d}`` (the radius of the ball of equal volume, ANCER eq. 3.14), from below."""
        return self.gap * math.exp(self.log_det / self.dim) if self.gap > 0 else 0.0

    @property
    def log_volume(self) -> float:
        if self.gap <= 0:
            return -math.inf
        d = self.dim
        return d * math.log(self.gap) + self.log_det + 0.5 * d * math.log(math.pi) - math.lgamma(0.5 * d + 1.0)

    def factored(self) -> Factored:
        return Factored(self.center, self.gap * self.theta, self.basis, self.gamma, self.outer_radius)

    def scale_apply(self, v: torch.Tensor) -> torch.Tensor:
        """``A v`` per row of ``v`` (n, d): ``theta (v + Q (gamma * (Q^T v))``."""
        return self.theta * (v + ((v @ self.basis) * self.gamma) @ self.basis.T)

    def whiten(self, y: torch.Tensor) -> torch.Tensor:
        """``A^-1 y`` per row (Woodbury): ``(I + QGQ^T)^-1 = I - Q G (I_k + Q^T Q G)^-1 Q^T`` after ``y / theta``."""
        u = y / self.theta
        if not self.rank:
            return u
        k = self.rank
        g = torch.diag(self.gamma)
        inner = torch.eye(k, dtype=torch.float64, device=y.device) + gram(self.basis) @ g
        coef = torch.linalg.solve(inner, (u @ self.basis).T).T  # (n, k)
        return u - (coef * self.gamma) @ self.basis.T

    def contains(self, points: torch.Tensor) -> torch.Tensor:
        """Boolean per point: ``||A^-1 (y - c)|| <= g`` (float64; membership, not a certified bound)."""
        v = self.whiten(self._flat(points))
        return torch.linalg.vector_norm(v, dim=1) <= self.gap

    def dense_scale(self) -> torch.Tensor:
        """The d x d scale ``A`` in float64 (for tests and small d only)."""
        eye = torch.eye(self.dim, dtype=torch.float64, device=self.center.device)
        return self.theta[:, None] * (eye + (self.basis * self.gamma) @ self.basis.T)
