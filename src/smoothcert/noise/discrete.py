"""Sound sampling for quantized inputs: Gaussian noise rounded onto the input's grid, drawn from integer bits.

Floating-point Gaussian noise is not exactly Gaussian, and a base classifier can tell (Voracek and Hein, "Sound
randomized smoothing in floating-point arithmetic", ICLR 2023): the textbook certificate then need not hold for
the computation actually performed. For inputs on a grid (pixels ``u / L``, ``u`` in ``0..L``, ``L = 255`` for
8-bit images) this module samples a smoothed classifier *exactly*, with integer arithmetic and fair random bits
only, following the paper's sampler (Gaussian noise rounded to the grid, bin thresholds on integer bits).

**Which classifier is certified.** Let ``Q(z) = clip(round(L z), 0, L)`` (per coordinate), ``F(v) = v / L``
rounded once to the buffer's dtype (float32 in the engine; ``uint8_pixels.float() / 255`` gives the same numbers)
and ``h = f o F o Q``, a base classifier defined on all of ``R^d``. The certified smoothed classifier is

    g(z) = argmax_c P_{delta ~ N(0, sigma^2 I)} [ f(F(clip(round(L (z + delta)), 0, L))) = c ],   z in R^d,

Cohen's smoothing of ``h``. Cohen et al.'s Theorem 1 (seed 001 Thm 1, seed 000 eq. 3.3) holds for *every*
measurable base classifier, ``h`` included: if ``p_A <= P(h(x + delta) = c_A)`` and ``p_A >= 1/2`` then
``g(x') = c_A`` for every ``x'`` with ``||x' - x||_2 < sigma Phi^-1(p_A)`` (pixels in [0, 1], sigma in those
units). So the family's gap and region are the isotropic Gaussian's, ``Phi^-1(p_A)`` and the l2 ball of radius
``sigma Phi^-1(p_A)``; what changes is only *which* ``p_A`` is bounded.

**Sampling g exactly at a grid point.** For ``x = u / L``, ``round(L (x + delta)) = u + round(L delta)``
(ties have probability 0), so ``h(x + delta) = f(F(clip(u + k, 0, L)))`` with ``k = round(L delta)``: i.i.d.
coordinates of the discretized Gaussian ``q_j = P(k = j) = Phi((j + 1/2) / s) - Phi((j - 1/2) / s)``,
``s = L sigma``. Every ``k >= L`` clips like ``k = L`` (and ``k <= -L`` like ``-L``), so the outcomes are
``j = -L..L`` with the tails folded into the ends, ``q_{+-L} = Phi(-(L - 1/2) / s)``. At grid points ``g`` is
therefore exactly the discrete smoothing ``argmax_c P_k[f(F(clip(u + k))) = c]`` that is sampled; between grid
points it is the continuous smoothing of ``h``.

**Rounded-down masses and the leftover.** Each bin gets ``m_j = floor(2^62 (q^_j - e_j)) / 2^62 <= q_j``, where
``q^_j`` is ``q_j`` computed in float64 (erfc of tails, no cancellation near 0) and ``e_j = 1e-12 (a_j + b_j)``
bounds its error (``a_j, b_j`` the two tail values it subtracts; scipy's erfc is accurate to a few ulps, and
``tests/test_sound_sampling.py`` checks ``m_j <= q_j`` against 50-digit mpmath for many sigmas). The remainder
``lambda = 1 - sum_j m_j >= 0`` is one more outcome, *leftover*. Each coordinate takes 62 fair bits
(the low bits of torch's full-range int64 draw, ``random_(-2**63, None)``: exactly uniform) and maps them through an
integer alias table (Walker; built exactly, no rounding) to an outcome of probability exactly ``m_j`` or
``lambda``. A sample with any leftover coordinate is *void*: it counts for no class.

**Why the bound still holds.** Per sample, ``P(not void and f(...) = c) = sum_k prod_i m_{k_i} 1[...] <=
sum_k prod_i q_{k_i} 1[...] = P(h(x + delta) = c)`` because ``m <= q`` termwise. The count of ``c_A`` among
``n`` samples is Binomial(``n``, ``mu_A``) with ``mu_A <= p_A``, so Clopper-Pearson's lower bound of ``mu_A`` at
level ``alpha`` also lower-bounds ``p_A``: the leftover mass is counted against ``c_A``. For PREDICT the engine
adds void samples to the runner-up's count (:func:`smoothcert.engine.smooth.predict`): coupled with exact
sampling, where each void sample is *some* class, that only raises the test's p-value.

**Off the grid by rounding.** An input is read as the grid point ``u / L`` (``u = round(L x)``), whose smoothing
is what the samples bound; ``x`` itself (``u / L`` rounded to float32, or within ``GRID_TOLERANCE`` grid steps of
it) may lie a little away. The region is the ball about ``x`` of radius ``sigma Phi^-1(p_A) - ||x - u / L||_2``,
inside the ball about ``u / L`` (about ``2^-25 sqrt(d)`` smaller for float32 pixels: 1e-6 at d = 784).

The price: ``P(void) <= d lambda`` per sample, about ``1e-10 d`` at sigma = 0.25 (``void_probability``), far
below the Clopper-Pearson slack. Inputs must lie on the grid (:meth:`DiscretizedGaussian.check_support`);
``x`` is read as ``u = round(L x)``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import special

from smoothcert.geometry.regions import Ball
from smoothcert.noise.base import Noise
from smoothcert.noise.gaussian import IsotropicGaussian
from smoothcert.validation import check_positive

__all__ = ["DiscretizedGaussian", "BITS", "discretized_masses", "alias_table", "gaussian_noise", "SAMPLINGS"]

#: Random bits per coordinate: masses are multiples of ``2^-BITS``.
BITS = 62
#: Relative bound on the float64 error of a computed bin mass (of the tail values it subtracts).
MASS_ERROR = 1e-12
#: How far ``L x`` may lie from an integer for ``x`` to count as a grid point (in grid steps).
GRID_TOLERANCE = 1e-3
#: The ways of sampling isotropic Gaussian smoothing: the name recorded in every row -> the family.
SAMPLINGS = ("float", "sound")


def discretized_masses(sigma: float, levels: int) -> list[int]:
    """``2 L + 1`` bin masses of ``round(L N(0, sigma^2))`` folded onto ``-L..L``, in units of ``2^-BITS``,
    each rounded down below the exact mass (see the module docstring); Python ints, index ``j + L``."""
    s = float(sigma) * levels * math.sqrt(2.0)
    j = np.arange(1, levels, dtype=np.float64)
    upper = 0.5 * special.erfc((j - 0.5) / s)  # P(k >= j) = Phi(-(j - 1/2) / s)
    lower = 0.5 * special.erfc((j + 0.5) / s)  # P(k >= j + 1)
    inner = upper - lower
    inner_err = MASS_ERROR * (upper + lower)
    tail = 0.5 * float(special.erfc((levels - 0.5) / s))  # P(k >= L), folded into j = L
    centre = float(special.erf(0.5 / s))  # P(k = 0) = Phi(1/2s) - Phi(-1/2s), no cancellation
    scale = float(2**BITS)

    def floor_units(value: float, err: float) -> int:
        return max(0, math.floor((value - err) * scale))  # scaling by 2^BITS is exact in float64

    side = [floor_units(float(v), float(e)) for v, e in zip(inner, inner_err)] + [floor_units(tail, MASS_ERROR * tail)]
    masses = side[::-1] + [floor_units(centre, MASS_ERROR * centre)] + side
    if sum(masses) > 2**BITS:  # impossible when every m_j <= q_j (sum q_j = 1); a guard, not a tolerance
        raise RuntimeError("rounded-down masses exceed 1: the float64 error bound failed")
    return masses


def alias_table(weights: list[int], total_bits: int = BITS) -> tuple[list[int], list[int]]:
    """Walker's alias table of integer ``weights`` (``len`` a power of two ``K``, sum ``2^total_bits``), exactly.

    Column ``i`` holds ``C = 2^total_bits / K`` units: ``threshold[i]`` of outcome ``i`` and ``C - threshold[i]``
    of ``alias[i]``. Drawing a column uniformly and ``r`` uniformly in ``[0, C)`` and returning ``i`` when
    ``r < threshold[i]`` (else ``alias[i]``) gives outcome ``j`` with probability ``weights[j] / 2^total_bits``:
    all arithmetic is on integers, so the identity is exact (checked in the tests).
    """
    k = len(weights)
    if k & (k - 1) or k < 2 or sum(weights) != 2**total_bits or min(weights) < 0:
        raise ValueError("alias_table needs a power-of-two number of non-negative weights summing to 2^total_bits")
    capacity = 2**total_bits // k
    left = list(weights)
    threshold, alias = [capacity] * k, list(range(k))
    small = [i for i in range(k) if left[i] < capacity]
    large = [i for i in range(k) if left[i] >= capacity]
    while small and large:
        s, g = small.pop(), large.pop()
        threshold[s], alias[s] = left[s], g
        left[g] -= capacity - left[s]
        (small if left[g] < capacity else large).append(g)
    # what remains is exactly full (the sums are integers): its columns keep their own outcome
    return threshold, alias


class DiscretizedGaussian(Noise):
    """Isotropic Gaussian smoothing sampled exactly on the input grid ``{0, 1/L, ..., 1}`` (``L = levels``).

    ``perturb_`` returns ``clip(u + k, 0, L) / L`` for the grid input ``u / L`` and ``k`` the discretized Gaussian
    of ``s = L sigma`` with rounded-down masses (void samples flagged); :meth:`gap` and :meth:`region` are Cohen's:
    the certificate holds for ``g`` of the module docstring (``f o F o clip o round`` smoothed by
    ``N(0, sigma^2 I)``) exactly. ``sigma`` in input units (pixels in [0, 1]).
    """

    kind = "discretized-gaussian"
    sampling = "sound"

    def __init__(self, sigma: float, levels: int = 255):
        self.sigma = check_positive("sigma (noise level, in input units where pixels lie in [0, 1])", sigma)
        if isinstance(levels, bool) or not isinstance(levels, (int, np.integer)) or not 1 <= int(levels) <= 65535:
            raise ValueError(f"levels (the grid's steps: pixels u / levels, u in 0..levels) must be an integer in "
                             f"[1, 65535], got {levels!r}")
        self.levels = int(levels)
        self.sigma_sampled = self.sigma  # no float32 rounding: the masses are computed from sigma itself
        masses = discretized_masses(self.sigma, self.levels)
        self.leftover_units = 2**BITS - sum(masses)
        outcomes = 1 << (len(masses)).bit_length()  # 2L + 1 bins, the leftover, zero-weight padding: 2^m
        self.masses = masses
        self.weights = masses + [self.leftover_units] + [0] * (outcomes - len(masses) - 1)
        self.column_bits = outcomes.bit_length() - 1
        threshold, alias = alias_table(self.weights)
        # column c keeps its own outcome when the low bits are below threshold[c], else gives alias[c]; ``pick``
        # holds both as noise values j (the leftover as L + 1, the padding never drawn): pick[2c + keep]
        as_noise = [o - self.levels for o in range(outcomes)]
        self._threshold = torch.tensor(threshold, dtype=torch.int64)
        self._pick = torch.tensor([as_noise[v] for c in range(outcomes) for v in (alias[c], c)], dtype=torch.int32)
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._buffers: dict[torch.device, list[torch.Tensor]] = {}

    # -- what the certificate costs ----------------------------------------------------------------------
    @property
    def leftover(self) -> float:
        """``lambda``: the mass per coordinate left over after rounding down (a void coordinate)."""
        return self.leftover_units / 2**BITS

    def void_probability(self, d: int) -> float:
        """``1 - (1 - lambda)^d``: the chance that a sample of ``d`` coordinates is void."""
        return -math.expm1(d * math.log1p(-self.leftover))

    # -- sampling ----------------------------------------------------------------------------------------
    def _tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._on_device:
            self._on_device[device] = (self._threshold.to(device), self._pick.to(device))
        return self._on_device[device]

    @property
    def void_value(self) -> int:
        """The value :meth:`noise_values` gives a leftover coordinate: ``L + 1``."""
        return self.levels + 1

    def noise_values(self, shape: tuple[int, ...], generator: torch.Generator | None = None,
                     device: torch.device | str = "cpu") -> torch.Tensor:
        """int32 draws of ``shape``: the grid noise ``j`` in ``-L..L`` with probability ``m_j`` exactly, or
        :attr:`void_value` (``L + 1``) for the leftover, from ``BITS`` fair bits per draw (:meth:`lookup`)."""
        return self._draw(math.prod(shape), generator, torch.device(device)).view(shape).clone()

    def _work(self, count: int, device: torch.device) -> list[torch.Tensor]:
        """Reused buffers for ``count`` draws (fresh large allocations cost page faults on every block)."""
        held = self._buffers.get(device)
        if held is None or held[0].numel() < count:
            held = [torch.empty(count, dtype=torch.int64, device=device) for _ in range(3)] + [
                torch.empty(count, dtype=torch.int32, device=device)]
            self._buffers[device] = held
        return [b[:count] for b in held]

    def _draw(self, count: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
        """:meth:`noise_values` into a reused buffer (valid until the next draw of this noise)."""
        bits, column, scratch, out = self._work(count, device)
        # uniform over all of int64 (torch's full-range draw: 64 fair bits, no modulo); keep the low BITS
        bits.random_(-2**63, None, generator=generator).bitwise_and_(2**BITS - 1)
        return self.lookup(bits, column, scratch, out)

    def lookup(self, bits: torch.Tensor, column: torch.Tensor | None = None, scratch: torch.Tensor | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
        """The outcome of each ``BITS``-bit integer (int64, 1-D; overwritten): the top bits pick a column of the
        alias table, the rest compare with its threshold. Uniform bits give outcome ``j`` with probability
        ``m_j`` exactly (:func:`alias_table`). ``column``, ``scratch`` (int64) and ``out`` (int32) are optional
        buffers of ``bits``' size."""
        threshold, pick = self._tables(bits.device)
        low_bits = BITS - self.column_bits
        column = torch.bitwise_right_shift(bits, low_bits, out=column)
        scratch = torch.index_select(threshold, 0, column, out=scratch)
        # low - threshold < 0 (keep the column's own outcome) iff its sign bit is set: both lie in [0, 2^low_bits]
        below = bits.bitwise_and_((1 << low_bits) - 1).sub_(scratch).bitwise_right_shift_(63)  # -1 or 0
        return torch.index_select(pick, 0, column.mul_(2).sub_(below), out=out)

    def grid(self, x: torch.Tensor) -> torch.Tensor:
        """The grid values ``u = round(L x)`` (int64) of an input on the grid."""
        return torch.round(x.to(torch.float64) * self.levels).to(torch.int64)

    def check_support(self, x):
        xd = torch.as_tensor(x).detach().to(torch.float64)
        scaled = xd * self.levels
        off = (scaled - torch.round(scaled)).abs()
        bad = (off > GRID_TOLERANCE) | (xd < 0) | (xd > 1) | ~torch.isfinite(xd)
        if bool(bad.any()):
            at = int(torch.nonzero(bad.reshape(-1))[0])
            raise ValueError(f"sound sampling needs inputs on the grid k/{self.levels} (k in 0..{self.levels}, pixels "
                             f"in [0, 1]); value {float(xd.reshape(-1)[at])!r} at flat position {at} is not (off by "
                             f"{float(off.reshape(-1)[at]):.3g} grid steps); float sampling (IsotropicGaussian, --sampling "
                             "float) takes any input")

    def perturb_(self, out, x, generator=None, noise_out=None):
        self.check_buffer(out)
        m, d = out.shape[0], out[0].numel()
        k = self._draw(m * d, generator, out.device).view(m, d)
        void = k.amax(dim=1) == self.void_value  # the leftover is the largest value
        start = self.grid(x).reshape(1, d).to(device=out.device, dtype=torch.int32)
        level = k.add_(start).clamp_(0, self.levels)  # add and clip in integer space
        flat = out.view(m, d)
        flat.copy_(level)  # integers <= 65535: exact in float32
        flat.div_(self.levels)  # the one conversion to float: F(v) = v / L, rounded once
        if noise_out is not None:
            torch.sub(out, x, out=noise_out)
        return void

    def fill_(self, out, generator=None):
        """Grid noise ``k / L`` (unclipped; ``NaN`` where a coordinate is leftover). The engine uses
        :meth:`perturb_`, which adds and clips in integer space; this is for inspecting the noise."""
        self.check_buffer(out)
        m, d = out.shape[0], out[0].numel()
        k = self.noise_values((m, d), generator, out.device)
        flat = out.view(m, d)
        flat.copy_(k).div_(self.levels)
        flat.masked_fill_(k == self.void_value, float("nan"))
        return out

    # -- the certificate: Cohen's ------------------------------------------------------------------------
    @property
    def scale(self) -> float:
        """The family's own scale, recorded in rows: the Gaussian's sigma (before rounding onto the grid)."""
        return self.sigma

    def offset(self, center: torch.Tensor) -> float:
        """``||x - u / L||_2``, rounded up: how far the input lies from the grid point whose smoothing is sampled
        (0 up to float rounding for ``x = u / L`` as stored; at most ``GRID_TOLERANCE sqrt(d) / L``)."""
        xd = center.detach().to(torch.float64).reshape(-1)
        off = float(torch.linalg.vector_norm(xd - self.grid(xd).to(torch.float64) / self.levels))
        return off * (1.0 + 1e-12) + math.sqrt(xd.numel()) * 2.0**-50  # float64 rounding of u / L and the norm

    def region(self, center, gap):
        """The ball about the input ``x`` of radius ``sigma gap - ||x - u / L||``: the samples bound ``p_A`` at the
        grid point ``u / L``, whose ball of radius ``sigma gap`` contains it (triangle inequality)."""
        return Ball(center, max(self.sigma * max(float(gap), 0.0) - self.offset(center), 0.0))

    def scales(self):
        return torch.tensor(self.sigma, dtype=torch.float64)

    def parameters(self):
        return {"sigma": torch.tensor([self.sigma], dtype=torch.float64),
                "levels": torch.tensor([self.levels], dtype=torch.int64)}

    @classmethod
    def from_parameters(cls, params):
        return cls(float(params["sigma"].reshape(-1)[0]), int(params["levels"].reshape(-1)[0]))

    def __repr__(self) -> str:
        return f"DiscretizedGaussian(sigma={self.sigma}, levels={self.levels})"


def gaussian_noise(sigma: float, sampling: str = "float") -> Noise:
    """Isotropic Gaussian smoothing at ``sigma``: ``float`` draws :class:`IsotropicGaussian` noise in floating point,
    ``sound`` the exact :class:`DiscretizedGaussian` on the 8-bit grid (inputs ``k / 255``)."""
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {', '.join(SAMPLINGS)}, got {sampling!r}")
    return IsotropicGaussian(sigma) if sampling == "float" else DiscretizedGaussian(sigma)
