"""Tolerances and region helpers shared by distances and intersection tests.

Every allowance here errs toward smaller distances and toward "may intersect": a region's basis that is
orthonormal only up to a tolerance is accounted for by :func:`basis_error`, float64 reductions by
:func:`rounding_allowance`.
"""

from __future__ import annotations

import weakref

import torch

from smoothcert.geometry.regions import Ball, CrossPolytope, Ellipsoid, Region

__all__ = ["EPS", "SHRINK", "BALL", "ELLIPSOID", "L1", "rounding_allowance", "region_kind", "region_basis",
           "basis_error", "outer_radius", "inscribed_lower", "is_point", "check_regions"]

EPS = float(torch.finfo(torch.float64).eps)
BALL, ELLIPSOID, L1 = "ball", "ellipsoid", "l1"
_BASIS_ERRORS: dict[int, tuple[weakref.ref, int, float]] = {}  # id -> (tensor ref, its version, error)
SHRINK = 1e-10  # relative margin that keeps a ball strictly inside the distance (eq. 3.19's epsilon)


def rounding_allowance(d: int) -> float:
    """A generous relative error allowance for an O(d) float64 reduction or matrix-vector product."""
    return 64.0 * (d + 4) * EPS


def region_kind(region: object) -> str:
    """``"ball"``, ``"ellipsoid"`` or ``"l1"``; a TypeError for anything else."""
    if isinstance(region, Ball):
        return BALL
    if isinstance(region, Ellipsoid):
        return ELLIPSOID
    if isinstance(region, CrossPolytope):
        return L1
    raise TypeError(f"expected a Ball, an Ellipsoid or a CrossPolytope region, got {type(region).__name__}")


def region_basis(region: Region) -> torch.Tensor | None:
    return region.basis if isinstance(region, Ellipsoid) else None


def basis_error(basis: torch.Tensor | None) -> float:
    """``||U^T U - I||_F`` plus rounding: how far a basis is from orthonormal (0 for None; cached per tensor).

    Geometry in the ellipsoid's own basis uses ``U^T`` as ``U^-1``; distances subtract this error times the
    scale so they stay lower bounds for a basis that is orthonormal only up to a tolerance.
    """
    if basis is None:
        return 0.0
    key = id(basis)
    entry = _BASIS_ERRORS.get(key)
    if entry is not None and entry[0]() is basis and entry[1] == basis._version:
        return entry[2]
    b = basis.to(torch.float64)
    eye = torch.eye(b.shape[0], dtype=b.dtype, device=b.device)
    err = float(torch.linalg.matrix_norm(b.T @ b - eye)) + rounding_allowance(b.shape[0])
    ref = weakref.ref(basis, lambda _, k=key: _BASIS_ERRORS.pop(k, None))
    _BASIS_ERRORS[key] = (ref, basis._version, err)
    return err


def outer_radius(region: Region) -> float:
    """Radius of a ball around the center that contains the region (``max a``, inflated for a skewed basis)."""
    return float(region.axes.max()) * (1.0 + basis_error(region_basis(region)))


def inscribed_lower(region: Region) -> float:
    """A lower bound of the region's inscribed l2 radius, safe for a basis orthonormal only up to tolerance."""
    skew = basis_error(region_basis(region))  # smallest singular value of U >= sqrt(1 - skew) >= 1 - skew
    return max(0.0, region.inscribed_radius * (1.0 - skew - rounding_allowance(region.dim)))


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

