"""The shared statistical soundness harness: "the certified radius exceeds the exact one in at most an alpha
share of trials", with stated power.

A certificate path is run on ``trials`` independent cases whose exact answer is known (a linear classifier, a
quadrature, an enumeration). A trial *violates* when the certificate claims more than is true: a radius above
the exact robust radius of the smoothed classifier, or a non-abstaining prediction that is not the smoothed
classifier's class. For a sound method each trial violates with probability at most ``alpha``, independently
(every trial draws from its own streams), so the number of violations is stochastically below
``Binomial(trials, alpha)``.

:func:`plan` picks the smallest ``trials`` and a threshold ``max_violations`` such that

* a sound method passes (``violations <= max_violations``) with probability at least ``pass_prob`` (0.999):
  ``P(Binomial(trials, alpha) <= max_violations) >= 0.999``;
* a method whose violation rate is ``2 alpha`` fails with probability at least ``power`` (0.9):
  ``P(Binomial(trials, 2 alpha) > max_violations) >= 0.9`` (a method over-certifying more often fails more
  often still: the binomial tail grows with the rate).

Both probabilities are computed exactly from the binomial distribution (scipy.stats) and kept in the
:class:`Plan`, so a test states what it can detect. (The earlier shared check, 40 trials at alpha = 0.1 with a
1e-3 p-value threshold, caught a 2 x alpha method only 9% of the time.)

The cases with a known answer live here too, so every soundness test builds them the same way:
:func:`linear_case` (a binary linear classifier and inputs on both sides of its hyperplane; under any noise
that is symmetric about zero its smoothed classifier is the same half-space, so the exact robust radius in a
norm is the distance to the hyperplane in that norm, :meth:`LinearCase.distance`), :func:`region_reach` (how
far a certified region extends along a direction: a region is sound on a linear classifier iff it does not
reach the hyperplane) and :func:`data_dependent_violations` (a data-dependent method certifying a whole
:class:`LinearCase` in one call, with memory-based certification on).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from numbers import Real

import numpy as np
import torch
from scipy import stats

from conftest import Linear2
from smoothcert.geometry.lowrank import LowRankEllipsoid
from smoothcert.geometry.regions import Ball, CrossPolytope, Ellipsoid, Region

__all__ = ["Plan", "plan", "count_violations", "assert_sound", "violations_of", "LinearCase", "linear_case",
           "linear_problem", "region_reach", "data_dependent_violations"]

PASS_PROB = 0.999
POWER = 0.9


@dataclass(frozen=True)
class Plan:
    """How many trials, how many violations a sound method may show, and the two probabilities that follow."""

    alpha: float
    trials: int
    max_violations: int
    pass_prob: float  #: P(a sound method passes) = P(Binomial(trials, alpha) <= max_violations)
    power: float  #: P(a 2 x alpha method fails) = P(Binomial(trials, 2 alpha) > max_violations)

    def __str__(self) -> str:
        return (f"{self.trials} trials at alpha {self.alpha}: at most {self.max_violations} violations; "
                f"a sound method passes with probability {self.pass_prob:.4f}, a method over-certifying at "
                f"2 x alpha fails with probability {self.power:.4f}")


def _probability(name: str, value, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number in ({low}, {high}), got {type(value).__name__} {value!r}")
    if not (math.isfinite(value) and low < value < high):
        raise ValueError(f"{name} must lie in ({low}, {high}), got {value!r}")
    return float(value)


def plan(alpha: float, *, pass_prob: float = PASS_PROB, power: float = POWER, max_trials: int = 200_000) -> Plan:
    """The smallest number of trials with ``P(sound passes) >= pass_prob`` and ``P(2 alpha fails) >= power``.

    For each number of trials ``t`` the threshold is the smallest ``c`` with ``P(Binomial(t, alpha) <= c) >=
    pass_prob`` (any larger ``c`` only lowers the power); the plan is the smallest ``t`` whose power
    ``P(Binomial(t, 2 alpha) > c)`` reaches ``power``. The power is not monotone in ``t`` (``c`` moves in
    steps), so every ``t`` from 1 up is examined, as one vectorized scipy call per doubling of the range.
    """
    alpha = _probability("alpha (the per-trial violation probability a sound method allows)", alpha, 0.0, 0.5)
    pass_prob = _probability("pass_prob", pass_prob, 0.0, 1.0)
    power = _probability("power", power, 0.0, 1.0)
    if isinstance(max_trials, bool) or not isinstance(max_trials, int) or max_trials < 1:
        raise ValueError(f"max_trials must be an integer >= 1, got {max_trials!r}")
    hi = 64
    while True:
        trials = np.arange(1, min(hi, max_trials) + 1)
        c = stats.binom.ppf(pass_prob, trials, alpha)
        c = np.where(stats.binom.cdf(c, trials, alpha) < pass_prob, c + 1, c)  # guard ppf's rounding
        sound = stats.binom.cdf(c, trials, alpha)
        detect = stats.binom.sf(c, trials, 2 * alpha)
        ok = np.flatnonzero((sound >= pass_prob) & (detect >= power))
        if ok.size:
            k = int(ok[0])
            return Plan(alpha, int(trials[k]), int(c[k]), float(sound[k]), float(detect[k]))
        if hi >= max_trials:
            raise ValueError(f"no plan within {max_trials} trials at alpha {alpha}")
        hi *= 2


def violations_of(certified: Sequence[float] | np.ndarray, exact: Sequence[float] | np.ndarray,
                  predicted: Sequence[int] | np.ndarray | None = None,
                  true_class: Sequence[int] | np.ndarray | None = None, *, abstain: int = -1,
                  rtol: float = 1e-12) -> np.ndarray:
    """Boolean per trial: the certificate claims more than is true.

    ``certified`` radii (0 for an abstention) against ``exact`` robust radii (a radius counts as larger only
    beyond a relative ``rtol`` of float64 rounding); with ``predicted`` and ``true_class``, a non-abstaining
    prediction of another class than the smoothed classifier's also violates. A NaN radius is refused: it
    would compare as "not larger" and hide a violation.
    """
    certified = np.asarray(certified, dtype=np.float64)
    exact = np.asarray(exact, dtype=np.float64)
    if certified.shape != exact.shape:
        raise ValueError(f"certified and exact radii differ in shape: {certified.shape} vs {exact.shape}")
    if np.isnan(certified).any() or np.isnan(exact).any():
        raise ValueError("certified and exact radii must not be NaN (give 0 for an abstention)")
    bad = certified > exact * (1.0 + rtol) + 1e-300
    if (predicted is None) != (true_class is None):
        raise ValueError("give both predicted and true_class, or neither")
    if predicted is not None:
        predicted = np.asarray(predicted)
        true_class = np.asarray(true_class)
        if predicted.shape != certified.shape or true_class.shape != certified.shape:
            raise ValueError(f"predicted {predicted.shape} and true_class {true_class.shape} must have the radii's "
                             f"shape {certified.shape}")
        bad = bad | ((predicted != abstain) & (predicted != true_class))
    return bad


def count_violations(trial: Callable[[int], bool], p: Plan) -> int:
    """Run ``trial(k)`` (True = violation) for ``k = 0 .. trials - 1`` and count the violations."""
    return sum(bool(trial(k)) for k in range(p.trials))


def assert_sound(violations: int | np.ndarray, p: Plan) -> None:
    """Fail when the violations exceed what ``alpha`` allows (see :class:`Plan` for the test's two error rates).

    ``violations`` is a count, or one boolean per trial (then there must be exactly ``p.trials`` of them).
    """
    if np.ndim(violations):
        if np.size(violations) != p.trials:
            raise ValueError(f"got {np.size(violations)} trial outcomes for a plan of {p.trials} trials")
        count = int(np.sum(violations))
    else:
        count = int(violations)
    assert count <= p.max_violations, f"{count} violations: {p}"


# ------------------------------------------------------------------------------------ cases with known answers

_DUAL = {"l2": 2, "l1": math.inf, "linf": 1}  # the exact radius in a norm divides the margin by the dual norm


@dataclass(frozen=True)
class LinearCase:
    """A binary linear classifier ``f(x) = 1[w . x + b > 0]`` and ``trials`` inputs ``x``.

    ``model`` must compute that classifier (possibly behind other layers, e.g. a PCA projection; ``w`` and ``b``
    are then the effective hyperplane). For noise symmetric about zero ``P(w . eps > 0) = P(w . eps < 0)``, so the
    smoothed classifier predicts the side of ``x`` (:attr:`label`) for every such noise, and its exact robust
    region is that open half-space: the exact robust radius in a norm is ``|w . x + b| / ||w||_*``
    (:meth:`distance`), and a certified region is sound iff its :meth:`reach` toward the hyperplane stays below
    the l2 distance.
    """

    model: torch.nn.Module
    x: torch.Tensor
    w: torch.Tensor
    b: float

    @property
    def trials(self) -> int:
        return int(self.x.shape[0])

    @property
    def margin(self) -> np.ndarray:
        """``w . x + b`` per input (float64)."""
        return (self.x.reshape(self.trials, -1).double() @ self.w + self.b).numpy()

    @property
    def label(self) -> np.ndarray:
        """The smoothed classifier's class per input: 1 on the side ``w . x + b > 0``."""
        return (self.margin > 0).astype(np.int64)

    def distance(self, norm: str = "l2", coords: Sequence[int] | None = None) -> np.ndarray:
        """The exact robust radius per input: the distance to the hyperplane in ``norm`` (l2, l1, linf); with
        ``coords``, for perturbations of those coordinates only (the other entries of ``w`` do not move it)."""
        if norm not in _DUAL:
            raise ValueError(f"norm must be one of {', '.join(_DUAL)}, got {norm!r}")
        w = self.w if coords is None else self.w[list(coords)]
        return np.abs(self.margin) / float(torch.linalg.vector_norm(w, ord=_DUAL[norm]))

    def reach(self, regions: Sequence[Region | None]) -> np.ndarray:
        """How far each input's region extends toward the hyperplane (l2 units; 0 for None, an abstention)."""
        if len(regions) != self.trials:
            raise ValueError(f"got {len(regions)} regions for {self.trials} inputs")
        unit = self.w / torch.linalg.vector_norm(self.w)
        return np.array([0.0 if r is None else region_reach(r, unit) for r in regions])


def linear_case(trials: int, d: int, seed: int, *, scale: float = 1.0, weight: torch.Tensor | None = None
                ) -> LinearCase:
    """Seeded: ``w ~ N(0, I_d)`` (or the given ``weight``), ``x ~ U[0, 1]^d`` (``trials`` rows), ``b = -median(x . w)``
    so that about half of the inputs lie on each side; the model is :class:`conftest.Linear2` with logits
    ``(0, scale (w . x + b))`` (a larger ``scale`` sharpens the softmax the optimizers see; the classifier is the
    same)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, generator=g)
    x = torch.rand(trials, d, generator=g)
    if weight is not None:
        w = torch.as_tensor(weight, dtype=torch.float32).reshape(d)
    model = Linear2(w * scale, -float((x @ w).median()) * scale)
    # the classifier is the one the model computes: its float32 weight and its bias rounded to float32
    return LinearCase(model, x, model.w.double(), float(np.float32(model.b)))


def linear_problem(d: int = 8, seed: int = 0, margin: float = 0.3, scale: float = 3.0
                   ) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """One input: a seeded random unit normal ``w``, ``x0 = 0.5 + 0.1 N(0, I)`` and the hyperplane at distance
    ``margin`` from it with ``x0`` on the class-1 side; returns ``(model, x0, w)`` (the model as in
    :func:`linear_case`)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, generator=g)
    w = w / w.norm()
    x0 = 0.5 + 0.1 * torch.randn(d, generator=g)
    b = -float(x0 @ w) + margin  # w . x0 + b = margin
    return Linear2(w * scale, b * scale), x0, w


def region_reach(region: Region, direction: torch.Tensor) -> float:
    """``max over y in region of direction . (y - center)``, the support function of the centred region.

    Ball: ``r ||n||``; ellipsoid ``{c + B diag(a) u : ||u|| <= 1}``: ``||diag(a) B^T n||``; cross-polytope
    ``{c + diag(a) v : ||v||_1 <= 1}``: ``max_i a_i |n_i|`` (attained at a vertex); low-rank ellipsoid
    ``{c + g A v : ||v|| <= 1}``: ``g ||A^T n||`` with the dense ``A`` built from the region's numbers.
    """
    n = torch.as_tensor(direction, dtype=torch.float64).reshape(-1)
    if isinstance(region, Ball):
        return float(region.radius * torch.linalg.vector_norm(n))
    if isinstance(region, CrossPolytope):
        return float((region.semi_axes * n.abs()).max())
    if isinstance(region, Ellipsoid):
        local = n if region.basis is None else region.basis.T @ n
        return float(torch.linalg.vector_norm(region.semi_axes * local))
    if isinstance(region, LowRankEllipsoid):
        return float(region.gap * torch.linalg.vector_norm(region.dense_scale().T @ n))
    raise TypeError(f"no support function for {type(region).__name__}")


def data_dependent_violations(method, case: LinearCase, *, n0: int, n: int, alpha: float, seed: int = 0,
                              batch_size: int = 400) -> tuple[np.ndarray, list[dict]]:
    """Certify every input of ``case`` with a data-dependent ``method`` (memory on) in one call; violations per input.

    An input violates when any of what the method claims is more than is true: the row's ``predict`` (not the
    smoothed class and not -1), its l2 ``radius`` or ``radius_norm`` (in the method's norm) above the exact
    radius, the certificate's region before memory (the record's certificate) or the region the memory stored
    (kept or shrunk) reaching the hyperplane. Memory only shrinks regions or abstains, so for a sound method
    each input still violates with probability at most ``alpha``, independently (its own optimization and
    certification streams).
    """
    from smoothcert.methods.base import RunContext
    from smoothcert.methods.records import record_row

    if not method.uses_memory:
        raise ValueError("data_dependent_violations checks certification with memory: build the method with memory on")
    ctx = RunContext(case.model, 2, n0, n, alpha, batch_size, torch.float32, seed, torch.device("cpu"))
    indices = list(range(case.trials))
    records = method.certify(ctx, case.x, torch.as_tensor(case.label), indices)
    rows = [record_row(r, method.row_columns()) for r in records]
    certs = [r.certificate for r in records]
    stored = {index: region for index, _, region in method.memory.memory.stored}
    l2, label = case.distance("l2"), case.label
    bad = violations_of([r["radius"] for r in rows], l2, [r["predict"] for r in rows], label)
    bad |= violations_of([r["radius_norm"] for r in rows], case.distance(method.norm))
    bad |= violations_of(case.reach([c.region for c in certs]), l2, [c.prediction for c in certs], label)
    bad |= violations_of(case.reach([stored.get(i) for i in indices]), l2)
    return bad, rows


if __name__ == "__main__":  # the plans at the usual levels: python tests/soundness.py
    for level in (0.05, 0.1, 0.2):
        print(plan(level))
