"""Cohen et al.'s certification with one fixed isotropic Gaussian ``N(0, sigma^2 I)`` (seed 000 section 3.1).

Guarantee: with probability at least ``1 - alpha``, the smoothed classifier predicts the reported class on the
l2 ball of radius ``sigma * Phi^-1(p_A)`` (seed 000 eq. 3.3). With ``sampling="sound"`` the noise is drawn exactly
on the 8-bit input grid (:class:`~smoothcert.noise.discrete.DiscretizedGaussian`) and the guarantee holds for the
smoothed classifier of ``f(clip(round(x + delta)))`` as computed, floating point included.
"""

from __future__ import annotations

from dataclasses import dataclass

from smoothcert.engine.smooth import certify
from smoothcert.methods.base import CertifyMethod, RunContext, sigma_setting
from smoothcert.methods.records import MethodRecord
from smoothcert.noise.discrete import SAMPLINGS, gaussian_noise
from smoothcert.settings import Settings, choice


@dataclass(frozen=True)
class FixedSettings(Settings):
    """Cohen's CERTIFY: the noise level, and how the noise is drawn."""

    sigma: float = sigma_setting()
    sampling: str = choice("float", SAMPLINGS, help="float: Gaussian noise in floating point; sound: the Gaussian "
                           "rounded onto the 8-bit grid k/255, drawn exactly from integer random bits, so the "
                           "certificate holds for f(clip(round(x + delta))) as computed (inputs must lie on the grid)")


class FixedSigma(CertifyMethod):
    """``--method fixed``: Cohen's CERTIFY at ``--sigma``."""

    name = "fixed"
    columns = ("sigma",)
    settings_type = FixedSettings
    samples_only = True

    def __init__(self, settings: FixedSettings | float | None = None, /, **keywords):
        """``FixedSigma(FixedSettings(0.25))``, ``FixedSigma(0.25)`` or ``FixedSigma(sigma=0.25)``."""
        super().__init__(settings, **keywords)
        self.noise = gaussian_noise(self.settings.sigma, self.settings.sampling)

    def check_inputs(self, x) -> None:
        self.noise.check_support(x)

    def certify(self, ctx: RunContext, x, labels, indices) -> list[MethodRecord]:
        certs = certify(ctx.model, x, self.noise, ctx.num_classes, ctx.n0, ctx.n, ctx.alpha,
                        batch_size=ctx.batch_size, block=ctx.block, generators=ctx.certify_generators(indices),
                        dtype=ctx.dtype, seed=ctx.seed)
        return [MethodRecord(self.name, c, c.region, {"sigma": self.noise.sigma}) for c in certs]
