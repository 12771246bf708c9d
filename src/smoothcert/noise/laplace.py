"""Laplace smoothing noise with l1 certificates (Teng et al., "l1 adversarial robustness certificates: a randomized
smoothing approach", 2020, Theorem 1; seed 001, "Laplace, Teng et al. (2019)" in its l1 table).

Noise ``eps_i ~ Laplace(0, lambda)`` independently per coordinate, density ``prod_i exp(-|z_i| / lambda) / (2 lambda)``.
Its standard deviation is ``sqrt(2) lambda``, so noise of per-coordinate standard deviation ``sigma`` (smoothcert's one
sigma convention, in input units) has **scale ``lambda = sigma / sqrt(2)``** (:meth:`Laplace.from_std`).

**Certificate, derived.** For ``||delta||_1 <= r`` the density ratio of the shifted noise is
``exp((||z||_1 - ||z - delta||_1) / lambda)``, in ``[exp(-r / lambda), exp(r / lambda)]`` by the triangle inequality.
So for every set ``A`` (the inputs the base classifier sends to ``c_A``)

    P(x + delta + eps in A) >= max{ exp(-r / lambda) p_A,  1 - exp(r / lambda) (1 - p_A) },

and for a runner-up ``B``, ``P(x + delta + eps in B) <= min{ exp(r / lambda) p_B, 1 - exp(-r / lambda) (1 - p_B) }``.
``c_A`` stays on top while a lower bound exceeds an upper bound. With ``p_B = 1 - p_A`` (one-sided, what CERTIFY
bounds) the best pair is ``1 - e^(r/lambda) (1 - p_A) > 1/2``:

    R_1 = -lambda ln(2 (1 - p_A))                                            (one-sided; Teng et al. Theorem 1)

and with an upper bound ``p_B`` of the runner-up (two-sided) the pairs give

    R_1 = max{ (lambda / 2) ln(p_A / p_B),  -lambda ln(1 - p_A + p_B) }       (Teng et al. Theorem 1)

(the fourth pair, ``(lambda / 2) ln((1 - p_B) / (1 - p_A))``, never exceeds the first since
``p_A (1 - p_A) >= p_B (1 - p_B)``; the third, ``lambda ln(1 + p_A - p_B)``, never exceeds the second). The one-sided
radius is tight: the classifier ``1[z_1 < x_1 + R_1]`` along a coordinate axis has exactly ``p_A`` at ``x`` and
``1/2`` at ``x + R_1 e_1`` (``tests/test_noise_families.py``). The gap is ``-ln(2 (1 - p_A))`` and the certified
region the l1 ball of radius ``lambda * gap`` (a :class:`~smoothcert.geometry.CrossPolytope` with equal axes); its
l2 and l_inf radii follow by the norm inequalities (``R_1 / sqrt(d)``, ``R_1 / d``, marked converted).
"""

from __future__ import annotations

import math

import torch

from smoothcert.geometry.norms import NormRadii
from smoothcert.geometry.regions import CrossPolytope
from smoothcert.noise.base import Noise, as_sampled
from smoothcert.validation import check_positive

__all__ = ["Laplace", "laplace_l1_radius", "laplace_scale"]

_SCALE = "the Laplace scale lambda (= sigma / sqrt(2), sigma the per-coordinate standard deviation in input units)"


def laplace_scale(sigma: float) -> float:
    """``lambda = sigma / sqrt(2)``: the Laplace scale of per-coordinate standard deviation ``sigma``."""
    return check_positive("sigma (per-coordinate standard deviation, in input units)", sigma) / math.sqrt(2.0)


def _probability(name: str, p: float) -> float:
    p = float(p)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {p!r}")
    return p


def laplace_l1_radius(p_a: float, scale: float, p_b: float | None = None) -> float:
    """The certified l1 radius of Laplace noise of ``scale`` lambda (module docstring; Teng et al. Theorem 1).

    ``p_a`` is a lower bound of the top class's probability; without ``p_b`` (one-sided) ``-lambda ln(2 (1 - p_A))``,
    0 below ``p_A = 1/2``; with an upper bound ``p_b`` of the runner-up's, ``max{(lambda / 2) ln(p_A / p_B),
    -lambda ln(1 - p_A + p_B)}``, 0 when neither is positive.
    """
    lam = check_positive(_SCALE, scale)
    p_a = _probability("p_a (lower bound of the top class's probability)", p_a)
    if p_b is None:
        if p_a <= 0.5:
            return 0.0
        return math.inf if p_a == 1.0 else -lam * math.log(2.0 * (1.0 - p_a))
    p_b = _probability("p_b (upper bound of the runner-up's probability)", p_b)
    if p_a <= p_b:
        return 0.0
    ratio = math.inf if p_b == 0.0 else 0.5 * lam * math.log(p_a / p_b)
    rest = 1.0 - p_a + p_b
    mass = math.inf if rest <= 0.0 else -lam * math.log(rest)
    return max(ratio, mass, 0.0)


class Laplace(Noise):
    """``eps_i ~ Laplace(0, lambda)`` i.i.d.: the region is the l1 ball of radius ``lambda (-ln(2 (1 - p_A)))``.

    ``scale`` lambda is kept as given (it names the run) and as sampled (``scale_sampled``, rounded to float32: the
    number the sampler multiplies by, and the one the region uses). ``sigma`` is the standard deviation
    ``sqrt(2) lambda``. Draws: ``lambda * s * E`` with ``E ~ Exp(1)`` and an independent random sign ``s``.
    """

    kind = "laplace"
    native_norms = ("l1",)

    def __init__(self, scale: float):
        self.scale = check_positive(_SCALE, scale)
        self.scale_sampled = float(as_sampled(torch.tensor(self.scale, dtype=torch.float64)))
        if not 0.0 < self.scale_sampled < math.inf:
            raise ValueError(f"{_SCALE} = {self.scale!r} is not representable in float32 (the sampling dtype)")

    @classmethod
    def from_std(cls, sigma: float) -> "Laplace":
        """Laplace noise of per-coordinate standard deviation ``sigma``: scale ``sigma / sqrt(2)``."""
        return cls(laplace_scale(sigma))

    @property
    def sigma(self) -> float:
        """The per-coordinate standard deviation, ``sqrt(2) * scale``."""
        return self.scale * math.sqrt(2.0)

    @staticmethod
    def _signed_exponential_(out: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        out.exponential_(1.0, generator=generator)
        sign = torch.empty_like(out).bernoulli_(0.5, generator=generator)
        return out.mul_(sign.mul_(2.0).sub_(1.0))

    def fill_(self, out, generator=None):
        self.check_buffer(out)
        return self._signed_exponential_(out, generator).mul_(self.scale_sampled)

    @classmethod
    def unit_draws(cls, shape, generator: torch.Generator | None = None, device="cpu") -> torch.Tensor:
        """float32 draws of standard deviation 1 (``Laplace(0, 1 / sqrt(2))``), for training at ``sigma * w``."""
        out = torch.empty(tuple(shape), device=device, dtype=torch.float32)
        return cls._signed_exponential_(out, generator).mul_(1.0 / math.sqrt(2.0))

    def gap(self, p_lower: float) -> float:
        """``-ln(2 (1 - p_A))``: the l1 radius per unit scale (0 at ``p_A = 1/2``)."""
        return laplace_l1_radius(p_lower, 1.0)

    def level(self, gap: float) -> float:
        """``1 - exp(-gap) / 2`` (``1/2`` at gap 0): the inverse of :meth:`gap`."""
        return 0.5 - 0.5 * math.expm1(-max(float(gap), 0.0))

    def region(self, center, gap):
        d = int(center.numel())
        radius = self.scale_sampled * max(float(gap), 0.0)
        return CrossPolytope(center, torch.full((d,), radius, dtype=torch.float64, device=center.device))

    def norm_radii(self, p_lower, gap, region):
        """l1 native (the region's radius ``lambda * gap``); l2 and l_inf by the norm inequalities."""
        return NormRadii.from_certified({"l1": region.norm_radius}, region.dim)

    def scales(self):
        return torch.tensor(self.scale_sampled, dtype=torch.float64)

    def parameters(self):
        return {"scale": torch.tensor([self.scale], dtype=torch.float64)}

    @classmethod
    def from_parameters(cls, params):
        return cls(float(params["scale"].reshape(-1)[0]))

    def __repr__(self) -> str:
        return f"Laplace(scale={self.scale})"
