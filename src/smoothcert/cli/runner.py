"""Dataset runs that write results as they go and resume after a crash.

A run certifies (or predicts) the inputs of a data set split selected Cohen-style: dataset indices ``i`` with
``i % skip == 0`` and ``i < max``, in increasing order. Each input's random numbers come from the run seed and its
dataset index (:func:`smoothcert.sampling.input_generator`), so the numbers do not depend on the order, the batch
or an interruption.

Files: ``OUT`` is a TSV with one row per input, first columns exactly Cohen's ``idx label predict radius correct
time`` (``idx label predict correct time`` for PREDICT), the method's columns after them; ``OUT.json`` records the
whole configuration, seed and package versions. Rows are flushed and fsynced after every batch. Run the same
command again and it keeps every complete row, drops a torn last line, and carries on after the last index done;
it refuses a results file written with another configuration and says which settings differ.
"""

from __future__ import annotations

import json
import os
import platform
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
_VOLATILE = ("versions", "started")


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


@dataclass
class ResultsFile:
    """A TSV results file with its JSON sidecar; see the module docstring for the resume rules."""

    path: Path
    columns: tuple[str, ...]
    config: dict[str, Any]

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
        self._check_sidecar()
        return self._complete_rows()

    def _write_sidecar(self) -> None:
        data = {**self.config, "columns": list(self.columns), "versions": versions(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
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
        diff = _differences({k: v for k, v in old.items() if k not in _VOLATILE},
                            {k: v for k, v in new.items() if k not in _VOLATILE})
        if diff:
            detail = "; ".join(f"{k}: file has {a!r}, this run has {b!r}" for k, a, b in diff[:6])
            raise ValueError(f"refusing to append to {self.path}: it was written with another configuration ({detail}). "
                             "Use the same settings to resume, or another output path")

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
    done_rows = results.open()
    done = [int(r["idx"]) for r in done_rows]
    if done != list(indices[: len(done)]):
        raise ValueError(f"{results.path} holds indices {done[:5]}... that are not the start of this run's "
                         f"selection {list(indices[:5])}...; use the same --skip/--max or another output path")
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
            if len(records) != len(batch):
                raise RuntimeError(f"a method returned {len(records)} records for {len(batch)} inputs")
            rows = [record_row(record, own) for record in records]
            for row, i, y in zip(rows, batch, labels.tolist()):
                row.update(idx=i, label=int(y), correct=int(int(row["predict"]) == int(y)), time=round(seconds, 4))
            results.append(rows)
            bar.update(len(batch))
    finally:
        bar.close()
    return results.path
