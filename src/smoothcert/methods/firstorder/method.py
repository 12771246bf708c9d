"""``--method first-order``: first-order certificates under Cohen's noise ``N(0, sigma^2 I)`` (seed 004).

The same noise and the same kind of samples as ``fixed``, but the ``n`` estimation samples also bound norms of
the gradient of the smoothed classifier, which certifies larger regions (Theorem 3, Corollaries 3.1-3.4; see
:mod:`smoothcert.firstorder`). ``alpha`` is split between the ``p_A`` bound (``--alpha-split``, default one
half) and the gradient bounds; the split is recorded in every row. The ``radius`` column is the first-order l2
radius; ``radius_<norm>_0`` / ``radius_<norm>_1`` hold the zeroth- and first-order radius of each norm from the
same ``p_A`` bound (``nan`` for norms not asked for), ``radius_sub_*`` the subspace radii.
"""

from __future__ import annotations

import argparse
import math

from smoothcert.methods.firstorder.certificate import (NORMS, FirstOrderPlan, Subspace, certify_first_order, parse_norms)
from smoothcert.validation import check_positive
from smoothcert.methods.base import CertifyMethod, RunContext

_RADII = tuple(f"radius_{p}{k}_{o}" for p in ("", "sub_") for k in NORMS for o in (0, 1))
_BOUNDS = ("grad_l2_upper", "grad_l2_lower", "grad_linf_upper", "grad_l1_upper", "grad_sub_l2_upper",
           "grad_sub_linf_upper", "grad_sub_l1_upper")


class FirstOrder(CertifyMethod):
    """``--method first-order``: zeroth- and first-order radii in l2, l1, l_inf and a subspace."""

    name = "first-order"
    columns = ("sigma", *_RADII, *_BOUNDS, "alpha_p", "alpha_grad", "alpha_each", "n_half", "subspace_dim")

    def __init__(self, sigma: float, norms=NORMS, subspace: str | Subspace | None = None, alpha_split: float = 0.5,
                 *, n: int | None = None, alpha: float | None = None):
        """Validate everything that can be checked before sampling; ``n`` and ``alpha`` (when known) check the
        budget (two halves of >= 2 samples, a ``p_A`` bound able to exceed 1/2 at ``alpha_p``)."""
        self.sigma = check_positive("sigma (noise level, in input units where pixels lie in [0, 1])", sigma)
        self.norms = parse_norms(norms)
        self.subspace = Subspace(subspace) if isinstance(subspace, str) else subspace
        if isinstance(alpha_split, bool) or not isinstance(alpha_split, (int, float)) or not 0 < alpha_split < 1:
            raise ValueError(f"alpha_split (share of alpha for the p_A bound) must lie in (0, 1), got {alpha_split!r}")
        self.alpha_split = float(alpha_split)
        if n is not None and alpha is not None:
            FirstOrderPlan.make(alpha, n, self.norms, self.subspace is not None, self.alpha_split)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("first-order (--method first-order)")
        g.add_argument("--norms", default=",".join(NORMS),
                       help="first-order: comma-separated norms to certify among l2, l1, linf (l2 always; each "
                            "extra norm needs more gradient bounds, which share alpha; default l2,l1,linf)")
        g.add_argument("--subspace", default=None,
                       help="first-order: also certify within a subspace: 'channel:0', 'coords:0-99,150' (indices of "
                            "the flattened input) or a .npy/.pt file with a (d, k) orthonormal basis or a (d, d) "
                            "projection (radii are in the ambient l_p norm of the perturbation, for any basis)")
        g.add_argument("--alpha-split", type=float, default=0.5,
                       help="first-order: share of alpha spent on the p_A bound; the rest is split evenly over the "
                            "gradient-norm bounds (default 0.5)")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "FirstOrder":
        return cls(args.sigma, getattr(args, "norms", ",".join(NORMS)), getattr(args, "subspace", None),
                   getattr(args, "alpha_split", 0.5), n=getattr(args, "n", None), alpha=getattr(args, "alpha", None))

    def config(self):
        return {"name": self.name, "sigma": self.sigma, "norms": list(self.norms),
                "subspace": None if self.subspace is None else str(self.subspace.spec),
                "alpha_split": self.alpha_split}

    def certify(self, ctx: RunContext, x, labels, indices):
        gens = list(zip(ctx.generators(indices, "select"), ctx.generators(indices, "estimate"),
                        ctx.generators(indices, "estimate-2")))
        certs = certify_first_order(ctx.model, x, self.sigma, ctx.num_classes, ctx.n0, ctx.n, ctx.alpha,
                                    norms=self.norms, subspace=self.subspace, alpha_split=self.alpha_split,
                                    batch_size=ctx.batch_size, block=ctx.block, generators=gens, dtype=ctx.dtype,
                                    seed=ctx.seed)
        rows = []
        for c in certs:
            row = {"predict": c.prediction, "radius": c.radius, "radius_proxy": c.radius_proxy,
                   "p_lower": c.p_lower, "gap": c.gap, "n": c.n, "method": self.name, "dtype": c.dtype,
                   "sigma": self.sigma, "alpha_p": c.alpha_p, "alpha_grad": c.alpha_grad,
                   "alpha_each": c.alpha_each, "n_half": c.halves[0],
                   "subspace_dim": c.subspace_dim if c.subspace_dim is not None else 0}
            row.update({f"radius_{k}": c.radii.get(k, math.nan) for k in (r[len("radius_"):] for r in _RADII)})
            row.update({b: c.grad_bounds.get(b[len("grad_"):], math.nan) for b in _BOUNDS})
            rows.append(row)
        return rows
