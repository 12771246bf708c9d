"""First-order ("higher-order") certificates for Gaussian smoothing (seed 004): same noise as Cohen, more from
the same samples.

Protocol (:func:`certify_first_order`): Cohen's CERTIFY plus an observer and a radius step. Per input, with
``N(0, sigma^2 I)`` noise:

1. The plan (:class:`FirstOrderPlan`, recorded in every certificate) splits the failure probability (union
   bound): ``alpha_p = alpha_split * alpha`` for the Clopper-Pearson bound ``q`` of ``p_A``, and
   ``alpha_grad = alpha - alpha_p`` evenly over the gradient-norm bounds the requested radii need.
2. :func:`smoothcert.engine.smooth.certify` at level ``alpha_p``: ``n0`` selection samples choose ``c_A``; the
   ``n`` fresh estimation samples, in two independent halves (``n1 = n // 2``, ``n2 = n - n1``, one stream
   each), give the class counts, ``q``, and, through a :class:`~smoothcert.stats.gradients.GradientObserver`
   on the estimation samples only, the sums of ``u (1[f(x + sigma u) = c_A] - 1/2)`` per half (nothing per
   sample is kept).
3. Gradient-norm bounds from those sums (:mod:`smoothcert.stats.gradients`: Theorem 4, 5, Table 1), then the
   radii (:mod:`smoothcert.methods.firstorder.radii`: Theorem 3, Corollaries 3.1-3.4), zeroth- and first-order
   side by side, in input units (``sigma`` times the normalized radius). Every first-order radius is the
   largest of all radii that hold on the same event, so it is never below the zeroth-order one from the same
   ``q``.

Guarantee: with probability at least ``1 - alpha`` every reported radius is certified at once: the smoothed
classifier predicts ``c_A`` on the l2 ball of radius ``radii["l2_1"]``, the l1 ball ``radii["l1_1"]``, the
l_inf ball ``radii["linf_1"]`` and, within the subspace ``S``, the corresponding balls
``{delta in S : ||delta||_p <= radii["sub_lp_1"]}`` in the ambient norm of the perturbation (seed 004
Definition 1), the same for every basis that describes ``S``. The l1, l_inf and subspace radii rely on the convexity of the
first-order region (seed 004 Proposition 1); the l2 radius does not.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

import smoothcert.stats.gradients as fs
from smoothcert.methods.firstorder.radii import l2_radius, vertex_radius, zeroth_order_radius
from smoothcert.noise.gaussian import IsotropicGaussian
from smoothcert.engine.smooth import ABSTAIN, certify
from smoothcert.stats.bounds import clopper_pearson_lower
from smoothcert.methods.firstorder.subspace import Subspace, SubspaceGeometry
from smoothcert.validation import check_alpha, check_count, check_number, check_positive

__all__ = ["NORMS", "Subspace", "SubspaceGeometry", "FirstOrderCertificate", "FirstOrderPlan", "GradientPilot",
           "certify_first_order", "gradient_bounds", "gradient_pilot", "normalized_radii"]

#: Threat models with first-order radii.
NORMS: tuple[str, ...] = ("l2", "l1", "linf")
#: Which one-sided bound of which norm each radius needs (``sub_``: of the projection ``P_S grad g``).
_NEEDS = {"l1": ("l2_lower", "linf_upper"), "linf": ("l2_lower", "l1_upper")}
_SUB_NEEDS = {"l2": ("l2_lower", "sub_l2_upper"), "l1": ("l2_lower", "sub_linf_upper"),
              "linf": ("l2_lower", "sub_l1_upper")}


def parse_norms(norms: str | Sequence[str]) -> tuple[str, ...]:
    """``"l2,l1,linf"`` or a sequence of names -> a tuple in canonical order; l2 is always included."""
    items = [s.strip().lower() for s in (norms.split(",") if isinstance(norms, str) else norms)]
    items = [s for s in items if s]
    bad = [s for s in items if s not in NORMS]
    if bad or not items:
        raise ValueError(f"norms must be a non-empty subset of {', '.join(NORMS)}, got {norms!r}")
    return tuple(n for n in NORMS if n in set(items) | {"l2"})


# --------------------------------------------------------------------------------------------- the protocol

@dataclass(frozen=True)
class FirstOrderPlan:
    """The failure-probability budget of one first-order certificate (validated up front).

    ``alpha_p`` bounds ``p_A``; ``alpha_each`` is the share of each gradient bound in ``events``;
    ``alpha_p + alpha_each * len(events) == alpha``.
    """

    alpha: float
    alpha_split: float
    n: int
    norms: tuple[str, ...]
    subspace: bool
    events: tuple[str, ...]

    @property
    def alpha_p(self) -> float:
        return self.alpha * self.alpha_split

    @property
    def alpha_grad(self) -> float:
        return self.alpha - self.alpha_p

    @property
    def alpha_each(self) -> float:
        return self.alpha_grad / len(self.events)

    @property
    def halves(self) -> tuple[int, int]:
        return self.n // 2, self.n - self.n // 2

    @classmethod
    def make(cls, alpha: float, n: int, norms: str | Sequence[str] = NORMS, subspace: bool = False,
             alpha_split: float = 0.5, p_samples: int | None = None) -> "FirstOrderPlan":
        """Validate the budget: ``0 < alpha_split < 1``, both halves >= 2 samples, and the ``p_A`` samples
        (``p_samples``, default ``n``; the sequential modes' ``n_max``) able to push the Clopper-Pearson bound of
        ``p_A`` above 1/2 at ``alpha_p`` (else every input would abstain)."""
        alpha = check_alpha(alpha)
        check_count("n", n)
        check_number("alpha_split (share of alpha for the p_A bound)", alpha_split, 0.0, 1.0, low_open=True,
                     high_open=True)
        if n // 2 < 2:
            raise ValueError(f"n={n} is too small for first-order certification: each of the two halves needs at "
                             "least 2 samples (n >= 4)")
        norms = parse_norms(norms)
        events = ["l2_upper"]
        for norm in norms:
            events += _NEEDS.get(norm, ())
            if subspace:
                events += _SUB_NEEDS[norm]
        plan = cls(alpha, float(alpha_split), n, norms, bool(subspace), tuple(dict.fromkeys(events)))
        k = n if p_samples is None else check_count("the p_A samples", p_samples)
        best = float(clopper_pearson_lower(k, k, plan.alpha_p))
        if best <= 0.5:
            raise ValueError(f"n={k} samples cannot certify anything at alpha_p={plan.alpha_p:.3g} (alpha={alpha} x "
                             f"alpha_split={alpha_split}): even n/n successes bound p_A only by {best:.3f} <= 1/2; "
                             "raise n or alpha_split")
        return plan


@dataclass(frozen=True)
class FirstOrderCertificate:
    """What first-order CERTIFY established for one input.

    ``radii`` (input units) has ``"{norm}_0"`` (zeroth order, from the same ``p_lower``) and ``"{norm}_1"``
    (first order) for each certified norm, and ``"sub_{norm}_{0,1}"`` with a subspace (ambient norms of the
    perturbation); ``radius`` is ``radii["l2_1"]``. ``grad_bounds`` are the bounds of ``||grad g(x)||`` (input
    units, i.e. per unit of input) that were used: ``l2_upper``, ``l2_lower``, ``linf_upper``, ``l1_upper``, and
    ``sub_*_upper`` of the ambient norms of ``P_S grad g(x)``; ``subspace_geometry`` holds the subspace's
    constants (:class:`SubspaceGeometry`).
    """

    prediction: int
    p_lower: float
    gap: float
    counts: np.ndarray = field(repr=False)
    radius: float
    radii: dict[str, float]
    grad_bounds: dict[str, float]
    sigma: float
    n0: int
    n: int
    halves: tuple[int, int]
    alpha: float
    alpha_p: float
    alpha_grad: float
    alpha_each: float
    dtype: str
    dim: int
    subspace_dim: int | None
    seed: int | None = None
    subspace_geometry: SubspaceGeometry | None = field(default=None, repr=False)
    n_used: int | None = None
    extra: dict = field(default_factory=dict, repr=False)

    @property
    def abstained(self) -> bool:
        return self.prediction == ABSTAIN

    @property
    def radius_proxy(self) -> float:
        return self.radius


def gradient_bounds(plan: FirstOrderPlan, sums: tuple[np.ndarray, np.ndarray], sub: Subspace | None,
                    geo: SubspaceGeometry | None, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Normalized bounds (of ``beta = sigma grad g``) for every event of ``plan``; one array (B,) each.

    Subspace bounds are of ambient norms of ``P_S beta`` (seed 004 Corollary 3.4): ``||P_S beta||_2`` from the
    halves' coordinates in an orthonormal basis (the same number), ``||P_S beta||_inf`` and ``||P_S beta||_1``
    from the pooled ``P_S M``, whose functionals ``e_i^T P_S z`` and ``s^T P_S z`` have the variance proxies
    ``KAPPA max_i l_i`` and ``KAPPA max_s ||P_S s||^2`` (:class:`SubspaceGeometry`).
    """
    (s1, s2), (n1, n2), delta = sums, plan.halves, plan.alpha_each
    out = {"l2_upper": fs.l2_upper(s1 / n1, s2 / n2, n1, n2, delta)}
    pooled = (s1 + s2) / plan.n
    if "l2_lower" in plan.events:
        out["l2_lower"] = fs.l2_lower(s1 / n1, s2 / n2, n1, n2, delta)
    if "linf_upper" in plan.events:
        out["linf_upper"] = np.minimum(fs.linf_upper(pooled, plan.n, delta), out["l2_upper"])
    if "l1_upper" in plan.events:
        out["l1_upper"] = np.minimum(fs.l1_upper(pooled, plan.n, delta), math.sqrt(s1.shape[1]) * out["l2_upper"])
    if sub is not None:
        t1, t2 = (sub.coordinates(v, shape) for v in (s1, s2))
        out["sub_l2_upper"] = np.minimum(fs.l2_upper(t1 / n1, t2 / n2, n1, n2, delta), out["l2_upper"])
        ambient = sub.project(pooled, shape)
        if "sub_linf_upper" in plan.events:  # |(P_S beta)_i| <= sqrt(l_i) ||P_S beta||_2
            out["sub_linf_upper"] = np.minimum(
                fs.linf_upper(ambient, plan.n, delta, fs.KAPPA * geo.max_leverage),
                math.sqrt(geo.max_leverage) * out["sub_l2_upper"])
        if "sub_l1_upper" in plan.events:  # ||P_S beta||_1 = s^T P_S beta <= ||P_S s|| ||P_S beta||_2
            out["sub_l1_upper"] = np.minimum(fs.l1_upper(ambient, plan.n, delta, sign_norm2=geo.sign_norm2),
                                             math.sqrt(geo.sign_norm2) * out["sub_l2_upper"])
    return out


def normalized_radii(q: float, bounds: dict[str, float], plan: FirstOrderPlan, dim: int,
                     subspace: SubspaceGeometry | None = None) -> dict[str, float]:
    """Zeroth- and first-order radii in units of ``sigma`` from ``q`` and the normalized gradient bounds.

    l2: Corollary 3.1 with ``m = l2_upper``. l1: Corollary 3.2 (``|v^T beta| <= linf_upper`` at the vertices
    ``+-e_i``). l_inf: Corollary 3.3 (vertices ``s / sqrt(d)``, ``|v^T beta| <= l1_upper / sqrt(d)``; the l_inf
    radius is the directional one over ``sqrt(d)``). Each first-order radius is the max with every radius
    implied by another on the same event (an l2 ball of radius R holds the l1 ball of radius R and the l_inf
    ball of radius R / sqrt(d)).

    Subspace (Corollary 3.4, Definition 1; ``subspace`` gives ``rho_p`` and the proxies): the ball
    ``U_p(R) = {delta in S : ||delta||_p <= R}`` in the ambient l_p norm lies in
    ``C = {||delta||_2 <= R rho_p, delta^T beta >= -R h_p}`` with ``h_p = sup_{delta in U_p(1)} beta^T delta
    <= ||P_S beta||_{p*}`` (Hoelder, as ``delta = P_S delta``) ``<= rho_p ||P_S beta||_2``. ``C`` is the convex
    hull of its spherical cap, the region is convex (Proposition 1) and the directional radius falls with the
    angle to ``beta`` (Proposition 2), so ``C`` is certified once the cap's widest direction ``v`` is, at length
    ``R rho_p``, with ``v^T beta >= -h_p / rho_p``: ``R = vertex_radius(h / rho_p) / rho_p``. With the full
    space (any basis) or coordinates this is Corollaries 3.1-3.3 (``rho_1 = 1``, ``rho_inf = sqrt(d_S)``).
    """
    r0 = zeroth_order_radius(q)
    if q <= 0.5:
        keys = [f"{k}_{o}" for k in plan.norms for o in (0, 1)]
        keys += [f"sub_{k}_{o}" for k in plan.norms for o in (0, 1)] if plan.subspace else []
        return dict.fromkeys(keys, 0.0)
    u2 = bounds["l2_upper"]
    low = bounds.get("l2_lower", 0.0)
    l2_1 = max(l2_radius(q, u2), r0)
    out = {"l2_0": r0, "l2_1": l2_1}
    root_d = math.sqrt(dim)
    if "l1" in plan.norms:
        out["l1_0"] = r0
        out["l1_1"] = max(vertex_radius(q, bounds["linf_upper"], low), l2_1)
    if "linf" in plan.norms:
        out["linf_0"] = r0 / root_d
        out["linf_1"] = max(vertex_radius(q, bounds["l1_upper"] / root_d, low) / root_d, l2_1 / root_d)
    if plan.subspace:
        if subspace is None:
            raise ValueError("a plan with a subspace needs its SubspaceGeometry")
        sub_u2 = bounds["sub_l2_upper"]
        sub_l2 = max(vertex_radius(q, sub_u2, low), l2_1)
        out["sub_l2_0"], out["sub_l2_1"] = r0, sub_l2
        for norm, dual, rho in (("l1", "sub_linf_upper", subspace.l2_per_l1),
                                ("linf", "sub_l1_upper", subspace.l2_per_linf)):
            if norm in plan.norms:
                h = min(bounds[dual], rho * sub_u2)
                out[f"sub_{norm}_0"] = r0 / rho
                out[f"sub_{norm}_1"] = max(vertex_radius(q, h / rho, low) / rho, sub_l2 / rho, out[f"{norm}_1"])
    return out


def _input_shape(x) -> tuple[int, ...] | None:
    """The shape of one input, when ``x`` is a batch tensor (else :func:`certify` rejects it before sampling)."""
    return tuple(x.shape[1:]) if isinstance(x, torch.Tensor) and x.ndim >= 2 else None


@dataclass(frozen=True)
class GradientPilot:
    """Fixed first-order CERTIFY's samples of a batch: Cohen's certificates at ``plan.alpha_p`` (``certs``), the
    classes they selected and the gradient-norm bounds from the estimation halves (normalized, per input)."""

    plan: FirstOrderPlan
    subspace: Subspace | None
    shape: tuple[int, ...]
    geometry: SubspaceGeometry | None
    certs: list
    classes: torch.Tensor
    bounds: dict[str, np.ndarray]
    sigma: float
    scale: float  # sigma as sampled (float32): the unit of every radius and gradient bound

    def certificate(self, i: int, prediction: int, p_lower: float, gap: float, counts: np.ndarray, dtype: str,
                    n0: int, n: int, seed: int | None, n_used: int | None = None,
                    extra: dict | None = None) -> FirstOrderCertificate:
        """Input ``i``'s certificate from a lower bound ``p_lower`` of ``p_A`` that holds outside ``alpha_p`` (radius
        0 where ``prediction`` abstains) and this pilot's gradient bounds."""
        certified, plan = prediction != ABSTAIN, self.plan
        b = {k: float(v[i]) for k, v in self.bounds.items()}
        dim = math.prod(self.shape)
        radii = {k: self.scale * v for k, v in normalized_radii(p_lower if certified else 0.0, b, plan, dim,
                                                                self.geometry).items()}
        return FirstOrderCertificate(
            prediction=prediction, p_lower=p_lower, gap=gap if certified else float("nan"), counts=counts,
            radius=radii["l2_1"], radii=radii, grad_bounds={k: v / self.scale for k, v in b.items()},
            sigma=self.sigma, n0=n0, n=n, halves=plan.halves, alpha=plan.alpha, alpha_p=plan.alpha_p,
            alpha_grad=plan.alpha_grad, alpha_each=plan.alpha_each, dtype=dtype, dim=dim,
            subspace_dim=self.subspace.dim(self.shape) if self.subspace is not None else None, seed=seed,
            subspace_geometry=self.geometry, n_used=n_used, extra=dict(extra or {}))


def gradient_pilot(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, sigma: float, num_classes: int,
                   n0: int, n: int, alpha: float, *, norms: str | Sequence[str] = NORMS,
                   subspace: Subspace | str | None = None, alpha_split: float = 0.5, p_samples: int | None = None,
                   batch_size: int = 1000, block: int | None = None,
                   generators: Sequence[tuple[torch.Generator | None, ...]] | None = None,
                   dtype: torch.dtype = torch.float32, seed: int | None = None, range_policy: str = "warn",
                   uniforms: Sequence[float] | None = None) -> GradientPilot:
    """Steps 1-3 of the protocol (module docstring) for ``x`` (B, *shape): the plan (``p_samples``: the samples
    that will bound ``p_A``, default ``n``), Cohen's CERTIFY at ``alpha_p`` with a gradient observer on its ``n``
    estimation samples (``generators``: one ``(selection, half 1, half 2)`` triple per input), and the bounds.
    Raises ValueError before sampling on a bad budget, norm or subspace."""
    sigma = check_positive("sigma (noise level, in input units where pixels lie in [0, 1])", sigma)
    sub = Subspace(subspace) if subspace is not None and not isinstance(subspace, Subspace) else subspace
    plan = FirstOrderPlan.make(alpha, n, norms, sub is not None, alpha_split, p_samples=p_samples)
    shape = _input_shape(x)
    if sub is not None and shape is not None:
        sub.dim(shape)  # a subspace that does not fit the inputs is rejected before sampling
    if generators is None and shape is not None:
        generators = [(None, None, None)] * x.shape[0]  # torch's global generator, three parts in turn
    elif generators is not None and not all(isinstance(g, (tuple, list)) and len(g) == 3 for g in generators):
        raise ValueError("generators must hold one (selection, half 1, half 2) triple per input")
    noise = IsotropicGaussian(sigma)
    observer = fs.GradientObserver(noise.sigma_sampled, parts=plan.halves)
    certs = certify(model, x, noise, num_classes, n0, n, plan.alpha_p, batch_size=batch_size,
                    block=block, generators=generators, dtype=dtype, seed=seed, range_policy=range_policy,
                    observers=[observer], uniforms=uniforms)
    geometry = sub.geometry(shape) if sub is not None else None
    sums = observer.part_sums.cpu().numpy()
    bounds = gradient_bounds(plan, (sums[:, 0], sums[:, 1]), sub, geometry, shape)
    return GradientPilot(plan, sub, shape, geometry, certs, observer.classes, bounds, sigma, noise.sigma_sampled)


def certify_first_order(
    model: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    sigma: float,
    num_classes: int,
    n0: int,
    n: int,
    alpha: float,
    *,
    norms: str | Sequence[str] = NORMS,
    subspace: Subspace | str | None = None,
    alpha_split: float = 0.5,
    batch_size: int = 1000,
    block: int | None = None,
    generators: Sequence[tuple[torch.Generator, torch.Generator, torch.Generator]] | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int | None = None,
    range_policy: str = "warn",
    uniforms: Sequence[float] | None = None,
) -> list[FirstOrderCertificate]:
    """First-order CERTIFY for a batch ``x`` (B, *shape) under ``N(0, sigma^2 I)``; one certificate per input.

    Cohen's CERTIFY (:func:`smoothcert.engine.smooth.certify` at level ``alpha_p``) with a
    :class:`~smoothcert.stats.gradients.GradientObserver` on its estimation samples, then the gradient bounds
    and the radii. ``generators``: per input a triple ``(selection, first half, second half)`` of independent
    streams (or ``None`` for torch's global generator). ``uniforms`` (one draw in [0, 1] per input): the
    randomized Clopper-Pearson bound of ``p_A`` (recorded as ``extra["cp_uniform"]``). See the module docstring
    for the protocol and the guarantee. Raises ValueError before sampling on a bad budget, norm or subspace.
    The noise is the one sampled, ``sigma`` rounded to float32 (``sigma_sampled``): the gradient sums are of its
    standard draws and the radii in its units.
    """
    pilot = gradient_pilot(model, x, sigma, num_classes, n0, n, alpha, norms=norms, subspace=subspace,
                           alpha_split=alpha_split, batch_size=batch_size, block=block, generators=generators,
                           dtype=dtype, seed=seed, range_policy=range_policy, uniforms=uniforms)
    return [pilot.certificate(i, c.prediction if c.p_lower > 0.5 else ABSTAIN, c.p_lower, c.gap, c.counts, c.dtype,
                              n0, n, seed, extra=c.extra)
            for i, c in enumerate(pilot.certs)]
