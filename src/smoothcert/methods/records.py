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
    no region to draw), the method's own ``fields`` (its columns) and the memory's ``decision`` (None without
    memory)."""

    method: str
    certificate: Any
    region: Region | None = None
    fields: Mapping[str, Any] = field(default_factory=dict)
    decision: MemoryDecision | None = None

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
        """The certified l2 radius after memory (0 when abstaining)."""
        if self.memory_abstained:
            return 0.0
        return float(self.decision.radius) if self.shrunk else self.certificate.radius

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
        return {"predict": self.prediction, "radius": self.radius, "radius_proxy": self.radius_proxy,
                "p_lower": cert.p_lower, "gap": cert.gap, "n": cert.n, "method": self.method, "dtype": cert.dtype,
                "n_used": cert.n if getattr(cert, "n_used", None) is None else cert.n_used,
                **getattr(cert, "extra", {}), **self.fields}


@dataclass(frozen=True)
class Prediction:
    """PREDICT's record: the class, or -1 when the test abstains."""

    prediction: int

    def values(self) -> dict[str, Any]:
        return {"predict": int(self.prediction)}


def record_row(record: MethodRecord | Prediction, columns: Sequence[str]) -> dict[str, Any]:
    """The row of ``record`` with exactly ``columns`` (in that order); a column the record cannot fill is an
    error, never a silent blank."""
    values = record.values()
    missing = [c for c in columns if c not in values]
    if missing:
        raise ValueError(f"a {type(record).__name__} of {values.get('method', 'PREDICT')!r} has no value for the "
                         f"column(s) {', '.join(missing)}")
    return {c: values[c] for c in columns}
