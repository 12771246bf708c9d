"""Memory-based certification inside a run: the memory beside the results log, reconciled on resume.

``<results>.memory`` (:class:`~smoothcert.methods.memory.CertificationMemory`) is saved as the run goes. The
memory records an input just before the runner writes its row; after a crash in between, the input is
processed again and its recomputed certificate must agree with the recorded decision (same prediction, the
same region bit for bit: :meth:`RunMemory.same_decision`), else a ValueError - a resumed run needs a
reproducible computation (same device and settings).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from smoothcert.geometry.regions import Region
from smoothcert.geometry.tolerances import inscribed_lower
from smoothcert.methods.memory import CertificationMemory

__all__ = ["RunMemory", "same_region"]


def same_region(a: Region, b: Region) -> bool:
    """Are two regions the same bit for bit: same type and every field equal (tensors bitwise; None only with None)?"""
    if type(a) is not type(b) or a.center.shape != b.center.shape:
        return False
    for field in fields(a):  # type: ignore[arg-type]
        x, y = getattr(a, field.name), getattr(b, field.name)
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            if not torch.equal(x, y.to(x.device)):
                return False
        elif isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor) or x != y:
            return False
    return True


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

        The row written now and the memory must report the same region, so the test is exact, not a tolerance:

        * same prediction (an abstaining certificate only matches an abstained record);
        * **kept**: the recomputed region must be the stored one bit for bit (type, center, semi-axes, basis).
          The row reports the recomputed certificate, so this makes it report exactly the region the memory
          holds and checks later inputs against. (A tolerance would let the row report one region while the
          memory keeps another; reporting the stored region instead would mix it with the recomputed row's
          ``p_lower`` and ``gap``.) Exactness costs nothing where the run is reproducible, which a resume
          needs anyway: an input's random numbers depend on the run seed and its dataset index only, and the
          memory's decisions are computed canonically (:mod:`smoothcert.geometry.tolerances`), independent
          of chunking, batching and resume point. Anything else is a computation that is not reproducible
          here, refused rather than guessed at;
        * **shrunk**: the row reports the stored ball (its radius and proxy radius, as the memory holds it),
          which must lie inside the recomputed region (:func:`~smoothcert.geometry.inscribed_lower`, safe
          for rounding and basis skew), so the row's certificate covers it;
        * **abstained** (inside another class's region): the row reports an abstention, as recorded.
        """
        if record.prediction != cert.prediction:
            return False
        if record.action == "abstained" or cert.region is None:
            return record.action == "abstained" or cert.prediction < 0
        if record.action == "shrunk":
            return region is not None and record.radius <= inscribed_lower(cert.region)
        return region is not None and same_region(region, cert.region)

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
