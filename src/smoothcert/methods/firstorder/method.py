"""``--method first-order``: first-order certificates under Cohen's noise ``N(0, sigma^2 I)`` (seed 004).

The same noise and the same kind of samples as ``fixed``, but the ``n`` estimation samples also bound norms of
the gradient of the smoothed classifier, which certifies larger regions (Theorem 3, Corollaries 3.1-3.4; see
:mod:`smoothcert.firstorder`). ``alpha`` is split between the ``p_A`` bound (``--alpha-split``, default one
half) and the gradient bounds; the split is recorded in every row. The ``radius`` column is the first-order l2
radius; ``radius_<norm>_0`` / ``radius_<norm>_1`` hold the zeroth- and first-order radius of each norm from the
same ``p_A`` bound (``nan`` for norms not asked for), ``radius_sub_*`` the subspace radii.

Every mode of certification applies: ``--randomized-cp`` bounds ``p_A`` with the randomized Clopper-Pearson bound;
in ``--mode target`` / ``anytime`` the ``n`` samples give the gradient bounds only and ``p_A`` is tested
sequentially on fresh samples, up to ``--n-max``, at the level the first-order l2 radius needs
(:mod:`smoothcert.methods.firstorder.sequential`; the target radius is l2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from smoothcert.geometry.regions import Ball
from smoothcert.methods.base import CertifyMethod, RunContext, sigma_setting
from smoothcert.engine.sequential import uniform_draws
from smoothcert.methods.firstorder.certificate import (NORMS, FirstOrderPlan, Subspace, certify_first_order,
                                                       parse_norms)
from smoothcert.methods.firstorder.sequential import certify_first_order_sequential
from smoothcert.methods.records import MethodRecord
from smoothcert.settings import Settings, names, number, text

_RADII = tuple(f"radius_{p}{k}_{o}" for p in ("", "sub_") for k in NORMS for o in (0, 1))
_BOUNDS = ("grad_l2_upper", "grad_l2_lower", "grad_linf_upper", "grad_l1_upper", "grad_sub_l2_upper",
           "grad_sub_linf_upper", "grad_sub_l1_upper")


@dataclass(frozen=True)
class FirstOrderSettings(Settings):
    """Cohen's noise level, the norms to certify, an optional subspace and the share of alpha for ``p_A``."""

    sigma: float = sigma_setting()
    norms: tuple[str, ...] = names(NORMS, NORMS, help="comma-separated norms to certify among l2, l1, linf (l2 "
                                   "always; each extra norm needs more gradient bounds, which share alpha)")
    subspace: str | None = text(None, optional=True, help="also certify within a subspace: 'channel:0', "
                                "'coords:0-99,150' (indices of the flattened input) or a .npy/.pt file with a "
                                "(d, k) orthonormal basis or a (d, d) projection; radii are in the ambient l_p norm of "
                                "the perturbation, for any basis")
    alpha_split: float = number(0.5, low=0.0, high=1.0, low_open=True, high_open=True,
                                help="share of alpha spent on the p_A bound; the rest is split evenly over the "
                                     "gradient-norm bounds")


class FirstOrder(CertifyMethod):
    """``--method first-order``: zeroth- and first-order radii in l2, l1, l_inf and a subspace."""

    name = "first-order"
    columns = ("sigma", *_RADII, *_BOUNDS, "alpha_p", "alpha_grad", "alpha_each", "n_half", "subspace_dim")
    settings_type = FirstOrderSettings
    samples_only = True
    #: Every mode: the randomized bound of p_A in fixed mode; in target and anytime mode the gradient bounds come
    #: from the fixed ``n`` samples and p_A is tested sequentially (:mod:`~smoothcert.methods.firstorder.sequential`).
    modes = True

    def __init__(self, settings: FirstOrderSettings | float | None = None, /, norms: Any = None,
                 subspace: str | Subspace | None = None, alpha_split: float | None = None, *, n: int | None = None,
                 alpha: float | None = None, **keywords: Any):
        """From settings, or ``FirstOrder(sigma, norms, subspace, alpha_split)`` (also by name); ``subspace`` may be a
        :class:`Subspace`. Everything that can be checked before sampling is; ``n`` and ``alpha`` (when known)
        check the budget (:meth:`check_sampling`). The norms are kept in canonical order, l2 always among them."""
        given = {key: value for key, value in (("norms", norms), ("alpha_split", alpha_split)) if value is not None}
        given.update(keywords)  # e.g. sigma=
        space = subspace if isinstance(subspace, Subspace) else None
        if subspace is not None:
            given["subspace"] = str(space.spec) if space is not None else subspace
        settings = self.make_settings(settings, **given)
        super().__init__(replace(settings, norms=parse_norms(settings.norms)))
        if space is None and self.settings.subspace is not None:
            space = Subspace(self.settings.subspace)
        self.subspace = space
        self.check_sampling(n, alpha)

    @property
    def sigma(self) -> float:
        return self.settings.sigma

    @property
    def norms(self) -> tuple[str, ...]:
        return self.settings.norms

    def check_sampling(self, n: int | None = None, alpha: float | None = None) -> None:
        """Two halves of >= 2 samples and a ``p_A`` bound able to exceed 1/2 at ``alpha_p``."""
        if n is not None and alpha is not None:
            FirstOrderPlan.make(alpha, n, self.norms, self.subspace is not None, self.settings.alpha_split)

    def certify(self, ctx: RunContext, x, labels, indices) -> list[MethodRecord]:
        gens = list(zip(ctx.generators(indices, "select"), ctx.generators(indices, "estimate"),
                        ctx.generators(indices, "estimate-2")))
        kw = dict(norms=self.norms, subspace=self.subspace, alpha_split=self.settings.alpha_split,
                  batch_size=ctx.batch_size, block=ctx.block, dtype=ctx.dtype, seed=ctx.seed)
        if ctx.mode.sequential:
            gens = [(*g, s) for g, s in zip(gens, ctx.generators(indices, "sequential"))]
            certs = certify_first_order_sequential(ctx.model, x, self.sigma, ctx.num_classes, ctx.n0, ctx.n,
                                                   ctx.alpha, ctx.mode, generators=gens, **kw)
        else:
            uniforms = uniform_draws(ctx.generators(indices, "cp-uniform")) if ctx.mode.randomized else None
            certs = certify_first_order(ctx.model, x, self.sigma, ctx.num_classes, ctx.n0, ctx.n, ctx.alpha,
                                        generators=gens, uniforms=uniforms, **kw)
        records = []
        for xi, c in zip(x, certs):
            fields = {"sigma": self.sigma, "alpha_p": c.alpha_p, "alpha_grad": c.alpha_grad,
                      "alpha_each": c.alpha_each, "n_half": c.halves[0],
                      "subspace_dim": c.subspace_dim if c.subspace_dim is not None else 0}
            fields.update({f"radius_{k}": c.radii.get(k, math.nan) for k in (r[len("radius_"):] for r in _RADII)})
            fields.update({b: c.grad_bounds.get(b[len("grad_"):], math.nan) for b in _BOUNDS})
            region = None if c.abstained else Ball(xi, float(c.radius))  # the first-order l2 ball
            records.append(MethodRecord(self.name, c, region, fields))
        return records
