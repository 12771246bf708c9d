"""Certified radii in the l1, l2 and l_inf norms, and the norm inequalities that turn one into another.

A certificate in one norm is a certificate in every other: for ``p``, ``q`` in ``{1, 2, inf}`` and ``delta`` in
``R^d``, ``||delta||_q <= ||delta||_p`` when ``q >= p`` and ``||delta||_p <= d^(1/p - 1/q) ||delta||_q`` (Hoelder; seed
001, "randomized smoothing in high dimension", the factor ``d^(1/2 - 1/p)`` of its l_p radii). So the l_p ball of
radius ``R`` contains the l_q ball of radius

    R * min(1, d^(1/q - 1/p))          (:func:`convert_radius`)

(``R`` itself for ``q < p``, ``R / d^(1/p - 1/q)`` for ``q > p``): from l2, ``R`` in l1 and ``R / sqrt(d)`` in
l_inf; from l1, ``R / sqrt(d)`` in l2 and ``R / d`` in l_inf; from l_inf, ``R`` in l1 and l2. The factors are
the norms' own extremes (``delta = R e_1``, ``delta = R (1, ..., 1) / d^(1/p)``), so no region of the other norm
that is certified by these inequalities alone could be larger.

:class:`NormRadii` is what a certificate records: one radius per norm, and which of them were *converted* by
these inequalities (or read off the region's geometry) rather than certified by the noise family's own theorem
(*native*). A noise family says which norms it certifies natively and how
(:meth:`~smoothcert.noise.base.Noise.norm_radii`); everything else comes from here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["NORMS", "NORM_ORDERS", "check_norm", "convert_radius", "NormRadii"]

#: The norms a certificate records, with their exponents ``p``.
NORM_ORDERS = {"l1": 1.0, "l2": 2.0, "linf": math.inf}
NORMS = tuple(NORM_ORDERS)
#: Relative margin that keeps a converted radius below the exact product of float64 rounding (toward smaller).
_ROUNDING = 8 * 2.0**-52


def check_norm(norm: str, allowed: tuple[str, ...] = NORMS, what: str = "a certified radius") -> str:
    """``norm`` if it is one of ``allowed``; else a ValueError that lists them."""
    if not isinstance(norm, str) or norm not in allowed:
        raise ValueError(f"{what} is measured in one of the norms {', '.join(allowed)}; got {norm!r}")
    return norm


def _check_dim(d: int) -> int:
    if isinstance(d, bool) or not isinstance(d, int) or d < 1:
        raise ValueError(f"the input dimension d must be an integer >= 1, got {d!r}")
    return d


def convert_radius(radius: float, source: str, target: str, d: int) -> float:
    """The radius of the largest ``target`` ball inside the ``source`` ball of ``radius`` in ``R^d``, certified by
    the norm inequalities alone: ``radius * min(1, d^(1/q - 1/p))`` (module docstring), rounded down."""
    check_norm(source)
    check_norm(target)
    _check_dim(d)
    radius = float(radius)
    if not (radius >= 0.0) or math.isinf(radius):
        raise ValueError(f"a radius must be finite and >= 0, got {radius!r}")
    p, q = NORM_ORDERS[source], NORM_ORDERS[target]
    if q <= p or d == 1:
        return radius
    exponent = 1.0 / p - (0.0 if math.isinf(q) else 1.0 / q)   # 1/p - 1/q > 0
    factor = 1.0 / math.sqrt(d) if exponent == 0.5 else d ** -exponent
    return radius * factor * (1.0 - _ROUNDING)


@dataclass(frozen=True)
class NormRadii:
    """One certified radius per norm of :data:`NORMS`, and the norms whose radius is ``converted``.

    ``radii[norm]`` is the largest radius certified in that norm: the family's own (native) certificate, or one
    that follows from another norm's (:func:`convert_radius`) or from the certified region's geometry, whichever
    is largest; ``converted`` names the norms whose radius is not a native one. All zeros for an abstention.
    """

    radii: Mapping[str, float]
    converted: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        if set(self.radii) != set(NORMS):
            raise ValueError(f"NormRadii needs one radius for each of {', '.join(NORMS)}, got {sorted(self.radii)}")
        object.__setattr__(self, "radii", {n: float(self.radii[n]) for n in NORMS})
        object.__setattr__(self, "converted", frozenset(self.converted))

    def __getitem__(self, norm: str) -> float:
        return self.radii[check_norm(norm)]

    @property
    def native(self) -> frozenset[str]:
        return frozenset(NORMS) - self.converted

    def marker(self) -> str:
        """The converted norms as a results column: ``l1,linf``, or ``none``."""
        return ",".join(n for n in NORMS if n in self.converted) or "none"

    def columns(self) -> dict[str, object]:
        """``radius_l1``, ``radius_l2``, ``radius_linf`` and ``converted`` (see :meth:`marker`)."""
        return {**{f"radius_{n}": self.radii[n] for n in NORMS}, "converted": self.marker()}

    @classmethod
    def zero(cls) -> "NormRadii":
        """An abstention's radii: 0 in every norm (nothing converted)."""
        return cls(dict.fromkeys(NORMS, 0.0))

    @classmethod
    def from_certified(cls, native: Mapping[str, float], d: int, derived: Mapping[str, float] | None = None
                       ) -> "NormRadii":
        """Every norm's radius from the ``native`` ones (the family's own certificates) and ``derived`` ones (radii
        of other norms read off the certified region, e.g. the largest l2 ball inside an l1 region).

        For each norm the radius is the largest of its native radius, its derived radius and the conversions of
        every native radius (:func:`convert_radius`); it is marked converted unless its native radius is that
        largest. At least one native radius is needed.
        """
        _check_dim(d)
        native = {check_norm(n): float(r) for n, r in native.items()}
        derived = {check_norm(n): float(r) for n, r in (derived or {}).items()}
        if not native:
            raise ValueError("a certificate needs at least one native radius")
        for n, r in (*native.items(), *derived.items()):
            if not (r >= 0.0) or math.isinf(r):
                raise ValueError(f"the {n} radius must be finite and >= 0, got {r!r}")
        radii, converted = {}, set()
        for target in NORMS:
            others = [convert_radius(r, source, target, d) for source, r in native.items() if source != target]
            if target in derived:
                others.append(derived[target])
            best_other = max(others, default=0.0)
            own = native.get(target)
            if own is not None and own >= best_other:
                radii[target] = own
            else:
                radii[target] = best_other
                converted.add(target)
        return cls(radii, frozenset(converted))
