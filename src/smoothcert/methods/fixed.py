"""Certification with one fixed isotropic noise: Cohen et al.'s ``N(0, sigma^2 I)`` (seed 000 section 3.1), or Laplace
or uniform noise of the same per-coordinate standard deviation (:mod:`smoothcert.noise.families`).

Guarantee: with probability at least ``1 - alpha``, the smoothed classifier predicts the reported class on the
certified ball of each norm: Gaussian, the l2 ball of radius ``sigma * Phi^-1(p_A)`` (seed 000 eq. 3.3); Laplace, the
l1 ball of radius ``-lambda ln(2 (1 - p_A))`` (Teng et al. Theorem 1, :mod:`smoothcert.noise.laplace`); uniform, the
l1 ball of radius ``lambda (2 p_A - 1)`` and the l_inf ball of radius ``2 lambda (1 - (3/2 - p_A)^(1/d))``
(:mod:`smoothcert.noise.uniform`). Every family's radii in the other norms follow by the norm inequalities
(:mod:`smoothcert.geometry.norms`) and are marked in the ``converted`` column. ``radius`` is the radius in ``--norm``.
With ``sampling="sound"`` (Gaussian noise only) the noise is drawn exactly on the 8-bit input grid
(:class:`~smoothcert.noise.discrete.DiscretizedGaussian`) and the guarantee holds for the smoothed classifier of
``f(clip(round(x + delta)))`` as computed, floating point included.
In ``--mode target`` / ``anytime`` the estimation samples are drawn sequentially
(:mod:`smoothcert.engine.sequential`, whose docstring states each mode's guarantee).
"""

from __future__ import annotations

from dataclasses import dataclass

from smoothcert.methods.base import CertifyMethod, RunContext, sigma_setting
from smoothcert.methods.records import MethodRecord
from smoothcert.noise.discrete import SAMPLINGS, gaussian_noise
from smoothcert.noise.families import FAMILIES, check_family_norm, family_noise
from smoothcert.settings import Settings, choice


@dataclass(frozen=True)
class FixedSettings(Settings):
    """CERTIFY with one fixed noise: its level, its family, the norm of the reported ``radius``, how it is drawn."""

    sigma: float = sigma_setting()
    noise: str = choice("gaussian", tuple(FAMILIES),
                        help="noise family, all at per-coordinate standard deviation --sigma: gaussian (scale sigma), "
                             "laplace (scale sigma / sqrt(2)), uniform (half-width sqrt(3) sigma)")
    norm: str = choice("l2", ("l2", "l1", "linf"),
                       help="norm of the radius column (fixed: every norm's radius is in radius_l1, radius_l2, "
                            "radius_linf; the column converted names those that follow by norm inequalities)")
    sampling: str = choice("float", SAMPLINGS, help="float: noise in floating point; sound: the Gaussian rounded onto "
                           "the 8-bit grid k/255, drawn exactly from integer random bits, so the certificate holds "
                           "for f(clip(round(x + delta))) as computed (inputs must lie on the grid; gaussian only)")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_family_norm(self.noise, self.norm)
        if self.sampling != "float" and self.noise != "gaussian":
            raise ValueError(f"sampling (--sampling) {self.sampling} is for Gaussian noise only, got noise "
                             f"(--noise) {self.noise}: leave out --sampling or use --noise gaussian")



class FixedSigma(CertifyMethod):
    """``--method fixed``: CERTIFY at ``--sigma`` with ``--noise`` (default Cohen's Gaussian), radius in ``--norm``."""

    name = "fixed"
    columns = ("sigma", "noise", "scale", "norm", "radius_l1", "radius_l2", "radius_linf", "converted")
    settings_type = FixedSettings
    samples_only = True
    modes = True

    def __init__(self, settings: FixedSettings | float | None = None, /, **keywords):
        """``FixedSigma(FixedSettings(0.25))``, ``FixedSigma(0.25)`` or ``FixedSigma(sigma=0.25, noise="laplace")``."""
        super().__init__(settings, **keywords)
        if self.settings.sampling == "float":
            self.noise = family_noise(self.settings.noise, self.settings.sigma)
        else:
            self.noise = gaussian_noise(self.settings.sigma, self.settings.sampling)

    def check_inputs(self, x) -> None:
        self.noise.check_support(x)

    def certify(self, ctx: RunContext, x, labels, indices) -> list[MethodRecord]:
        certs = ctx.certify(x, self.noise, indices)
        s = self.settings
        fields = {"sigma": s.sigma, "noise": s.noise, "scale": self.noise.scale, "norm": s.norm}
        return [MethodRecord(self.name, c, c.region, fields, norm=s.norm) for c in certs]
