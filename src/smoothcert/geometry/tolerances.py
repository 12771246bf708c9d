"""Tolerances, region helpers and canonical reductions shared by distances and intersection tests.

Every allowance here errs toward smaller distances and toward "may intersect": a region's basis that is
orthonormal only up to a tolerance is accounted for by :func:`basis_error`, float64 reductions by
:func:`rounding_allowance`.

**Canonical reductions.** Memory-based certification must decide the same way however its regions are
batched, chunked or reloaded (a resumed or split run equals an uninterrupted one bit for bit). Library
reductions do not promise that: ``sum``, ``vector_norm`` and ``cumsum`` pick their vectorization and
accumulation order from the tensor's shape and layout, and BLAS products (``@``, ``bmm``) from the number of
rows, the thread count and the memory alignment. :func:`fixed_sum`, :func:`fixed_norm`, :func:`fixed_cumsum`,
:func:`fixed_vecmat` and :func:`fixed_matvec` are built from elementwise float64 operations only (each one
IEEE-rounded per element, whatever the vector width) combined in an order fixed by the length alone, so every
row's result depends on that row's values only: the same bits alone or in any batch, on any CPU (and on a GPU,
whose float64 ``+ * / sqrt`` are IEEE-rounded too). Their rounding error is that of pairwise summation
(``O(log d) eps``), within :func:`rounding_allowance`.
"""

from __future__ import annotations

import weakref

import torch

from smoothcert.geometry.regions import Ball, CrossPolytope, Ellipsoid, Region

__all__ = ["EPS", "SHRINK", "BALL", "ELLIPSOID", "L1", "rounding_allowance", "region_kind", "region_basis",
           "basis_error", "outer_radius", "inscribed_lower", "is_point", "check_regions", "fixed_sum", "fixed_norm",
           "fixed_cumsum", "fixed_vecmat", "fixed_matvec"]

EPS = float(torch.finfo(torch.float64).eps)
BALL, ELLIPSOID, L1 = "ball", "ellipsoid", "l1"
_BASIS_ERRORS: dict[tuple, tuple[weakref.ref, int, float]] = {}  # memory -> (tensor ref, its version, error)
SHRINK = 1e-10  # relative margin that keeps a ball strictly inside the distance (eq. 3.19's epsilon)
_PRODUCT_BYTES = 1 << 26  # the (rows, d, d) products of fixed_vecmat / fixed_matvec are built in parts this size


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
    scale so they stay lower bounds for a basis that is orthonormal only up to a tolerance. ``U^T U`` is the
    sum of the rows' outer products taken in row order (elementwise, no BLAS) and the norm is
    :func:`fixed_norm`: the same bits for the same basis on any CPU, thread count or memory alignment (the
    value enters every distance's allowance, so a reloaded memory must get it exactly). The cache is keyed by
    the tensor's memory, so the detached views that regions take of one basis share one entry; an entry lives
    as long as the tensor it was computed for and is dropped when that memory is modified in place.
    """
    if basis is None:
        return 0.0
    key = (basis.device, basis.data_ptr(), tuple(basis.shape), tuple(basis.stride()), basis.dtype)
    entry = _BASIS_ERRORS.get(key)
    if entry is not None:
        owner = entry[0]()
        if owner is not None and owner._version == entry[1] == basis._version:
            return entry[2]
    b = basis.detach().to(torch.float64)
    d = b.shape[0]
    gram = torch.zeros((d, d), dtype=b.dtype, device=b.device)  # U^T U: the rows' outer products, in order
    outer = torch.empty_like(gram)
    for row in b:
        torch.mul(row[:, None], row[None, :], out=outer)
        gram.add_(outer)
    gram.diagonal().sub_(1.0)
    err = float(fixed_norm(gram.reshape(-1))) + rounding_allowance(d)
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


# ----------------------------------------------------------------------------------------------- canonical reductions


def fixed_sum(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Sum along ``dim`` by a fixed pairwise tree of elementwise additions (see the module docstring).

    With ``p`` the largest power of two ``<= m`` (the length), entries ``p..m-1`` are first added to entries
    ``0..m-p-1``, then the halves of the ``p`` partial sums are added until one is left: an order that depends
    on ``m`` only, so each slice's sum is the same bits in any batch, shape or memory layout.
    """
    m = x.shape[dim]
    if m == 0:
        return x.sum(dim)
    p = 1 << (m.bit_length() - 1)
    if p < m:
        r = m - p
        x = torch.cat([x.narrow(dim, 0, r) + x.narrow(dim, p, r), x.narrow(dim, r, p - r)], dim)
    while p > 1:
        p //= 2
        x = x.narrow(dim, 0, p) + x.narrow(dim, p, p)
    return x.squeeze(dim)


def fixed_norm(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """The l2 norm along ``dim``: the square root of :func:`fixed_sum` of the squares (canonical per slice)."""
    return fixed_sum(x * x, dim).sqrt()


def fixed_cumsum(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Inclusive prefix sums along ``dim`` by the doubling scan (``x_i += x_{i-s}`` for ``s = 1, 2, 4, ...``).

    Elementwise additions in an order fixed by the length: canonical per slice (see the module docstring).
    """
    m = x.shape[dim]
    s = 1
    while s < m:
        x = torch.cat([x.narrow(dim, 0, s), x.narrow(dim, s, m - s) + x.narrow(dim, 0, m - s)], dim)
        s *= 2
    return x


def _row_parts(n: int, d: int) -> list[slice]:
    step = max(1, _PRODUCT_BYTES // (8 * d * d))
    return [slice(s, s + step) for s in range(0, n, step)]


def fixed_vecmat(v: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Row ``i`` of ``v`` (n, d) times its matrix ``m[i]`` ((n, d, d), or (1, d, d) shared): ``v_i^T M_i`` (n, d).

    ``sum_k v_ik M_ikj`` by :func:`fixed_sum` over ``k``: canonical per row (no BLAS), in parts of at most
    64 MB of products.
    """
    n, d = v.shape
    parts = [fixed_sum(v[s, :, None] * (m if m.shape[0] == 1 else m[s]), dim=1) for s in _row_parts(n, d)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def fixed_matvec(m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Matrix ``m[i]`` ((n, d, d), or (1, d, d) shared) times row ``i`` of ``v`` (n, d): ``M_i v_i`` (n, d).

    ``sum_k M_ijk v_ik`` by :func:`fixed_sum` over ``k``: canonical per row (no BLAS), in parts of at most 64 MB.
    """
    n, d = v.shape
    parts = [fixed_sum((m if m.shape[0] == 1 else m[s]) * v[s, None, :], dim=2) for s in _row_parts(n, d)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)
