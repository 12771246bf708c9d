"""Semantic transformations as smoothing families: noise over the parameter of a transformation.

Smoothing over a transformation ``psi_beta`` (seed 001, "Semantic perturbations certified robustness"; Fischer,
Baader and Vechev, "Certified Defense to Image Transformations via Randomized Smoothing", NeurIPS 2020):

    g(x) = argmax_c P_beta(f(psi_beta(x)) = c).

The engine samples the *parameter*: a method hands it the base classifier ``h_x(beta) = f(psi_beta(x))`` on a
parameter input ``beta_0 = 0`` (:class:`Transformed`), and the family below draws ``beta``.

**Cyclic integer translations.** ``psi_t`` shifts an image by the integer vector ``t = (rows, columns)`` with
wrap-around (``torch.roll``): ``psi_s o psi_t = psi_{s + t}`` exactly, so ``g(psi_t(x)) = argmax_c P_k(f(psi_{k +
t}(x)) = c)``: the adversary's shift moves the smoothing distribution. :class:`DiscreteGaussianShift` draws ``k``
from the discrete Gaussian on the box ``{-K..K}^2``, ``mu(k) ∝ exp(-||k||^2 / (2 sigma^2))`` (each coordinate
independently; the truncation is part of the distribution that is sampled, so nothing is lost to it). For a
shift ``t`` the distribution becomes ``nu_t(j) = mu(j - t)``. With ``p_A`` a lower bound of ``mu(A)`` for the
set ``A`` of parameters where ``h`` predicts ``c_A``, the Neyman-Pearson lemma for discrete distributions
(Neyman and Pearson 1933; the randomized form used by Cohen et al., ICML 2019, appendix A, and for discrete
noise by Lee et al., NeurIPS 2019) gives the exact worst case

    min { nu_t(A) : mu(A) >= p_A } = sum of nu_t over the points of smallest ratio nu_t / mu, taken until their mu
    mass reaches p_A (the last point in part),

a piecewise-linear function of ``p_A`` (:meth:`DiscreteGaussianShift.worst_case`). The smoothed classifier
predicts ``c_A`` at ``psi_t(x)`` when this bound exceeds 1/2. The certified radius (pixels, l2 norm of the shift)
is the largest ``r`` such that *every* integer shift with ``||t||_2 <= r`` (up to ``max_shift``) passes: the
certificate holds for exactly those shifts, a set of lattice points, not a continuous ball.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from smoothcert.geometry.regions import Ball
from smoothcert.noise.base import Noise

__all__ = ["cyclic_shift", "DiscreteGaussianShift", "Transformed", "shift_lattice"]

#: A certified bound must exceed 1/2 by this much (float64 sums of probabilities err by far less).
_MARGIN = 1e-9


def cyclic_shift(x: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """``x`` (C, H, W) shifted cyclically by each row of the integer ``shifts`` (m, 2): ``(m, C, H, W)``.

    ``out[i, :, r, c] = x[:, (r - shifts[i, 0]) mod H, (c - shifts[i, 1]) mod W]`` (as ``torch.roll``), by one
    gather for the whole batch.
    """
    if x.ndim != 3:
        raise ValueError(f"cyclic shifts act on images (C, H, W), got shape {tuple(x.shape)}")
    _, h, w = x.shape
    s = shifts.to(device=x.device).round().long()
    rows = (torch.arange(h, device=x.device).unsqueeze(0) - s[:, :1]) % h  # (m, H)
    cols = (torch.arange(w, device=x.device).unsqueeze(0) - s[:, 1:]) % w  # (m, W)
    flat = rows.unsqueeze(2) * w + cols.unsqueeze(1)  # (m, H, W)
    return x.reshape(x.shape[0], h * w)[:, flat.reshape(-1)].reshape(x.shape[0], -1, h, w).transpose(0, 1)


def shift_lattice(max_shift: int) -> np.ndarray:
    """Every integer shift ``t != 0`` with ``||t||_2 <= max_shift``, sorted by norm: int64 ``(m, 2)``."""
    r = np.arange(-max_shift, max_shift + 1)
    grid = np.stack(np.meshgrid(r, r, indexing="ij"), -1).reshape(-1, 2)
    norms = np.sqrt((grid**2).sum(1))
    keep = (norms <= max_shift + 1e-12) & (norms > 0)
    grid, norms = grid[keep], norms[keep]
    return grid[np.argsort(norms, kind="stable")]


class Transformed(torch.nn.Module):
    """The base classifier on the parameter space: ``h(beta) = model(transform(x, beta))`` for one input ``x``."""

    def __init__(self, model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                 transform: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        super().__init__()
        self.model, self.x, self.transform = model, x, transform

    def forward(self, beta: torch.Tensor) -> torch.Tensor:
        return self.model(self.transform(self.x, beta))


class DiscreteGaussianShift(Noise):
    """Integer shifts ``k ~`` discrete Gaussian on ``{-K..K}^2`` (per coordinate ``∝ exp(-k^2 / (2 sigma^2))``).

    ``sigma`` in pixels; ``K = ceil(support * sigma)`` (default 6 sigma). ``max_shift`` (pixels) bounds the shifts
    the certificate considers. ``gap(p)`` returns the certified radius in pixels (see the module), and
    ``region`` the ball of that radius in shift space (it certifies its integer points).
    """

    kind = "discrete-gaussian-shift"

    def __init__(self, sigma: float, max_shift: int, support: float = 6.0):
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not 0 < sigma < math.inf:
            raise ValueError(f"sigma (shift noise, pixels) must be a finite number > 0, got {sigma!r}")
        if isinstance(max_shift, bool) or not isinstance(max_shift, int) or max_shift < 1:
            raise ValueError(f"max_shift must be an integer >= 1 (pixels), got {max_shift!r}")
        self.sigma, self.max_shift, self.support = float(sigma), int(max_shift), float(support)
        self.K = max(1, math.ceil(self.support * self.sigma))
        values = np.arange(-self.K, self.K + 1)
        pmf = np.exp(-(values.astype(np.float64) ** 2) / (2 * self.sigma**2))
        self.values, self.pmf = values, pmf / pmf.sum()
        self._probs = torch.tensor(self.pmf, dtype=torch.float64)
        self._curves: tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]] | None = None

    def fill_(self, out, generator=None):
        self.check_buffer(out)
        m = out.numel()
        draws = torch.multinomial(self._probs.to(out.device), m, replacement=True, generator=generator)
        return out.copy_((draws - self.K).reshape(out.shape).to(out.dtype))

    def mu(self, points: np.ndarray) -> np.ndarray:
        """``mu`` at integer points ``(m, 2)`` (0 outside the box)."""
        inside = (np.abs(points) <= self.K).all(axis=1)
        idx = np.clip(points + self.K, 0, 2 * self.K)
        return np.where(inside, self.pmf[idx[:, 0]] * self.pmf[idx[:, 1]], 0.0)

    def _curve(self, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Cumulative ``mu`` and ``nu_t`` over the support, sorted by ``nu_t / mu`` ascending (ties: any order)."""
        r = np.arange(-self.K, self.K + 1)
        box = np.stack(np.meshgrid(r, r, indexing="ij"), -1).reshape(-1, 2)
        pts = np.unique(np.concatenate([box, box + t]), axis=0)
        mu, nu = self.mu(pts), self.mu(pts - t)
        pos = mu > 0
        mu, nu = mu[pos], nu[pos]  # points with mu = 0 never help to reach mu mass p
        order = np.argsort(nu / mu, kind="stable")
        return np.concatenate([[0.0], np.cumsum(mu[order])]), np.concatenate([[0.0], np.cumsum(nu[order])])

    def curves(self) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
        """The shifts of :func:`shift_lattice` and, per shift, its worst-case curve (computed once)."""
        if self._curves is None:
            shifts = shift_lattice(self.max_shift)
            self._curves = (shifts, [self._curve(t) for t in shifts])
        return self._curves

    def worst_case(self, p_lower: float, t: np.ndarray) -> float:
        """``min { nu_t(A) : mu(A) >= p_lower }`` (exact, Neyman-Pearson with a randomized boundary point)."""
        cum_mu, cum_nu = self._curve(np.asarray(t, dtype=np.int64))
        return float(np.interp(min(p_lower, cum_mu[-1]), cum_mu, cum_nu))

    def gap(self, p_lower: float) -> float:
        """The certified radius in pixels for a lower bound ``p_lower`` of the top class's probability: the largest
        norm ``r`` such that every shift with ``||t|| <= r`` has worst case > 1/2 (0 when the first fails)."""
        shifts, curves = self.curves()
        norms = np.sqrt((shifts**2).sum(1))
        passed = np.array([float(np.interp(min(p_lower, cm[-1]), cm, cn)) > 0.5 + _MARGIN for cm, cn in curves])
        if passed.all():
            return float(norms[-1])
        fail = float(norms[~passed].min())
        below = norms[norms < fail - 1e-9]
        return float(below.max()) if below.size else 0.0

    def level(self, gap: float) -> float:
        """The least probability whose :meth:`gap` reaches ``gap`` (the gap is a step function: by search)."""
        return self.level_by_search(gap)

    def region(self, center, gap):
        return Ball(center, max(float(gap), 0.0))

    def scales(self):
        return torch.tensor(1.0, dtype=torch.float64)

    def parameters(self):
        return {"sigma": torch.tensor([self.sigma], dtype=torch.float64),
                "max_shift": torch.tensor([self.max_shift]), "support": torch.tensor([self.support])}

    @classmethod
    def from_parameters(cls, params):
        return cls(float(params["sigma"][0]), int(params["max_shift"][0]), float(params["support"][0]))

    def __repr__(self) -> str:
        return f"DiscreteGaussianShift(sigma={self.sigma}, max_shift={self.max_shift}, K={self.K})"
