"""First-order certificates in ``--mode target`` and ``anytime``: the gradient bounds on a fixed pilot, ``p_A``
sequentially (seed 004 with the sequential tests of :mod:`smoothcert.engine.sequential`).

Protocol (:func:`certify_first_order_sequential`), per input, with ``N(0, sigma^2 I)`` noise as sampled:

1. ``n0`` selection samples choose ``c_A`` (stream ``select``).
2. The ``n`` estimation samples of fixed first-order CERTIFY, in two independent halves, give the gradient-norm
   bounds at ``alpha_each`` each (:func:`~smoothcert.methods.firstorder.certificate.gradient_bounds`); their
   class counts are not used.
3. ``p_A`` is tested sequentially at ``alpha_p`` on a further independent stream by
   :func:`~smoothcert.engine.sequential.certify_sequential`, with :class:`FirstOrderGaussian`: the same noise
   whose gap is the first-order l2 radius of the pilot's bound ``m >= ||beta||_2`` (Corollary 3.1,
   :func:`~smoothcert.methods.firstorder.radii.l2_radius`). In ``target`` mode the level is the smallest ``q``
   whose first-order l2 radius reaches the target ``r``, below Cohen's ``Phi(r / sigma)`` wherever the gradient
   bound is informative; ``anytime`` runs the confidence sequence to the requested precision of that radius.

Guarantee: the gradient bounds fail with probability at most ``alpha_grad``; the confidence sequence of ``p_A``
fails with probability at most ``alpha_p`` whatever the stopping rule, since its level (a function of the pilot)
is fixed before any of its samples is drawn. Outside both events ``q`` (target: the level ``p*`` where it
certified; anytime: the lower bound where it stopped) is a lower bound of ``p_A`` and every radius computed from
``q`` and the bounds holds, as in fixed first-order CERTIFY: with probability at least ``1 - alpha`` every
reported radius is certified at once (union bound, recorded as ``alpha_p``, ``alpha_grad``, ``alpha_each``).
An input that is not certified abstains (radius 0; in target mode, at ``r``). ``n_used`` counts the pilot's and
the sequential estimation samples.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from scipy import optimize

from smoothcert.engine.sequential import Mode, certify_sequential
from smoothcert.methods.firstorder.certificate import NORMS, FirstOrderCertificate, Subspace, gradient_pilot
from smoothcert.methods.firstorder.radii import R_MAX, l2_radius
from smoothcert.noise.gaussian import IsotropicGaussian
from smoothcert.stats.bounds import level as normal_level

__all__ = ["FirstOrderGaussian", "certify_first_order_sequential"]

#: :meth:`FirstOrderGaussian.level` tries ``root + (hi - root) 2^-k`` for k from this down to 0 until one reaches the gap.
_LEVEL_STEPS = 40


class FirstOrderGaussian(IsotropicGaussian):
    """``N(0, sigma^2 I)`` (sampled exactly as :class:`IsotropicGaussian`) whose certified gap is the first-order
    normalized l2 radius for a gradient bound ``m >= sigma ||grad g(x)||_2`` (Corollary 3.1, never below
    Cohen's ``Phi^-1(q)``); the region is the l2 ball of ``sigma_sampled`` times that radius."""

    kind = "first-order-isotropic"

    def __init__(self, sigma: float, m: float):
        super().__init__(sigma)
        m = float(m)
        if not (math.isfinite(m) and m >= 0):
            raise ValueError(f"the gradient bound m must be a finite number >= 0, got {m!r}")
        self.m = m

    def gap(self, p_lower: float) -> float:
        return l2_radius(min(max(float(p_lower), 0.0), 1.0), self.m)

    def level(self, gap: float) -> float:
        """The smallest probability whose first-order gap reaches ``gap`` (Brent's root of ``gap(q) - gap`` between
        1/2 and Cohen's level, then raised until reached): a ``q`` returned satisfies ``self.gap(q) >= gap``, always
        checked; 1 when no probability below 1 reaches it."""
        gap = float(gap)
        if gap <= 0:
            return 0.5
        if gap > R_MAX:
            return 1.0
        hi = float(normal_level(gap))  # Cohen's level: the first-order radius is never below Cohen's
        for _ in range(64):
            if hi >= 1.0 or self.gap(hi) >= gap:
                break
            hi = math.nextafter(hi, 1.0)
        if hi >= 1.0:
            return 1.0
        root = optimize.brentq(lambda q: self.gap(q) - gap, 0.5, hi, xtol=1e-15, rtol=4 * np.finfo(float).eps)
        for k in range(_LEVEL_STEPS + 1):  # from the root towards hi, the first probability that reaches the gap
            q = root + (hi - root) * 2.0 ** (k - _LEVEL_STEPS)
            if self.gap(q) >= gap:
                return q
        return hi

    def parameters(self):
        return {"sigma": torch.tensor([self.sigma], dtype=torch.float64),
                "m": torch.tensor([self.m], dtype=torch.float64)}

    @classmethod
    def from_parameters(cls, params):
        return cls(float(params["sigma"].reshape(-1)[0]), float(params["m"].reshape(-1)[0]))

    def __repr__(self) -> str:
        return f"FirstOrderGaussian(sigma={self.sigma}, m={self.m})"


def certify_first_order_sequential(
    model: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    sigma: float,
    num_classes: int,
    n0: int,
    n: int,
    alpha: float,
    mode: Mode,
    *,
    norms: str | Sequence[str] = NORMS,
    subspace: Subspace | str | None = None,
    alpha_split: float = 0.5,
    batch_size: int = 1000,
    block: int | None = None,
    generators: Sequence[tuple[torch.Generator, ...]],
    dtype: torch.dtype = torch.float32,
    seed: int | None = None,
    range_policy: str = "warn",
) -> list[FirstOrderCertificate]:
    """First-order CERTIFY of ``x`` (B, *shape) in ``mode`` (``target`` or ``anytime``); one certificate per input.

    ``n``: the pilot's estimation samples (the gradient bounds); ``mode.n_max``: the most samples of the sequential
    ``p_A`` test. ``generators``: per input four independent streams ``(selection, half 1, half 2, sequential)``.
    See the module docstring for the protocol and the guarantee. Raises ValueError before sampling on a bad budget,
    norm, subspace or mode.
    """
    if not isinstance(mode, Mode) or not mode.sequential:
        raise ValueError("certify_first_order_sequential takes a Mode of name target or anytime")
    if not (isinstance(x, torch.Tensor) and x.ndim >= 2):
        raise ValueError("x must be a batch tensor (B, *input_shape)")
    gens = list(generators)
    if len(gens) != x.shape[0] or not all(isinstance(g, (tuple, list)) and len(g) == 4 for g in gens):
        raise ValueError("generators must hold one (selection, half 1, half 2, sequential) quadruple per input")
    pilot = gradient_pilot(model, x, sigma, num_classes, n0, n, alpha, norms=norms, subspace=subspace,
                           alpha_split=alpha_split, p_samples=mode.n_max, batch_size=batch_size, block=block,
                           generators=[g[:3] for g in gens], dtype=dtype, seed=seed, range_policy=range_policy)
    noises = [FirstOrderGaussian(pilot.sigma, float(m)) for m in pilot.bounds["l2_upper"]]
    tests = certify_sequential(model, x, noises, num_classes, n0, mode, pilot.plan.alpha_p, batch_size=batch_size,
                               block=block, generators=[(g[0], g[3]) for g in gens], dtype=dtype, seed=seed,
                               range_policy=range_policy, classes=pilot.classes)
    return [pilot.certificate(i, t.prediction, t.p_lower, t.gap, t.counts, t.dtype, n0, int(mode.n_max), seed,
                              n_used=n + int(t.n_used), extra=t.extra)
            for i, t in enumerate(tests)]
