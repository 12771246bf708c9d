"""Memory-based certification inside a run: the memory beside the results log, reconciled on resume.

``<results>.memory`` (:class:`~smoothcert.methods.memory.CertificationMemory`) is saved as the run goes. The
memory records an input just before the runner writes its row; after a crash in between, the input is
processed again and its recomputed certificate must agree with the recorded decision (same prediction, same
region), else a ValueError - a resumed run needs a reproducible computation (same device and settings).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from smoothcert.methods.memory import CertificationMemory

__all__ = ["RunMemory"]


class RunMemory:
    """Algorithm 1 over a run's inputs, with the replay of records a crash left ahead of the log."""

    def __init__(self, memory: CertificationMemory | None = None, replay: dict | None = None):
        self.memory = CertificationMemory() if memory is None else memory
        self._replay = replay or {}

    @classmethod
    def open(cls, results: Path, fingerprint: Mapping[str, Any], done: Sequence[int]) -> "RunMemory":
        """Create or resume ``<results>.memory`` (:meth:`CertificationMemory.open`) and reconcile it with the log.

        The memory records an input before the runner writes its row, so after a crash it may hold records of
        inputs whose rows are missing; those inputs are processed again, and their recomputed certificate must
        match the recorded decision (else a ValueError: never two different decisions for one input).
        """
        results = Path(results)
        memory = CertificationMemory.open(results.with_name(results.name + ".memory"), fingerprint)
        records = memory.records
        done = [int(i) for i in done]
        if len(records) < len(done) or [r.index for r in records[: len(done)]] != done:
            raise ValueError(f"{results}.memory does not match {results}: it holds {len(records)} records for "
                             f"{len(done)} rows (or another order); the memory must record every certified input, "
                             "so use another output path (or remove both)")
        regions = {index: region for index, _, region in memory.stored}
        return cls(memory, {r.index: (r, regions.get(r.index)) for r in records[len(done):]})

    @staticmethod
    def same_decision(record, region, cert) -> bool:
        """Does a recomputed certificate agree with the memory's record of the same input (resume after a crash)?

        Same prediction; for a kept region the same ellipsoid (axes and basis to 1e-9, relative); for a shrunk
        one, the recorded ball inside the new region. Anything else is refused: the memory must hold exactly
        the regions that the log reports.
        """
        if record.prediction != cert.prediction:
            return False
        if record.action == "abstained" or cert.region is None:
            return record.action == "abstained" or cert.prediction < 0
        if record.action == "shrunk":
            return record.radius <= cert.region.inscribed_radius
        if region is None or region.axes.shape != cert.region.axes.shape:
            return False
        new_axes = cert.region.axes.to(region.axes.device)
        if not torch.allclose(region.axes, new_axes, rtol=1e-9, atol=0.0):
            return False
        old_basis, new_basis = getattr(region, "basis", None), getattr(cert.region, "basis", None)
        if (old_basis is None) != (new_basis is None):
            return False
        return old_basis is None or torch.allclose(old_basis, new_basis.to(old_basis.device), rtol=0.0, atol=1e-12)

    def remember(self, index: int, center: torch.Tensor, cert) -> tuple[str, Any, float]:
        """Algorithm 1 for one certified input (an abstained certificate is recorded as abstained)."""
        if self._replay:
            if index not in self._replay:
                raise ValueError(f"the saved memory holds records of inputs after the log's last row, but not of "
                                 f"index {index}: the run's order changed; use another output path")
            record, region = self._replay.pop(index)
            if not self.same_decision(record, region, cert):
                raise ValueError(f"index {index} was recorded in the memory with prediction {record.prediction} "
                                 f"({record.action}, radius {record.radius}) but now certifies {cert.prediction} "
                                 f"with radius {cert.radius}: the computation is not reproducible here (another "
                                 "device or thread count?); resume where the run started, or use another output path")
            return record.action, region, record.radius
        return self.memory.check(index, center, cert.prediction, cert.region)

    def close(self) -> None:
        self.memory.close()
