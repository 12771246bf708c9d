"""Modes of certification: fixed-n CERTIFY, a sequential test at a target radius, an anytime confidence sequence.

Every mode keeps Cohen's protocol (seed 000 section 3.1): ``n0`` selection samples choose ``c_A``, *fresh*
estimation samples bound ``p_A = P(f(x + noise) = c_A)``; the region is the noise's own (``noise.region``).

* ``fixed`` (the default): ``n`` estimation samples, the one-sided Clopper-Pearson bound at ``alpha``; with
  probability at least ``1 - alpha`` the region at gap ``noise.gap(p_lower)`` is certified (unchanged results).
  With ``randomized``, the randomized Clopper-Pearson bound (coverage exactly ``1 - alpha``,
  :func:`~smoothcert.stats.sequential.randomized_cp_lower`), its uniform draw from the input's own
  ``cp-uniform`` stream, recorded as ``cp_uniform``.
* ``target``: "is the input certified at radius ``r``?" The noise gives the level ``p* = noise.level(g)`` of the
  smallest gap ``g`` whose region has inscribed l2 radius ``>= r``; estimation samples are drawn in batches up
  to the checks of :func:`~smoothcert.stats.sequential.check_schedule` (at most ``n_max``), and at each check the
  anytime-valid test :func:`~smoothcert.stats.sequential.target_decisions` (union-bound Clopper-Pearson or the
  KT betting mixture, :func:`~smoothcert.stats.sequential.target_step`) either certifies, stops for futility
  (abstains at ``r``; also when no later check could certify even if every remaining sample were a success,
  and before sampling when ``n_max`` samples could never reach ``p*``) or continues; undecided at ``n_max``:
  abstains. Guarantee: with probability at least ``1 - alpha`` a certified input has
  ``p_A >= p*``, so the smoothed classifier predicts ``c_A`` on the region at gap ``noise.gap(p*) >= g``
  (radius ``r``); the region recorded (and stored by memory-based certification) is that one, never larger.
* ``anytime``: the union-bound Clopper-Pearson confidence sequence (most of ``alpha`` spent at ``n_max``,
  :meth:`Mode.spending`), run until the gap is known to within
  ``precision`` (gap units: ``radius / sigma`` for isotropic noise) of the gap its bound would reach at
  ``n_max`` at the current estimate ``s / n``, until the upper bound falls below 1/2 (abstain), or ``n_max``.
  Guarantee: with probability at least ``1 - alpha`` every lower bound of the sequence holds, so the region at
  the gap of the bound where it stopped is certified, whatever the stopping rule.

Inputs still undecided are sampled together at each check (:func:`~smoothcert.engine.sampling.sample_counts`
packs them into full forward passes); counts come back to the host once per check, never inside a batch's
sampling. Estimation draws come in blocks of ``min(batch increment, batch_size)`` samples per input, so an
input's draws depend only on its own streams, the schedule and ``batch_size`` (not on which inputs are still
undecided, nor on ``block``): splits and resumes give the same numbers. ``block`` applies to the selection.
``n_used`` records the estimation samples each input actually used.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from smoothcert.engine.sampling import sample_counts
from smoothcert.engine.smooth import ABSTAIN, Certificate, certify, check_call, check_noise_support, dtype_name
from smoothcert.geometry.norms import NormRadii
from smoothcert.noise.base import Noise
from smoothcert.stats.sequential import (CERTIFIED, FUTILE, SEQUENCES, UNDECIDED, anytime_decisions, check_schedule,
                                         spending, target_step, union_cp_bounds)
from smoothcert.validation import check_count, check_sample_sizes

__all__ = ["MODES", "Mode", "certify_in_mode", "certify_sequential", "target_level", "uniform_draws"]

MODES = ("fixed", "target", "anytime")
DECISIONS = {CERTIFIED: "certified", FUTILE: "futile", UNDECIDED: "undecided"}


@dataclass(frozen=True)
class Mode:
    """How CERTIFY spends its estimation samples (see the module's docstring for each mode's guarantee).

    ``radius`` (target only, > 0, l2, input units), ``n_max`` (target and anytime: the most estimation samples),
    ``precision`` (anytime: in gap units, default 0.02), ``randomized`` (fixed only), ``sequence`` (target:
    ``cp`` or ``betting``), ``first`` (samples before the first check) and ``growth`` (each later check at
    ``growth`` times the previous one, :func:`~smoothcert.stats.sequential.check_schedule`).
    """

    name: str = "fixed"
    radius: float | None = None
    n_max: int | None = None
    precision: float | None = None
    randomized: bool = False
    sequence: str = "cp"
    first: int = 50
    growth: float = 1.5

    def __post_init__(self) -> None:
        if self.name not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.name!r}")
        if self.sequence not in SEQUENCES:
            raise ValueError(f"the sequence must be one of {', '.join(SEQUENCES)}, got {self.sequence!r}")
        check_count("the first check (samples)", self.first)
        g = self.growth
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not (math.isfinite(g) and 1.0 < g <= 16.0):
            raise ValueError(f"the check growth (--check-growth) must be a number in (1, 16], got {g!r}")
        object.__setattr__(self, "growth", float(g))
        if self.name == "fixed" and (self.first, self.growth) != (50, 1.5):
            raise ValueError("--first-check and --check-growth are for --mode target or anytime, not --mode fixed")
        only = {"radius": ("target",), "n_max": ("target", "anytime"), "precision": ("anytime",)}
        for key, modes in only.items():
            if getattr(self, key) is not None and self.name not in modes:
                raise ValueError(f"{key} is for --mode {' or '.join(modes)}, not --mode {self.name}")
        if self.randomized and self.name != "fixed":
            raise ValueError(f"the randomized Clopper-Pearson bound is an option of --mode fixed, not {self.name}")
        if self.sequence != "cp" and self.name != "target":
            raise ValueError(f"--sequence {self.sequence} is for --mode target (anytime uses the cp sequence)")
        if self.name == "target":
            r = self.radius
            if r is None or isinstance(r, bool) or not isinstance(r, (int, float)) or not (math.isfinite(r) and r > 0):
                raise ValueError(f"--mode target needs --radius R, a finite number > 0, got {r!r}")
        if self.name != "fixed":
            if self.n_max is None:
                raise ValueError(f"--mode {self.name} needs --n-max N (the most estimation samples per input)")
            check_count("n_max", self.n_max)
        if self.name == "anytime":
            p = 0.02 if self.precision is None else self.precision
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not (math.isfinite(p) and p > 0):
                raise ValueError(f"--precision must be a finite number > 0, got {p!r}")
            object.__setattr__(self, "precision", float(p))

    @property
    def sequential(self) -> bool:
        return self.name != "fixed"

    def check_sampling(self, n0: int, n: int) -> None:
        """Before any sampling: ``n0 <= n`` and, for sequential modes, ``n_max >= n0``."""
        check_sample_sizes(n0, n)
        if self.sequential and self.n_max < n0:
            raise ValueError(f"--n-max ({self.n_max}) must be at least --n0 ({n0})")

    def schedule(self) -> np.ndarray:
        """The checks ``n_1 < ... < n_K = n_max`` (:func:`~smoothcert.stats.sequential.check_schedule`)."""
        return check_schedule(self.n_max, self.first, self.growth)

    def spending(self, alpha: float) -> np.ndarray:
        """The union bound's ``alpha_k`` per check: early checks first for ``target`` (most inputs stop there),
        the last check first for ``anytime`` (its aim is the bound at ``n_max``; about 0.6 alpha there, so the bound
        at ``n_max`` is close to fixed-n CERTIFY's), :func:`~smoothcert.stats.sequential.spending`."""
        return spending(alpha, len(self.schedule()), late=self.name == "anytime")

    @property
    def columns(self) -> tuple[str, ...]:
        """The row columns this mode adds."""
        if self.name == "target":
            return ("mode", "target_radius", "decision")
        if self.name == "anytime":
            return ("mode", "decision")
        return ("cp_uniform",) if self.randomized else ()

    def config(self) -> dict:
        """JSON-ready settings (empty for plain fixed-n CERTIFY, so earlier runs' configurations are unchanged)."""
        return {} if self == Mode() else {"mode": asdict(self)}


def target_level(noise: Noise, center: torch.Tensor, radius: float) -> tuple[float, float]:
    """``(g, p*)``: the smallest gap ``g`` whose region's inscribed l2 radius is ``>= radius`` and the least level
    ``p*`` with ``noise.gap(p*) >= g``, so a certified ``p_A >= p*`` certifies a region of radius ``>= radius``.

    Regions grow with the gap (for most families in proportion: ``radius / unit`` up to rounding; otherwise, e.g. a
    radius less an offset, by search). ``p*`` starts at ``noise.level(g)``, raised by ulps or, should that fall
    short, searched (:meth:`~smoothcert.noise.base.Noise.level_by_search`); ``(inf, 1)`` when no gap or no
    probability below 1 reaches it (never certifiable)."""
    def reaches(g: float) -> bool:
        return float(noise.region(center, g).inscribed_radius) >= radius

    unit = float(noise.region(center, 1.0).inscribed_radius)
    g = radius / unit if unit > 0 else 1.0
    for _ in range(8):
        if reaches(g):
            break
        g = math.nextafter(g, math.inf)
    else:
        g = _least_gap(reaches, g)
        if not math.isfinite(g):
            return math.inf, 1.0
    p = float(noise.level(g))
    for _ in range(64):
        if p >= 1.0 or noise.gap(p) >= g:
            break
        p = math.nextafter(p, 1.0)
    if p < 1.0 and noise.gap(p) < g:
        p = noise.level_by_search(g, start=0.5)
    return g, min(p, 1.0)


def _least_gap(reaches: Callable[[float], bool], g: float, ceiling: float = 1e6) -> float:
    """The least ``g' >= g`` (to one ulp) with ``reaches(g')`` (nondecreasing), by doubling then bisection; ``inf``
    when no gap up to ``ceiling`` reaches it."""
    lo, hi = g, max(g, 1e-12)
    while not reaches(hi):
        lo, hi = hi, 2.0 * hi
        if hi > ceiling:
            return math.inf
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if not lo < mid < hi:
            break
        lo, hi = (lo, mid) if reaches(mid) else (mid, hi)
    return hi


def _streams(generators, b):
    if generators is None:
        return [None] * b, [None] * b
    gens = list(generators)
    if len(gens) != b:
        raise ValueError(f"got {len(gens)} generators for {b} inputs")
    if all(isinstance(g, (tuple, list)) for g in gens):
        return [g[0] for g in gens], [g[1] for g in gens]
    return gens, gens


def certify_sequential(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                       noise: Noise | Sequence[Noise], num_classes: int, n0: int, mode: Mode, alpha: float, *,
                       batch_size: int = 1000, block: int | None = None, generators: Sequence | None = None,
                       dtype: torch.dtype = torch.float32, seed: int | None = None,
                       range_policy: str = "warn", classes: torch.Tensor | None = None) -> list[Certificate]:
    """CERTIFY ``x`` (B, ...) in ``mode`` ``target`` or ``anytime``; one :class:`Certificate` per input, with
    ``n = n_max``, ``n_used`` the estimation samples drawn and ``extra`` the mode's columns. ``generators``: per
    input a ``(selection, estimation)`` pair of independent streams, or one stream for both in turn.
    ``classes`` (optional, int64 (B,)): the class ``c_A`` of every input, already chosen on selection samples
    independent of the estimation streams (e.g. by a caller that spent them on other statistics); then no
    selection samples are drawn here."""
    if not isinstance(mode, Mode) or not mode.sequential:
        raise ValueError("certify_sequential takes a Mode of name target or anytime")
    check_call(model, x, num_classes, alpha, batch_size, dtype, range_policy)
    name = dtype_name(dtype)
    mode.check_sampling(n0, n0)
    b = x.shape[0]
    noises = [noise] * b if isinstance(noise, Noise) else list(noise)
    if len(noises) != b:
        raise ValueError(f"got {len(noises)} noise distributions for {b} inputs")
    check_noise_support(x, noise if isinstance(noise, Noise) else noises)  # e.g. sound sampling's grid
    select, estimate = _streams(generators, b)
    kw = dict(batch_size=batch_size, block=block, dtype=dtype)
    if classes is None:
        top = sample_counts(model, x, noises, n0, num_classes, generators=select, **kw).argmax(dim=1)
    else:
        top = torch.as_tensor(classes, dtype=torch.int64).reshape(-1)
        if top.numel() != b or not bool(((top >= 0) & (top < num_classes)).all()):
            raise ValueError(f"classes must hold one class in [0, {num_classes}) per input, got {classes!r}")
    schedule, alphas = mode.schedule(), mode.spending(alpha)
    if mode.name == "target":
        gaps, levels = map(np.asarray, zip(*[target_level(noises[i], x[i], mode.radius) for i in range(b)]))
    full = np.zeros((b, num_classes), dtype=np.int64)
    succ = np.zeros(b, dtype=np.int64)
    top_host = top.cpu().numpy()  # after selection, before any estimation sample
    used = np.zeros(b, dtype=np.int64)
    lower = np.zeros(b)
    decision = np.full(b, UNDECIDED, dtype=np.int64)
    if mode.name == "target":  # levels out of reach of n_max samples abstain without sampling
        decision[:] = FUTILE
        feasible = np.flatnonzero(levels < 1.0)
        decision[feasible] = target_step(np.zeros(feasible.size), -1, schedule, alphas, levels[feasible], alpha,
                                       mode.sequence)
    active = np.flatnonzero(decision == UNDECIDED)
    prev = 0
    for k, n_k in enumerate(schedule.tolist()):
        if active.size == 0:
            break
        rows = torch.as_tensor(active, device=x.device)
        m = n_k - prev  # one input's m samples share passes of at most batch_size: full passes, whoever is left
        counts = sample_counts(model, x[rows], [noises[i] for i in active], m, num_classes,
                               generators=[estimate[i] for i in active], batch_size=batch_size,
                               block=min(m, batch_size), dtype=dtype)
        full[active] += counts.cpu().numpy()  # the check: the one host sync of this batch
        prev = n_k
        succ[active] = full[active, top_host[active]]
        used[active] = n_k
        lower[active] = union_cp_bounds(succ[active], np.full(active.size, n_k), float(alphas[k]))[0]
        if mode.name == "target":
            dec = target_step(succ[active], k, schedule, alphas, levels[active], alpha, mode.sequence)
        else:
            dec = anytime_decisions(succ[active], n_k, mode.n_max, float(alphas[k]), float(alphas[-1]), mode.precision,
                                    [noises[i].gap for i in active])
        decision[active] = dec
        active = active[dec == UNDECIDED]
    top = top_host
    out = []
    for i in range(b):
        extra = {"mode": mode.name, "decision": DECISIONS[int(decision[i])]}
        if mode.name == "target":
            extra["target_radius"] = float(mode.radius)
            p = float(levels[i]) if decision[i] == CERTIFIED else float(lower[i])
            ok = decision[i] == CERTIFIED
        else:
            p = float(lower[i])
            ok = p >= 0.5
        cells = (n0, int(mode.n_max), alpha, name, noises[i], seed, int(used[i]), extra)
        if not ok:
            out.append(Certificate(ABSTAIN, p, full[i], float("nan"), None, 0.0, 0.0, *cells, radii=NormRadii.zero()))
            continue
        g = float(noises[i].gap(p))
        region = noises[i].region(x[i], g)
        out.append(Certificate(int(top[i]), p, full[i], g, region, region.inscribed_radius,
                               region.proxy_radius, *cells, radii=noises[i].norm_radii(p, g, region)))
    return out


def uniform_draws(generators: Sequence[torch.Generator]) -> list[float]:
    """One float64 uniform draw in [0, 1) per stream: the randomized Clopper-Pearson bound's ``U`` (seed by seed the
    same draw for every method)."""
    return [float(torch.rand((), generator=g, device=g.device, dtype=torch.float64)) for g in generators]


def certify_in_mode(mode: Mode, model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                    noise: Noise | Sequence[Noise], num_classes: int, n0: int, n: int, alpha: float, *,
                    batch_size: int = 1000, block: int | None = None, generators: Sequence | None = None,
                    uniform_generators: Sequence[torch.Generator] | None = None,
                    dtype: torch.dtype = torch.float32, seed: int | None = None) -> list[Certificate]:
    """CERTIFY in ``mode``: :func:`~smoothcert.engine.smooth.certify` with ``n`` samples for ``fixed`` (its uniform
    draws from ``uniform_generators`` when randomized), :func:`certify_sequential` otherwise."""
    if mode.sequential:
        return certify_sequential(model, x, noise, num_classes, n0, mode, alpha, batch_size=batch_size, block=block,
                                  generators=generators, dtype=dtype, seed=seed)
    uniforms = None
    if mode.randomized:
        if uniform_generators is None or len(uniform_generators) != x.shape[0]:
            raise ValueError("the randomized Clopper-Pearson bound needs one uniform stream per input")
        uniforms = uniform_draws(uniform_generators)
    return certify(model, x, noise, num_classes, n0, n, alpha, batch_size=batch_size, block=block,
                   generators=generators, dtype=dtype, seed=seed, uniforms=uniforms)
