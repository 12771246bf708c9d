"""Cohen et al.'s certification with one fixed isotropic Gaussian ``N(0, sigma^2 I)`` (seed 000 section 3.1).

Guarantee: with probability at least ``1 - alpha``, the smoothed classifier predicts the reported class on the
l2 ball of radius ``sigma * Phi^-1(p_A)`` (seed 000 eq. 3.3). In ``--mode target`` / ``anytime`` the estimation
samples are drawn sequentially (:mod:`smoothcert.engine.sequential`, whose docstring states each mode's guarantee).
"""

from __future__ import annotations

from dataclasses import dataclass

from smoothcert.methods.base import CertifyMethod, RunContext, sigma_setting
from smoothcert.methods.records import MethodRecord
from smoothcert.noise.gaussian import IsotropicGaussian
from smoothcert.settings import Settings


@dataclass(frozen=True)
class FixedSettings(Settings):
    """Cohen's CERTIFY: the noise level alone."""

    sigma: float = sigma_setting()


class FixedSigma(CertifyMethod):
    """``--method fixed``: Cohen's CERTIFY at ``--sigma``."""

    name = "fixed"
    columns = ("sigma",)
    settings_type = FixedSettings
    samples_only = True
    modes = True

    def __init__(self, settings: FixedSettings | float | None = None, /, **keywords):
        """``FixedSigma(FixedSettings(0.25))``, ``FixedSigma(0.25)`` or ``FixedSigma(sigma=0.25)``."""
        super().__init__(settings, **keywords)
        self.noise = IsotropicGaussian(self.settings.sigma)

    def certify(self, ctx: RunContext, x, labels, indices) -> list[MethodRecord]:
        certs = ctx.certify(x, self.noise, indices)
        return [MethodRecord(self.name, c, c.region, {"sigma": self.noise.sigma}) for c in certs]
