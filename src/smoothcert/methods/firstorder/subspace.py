"""Subspaces of the input space for first-order subspace certificates (seed 004 Corollary 3.4, Definition 1).

A subspace radius is measured in the ambient norm of the perturbation (Definition 1): the l_p ball of ``S`` is
``U_p(R) = {delta in S : ||delta||_p <= R}``, whatever basis describes ``S``. For l2 the ambient norm of
``delta = Q c`` (orthonormal ``Q``) is ``||c||_2``; for l1 and l_inf it is not, and the radius step needs two
basis-independent quantities of ``S`` (:class:`SubspaceGeometry`), both functions of the leverage scores
``l_i = ||P_S e_i||_2^2 = (P_S)_ii``:

* ``rho_p = max {||delta||_2 : delta in U_p(1)}``, the longest l2 length of the section (upper bounds);
* the proxies of the gradient functionals the estimator bounds: ``max_i ||P_S e_i||^2`` for the coordinates
  of ``P_S beta`` and ``max_s ||P_S s||^2`` over sign vectors ``s`` for its l1 norm.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["Subspace", "SubspaceGeometry"]

#: Relative inflation of constants computed from floating-point leverage scores (errs toward a smaller region).
_ROUNDING = 1.0 + 1e-9


@dataclass(frozen=True)
class SubspaceGeometry:
    """Constants of a subspace ``S`` (dimension ``dim``) of ``R^d`` for the first-order radius step; each is the
    exact value or an upper bound, which only shrinks the certified radii.

    ``l2_per_l1`` / ``l2_per_linf``: ``rho_p = max ||delta||_2`` over ``delta in S`` with ``||delta||_p <= 1``.
    With ``delta = P_S delta``, ``|delta_i| = |(P_S e_i)^T delta| <= sqrt(l_i) ||delta||_2``; hence
    ``||delta||_2^2 <= ||delta||_1 ||delta||_inf`` gives ``rho_1 <= sqrt(max_i l_i)``, and
    ``||delta||_2^2 <= sum_i min(1, l_i ||delta||_2^2)`` (for ``||delta||_inf <= 1``) gives ``rho_inf^2 <= s*``,
    the largest ``s`` with ``s <= sum_i min(1, l_i s) = min_j (j + s T_j)`` (leverages sorted in decreasing
    order, ``T_j`` the sum of all but the ``j`` largest), i.e. ``s* = min {j / (1 - T_j) : T_j < 1}``; also
    ``rho_inf^2 <= sign_norm2``. Coordinate subspaces: ``rho_1 = 1``, ``rho_inf = sqrt(dim)``.

    ``max_leverage = max_i ||P_S e_i||_2^2`` and ``sign_norm2 >= max ||P_S s||_2^2`` over ``s in [-1, 1]^d``
    (``||Q^T s|| <= sqrt(j) + sum of the other sqrt(l_i)`` for the ``j`` largest leverages, minimized over ``j``):
    the variance-proxy factors of ``e_i^T P_S z`` and ``s^T P_S z`` (:mod:`smoothcert.stats.gradients`).
    """

    dim: int
    max_leverage: float
    sign_norm2: float
    l2_per_l1: float
    l2_per_linf: float

    @classmethod
    def coordinates(cls, k: int) -> "SubspaceGeometry":
        """``k`` coordinates of the input (exact constants)."""
        return cls(k, 1.0, float(k), 1.0, math.sqrt(k))

    @classmethod
    def from_leverage(cls, dim: int, leverage: np.ndarray) -> "SubspaceGeometry":
        """From the leverage scores ``l_i = (P_S)_ii`` (basis-independent), inflated against rounding."""
        lev = np.sort(np.clip(np.asarray(leverage, dtype=np.float64), 0.0, 1.0))[::-1]
        max_lev = min(1.0, float(lev[0]) * _ROUNDING)
        rest = np.concatenate([np.cumsum(lev[::-1])[::-1], [0.0]])  # rest[j] = T_j = sum of lev[j:]
        j = np.arange(len(lev) + 1)
        roots = np.concatenate([np.cumsum(np.sqrt(lev[::-1]))[::-1], [0.0]])
        sign_norm2 = min(float(np.min(np.sqrt(j) + roots)) ** 2 * _ROUNDING, float(len(lev)))
        rest = rest + 1e-10 + 8.0 * np.finfo(np.float64).eps * len(lev) * dim  # T_j from above: rounding
        free = (rest < 1.0) & (j > 0)  # T_0 = trace P_S = k >= 1: the j = 0 term is never free (no 0 / x)
        s_star = float(np.min(j[free] / (1.0 - rest[free]), initial=float(len(lev)))) * _ROUNDING
        return cls(int(dim), max_lev, sign_norm2, math.sqrt(max_lev), math.sqrt(min(s_star, sign_norm2)))



class Subspace:
    """A linear subspace ``S`` of the flattened input space (seed 004 Corollary 3.4, Definition 1).

    ``spec`` is one of
      * ``"coords:0-99,200,300-310"``: coordinates of the flattened input (``x.reshape(-1)``), ranges inclusive;
      * ``"channel:0"`` / ``"channel:0,2"``: every coordinate of those channels of a ``(C, ...)`` input;
      * a path to a ``.npy`` or ``.pt`` file (optionally prefixed ``"file:"``) holding either a ``(d, k)`` matrix
        with orthonormal columns (a basis of ``S``) or the ``(d, d)`` orthogonal projection ``P_S``;
      * a ``(d, k)`` array / tensor with orthonormal columns, or a sequence of coordinates.

    Radii "in the subspace" are measured in the ambient l_p norm of the perturbation ``delta in S`` (seed 004
    Definition 1), the same for every basis of ``S`` (a ``(d, k)`` basis ``Q``, ``Q R`` or ``Q Q^T``).
    """

    def __init__(self, spec):
        self.spec = spec if isinstance(spec, str) else "matrix" if hasattr(spec, "shape") else "coords"
        self._indices: np.ndarray | None = None
        self._channels: np.ndarray | None = None
        self._basis: np.ndarray | None = None
        if isinstance(spec, str):
            self._parse(spec.strip())
        elif isinstance(spec, (np.ndarray, torch.Tensor)):
            self._basis = self._as_basis(np.asarray(torch.as_tensor(spec).detach().cpu(), dtype=np.float64))
        else:
            self._indices = self._unique("coordinates", [int(i) for i in spec])

    @staticmethod
    def _unique(what: str, values) -> np.ndarray:
        arr = np.unique(np.asarray(values, dtype=np.int64))
        if arr.size == 0:
            raise ValueError(f"the subspace is empty: give at least one of its {what}")
        if arr[0] < 0:
            raise ValueError(f"subspace {what} must be >= 0, got {int(arr[0])}")
        return arr

    @staticmethod
    def _ranges(text: str) -> list[int]:
        out: list[int] = []
        for part in (p.strip() for p in text.split(",")):
            m = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
            if not m:
                raise ValueError(f"cannot read {part!r} in subspace spec: use indices and inclusive ranges "
                                 "like '0-99,150'")
            lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
            if hi < lo:
                raise ValueError(f"empty range {part!r} in subspace spec")
            out.extend(range(lo, hi + 1))
        return out

    def _parse(self, spec: str) -> None:
        kind, _, rest = spec.partition(":")
        kind = kind.lower()
        if kind in ("coords", "coord", "coordinates") and rest:
            self._indices = self._unique("coordinates", self._ranges(rest))
        elif kind in ("channel", "channels") and rest:
            self._channels = self._unique("channels", self._ranges(rest))
        elif kind == "file" and rest or spec.endswith((".npy", ".pt")):
            self._basis = self._as_basis(self._load(Path(rest if kind == "file" else spec)))
        else:
            raise ValueError(f"unknown subspace spec {spec!r}: use 'coords:0-99,...', 'channel:C', or a .npy/.pt "
                             "file with a (d, k) orthonormal basis or a (d, d) projection matrix")

    @staticmethod
    def _load(path: Path) -> np.ndarray:
        if not path.is_file():
            raise ValueError(f"subspace file {str(path)!r} does not exist")
        if path.suffix == ".npy":
            return np.load(path, allow_pickle=False).astype(np.float64)
        if path.suffix == ".pt":
            return torch.load(path, map_location="cpu", weights_only=True).detach().double().numpy()
        raise ValueError(f"subspace file must be .npy or .pt, got {str(path)!r}")

    @staticmethod
    def _as_basis(m: np.ndarray) -> np.ndarray:
        if m.ndim != 2 or m.size == 0 or not np.all(np.isfinite(m)):
            raise ValueError(f"a subspace matrix must be a finite 2-D array, got shape {m.shape}")
        d, k = m.shape
        if d == k and np.allclose(m, m.T, atol=1e-8) and np.allclose(m @ m, m, atol=1e-6):
            vals, vecs = np.linalg.eigh(m)
            basis = vecs[:, vals > 0.5]
            if basis.shape[1] == 0:
                raise ValueError("the projection matrix is zero: the subspace is empty")
            return basis
        if k <= d and np.allclose(m.T @ m, np.eye(k), atol=1e-6):
            # the same span, exactly orthonormal up to float64 rounding: the constants are the subspace's, not
            # those of a slightly short or skewed basis (which the leverage scores would otherwise under-count)
            w, _, vh = np.linalg.svd(m, full_matrices=False)
            return w @ vh
        raise ValueError(f"a subspace matrix must be a (d, k) basis with orthonormal columns or a (d, d) orthogonal "
                         f"projection (symmetric, idempotent); got shape {m.shape} that is neither")

    def resolve(self, input_shape: Sequence[int]) -> np.ndarray:
        """Check the subspace against ``input_shape``; return its coordinate indices or its ``(d, k)`` basis."""
        shape = tuple(int(s) for s in input_shape)
        d = math.prod(shape)
        if self._channels is not None:
            if len(shape) < 2:
                raise ValueError(f"'channel:' needs inputs shaped (C, ...), got {shape}")
            if self._channels[-1] >= shape[0]:
                raise ValueError(f"channel {int(self._channels[-1])} is out of range for inputs with {shape[0]} "
                                 f"channels (shape {shape})")
            per = d // shape[0]
            return (self._channels[:, None] * per + np.arange(per)[None]).ravel()
        if self._indices is not None:
            if self._indices[-1] >= d:
                raise ValueError(f"subspace coordinate {int(self._indices[-1])} is out of range: inputs have "
                                 f"{d} coordinates (shape {shape}), allowed 0..{d - 1}")
            return self._indices
        if self._basis.shape[0] != d:
            raise ValueError(f"the subspace basis has {self._basis.shape[0]} rows but inputs have {d} coordinates")
        return self._basis

    def coordinates(self, vectors: np.ndarray, input_shape: Sequence[int]) -> np.ndarray:
        """Coordinates ``Q^T v`` of rows ``v`` of ``vectors`` (B, d) in the subspace's orthonormal basis ``Q``."""
        sel = self.resolve(input_shape)
        return vectors[:, sel] if sel.ndim == 1 else vectors @ sel

    def project(self, vectors: np.ndarray, input_shape: Sequence[int]) -> np.ndarray:
        """Ambient projections ``P_S v`` of rows ``v`` of ``vectors`` (B, d): ``(B, d)``, or for coordinate
        subspaces ``(B, k)`` (the selected coordinates; the others are 0, so every l_p norm is the same)."""
        sel = self.resolve(input_shape)
        return vectors[:, sel] if sel.ndim == 1 else (vectors @ sel) @ sel.T

    def geometry(self, input_shape: Sequence[int]) -> SubspaceGeometry:
        """The constants of :class:`SubspaceGeometry` (exact for coordinate subspaces)."""
        sel = self.resolve(input_shape)
        if sel.ndim == 1:
            return SubspaceGeometry.coordinates(int(sel.shape[0]))
        return SubspaceGeometry.from_leverage(sel.shape[1], (sel * sel).sum(axis=1))

    def dim(self, input_shape: Sequence[int]) -> int:
        sel = self.resolve(input_shape)
        return int(sel.shape[0] if sel.ndim == 1 else sel.shape[1])

    def __repr__(self) -> str:
        return f"Subspace({self.spec!r})"
