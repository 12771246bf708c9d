"""High-confidence bounds on norms of the gradient of a Gaussian-smoothed classifier (seed 004 section 4).

Notation (normalized units). With ``w = sigma u``, ``u ~ N(0, I_d)`` and ``c`` the tracked class,
``g(x) = P(f(x + w) = c)`` and ``beta = sigma * grad g(x) = E[u (1[f(x + w) = c] - 1/2)]`` (seed 004,
Corollary 1.1; the ``- 1/2`` removes nothing in expectation and halves the spread). Every sample gives
``z = u (1[f(x + sigma u) = c] - 1/2)``; by seed 004 Theorem 4 (divided by ``sigma^2``), ``z - beta`` is a
sub-Gaussian vector with variance proxy :data:`KAPPA` ``= 1/4 + 3 / sqrt(8 pi e)``, i.e.
``E exp(s^T (z - beta)) <= exp(KAPPA ||s||^2 / 2)`` for every ``s``. A mean of ``n`` independent samples is
sub-Gaussian with proxy ``KAPPA / n``.

The samples come in two independent halves with means ``X`` (``n1`` samples) and ``Y`` (``n2``):

* l2 (Theorem 5, Table 1): ``X^T Y`` is unbiased for ``||beta||^2`` and
  ``X^T Y - ||beta||^2 = beta^T (a + b) + a^T b`` with ``a = X - beta``, ``b = Y - beta`` independent. Each
  term gets half the failure probability: ``P(beta^T (a + b) <= -c ||beta||) <= delta`` with
  ``c = sqrt(2 (k1 + k2) log(1 / delta))``, and ``P(a^T b <= -t) <= delta`` from the Chernoff bound
  ``E exp(lam a^T b) <= (1 - lam^2 k1 k2)^(-d / 2)`` (condition on ``b``, then the Gaussian trick), inverted
  exactly by :func:`product_deviation`. Solving the quadratic in ``||beta||`` gives the bounds of
  :func:`l2_upper` / :func:`l2_lower`. The paper's closed forms (Theorem 5:
  ``sqrt(X^T Y + t) / sqrt(1 + eps^2 - eps)`` and its ``t``) are printed garbled and are tighter than this
  derivation supports (to first order they use ``c / 2`` for the linear term), so they are not used.
* l_inf and l1 (Table 1): the pooled mean ``M = (n1 X + n2 Y) / (n1 + n2)``.

  *Upper bounds need no union.* A norm is the largest of a family of linear functionals, ``||beta|| =
  max_a a^T beta`` (l_inf: ``a = +-e_i``; l1: ``a`` a sign vector), and the one that attains it at the true
  ``beta``, ``a* = sign(beta_i*) e_i*`` with ``i* = argmax_i |beta_i|`` or ``a* = sign(beta)``, is fixed: it
  depends on the classifier and ``x``, not on the samples. Since ``||M|| >= a*^T M``,
  ``||beta|| = a*^T beta <= ||M|| + a*^T (beta - M)``, and ``a*^T (beta - M)`` is one sub-Gaussian scalar with
  proxy ``KAPPA ||a*||^2 / n`` (Theorem 4), so Chernoff's bound for that single tail gives
  ``P(||beta|| > ||M|| + t) <= exp(-n t^2 / (2 KAPPA ||a*||^2)) = delta`` with
  ``t_inf = sqrt(2 KAPPA log(1 / delta) / n)`` (``||a*||^2 = 1``) and
  ``t_1 = sqrt(2 KAPPA d log(1 / delta) / n)`` (``||a*||^2 <= d``). Table 1's unions over the ``2 d``
  coordinate tails and the ``2^d`` sign vectors are needed only by the *lower* bounds: ``||M|| - ||beta|| <=
  max_a a^T (M - beta)`` is attained by the functional that maximizes ``M``, which depends on the samples, so
  its tail must hold for every ``a`` at once: ``t_inf = sqrt(2 KAPPA log(2 d / delta) / n)`` and
  ``t_1 = sqrt(2 KAPPA d (d log 2 + log(1 / delta)) / n)``. (Coverage of the upper bounds is checked by Monte
  Carlo in ``tests/test_firstorder_coverage.py`` on classifiers where the plug-in norm is unbiased.)

Each function returns a one-sided bound that holds with probability at least ``1 - delta``; the caller
splits its failure probability over the bounds it uses (union bound). Bounds over a subspace ``S`` (seed 004
section 4, last paragraph) are of ambient norms of ``P_S beta``: l2 from the halves' coordinates ``Q^T X``,
``Q^T Y`` in an orthonormal basis (``d = d_S``: ``Q^T (X - beta)`` is sub-Gaussian with the same proxy in
``R^{d_S}``); l_inf and l1 from the pooled ``P_S M``, where ``e_i^T P_S (M - beta)`` has proxy
``KAPPA ||P_S e_i||^2 / n`` (pass ``kappa = KAPPA max_i ||P_S e_i||^2``) and ``s^T P_S (M - beta)`` has proxy
``KAPPA ||P_S s||^2 / n`` (pass ``sign_norm2``); the fixed functional is then ``a*^T P_S``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from numpy.typing import ArrayLike
from scipy import optimize

from smoothcert.validation import check_alpha, check_count, check_positive

__all__ = [
    "KAPPA", "GradientObserver", "product_deviation", "l2_upper", "l2_lower", "linf_upper", "linf_lower",
    "l1_upper", "l1_lower",
]

#: Variance proxy of ``u (1[f = c] - 1/2) - beta`` in normalized units (seed 004 Theorem 4 over ``sigma^2``).
KAPPA: float = 0.25 + 3.0 / math.sqrt(8.0 * math.pi * math.e)


class GradientObserver:
    """An observer for :func:`smoothcert.engine.sampling.sample_counts` and the estimation pass of
    :func:`smoothcert.engine.smooth.certify` that sums ``u (1[f(x + sigma u) = c] - 1/2)`` per input.

    ``parts`` (optional) splits each input's samples, in the order they are drawn, into consecutive parts of
    those sizes (the two independent halves of seed 004 Theorem 5); :attr:`part_sums` is a float64
    ``(B, parts, d)`` tensor on the inputs' device, :attr:`sums` their total ``(B, d)`` and ``count`` the samples
    seen per input. ``classes`` holds the tracked class per input, chosen on independent selection samples:
    give it here or through :meth:`begin` (which ``certify`` calls with its selected classes). Nothing per
    sample is kept: each block's contribution is reduced at once (in float64, outside autocast), part by part
    with a mask of the samples' positions (no host synchronization).
    """

    def __init__(self, sigma: float, *, parts: Sequence[int] | None = None, classes: torch.Tensor | None = None):
        self.sigma = check_positive("sigma", sigma)
        self.parts = None if parts is None else tuple(check_count("observer part size", p) for p in parts)
        if self.parts is not None and not self.parts:
            raise ValueError("parts must list at least one part size")
        self.classes: torch.Tensor | None = None
        self.count: torch.Tensor | None = None
        self._sums: torch.Tensor | None = None
        if classes is not None:
            self.begin(classes)

    def begin(self, classes: torch.Tensor) -> None:
        """Track ``classes`` (one per input) and start from zero sums."""
        self.classes = classes.reshape(-1).to(torch.int64)
        self.count = torch.zeros(len(self.classes), dtype=torch.int64, device=self.classes.device)
        self._sums = None  # allocated at the first block, when the input dimension is known

    @property
    def part_sums(self) -> torch.Tensor:
        """``(B, parts, d)`` float64 sums of ``u (1[f = c] - 1/2)`` over each part's samples."""
        if self._sums is None:
            raise RuntimeError("GradientObserver has seen no samples yet")
        if self.parts is not None and int(self.count.max()) > sum(self.parts):
            raise ValueError(f"GradientObserver saw {int(self.count.max())} samples of an input, more than its "
                             f"parts {self.parts} hold")
        return self._sums

    @property
    def sums(self) -> torch.Tensor:
        """``(B, d)`` float64 sums over all samples seen."""
        return self.part_sums.sum(dim=1)

    def __call__(self, rows: torch.Tensor, noise: torch.Tensor, predictions: torch.Tensor) -> None:
        if self.classes is None:
            raise RuntimeError("GradientObserver: give the tracked classes (classes=... or begin) before sampling")
        with torch.autocast(device_type=noise.device.type, enabled=False):
            sign = (predictions == self.classes[rows].unsqueeze(1)).to(torch.float64) - 0.5
            flat = noise.reshape(noise.shape[0], noise.shape[1], -1).to(torch.float64)
            if self._sums is None:
                width = 1 if self.parts is None else len(self.parts)
                self._sums = torch.zeros((len(self.classes), width, flat.shape[2]), dtype=torch.float64,
                                         device=self.classes.device)
            m = predictions.shape[1]
            if self.parts is None:
                self._sums[rows, 0] += torch.einsum("gm,gmd->gd", sign, flat) / self.sigma
            else:
                position = self.count[rows].unsqueeze(1) + torch.arange(m, device=rows.device)
                start = 0
                for part, size in enumerate(self.parts):
                    inside = ((position >= start) & (position < start + size)).to(torch.float64)
                    self._sums[rows, part] += torch.einsum("gm,gmd->gd", sign * inside, flat) / self.sigma
                    start += size
            self.count[rows] += m


def _delta(delta: float) -> float:
    return check_alpha(delta)


def product_deviation(dim: int, k1: float, k2: float, delta: float) -> float:
    """Smallest ``t`` with ``P(a^T b >= t) <= delta`` for independent sub-Gaussian ``a``, ``b`` in ``R^dim``.

    ``a``, ``b`` have variance proxies ``k1``, ``k2``. Chernoff: ``P(a^T b >= t) <= inf_s exp(-s t / K)
    (1 - s^2)^(-dim / 2)`` over ``0 < s < 1`` with ``K = sqrt(k1 k2)``; the infimum is at
    ``s = (sqrt(dim^2 + 4 tau^2) - dim) / (2 tau)``, ``tau = t / K``, and ``tau`` is found by bracketing, returning
    the upper end (a larger ``t`` is a weaker, still valid, deviation). Holds for ``-a^T b`` alike.
    """
    check_count("dim", dim)
    check_positive("k1", k1)
    check_positive("k2", k2)
    log_delta = math.log(_delta(delta))

    def log_bound(tau: float) -> float:
        s = 2.0 * tau / (dim + math.sqrt(dim * dim + 4.0 * tau * tau))
        return -s * tau - 0.5 * dim * math.log1p(-s * s)

    hi = 2.0 * (-log_delta + 0.5 * dim * math.log(4.0 / 3.0))  # log_bound(hi) <= -hi/2 + dim/2 log(4/3) = log_delta
    tau = optimize.brentq(lambda tau: log_bound(tau) - log_delta, 0.0, hi, xtol=1e-12, rtol=1e-12)
    tau *= 1.0 + 1e-9  # the upper end of the bracket
    while log_bound(tau) > log_delta:
        tau *= 1.0 + 1e-9
    return float(tau * math.sqrt(k1 * k2))


def _halves(x_mean: ArrayLike, y_mean: ArrayLike, n1: int, n2: int) -> tuple[np.ndarray, np.ndarray, int]:
    check_count("n1 (samples in the first half)", n1)
    check_count("n2 (samples in the second half)", n2)
    x = np.atleast_2d(np.asarray(x_mean, dtype=np.float64))
    y = np.atleast_2d(np.asarray(y_mean, dtype=np.float64))
    if x.shape != y.shape:
        raise ValueError(f"the two halves' means must have one shape, got {x.shape} and {y.shape}")
    return x, y, x.shape[1]


def _l2_terms(x, y, n1, n2, delta, kappa):
    dim = x.shape[1]
    k1, k2 = kappa / n1, kappa / n2
    t = product_deviation(dim, k1, k2, delta / 2.0)
    c = math.sqrt(2.0 * (k1 + k2) * math.log(2.0 / delta))
    return np.einsum("bd,bd->b", x, y), t, c


def l2_upper(x_mean: ArrayLike, y_mean: ArrayLike, n1: int, n2: int, delta: float,
             kappa: float = KAPPA) -> np.ndarray:
    """Upper bound ``U`` with ``P(||beta||_2 <= U) >= 1 - delta`` from the two halves' means (rows: inputs).

    On the event ``X^T Y >= ||beta||^2 - c ||beta|| - t`` (probability >= 1 - delta),
    ``||beta|| <= (c + sqrt(c^2 + 4 (X^T Y + t))) / 2`` (seed 004 Theorem 5, re-derived; see module docstring).
    """
    x, y, _ = _halves(x_mean, y_mean, n1, n2)
    xy, t, c = _l2_terms(x, y, n1, n2, _delta(delta), kappa)
    return 0.5 * (c + np.sqrt(np.maximum(c * c + 4.0 * (xy + t), 0.0)))


def l2_lower(x_mean: ArrayLike, y_mean: ArrayLike, n1: int, n2: int, delta: float,
             kappa: float = KAPPA) -> np.ndarray:
    """Lower bound ``L`` with ``P(||beta||_2 >= L) >= 1 - delta``: ``(sqrt(c^2 + 4 (X^T Y - t)) - c) / 2`` or 0.

    On the event ``X^T Y <= ||beta||^2 + c ||beta|| + t`` (seed 004 Theorem 5, re-derived).
    """
    x, y, _ = _halves(x_mean, y_mean, n1, n2)
    xy, t, c = _l2_terms(x, y, n1, n2, _delta(delta), kappa)
    a = xy - t
    return np.where(a > 0, 0.5 * (np.sqrt(c * c + 4.0 * np.maximum(a, 0.0)) - c), 0.0)


def _pooled(mean: ArrayLike, n: int) -> np.ndarray:
    check_count("n (samples)", n)
    return np.atleast_2d(np.asarray(mean, dtype=np.float64))


def _single_tail(scale: float, n: int, delta: float, kappa: float) -> float:
    """Chernoff tail of one fixed sub-Gaussian functional with proxy ``kappa * scale / n``: no union."""
    return math.sqrt(2.0 * kappa * scale * -math.log(_delta(delta)) / n)


def _t_inf(dim: int, n: int, delta: float, kappa: float) -> float:
    return math.sqrt(2.0 * kappa * (math.log(2.0 * dim) - math.log(_delta(delta))) / n)


def _t_one(dim: int, n: int, delta: float, kappa: float) -> float:
    return math.sqrt(2.0 * kappa * dim * (dim * math.log(2.0) - math.log(_delta(delta))) / n)


def linf_upper(mean: ArrayLike, n: int, delta: float, kappa: float = KAPPA) -> np.ndarray:
    """``P(||beta||_inf <= ||M||_inf + sqrt(2 kappa log(1 / delta) / n)) >= 1 - delta`` for the pooled mean ``M``
    of ``n`` samples: the tail of the one functional ``+-e_i*`` that attains ``||beta||_inf`` (module docstring;
    Table 1 without its union over the ``2 d`` coordinates, which an upper bound does not need)."""
    m = _pooled(mean, n)
    return np.abs(m).max(axis=1) + _single_tail(1.0, n, delta, kappa)


def linf_lower(mean: ArrayLike, n: int, delta: float, kappa: float = KAPPA) -> np.ndarray:
    """``P(||beta||_inf >= ||M||_inf - t_inf) >= 1 - delta`` (Table 1, union over ``2 d`` tails), floored at 0."""
    m = _pooled(mean, n)
    return np.maximum(np.abs(m).max(axis=1) - _t_inf(m.shape[1], n, delta, kappa), 0.0)


def l1_upper(mean: ArrayLike, n: int, delta: float, kappa: float = KAPPA, *,
             sign_norm2: float | None = None) -> np.ndarray:
    """``P(||beta||_1 <= ||M||_1 + sqrt(2 kappa S log(1 / delta) / n)) >= 1 - delta`` for the pooled mean ``M`` of
    ``n`` samples: the tail of the one functional ``sign(beta)`` that attains ``||beta||_1`` (module docstring;
    Table 1 without its union over the ``2^d`` sign vectors, which an upper bound does not need).

    ``S = sign_norm2`` bounds ``||P s||^2`` over sign vectors ``s`` when ``M = P Z`` is a projection (default: the
    dimension, ``||s||^2``): the variance-proxy factor of ``s^T M``.
    """
    m = _pooled(mean, n)
    scale = m.shape[1] if sign_norm2 is None else check_positive("sign_norm2", sign_norm2)
    return np.abs(m).sum(axis=1) + _single_tail(scale, n, delta, kappa)


def l1_lower(mean: ArrayLike, n: int, delta: float, kappa: float = KAPPA) -> np.ndarray:
    """``P(||beta||_1 >= ||M||_1 - t_1) >= 1 - delta`` (Table 1, union over ``2^d`` sign vectors), floored at 0."""
    m = _pooled(mean, n)
    return np.maximum(np.abs(m).sum(axis=1) - _t_one(m.shape[1], n, delta, kappa), 0.0)
