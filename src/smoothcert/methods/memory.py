"""Memory-based certification (seed 000 Algorithm 1): what makes data-dependent smoothing sound.

When the noise is chosen per input (DDS, ANCER, RANCER, RDDRS) two certified regions of different classes
can overlap, and then at least one of them is wrong. Memory-based certification processes the inputs in a
fixed, recorded order and resolves every conflict against the regions already certified. For a new input
``x`` with prediction ``C`` and region ``R``, against every stored ``(x_i, C_i, R_i)`` with ``C_i != C``
(Algorithm 1 of seed 000 section 3.3.4, used unchanged by RANCER in section 4.6):

1. ``x`` lies in some ``R_i`` (or within rounding of it): **abstained** -- ABSTAIN, radius 0, nothing stored.
2. otherwise, if ``R`` meets some ``R_i`` (``MaxIntersect``: the enclosing balls meet; then ``Intersect``:
   the exact test of :func:`~smoothcert.geometry.intersects_each`), ``R`` is replaced by
   ``LargestOutSubset``: the largest l2 ball around ``x`` that misses every such ``R_i`` (eq. 3.19) and lies
   inside ``R`` (only ``R`` was certified) -- **shrunk**, radius
   ``min(inscribed radius of R, min_i dist(x, R_i))``, every distance a lower bound.
3. the (possibly shrunk) region is stored with ``C`` -- **kept** or **shrunk**.

Regions of the same class are never compared. Algorithm 1 shrinks ``R`` inside its loop; taking the
minimum over every ``R_i`` that meets the original ``R`` gives the same ball up to rounding allowances,
never a larger one (a region that misses the shrunk ball but meets ``R`` only lowers the minimum), so the
result does not depend on the order of the stored regions. (Section 3.2.1 describes an older DDS variant that
hands the input the other class; Algorithm 1 abstains, and so does this module.) Afterwards no two stored
regions of different classes intersect and no stored input lies in another class's region.

Reproducibility: every float behind a decision (the "near" pre-filter, distances, verdicts, shrunk radii) is
computed per stored region from that region alone (:mod:`smoothcert.geometry.tolerances`, canonical
reductions), so the decisions do not depend on how many regions are stored, which of them are tested
together, the chunk size or where a run was resumed: a resumed or split run gives the same bits as an
uninterrupted one.

Persistence: a memory bound to a folder keeps ``memory.json`` (format, run fingerprint, input order, and a
configuration mapping in clear so that a refusal can name what differs),
``records.jsonl`` (one line per processed input, appended and fsync'ed: the commit point) and
``regions-NNNNN.safetensors`` (float64 centers, axes, bases keyed by dataset index). Only the open chunk is
rewritten on a flush (atomically, through a temporary file) and a chunk is closed once it holds
``chunk_bytes``: each flush costs at most ``chunk_bytes`` plus the new entries, and a run leaves about
``total / chunk_bytes`` files (rotated d x d bases are large: at d = 784 one basis is 4.9 MB, so those
chunks hold one entry; a low-rank region keeps ``theta``, its (d, k) factor and ``gamma``: ``8 d (k + 2)`` bytes,
0.44 MB at d = 3,072 and k = 16). Everything stored is also held in memory, bases included. A crash loses at most the
``autosave - 1`` latest records, which a resumed run processes again.
"""

from __future__ import annotations

import json
import operator
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from smoothcert.geometry.distance import distances
from smoothcert.geometry.tolerances import (SHRINK, fixed_norm, inscribed_lower, outer_radius, region_kind,
                                            rounding_allowance)
from smoothcert.geometry.intersection import intersects_each
from smoothcert.geometry.regions import Ball, Region
from smoothcert.methods.memory_files import (IDENTITY_KEYS, atomic_write, fingerprint_of, fsync_replace, own_copy,
                                             plain_config, rebuild_region, why_other_run)
from smoothcert.validation import check_count

__all__ = ["CertificationMemory", "MemoryRecord", "KEPT", "SHRUNK", "ABSTAINED", "IDENTITY_KEYS", "fingerprint_of"]

KEPT, SHRUNK, ABSTAINED = "kept", "shrunk", "abstained"
_FORMAT = "smoothcert-memory/1"
_HEADER, _RECORDS = "memory.json", "records.jsonl"
_CHUNK = re.compile(r"regions-(\d{5,})\.safetensors$")


@dataclass(frozen=True)
class MemoryRecord:
    """What memory-based certification did with one input (``prediction`` is the one submitted)."""

    index: int
    prediction: int
    action: str
    radius: float


class CertificationMemory:
    """The memory ``M`` of Algorithm 1: certified regions in processing order, optionally saved to a folder.

    ``order`` (dataset indices) fixes the processing order up front; without it the order is recorded as
    inputs arrive and each index may appear once. Use :meth:`open` to create or resume a memory on disk;
    the constructor with ``path`` creates a new one and refuses a folder that already holds a memory.
    """

    def __init__(self, run_fingerprint: str | Mapping = "", order: Sequence[int] | None = None, *,
                 path: str | os.PathLike | None = None, autosave: int = 1, chunk_bytes: int = 1 << 20,
                 device: torch.device | str | None = None):
        self._setup(run_fingerprint, order, path, autosave, chunk_bytes, device)
        if self._path is not None:
            if (self._path / _HEADER).exists() or (self._path / _RECORDS).exists():
                raise ValueError(f"{self._path} already holds a certification memory: resume it with "
                                 "CertificationMemory.open(path, run_fingerprint) or choose a fresh folder")
            self._path.mkdir(parents=True, exist_ok=True)
            header = {"format": _FORMAT, "fingerprint": self.fingerprint, "order": self.order}
            if isinstance(run_fingerprint, Mapping):  # in clear, so that a refusal can say what differs
                header["config"] = plain_config(run_fingerprint)
            atomic_write(self._path / _HEADER, json.dumps(header).encode())
            (self._path / _RECORDS).touch()

    def _setup(self, fingerprint, order, path, autosave, chunk_bytes, device) -> None:
        self.fingerprint = fingerprint_of(fingerprint)
        if order is not None:
            order = [_as_index(i) for i in order]
            if len(set(order)) != len(order):
                raise ValueError("order lists a dataset index twice: each input is processed once")
        self.order: list[int] | None = order
        check_count("autosave (records between writes)", autosave)
        check_count("chunk_bytes", chunk_bytes)
        self._path = None if path is None else Path(path)
        self._autosave, self._chunk_bytes = autosave, chunk_bytes
        self.device = None if device is None else torch.device(device)
        self._records: list[MemoryRecord] = []
        self._seen: set[int] = set()
        self._regions: list[Region] = []
        self._stored: list[tuple[int, int]] = []  # (index, prediction) per stored region
        self._centers = self._outer = self._pred = None
        self._dim: int | None = None
        self._pending: list[dict] = []
        self._chunk_id, self._chunk, self._chunk_size, self._chunk_dirty = 0, {}, 0, False

    # --------------------------------------------------------------------------------------- resuming

    @classmethod
    def open(cls, path: str | os.PathLike, run_fingerprint: str | Mapping, order: Sequence[int] | None = None, *,
             autosave: int = 1, chunk_bytes: int = 1 << 20,
             device: torch.device | str | None = None) -> "CertificationMemory":
        """Resume the memory saved in ``path``, or create it there.

        Raises ValueError when the saved memory belongs to another run (different fingerprint; the message
        names what differs, e.g. "built for another checkpoint" when the fingerprint mappings differ in one of
        :data:`IDENTITY_KEYS`), when ``order`` differs from the recorded one, or when the records are out of
        order or corrupt. A torn last line (a crash mid-write) is dropped.
        """
        path = Path(path)
        if not (path / _HEADER).exists():
            if (path / _RECORDS).exists():
                raise ValueError(f"{path} holds {_RECORDS} without {_HEADER}: not a usable certification memory")
            return cls(run_fingerprint, order, path=path, autosave=autosave, chunk_bytes=chunk_bytes, device=device)
        header = json.loads((path / _HEADER).read_text())
        if header.get("format") != _FORMAT:
            raise ValueError(f"{path / _HEADER} is not a smoothcert memory (format {header.get('format')!r})")
        fp = fingerprint_of(run_fingerprint)
        if header["fingerprint"] != fp:
            why = why_other_run(header.get("config"), run_fingerprint)
            raise ValueError(f"the memory in {path} belongs to another run: {why} (fingerprint "
                             f"{header['fingerprint']!r}, this run {fp!r}); resume with the same checkpoint, data "
                             "set and configuration, or use a fresh folder")
        if order is not None and [_as_index(i) for i in order] != header["order"]:
            raise ValueError(f"the memory in {path} was recorded with another input order; resume with the "
                             "recorded order (or order=None to use it)")
        mem = cls.__new__(cls)
        mem._setup(fp, header["order"], path, autosave, chunk_bytes, device)
        mem._replay()
        return mem

    def _replay(self) -> None:
        assert self._path is not None
        log = self._path / _RECORDS
        data = log.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):  # torn last line: drop it so new records append cleanly
            with open(log, "r+b") as fh:
                fh.truncate(end)
        chunks: dict[str, dict[str, torch.Tensor]] = {}
        device = self.device or torch.device("cpu")
        for number, line in enumerate(data[:end].splitlines(), 1):
            try:
                rec = json.loads(line)
                index = self._expect(rec["index"])
                region = None
                if rec["region"] is not None:
                    spec = rec["region"]
                    if spec["chunk"] not in chunks:
                        chunks[spec["chunk"]] = load_file(self._path / spec["chunk"], device=str(device))
                    region = rebuild_region(spec, chunks[spec["chunk"]], index)
            except (ValueError, KeyError, TypeError, OSError) as err:
                raise ValueError(f"{log} line {number} is corrupt or out of order: {err}") from err
            self._commit(MemoryRecord(index, int(rec["prediction"]), rec["action"], float(rec["radius"])), region)
        numbers = [int(m.group(1)) for p in self._path.iterdir() if (m := _CHUNK.match(p.name))]
        self._chunk_id = max(numbers, default=-1) + 1

    # --------------------------------------------------------------------------------------- the algorithm

    def check(self, index: int, center: torch.Tensor, prediction: int,
              region: Region | None) -> tuple[str, Region | None, float]:
        """Algorithm 1 for one input: returns ``(action, region or None, radius)`` and stores the region.

        ``action`` is ``"kept"`` (the region, as a copy the memory owns; a basis is shared and must not be
        modified in place), ``"shrunk"`` (replaced by a Ball) or ``"abstained"``
        (inside another class's region, or ``prediction < 0``: the smoothed classifier already abstained);
        ``radius`` is the l2 radius certified after memory (0 when abstaining). ``index`` must be the next
        one of the recorded order; ``center`` is the input and must be the region's center.
        """
        index = self._expect(index)
        prediction = _as_prediction(prediction)
        if prediction < 0:
            return self._finish(MemoryRecord(index, prediction, ABSTAINED, 0.0), None)
        if region is None:
            raise ValueError("region is None for a prediction >= 0: give the certified region (or prediction -1)")
        region_kind(region)
        if not isinstance(center, torch.Tensor) or center.numel() != region.dim:
            raise ValueError(f"center must be a tensor of the region's d={region.dim} values")
        if self._dim is not None and region.dim != self._dim:
            raise ValueError(f"this memory holds d={self._dim} regions, got d={region.dim}")
        c = center.detach().to(dtype=torch.float64, device=region.center.device).reshape(-1)
        tol = 1e-12 * (1.0 + float(c.abs().max()))
        if float((c - region.center).abs().max()) > tol:
            raise ValueError("center is not the region's center: memory certification needs the region around "
                             "the input it certifies")
        action, kept, radius = self._decide(prediction, region)
        return self._finish(MemoryRecord(index, prediction, action, radius), None if kept is None else own_copy(kept))

    def _decide(self, prediction: int, region: Region) -> tuple[str, Region | None, float]:
        x = region.center
        n = len(self._regions)
        if n:
            dev = self._centers.device
            gap = fixed_norm(self._centers[:n] - x.to(dev))  # canonical per row: the same whatever n
            reach = (self._outer[:n] + outer_radius(region)) * (1.0 + rounding_allowance(region.dim))
            near = (self._pred[:n] != prediction) & (gap <= reach + rounding_allowance(region.dim) * gap)
            cand = torch.nonzero(near).flatten().tolist()
            if cand:
                others = [self._regions[i] for i in cand]
                dist = distances(x, others)
                if bool((dist <= 0).any()):
                    return ABSTAINED, None, 0.0
                meets = intersects_each(region, others).to(dist.device)
                if bool(meets.any()):
                    radius = min(inscribed_lower(region), float(dist[meets].min()) * (1.0 - SHRINK))
                    return SHRUNK, Ball(x, radius), radius
        return KEPT, region, float(region.inscribed_radius)

    def _expect(self, index) -> int:
        index = _as_index(index)
        pos = len(self._records)
        if self.order is not None:
            if pos >= len(self.order):
                raise ValueError(f"all {len(self.order)} inputs of the recorded order are already processed "
                                 f"(got index {index})")
            if index != self.order[pos]:
                raise ValueError(f"input out of order: the recorded order expects dataset index {self.order[pos]} "
                                 f"at position {pos}, got {index}")
        elif index in self._seen:
            raise ValueError(f"dataset index {index} was already processed: each input is certified once")
        return index

    def _finish(self, record: MemoryRecord, region: Region | None) -> tuple[str, Region | None, float]:
        spec = None
        if region is not None and self._path is not None:
            spec = self._add_to_chunk(record.index, region)
        self._commit(record, region)
        if self._path is not None:
            self._pending.append({"index": record.index, "prediction": record.prediction, "action": record.action,
                                  "radius": record.radius, "region": spec})
            if len(self._pending) >= self._autosave:
                self.flush()
        return record.action, region, record.radius

    def _commit(self, record: MemoryRecord, region: Region | None) -> None:
        self._records.append(record)
        self._seen.add(record.index)
        if region is None:
            return
        if self._dim is None:
            self._dim = region.dim
            dev = self.device or region.center.device
            self.device = dev
            self._centers = torch.empty((16, region.dim), dtype=torch.float64, device=dev)
            self._outer = torch.empty(16, dtype=torch.float64, device=dev)
            self._pred = torch.empty(16, dtype=torch.long, device=dev)
        n = len(self._regions)
        if n == self._centers.shape[0]:
            self._centers = torch.cat([self._centers, torch.empty_like(self._centers)])
            self._outer = torch.cat([self._outer, torch.empty_like(self._outer)])
            self._pred = torch.cat([self._pred, torch.empty_like(self._pred)])
        self._centers[n] = region.center.to(self._centers.device)
        self._outer[n] = outer_radius(region)
        self._pred[n] = record.prediction
        self._regions.append(region)
        self._stored.append((record.index, record.prediction))

    # --------------------------------------------------------------------------------------- files

    def _add_to_chunk(self, index: int, region: Region) -> dict:
        kind = region_kind(region)
        tensors = {f"{index}/center": region.center}
        basis = getattr(region, "basis", None)
        if kind == "lowrank":  # O(d k): theta, the (d, k) factor and gamma, never a d x d matrix
            tensors.update({f"{index}/theta": region.theta, f"{index}/gamma": region.gamma})  # type: ignore
        elif kind != "ball":
            tensors[f"{index}/axes"] = region.axes
        if basis is not None:
            tensors[f"{index}/basis"] = basis
        for key, t in tensors.items():
            t = t.detach().to(device="cpu", dtype=torch.float64).clone().contiguous()
            self._chunk[key] = t
            self._chunk_size += t.numel() * t.element_size()
        self._chunk_dirty = True
        spec = {"kind": kind, "chunk": f"regions-{self._chunk_id:05d}.safetensors", "basis": basis is not None}
        if kind == "ball":
            spec["radius"] = float(region.radius)  # type: ignore[attr-defined]
        if kind == "lowrank":
            spec["gap"] = float(region.gap)  # type: ignore[attr-defined]
        return spec

    def flush(self) -> None:
        """Write what is pending: the open chunk (atomically), then the new record lines (fsync'ed)."""
        if self._path is None or not self._pending:
            return
        if self._chunk_dirty:
            name = self._path / f"regions-{self._chunk_id:05d}.safetensors"
            tmp = name.with_suffix(".tmp")
            save_file(self._chunk, str(tmp))
            fsync_replace(tmp, name)
            self._chunk_dirty = False
        lines = "".join(json.dumps(p) + "\n" for p in self._pending).encode()
        with open(self._path / _RECORDS, "ab") as fh:
            fh.write(lines)
            fh.flush()
            os.fsync(fh.fileno())
        self._pending.clear()
        if self._chunk_size >= self._chunk_bytes:
            self._chunk_id, self._chunk, self._chunk_size = self._chunk_id + 1, {}, 0

    def close(self) -> None:
        """Flush, then release the folder: the memory stays usable in this process, nothing more is saved.

        Every later :meth:`check` is still made against every region stored so far (closing never forgets a
        certificate), but its record is kept in memory only, so the folder keeps exactly what was processed
        while it was bound (:meth:`open` resumes from there).
        """
        self.flush()
        self._path = None
        self._chunk, self._chunk_size, self._chunk_dirty = {}, 0, False

    def __enter__(self) -> "CertificationMemory":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --------------------------------------------------------------------------------------- views

    def __len__(self) -> int:
        return len(self._records)

    @property
    def records(self) -> list[MemoryRecord]:
        """One record per processed input, in processing order."""
        return list(self._records)

    @property
    def stored(self) -> list[tuple[int, int, Region]]:
        """``(dataset index, prediction, region)`` of every stored region, in processing order."""
        return [(i, p, r) for (i, p), r in zip(self._stored, self._regions)]

    @property
    def next_index(self) -> int | None:
        """The dataset index the recorded order expects next (None without an order, or when done)."""
        if self.order is None or len(self._records) >= len(self.order):
            return None
        return self.order[len(self._records)]

    @property
    def counts(self) -> dict[str, int]:
        """How many inputs were kept, shrunk and abstained."""
        c = Counter(r.action for r in self._records)
        return {a: c.get(a, 0) for a in (KEPT, SHRUNK, ABSTAINED)}


def _as_index(index) -> int:
    try:
        value = operator.index(index)
    except TypeError:
        raise TypeError(f"a dataset index must be an integer, got {type(index).__name__}") from None
    if isinstance(index, bool) or value < 0:
        raise ValueError(f"a dataset index must be an integer >= 0, got {index!r}")
    return value


def _as_prediction(prediction) -> int:
    if isinstance(prediction, torch.Tensor) and prediction.numel() == 1:
        prediction = prediction.item()
    if isinstance(prediction, bool):
        raise TypeError("prediction must be an integer class (-1 for abstain), got a bool")
    try:
        return operator.index(prediction)
    except TypeError:
        raise TypeError(f"prediction must be an integer class (-1 for abstain), got {type(prediction).__name__}") \
            from None
