"""Tolerances and region helpers shared by distances and intersection tests.

Every allowance here errs toward smaller distances and toward "may intersect": a region's basis that is
orthonormal only up to a tolerance is accounted for by :func:`~smoothcert.geometry.linalg.basis_error`
(already inside an ellipsoid's own radii), float64 reductions by :func:`rounding_allowance`.
"""

from __future__ import annotations

import torch

from smoothcert.geometry.linalg import EPS, basis_error, rounding_allowance
from smoothcert.geometry.lowrank import LowRankEllipsoid
from smoothcert.geometry.reductions import fixed_cumsum, fixed_matvec, fixed_norm, fixed_sum, fixed_vecmat
from smoothcert.geometry.regions import Ball, CrossPolytope, Ellipsoid, Region

__all__ = ["EPS", "SHRINK", "BALL", "ELLIPSOID", "L1", "LOWRANK", "rounding_allowance", "region_kind", "region_basis",
           "basis_error", "outer_radius", "inscribed_lower", "is_point", "check_regions", "fixed_sum", "fixed_norm",
           "fixed_cumsum", "fixed_vecmat", "fixed_matvec"]

BALL, ELLIPSOID, L1, LOWRANK = "ball", "ellipsoid", "l1", "lowrank"
SHRINK = 1e-10  # relative margin that keeps a ball strictly inside the distance (eq. 3.19's epsilon)


def region_kind(region: object) -> str:
    """``"ball"``, ``"ellipsoid"``, ``"l1"`` or ``"lowrank"``; a TypeError for anything else."""
    if isinstance(region, Ball):
        return BALL
    if isinstance(region, Ellipsoid):
        return ELLIPSOID
    if isinstance(region, CrossPolytope):
        return L1
    if isinstance(region, LowRankEllipsoid):
        return LOWRANK
    raise TypeError(f"expected a Ball, an Ellipsoid, a CrossPolytope or a LowRankEllipsoid region, got {type(region).__name__}")


def region_basis(region: Region) -> torch.Tensor | None:
    return region.basis if isinstance(region, Ellipsoid) else None


def outer_radius(region: Region) -> float:
    """Radius of a ball around the center that contains the region: ``max a * sigma_max(B)``, with
    ``sigma_max(B) <= sqrt(1 + basis_error) <= 1 + basis_error`` (a low-rank ellipsoid's own bound)."""
    if isinstance(region, LowRankEllipsoid):
        return region.outer_radius
    return float(region.axes.max()) * (1.0 + basis_error(region_basis(region)))


def inscribed_lower(region: Region) -> float:
    """A lower bound of the region's inscribed l2 radius, less rounding.

    The region's own :attr:`~smoothcert.geometry.Region.inscribed_radius` already allows for a basis that is
    orthonormal only up to :func:`basis_error` (``sigma_min(B) >= sqrt(1 - basis_error)``).
    """
    return max(0.0, region.inscribed_radius * (1.0 - rounding_allowance(region.dim)))


def is_point(region: Region) -> bool:
    return not bool((region.axes > 0).any())


def check_regions(*regions: object) -> int:
    dims = set()
    for r in regions:
        region_kind(r)
        dims.add(r.dim)  # type: ignore[attr-defined]
    if len(dims) > 1:
        raise ValueError(f"regions must live in the same dimension, got dimensions {sorted(dims)}")
    return dims.pop()


# ----------------------------------------------------------------------------------------------- canonical reductions
