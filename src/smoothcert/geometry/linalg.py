"""The small linear algebra that regions, tolerances and noises share.

* :func:`geometric_mean` -- ``exp(mean(log a))``, the proxy radius's mean (seed 000 eq. 3.14), computed in log
  space because the product of 784 semi-axes underflows.
* :func:`basis_error` -- how far a basis is from orthonormal, the allowance every geometric quantity of a
  region in that basis makes (its singular values lie in ``[sqrt(1 - e), sqrt(1 + e)]``).
* :func:`nearest_orthonormal` -- the polar factor of a basis: the orthonormal matrix nearest to it.
* :func:`rounding_allowance` -- a generous relative error bound of an O(d) float64 reduction.
"""

from __future__ import annotations

import math
import weakref

import torch

from smoothcert.geometry.reductions import fixed_norm

__all__ = ["EPS", "geometric_mean", "rounding_allowance", "basis_error", "singular_value_floor",
           "nearest_orthonormal"]

EPS = float(torch.finfo(torch.float64).eps)
_BASIS_ERRORS: dict[tuple, tuple[weakref.ref, int, float]] = {}  # memory -> (tensor ref, its version, error)


def geometric_mean(values: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``exp(mean(log values))`` along ``dim`` (0 where a value is 0); differentiable, never underflows as a product.

    The proxy radius of seed 000 eq. 3.14 is ``gap`` times the geometric mean of the semi-axis scales; the
    ANCER (eq. 3.15) and RDDRS (seed 003 eq. 5) objectives maximize it.
    """
    return torch.exp(torch.log(values).mean(dim=dim))


def rounding_allowance(d: int) -> float:
    """A generous relative error allowance for an O(d) float64 reduction or matrix-vector product."""
    return 64.0 * (d + 4) * EPS


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


def singular_value_floor(basis: torch.Tensor | None) -> float:
    """A lower bound of the smallest singular value of ``basis``: ``sqrt(1 - basis_error)`` (1 for None)."""
    return math.sqrt(max(0.0, 1.0 - basis_error(basis)))


def nearest_orthonormal(basis: torch.Tensor) -> torch.Tensor:
    """The orthonormal matrix nearest to ``basis`` in Frobenius norm: its polar factor ``W V^T`` (``basis = W S V^T``).

    For a basis with ``U^T U`` close to ``I`` each column moves by about the skew, so directions stay where the
    caller put them. float64.
    """
    w, _, vh = torch.linalg.svd(basis.to(torch.float64))
    return w @ vh
