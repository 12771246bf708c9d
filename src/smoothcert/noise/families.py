"""The isotropic noise families by name, for the command line and the training loop: ``gaussian``, ``laplace``,
``uniform``, all parameterized by one sigma, the **per-coordinate standard deviation** in input units (pixels in
[0, 1]). Each family derives its own scale from it and records it: Gaussian ``sigma``; Laplace ``lambda = sigma /
sqrt(2)`` (:mod:`smoothcert.noise.laplace`); uniform on ``[-lambda, lambda]^d`` with ``lambda = sqrt(3) sigma``
(:mod:`smoothcert.noise.uniform`).

A family class provides ``from_std(sigma)`` (the noise), ``unit_draws(shape, generator, device)`` (float32 draws of
standard deviation 1, so training adds ``sigma * w``), ``native_norms`` (the norms its own theorem certifies) and
:meth:`~smoothcert.noise.base.Noise.norm_radii`. Every family certifies l1, l2 and l_inf: the norms it does not
certify natively follow by the norm inequalities (:mod:`smoothcert.geometry.norms`) and are marked converted.
"""

from __future__ import annotations

import torch

from smoothcert.geometry.norms import NORMS, check_norm
from smoothcert.noise.base import Noise
from smoothcert.noise.gaussian import IsotropicGaussian
from smoothcert.noise.laplace import Laplace
from smoothcert.noise.uniform import UniformDiagonal

__all__ = ["FAMILIES", "family", "family_noise", "unit_draws", "check_family_norm"]

#: Family name -> class. The names are the choices of ``--noise``.
FAMILIES: dict[str, type[Noise]] = {"gaussian": IsotropicGaussian, "laplace": Laplace, "uniform": UniformDiagonal}


def family(name: str) -> type[Noise]:
    """The family class named ``name``; a ValueError that lists the families otherwise."""
    if not isinstance(name, str) or name not in FAMILIES:
        raise ValueError(f"the noise family must be one of {', '.join(FAMILIES)}, got {name!r}")
    return FAMILIES[name]


def family_noise(name: str, sigma: float) -> Noise:
    """The isotropic noise of family ``name`` with per-coordinate standard deviation ``sigma`` (its scale derived
    from sigma; a sigma <= 0 is a ValueError before anything is drawn)."""
    return family(name).from_std(sigma)


def unit_draws(name: str, shape, generator: torch.Generator | None = None, device="cpu") -> torch.Tensor:
    """float32 draws of family ``name`` with standard deviation 1 per coordinate (Gaussian: ``torch.randn``)."""
    return family(name).unit_draws(shape, generator=generator, device=device)


def check_family_norm(name: str, norm: str) -> str:
    """``norm`` if family ``name`` certifies it (natively or converted); a ValueError naming both otherwise."""
    cls = family(name)
    native = ", ".join(cls.native_norms)
    return check_norm(norm, NORMS, what=f"--noise {name} (native: {native}; the others converted)")
