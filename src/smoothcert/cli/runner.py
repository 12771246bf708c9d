"""Dataset runs that write results as they go and resume after a crash.

A run certifies (or predicts) the inputs of a data set split selected Cohen-style: dataset indices ``i`` with
``i % skip == 0`` and ``i < max``, in increasing order. Each input's random numbers come from the run seed and its
dataset index (:func:`smoothcert.sampling.input_generator`), so the numbers do not depend on the order, the batch
or an interruption.

Files: ``OUT`` is a TSV with one row per input, first columns exactly Cohen's ``idx label predict radius correct
time`` (``idx label predict correct time`` for PREDICT), the method's columns after them; ``OUT.json`` records the
whole configuration, seed and package versions. Rows are flushed and fsynced after every batch. Run the same
command again and it keeps every complete row, drops a torn last line, carries on after the last index done and
says so (from which row). A larger ``--max`` extends a file; the settings a command declares ``continuable`` (the
batch sizes of a run that only samples: they change how many inputs share a forward pass, never an input's random
numbers, as long as ``block``, the samples of one input per forward pass, is unchanged) may change on resume. It
refuses a results file written with another configuration and names the settings that differ. A file that holds
no complete row (and no side files) is replaced by a run with other settings, which says so.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from smoothcert.methods.records import MethodRecord, Prediction, record_row
from smoothcert.progress import progress as progress_reporter
from smoothcert.validation import check_count

CERTIFY_COLUMNS = ("idx", "label", "predict", "radius", "correct", "time")
PREDICT_COLUMNS = ("idx", "label", "predict", "correct", "time")
#: The columns the runner fills itself; a record fills every other one (:func:`record_row`).
RUNNER_COLUMNS = ("idx", "label", "correct", "time")

#: Sidecar keys that may differ between the first run and a resumed one.
_VOLATILE = ("versions", "started", "resumed")
#: Sidecar keys of the selection: a resumed run may select more inputs (a larger ``--max``), checked by the rows.
_SELECTION = ("max", "count", "indices")


def samples_per_pass(batch_size: int, inputs_per_batch: int) -> int:
    """``block``: samples of one input per forward pass (:attr:`smoothcert.methods.base.RunContext.block`). Each
    input's noise is drawn in blocks of this size, so it is part of what fixes the numbers."""
    return max(1, batch_size // inputs_per_batch)


def versions() -> dict[str, str]:
    """Versions of the packages a result depends on."""
    import numpy
    import scipy

    from smoothcert.version import __version__

    return {"smoothcert": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
            "scipy": scipy.__version__, "python": platform.python_version()}


def select_indices(length: int, skip: int = 1, max_index: int | None = None) -> list[int]:
    """Cohen's selection: indices ``i`` of the split with ``i % skip == 0`` and ``i < max_index``."""
    check_count("skip", skip)
    if max_index is not None:
        check_count("max", max_index)
    stop = length if max_index is None else min(length, max_index)
    return list(range(0, stop, skip))


def _format(value: Any) -> str:
    if isinstance(value, float):
        return repr(value) if value == value else "nan"
    if isinstance(value, bool):
        return str(int(value))
    return str(value)


def _differences(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``(setting, old value, new value)`` for every difference, nested settings named ``method.kappa``."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [(prefix.rstrip("."), old, new)]


def _describe(key: str, old: Any, new: Any) -> str:
    """One difference, short: lists by what one side has and the other lacks, not in full."""
    if isinstance(old, list) and isinstance(new, list):
        gone = [str(v) for v in old if v not in new]
        added = [str(v) for v in new if v not in old]
        parts = ([f"the file has {', '.join(gone[:4])}{' ...' if len(gone) > 4 else ''} that this run lacks"]
                 if gone else []) + ([f"this run adds {', '.join(added[:4])}{' ...' if len(added) > 4 else ''}"]
                                     if added else [])
        return f"{key}: " + ("; ".join(parts) if parts else "another order")
    return f"{key}: file has {old!r}, this run has {new!r}"


@dataclass
class ResultsFile:
    """A TSV results file with its JSON sidecar; see the module docstring for the resume rules."""

    path: Path
    columns: tuple[str, ...]
    config: dict[str, Any]
    #: Settings (sidecar keys) that may differ from the file's on resume; the new values are recorded.
    continuable: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.notes: list[str] = []  # what open() did beyond creating or plainly resuming, for the user
        self.changed: list[tuple[str, Any, Any]] = []

    @property
    def sidecar(self) -> Path:
        return self.path.with_name(self.path.name + ".json")

    def open(self) -> list[dict[str, str]]:
        """Create the files, or check they belong to this configuration and return the complete rows."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            self._write_sidecar()
            with open(self.path, "w") as f:
                f.write("\t".join(self.columns) + "\n")
                f.flush()
                os.fsync(f.fileno())
            return []
        try:
            self._check_sidecar()
            rows = self._complete_rows()
        except ValueError as refused:
            if not self._replaceable():
                raise
            self.notes.append(f"{self.path} held no complete row: replaced it and its {self.sidecar.name} "
                              f"({' '.join(str(refused).split())[:300]})")
            self.path.unlink()
            return self.open()
        if self.changed:
            self._write_sidecar(resumed={"at_row": len(rows), "changed": {k: [a, b] for k, a, b in self.changed}})
        return rows

    def _replaceable(self) -> bool:
        """A file this package wrote (it has its sidecar) that holds no complete row and has no side files."""
        if not self.sidecar.exists():
            return False
        with open(self.path, "rb") as f:
            if f.read().count(b"\n") > 1:
                return False
        prefix = self.path.name + "."
        return not any(p.name.startswith(prefix) and p != self.sidecar for p in self.path.parent.iterdir())

    def _write_sidecar(self, resumed: dict[str, Any] | None = None) -> None:
        data = {**self.config, "columns": list(self.columns), "versions": versions(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        if resumed is not None:
            old = json.loads(self.sidecar.read_text())
            data["started"] = old.get("started", data["started"])
            data["resumed"] = [*old.get("resumed", []), {**resumed, "at": time.strftime("%Y-%m-%dT%H:%M:%S")}]
        tmp = self.sidecar.with_name(self.sidecar.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
        os.replace(tmp, self.sidecar)

    def _check_sidecar(self) -> None:
        if not self.sidecar.exists():
            raise ValueError(f"{self.path} exists but has no {self.sidecar.name}: it was not written by this run; "
                             "choose another output path or remove the file")
        try:
            old = json.loads(self.sidecar.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{self.sidecar} is not valid JSON ({e}); choose another output path") from e
        new = json.loads(json.dumps({**self.config, "columns": list(self.columns)}, default=str))
        if "block" in new and "block" not in old and {"batch_size", "inputs_per_batch"} <= set(old):
            old["block"] = samples_per_pass(old["batch_size"], old["inputs_per_batch"])  # files from before "block"
        diff = _differences({k: v for k, v in old.items() if k not in _VOLATILE},
                            {k: v for k, v in new.items() if k not in _VOLATILE})
        free = set(_SELECTION) | set(self.continuable)
        refused = [d for d in diff if d[0] not in free]
        # a method's name first (its settings follow from it), the columns last (they follow from the method)
        refused.sort(key=lambda d: 0 if d[0].endswith("name") else 2 if d[0] == "columns" else 1)
        if refused:
            detail = "; ".join(_describe(*d) for d in refused[:6])
            more = f" and {len(refused) - 6} more" if len(refused) > 6 else ""
            hint = (" (block = batch-size // inputs-per-batch, the samples of one input per forward pass: the noise "
                    "is drawn in blocks, so another block can change the numbers)"
                    if any(d[0] == "block" for d in refused) else "")
            raise ValueError(f"refusing to append to {self.path}: it was written with another configuration "
                             f"({detail}{more}){hint}. Use the same settings to resume, or another output path")
        self.changed = diff

    def _complete_rows(self) -> list[dict[str, str]]:
        with open(self.path, "rb") as f:
            data = f.read()
        lines = data.split(b"\n")
        header = lines[0].decode()
        if header.split("\t") != list(self.columns):
            raise ValueError(f"{self.path} has columns {header!r}, expected {chr(9).join(self.columns)!r}")
        keep = len(lines[0]) + 1
        rows = []
        # Every complete row ends with a newline; the text after the last newline is a torn write.
        for raw in lines[1:-1]:
            fields = raw.decode().split("\t")
            if len(fields) != len(self.columns):
                break
            rows.append(dict(zip(self.columns, fields)))
            keep += len(raw) + 1
        if keep < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(keep)
                os.fsync(f.fileno())
        return rows

    def append(self, rows: Sequence[dict[str, Any]]) -> None:
        with open(self.path, "a") as f:
            for row in rows:
                f.write("\t".join(_format(row[c]) for c in self.columns) + "\n")
            f.flush()
            os.fsync(f.fileno())


def resume_message(results: ResultsFile, done: int, indices: Sequence[int]) -> str:
    """What a resumed run says: the rows kept, where it continues, and the settings it changed."""
    if done >= len(indices):
        where = f"all {len(indices)} selected inputs are done"
    else:
        where = f"continuing at row {done + 1} of {len(indices)} (dataset index {indices[done]})"
    changed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in results.changed if k not in ("count", "indices"))
    return f"resuming {results.path}: kept its {done} complete rows, {where}" + (f"; changed {changed}" if changed else "")


def batch_rows(records: Sequence[MethodRecord | Prediction], batch: Sequence[int], labels: torch.Tensor,
               seconds: float, columns: Sequence[str]) -> list[dict[str, Any]]:
    """The rows of one batch: each record's ``columns`` and the runner's own ``idx label correct time`` (``time``:
    seconds per input of the batch)."""
    if len(records) != len(batch):
        raise RuntimeError(f"a method returned {len(records)} records for {len(batch)} inputs")
    rows = [record_row(record, columns) for record in records]
    for row, i, y in zip(rows, batch, labels.tolist()):
        row.update(idx=i, label=int(y), correct=int(int(row["predict"]) == int(y)), time=round(seconds, 4))
    return rows


def resume_point(results: ResultsFile, indices: Sequence[int]) -> list[int]:
    """Open ``results`` and return the dataset indices already done, checked to be the start of ``indices``; say
    on stderr what the file's opening noted and, for a resumed run, where it continues."""
    done = [int(r["idx"]) for r in results.open()]
    if done != list(indices[: len(done)]):
        if len(done) > len(indices) and done[: len(indices)] == list(indices):
            raise ValueError(f"{results.path} already holds {len(done)} rows, more than the {len(indices)} inputs "
                             "this run selects: give its --max (or a larger one) to extend it, or another output path")
        raise ValueError(f"{results.path} holds indices {done[:5]}... that are not the start of this run's "
                         f"selection {list(indices[:5])}...; use the same --skip/--max or another output path")
    for note in results.notes:
        print(note, file=sys.stderr)
    if done:
        print(resume_message(results, len(done), indices), file=sys.stderr)
    return done


def run_dataset(
    results: ResultsFile,
    inputs: Callable[[Sequence[int]], tuple[torch.Tensor, torch.Tensor]],
    indices: Sequence[int],
    process: Callable[[torch.Tensor, torch.Tensor, Sequence[int]], Sequence[MethodRecord | Prediction]],
    *,
    inputs_per_batch: int = 1,
    on_open: Callable[[list[int]], None] | None = None,
    progress: bool = True,
) -> Path:
    """Process ``indices`` in order, ``inputs_per_batch`` at a time, appending rows; resume from complete rows.

    ``inputs(indices) -> (x, labels)``; ``process(x, labels, indices)`` returns one record per input
    (:mod:`smoothcert.methods.records`), which fills every column but ``idx``, ``label``, ``correct`` and
    ``time``; those are filled here (``time`` is the batch's wall-clock seconds divided by its size).
    """
    own = [c for c in results.columns if c not in RUNNER_COLUMNS]
    done = resume_point(results, indices)
    if on_open is not None:
        on_open(done)
    todo = list(indices[len(done):])
    # a bar on a terminal, a plain line every few percent in a log (smoothcert.progress)
    bar = progress_reporter(len(indices), initial=len(done), enabled=progress, unit="input",
                            desc=str(results.config.get("command", "run")))
    try:
        for start in range(0, len(todo), inputs_per_batch):
            batch = todo[start : start + inputs_per_batch]
            x, labels = inputs(batch)
            t0 = time.perf_counter()
            records = process(x, labels, batch)
            seconds = (time.perf_counter() - t0) / len(batch)
            results.append(batch_rows(records, batch, labels, seconds, own))
            bar.update(len(batch))
    finally:
        bar.close()
    return results.path


#: The column in which a data-dependent method flags a chosen scale at its floor or at an extreme.
FLAG_COLUMN = "scale_flag"


def flag_summary(path: Path) -> list[str]:
    """Lines that summarize the flagged rows of a results file (``scale_flag`` other than ``none``), if any."""
    with open(path) as f:
        header = f.readline().rstrip("\n").split("\t")
        if FLAG_COLUMN not in header:
            return []
        at = header.index(FLAG_COLUMN)
        values = [line.rstrip("\n").split("\t") for line in f]
    values = [v[at] for v in values if len(v) == len(header)]
    counts: dict[str, int] = {}
    for v in values:
        if v != "none":
            counts[v] = counts.get(v, 0) + 1
    return [f"note: {k} scale in {c} of {len(values)} rows ({FLAG_COLUMN} column): see the method's documentation"
            for k, c in sorted(counts.items())]
