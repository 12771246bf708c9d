"""What a method returns for one input, and the one function that turns it into a results row.

A :class:`MethodRecord` holds the certificate that CERTIFY established (the engine's
:class:`~smoothcert.engine.smooth.Certificate`, or a first-order certificate), the certified region, the method's
own column values and, for methods with memory-based certification (seed 000 Algorithm 1), what the memory
decided (:class:`MemoryDecision`). The record's ``prediction``, ``radius``, ``radius_proxy`` and
``certified_region`` are the *final* ones: after memory, which may only keep, shrink or abstain - never enlarge.
A :class:`Prediction` is PREDICT's record.

:func:`record_row` is the only place where a record becomes a row (runner, tests and tools all use it); the
runner adds ``idx``, ``label``, ``correct`` and ``time``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from smoothcert.geometry.norms import NormRadii, check_norm
from smoothcert.geometry.regions import Region

__all__ = ["MemoryDecision", "MethodRecord", "Prediction", "record_row", "MEMORY_ACTIONS"]

#: What memory-based certification may do with a certificate.
MEMORY_ACTIONS = ("kept", "shrunk", "abstained")


@dataclass(frozen=True)
class MemoryDecision:
    """Memory's verdict on one certificate: ``kept`` it, ``shrunk`` it to ``region`` (a ball of ``radius``, the
    largest that meets no stored region of another class), or ``abstained``."""

    action: str
    region: Region | None
    radius: float

    def __post_init__(self) -> None:
        if self.action not in MEMORY_ACTIONS:
            raise ValueError(f"a memory decision's action must be one of {', '.join(MEMORY_ACTIONS)}, "
                             f"got {self.action!r}")


@dataclass(frozen=True)
class MethodRecord:
    """One input's result: ``certificate`` (with ``prediction``, ``p_lower``, ``gap``, ``radius``,
    ``radius_proxy``, ``n``, ``dtype``), the region it certifies (None when abstaining or when the method has
    no region to draw), the method's own ``fields`` (its columns), the memory's ``decision`` (None without
    memory) and ``norm``, the norm of :attr:`radius` (None: the region's inscribed l2 radius, as for every method
    before norms were recorded; ``l1``, ``l2`` or ``linf``: that entry of :attr:`norm_radii`)."""

    method: str
    certificate: Any
    region: Region | None = None
    fields: Mapping[str, Any] = field(default_factory=dict)
    decision: MemoryDecision | None = None
    norm: str | None = None

    def __post_init__(self) -> None:
        if self.norm is not None:
            check_norm(self.norm, what="a record's radius")
            if not isinstance(getattr(self.certificate, "radii", None), NormRadii):
                raise ValueError(f"a record in the {self.norm} norm needs a certificate with per-norm radii")

    @property
    def memory_abstained(self) -> bool:
        return self.decision is not None and self.decision.action == "abstained"

    @property
    def shrunk(self) -> bool:
        return self.decision is not None and self.decision.action == "shrunk"

    @property
    def prediction(self) -> int:
        return -1 if self.memory_abstained else self.certificate.prediction

    @property
    def abstained(self) -> bool:
        return self.prediction == -1

    @property
    def radius(self) -> float:
        """The certified radius after memory (0 when abstaining): in :attr:`norm`, else the inscribed l2 radius."""
        if self.memory_abstained:
            return 0.0
        if self.norm is not None:
            return self.norm_radii[self.norm]
        return float(self.decision.radius) if self.shrunk else self.certificate.radius

    @property
    def norm_radii(self) -> NormRadii | None:
        """The certified radius per norm after memory (None when the certificate has none): the certificate's, all
        0 when memory abstained, and those of the shrunk l2 ball (l2 native, l1 and l_inf converted) when shrunk."""
        radii = getattr(self.certificate, "radii", None)
        if not isinstance(radii, NormRadii):  # e.g. a first-order certificate's own radii by order
            return None
        if self.decision is None or self.decision.action == "kept":
            return radii
        if self.memory_abstained:
            return NormRadii.zero()
        return NormRadii.from_certified({"l2": float(self.decision.radius)}, self.decision.region.dim)

    @property
    def radius_proxy(self) -> float:
        if self.memory_abstained:
            return 0.0
        return float(self.decision.region.proxy_radius) if self.shrunk else self.certificate.radius_proxy

    @property
    def certified_region(self) -> Region | None:
        """The region certified after memory (None when abstaining)."""
        if self.memory_abstained:
            return None
        return self.decision.region if self.shrunk else self.region

    def values(self) -> dict[str, Any]:
        """Every column this record can fill: the common ones, then the method's own."""
        cert = self.certificate
        radii = self.norm_radii
        return {"predict": self.prediction, "radius": self.radius, "radius_proxy": self.radius_proxy,
                "p_lower": cert.p_lower, "gap": cert.gap, "n": cert.n, "method": self.method, "dtype": cert.dtype,
                "sampling": getattr(cert, "sampling", "float"),
                "n_used": cert.n if getattr(cert, "n_used", None) is None else cert.n_used,
                **({} if radii is None else radii.columns()), **getattr(cert, "extra", {}), **self.fields}


@dataclass(frozen=True)
class Prediction:
    """PREDICT's record: the class, or -1 when the test abstains; ``sampling`` says how the noise was drawn
    (``float`` or ``sound``)."""

    prediction: int
    sampling: str = "float"

    def values(self) -> dict[str, Any]:
        return {"predict": int(self.prediction), "sampling": self.sampling}


def record_row(record: MethodRecord | Prediction, columns: Sequence[str]) -> dict[str, Any]:
    """The row of ``record`` with exactly ``columns`` (in that order); a column the record cannot fill is an
    error, never a silent blank."""
    values = record.values()
    missing = [c for c in columns if c not in values]
    if missing:
        raise ValueError(f"a {type(record).__name__} of {values.get('method', 'PREDICT')!r} has no value for the "
                         f"column(s) {', '.join(missing)}")
    return {c: values[c] for c in columns}
