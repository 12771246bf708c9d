"""Certified regions: balls and ellipsoids around an input.

A region is what a certificate promises: every ``x + delta`` inside it gets the same prediction from the
smoothed classifier (with probability at least ``1 - alpha`` over the sampling).

* :class:`Ball` -- ``{y : ||y - c||_2 <= r}`` (Cohen, DDS).
* :class:`Ellipsoid` -- ``{c + B (a * u) : ||u||_2 <= 1}`` with a basis ``B`` (columns) orthonormal up to
  rounding and semi-axes ``a`` (ANCER eq. 3.12 with ``B = I``, RANCER eq. 4.4, RDDRS eq. 2).
* :class:`CrossPolytope` -- the axis-aligned l1 region ``{c + diag(a) v : ||v||_1 <= 1}`` (uniform noise).

Every region reports its inscribed l2 radius (``min a``), its proxy radius (ANCER eq. 3.14: the radius of
the ball of equal volume, ``exp(mean(log a))``, :func:`~smoothcert.geometry.linalg.geometric_mean`) and its
log-volume. An ellipsoid's basis need not be exactly orthonormal (a float32 basis is not): its radii and
volume are lower bounds that allow for the basis's skew ``e = basis_error(B)``, through
``sigma_min(B) >= sqrt(1 - e)`` and ``|det B| >= (1 - e)^(d/2)``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from smoothcert.geometry.linalg import geometric_mean, singular_value_floor


def _log_unit_ball_volume(d: int) -> float:
    return 0.5 * d * math.log(math.pi) - math.lgamma(0.5 * d + 1.0)


class Region(ABC):
    """Base class of certified regions; ``center`` is flat (d,) and float64 for exact geometry."""

    center: torch.Tensor

    @property
    def dim(self) -> int:
        return int(self.center.numel())

    @property
    @abstractmethod
    def axes(self) -> torch.Tensor:
        """Semi-axis lengths, (d,) float64."""

    @property
    def inscribed_radius(self) -> float:
        """Radius of the largest l2 ball around the center inside the region."""
        return float(self.axes.min())

    @property
    def norm_radius(self) -> float:
        """Radius of the largest ball *of the region's own norm* inside it: l2 here, l1 for a cross-polytope."""
        return self.inscribed_radius

    @property
    def proxy_radius(self) -> float:
        """Radius of the l2 ball with the same volume (ANCER eq. 3.14): geometric mean of the semi-axes."""
        axes = self.axes
        if bool((axes <= 0).any()):
            return 0.0
        return float(geometric_mean(axes))

    @property
    def log_volume(self) -> float:
        """Natural log of the region's d-dimensional volume (``-inf`` for a degenerate region)."""
        axes = self.axes
        if bool((axes <= 0).any()):
            return -math.inf
        return float(torch.log(axes).sum()) + _log_unit_ball_volume(self.dim)

    @abstractmethod
    def contains(self, points: torch.Tensor) -> torch.Tensor:
        """Boolean per point (points reshaped to (-1, d)): is the point inside the region?"""

    def _flat(self, points: torch.Tensor) -> torch.Tensor:
        p = points.to(dtype=torch.float64, device=self.center.device).reshape(-1, self.dim)
        return p - self.center


@dataclass(frozen=True, eq=False)
class Ball(Region):
    """The l2 ball ``{y : ||y - center||_2 <= radius}``."""

    center: torch.Tensor
    radius: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "center", self.center.detach().reshape(-1).to(torch.float64))
        if not math.isfinite(self.radius) or self.radius < 0:
            raise ValueError(f"a ball's radius must be finite and >= 0, got {self.radius}")

    @property
    def axes(self) -> torch.Tensor:
        return torch.full((self.dim,), float(self.radius), dtype=torch.float64, device=self.center.device)

    @property
    def inscribed_radius(self) -> float:
        return float(self.radius)

    @property
    def proxy_radius(self) -> float:
        return float(self.radius)

    def contains(self, points: torch.Tensor) -> torch.Tensor:
        """Boolean per point (points reshaped to (-1, d))."""
        return torch.linalg.vector_norm(self._flat(points), dim=1) <= self.radius


@dataclass(frozen=True, eq=False)
class Ellipsoid(Region):
    """``{center + basis @ (semi_axes * u) : ||u||_2 <= 1}``; ``basis`` None means the identity.

    Equivalently ``{y : || diag(1/a) B^-1 (y - c) ||_2 <= 1}``: with a Gaussian of scale ``S = B diag(theta)``
    and gap ``g`` the certified region has ``a = theta * g`` (ANCER eq. 3.12). ``B`` is exactly the basis
    the noise was sampled with and may be orthonormal only up to rounding; the radii and the volume below
    are lower bounds for that (``sigma_min(B) >= sqrt(1 - basis_error(B))``).
    """

    center: torch.Tensor
    semi_axes: torch.Tensor
    basis: torch.Tensor | None = None

    def __post_init__(self) -> None:
        c = self.center.detach().reshape(-1).to(torch.float64)
        a = self.semi_axes.detach().reshape(-1).to(dtype=torch.float64, device=c.device)
        if a.numel() != c.numel():
            raise ValueError(f"an ellipsoid needs one semi-axis per dimension: {a.numel()} axes for d={c.numel()}")
        if not bool(torch.isfinite(a).all()) or bool((a < 0).any()):
            raise ValueError("an ellipsoid's semi-axes must be finite and >= 0")
        object.__setattr__(self, "center", c)
        object.__setattr__(self, "semi_axes", a)
        if self.basis is not None:  # the caller's tensor itself when it can be (its basis_error is cached)
            b = self.basis.detach() if self.basis.requires_grad else self.basis
            b = b.to(dtype=torch.float64, device=c.device)
            if b.shape != (c.numel(), c.numel()):
                raise ValueError(f"an ellipsoid's basis must be ({c.numel()}, {c.numel()}), got {tuple(b.shape)}")
            object.__setattr__(self, "basis", b)

    @property
    def axes(self) -> torch.Tensor:
        return self.semi_axes

    @property
    def inscribed_radius(self) -> float:
        """``min(a) * sigma_min(B)`` from below: ``min(a) * sqrt(1 - basis_error(B))`` (``min a`` for ``B = I``).

        A point ``y`` with ``||y|| <= r`` is ``B (a * u)`` with ``||u|| <= r / (min(a) sigma_min(B))``.
        """
        return float(self.semi_axes.min()) * singular_value_floor(self.basis)

    @property
    def proxy_radius(self) -> float:
        """``geomean(a) * |det B|^(1/d)`` from below: ``geomean(a) * sqrt(1 - basis_error(B))``."""
        return super().proxy_radius * singular_value_floor(self.basis)

    @property
    def log_volume(self) -> float:
        """``sum log a + log|det B| + log(unit ball)`` from below, with ``log|det B| >= d log sigma_min(B)``."""
        floor = singular_value_floor(self.basis)
        if floor <= 0.0:
            return -math.inf
        return super().log_volume + self.dim * math.log(floor)

    def local(self, points: torch.Tensor) -> torch.Tensor:
        """Coordinates ``u`` with ``points - center = B u``: ``B^-1 (points - center)`` (solved, not ``B^T``)."""
        p = self._flat(points)
        return p if self.basis is None else torch.linalg.solve(self.basis, p.T).T

    def contains(self, points: torch.Tensor) -> torch.Tensor:
        """Boolean per point; a zero semi-axis admits only points with no component along it."""
        u = self.local(points)
        a = self.semi_axes
        safe = torch.where(a > 0, a, torch.ones_like(a))
        scaled = torch.where(a > 0, u / safe, torch.where(u == 0, 0.0, math.inf))
        return (scaled**2).sum(dim=1) <= 1.0


@dataclass(frozen=True, eq=False)
class CrossPolytope(Region):
    """The axis-aligned l1 region ``{c + diag(a) v : ||v||_1 <= 1} = {y : sum_i |y_i - c_i| / a_i <= 1}``.

    ANCER's l1 certificate (uniform noise, seed 000 section 3.3.3 with p = 1): the "ellipsoid" of the l1 norm.
    It lies inside the l2 ellipsoid with the same axes (``||v||_2 <= ||v||_1``). A zero semi-axis admits only
    points with no component along it.
    """

    center: torch.Tensor
    semi_axes: torch.Tensor

    def __post_init__(self) -> None:
        c = self.center.detach().reshape(-1).to(torch.float64)
        a = self.semi_axes.detach().reshape(-1).to(dtype=torch.float64, device=c.device)
        if a.numel() != c.numel():
            raise ValueError(f"an l1 region needs one semi-axis per dimension: {a.numel()} axes for d={c.numel()}")
        if not bool(torch.isfinite(a).all()) or bool((a < 0).any()):
            raise ValueError("an l1 region's semi-axes must be finite and >= 0")
        object.__setattr__(self, "center", c)
        object.__setattr__(self, "semi_axes", a)

    @property
    def axes(self) -> torch.Tensor:
        return self.semi_axes

    @property
    def inscribed_radius(self) -> float:
        """Largest l2 ball inside: the distance ``1 / ||1/a||_2`` from the center to every facet."""
        a = self.semi_axes
        if bool((a <= 0).any()):
            return 0.0
        return float(1.0 / torch.linalg.vector_norm(1.0 / a))

    @property
    def norm_radius(self) -> float:
        """The largest l1 ball inside: radius ``min a`` (``||v||_1 <= min a`` gives ``sum |v_i| / a_i <= 1``)."""
        return float(self.semi_axes.min())

    @property
    def proxy_radius(self) -> float:
        """Radius of the l1 ball with the same volume (ANCER eq. 3.14 with p = 1): ``exp(mean(log a))``."""
        return super().proxy_radius

    @property
    def log_volume(self) -> float:
        """``log(2^d / d! * prod a)``, the volume of a scaled l1 ball."""
        a = self.semi_axes
        if bool((a <= 0).any()):
            return -math.inf
        return float(torch.log(a).sum()) + self.dim * math.log(2.0) - math.lgamma(self.dim + 1.0)

    def contains(self, points: torch.Tensor) -> torch.Tensor:
        """Boolean per point (points reshaped to (-1, d))."""
        y = self._flat(points).abs()
        a = self.semi_axes
        safe = torch.where(a > 0, a, torch.ones_like(a))
        scaled = torch.where(a > 0, y / safe, torch.where(y == 0, 0.0, math.inf))
        return scaled.sum(dim=1) <= 1.0
