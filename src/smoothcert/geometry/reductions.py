"""Canonical reductions: sums, norms and matrix-vector products whose bits depend on each row's values only.

Memory-based certification must decide the same way however its regions are
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

import torch

__all__ = ["fixed_sum", "fixed_norm", "fixed_cumsum", "fixed_vecmat", "fixed_matvec"]

_PRODUCT_BYTES = 1 << 26  # the (rows, d, d) products of fixed_vecmat / fixed_matvec are built in parts this size


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
