"""Cohen et al.'s certification with one fixed isotropic Gaussian ``N(0, sigma^2 I)`` (seed 000 section 3.1).

Guarantee: with probability at least ``1 - alpha``, the smoothed classifier predicts the reported class on the
l2 ball of radius ``sigma * Phi^-1(p_A)`` (seed 000 eq. 3.3).
"""

from __future__ import annotations

import argparse

from smoothcert.noise.gaussian import IsotropicGaussian
from smoothcert.engine.smooth import certify
from smoothcert.methods.base import CertifyMethod, RunContext, certificate_row


class FixedSigma(CertifyMethod):
    """``--method fixed``: Cohen's CERTIFY at ``--sigma``."""

    name = "fixed"
    columns = ("sigma",)

    def __init__(self, sigma: float):
        self.noise = IsotropicGaussian(sigma)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "FixedSigma":
        return cls(args.sigma)

    def config(self):
        return {"name": self.name, "sigma": self.noise.sigma}

    def certify(self, ctx: RunContext, x, labels, indices):
        certs = certify(ctx.model, x, self.noise, ctx.num_classes, ctx.n0, ctx.n, ctx.alpha,
                        batch_size=ctx.batch_size, block=ctx.block, generators=ctx.certify_generators(indices),
                        dtype=ctx.dtype, seed=ctx.seed)
        return [{**certificate_row(c, self.name), "sigma": self.noise.sigma} for c in certs]
