"""Progress of a long stage (training, certification) that reads well on a terminal and in a log.

:func:`progress` returns one reporter per stage:

- on a terminal (the stream's ``isatty()``, with a width), a tqdm bar with rate and ETA, redrawn in place;
- in a Jupyter kernel, tqdm's notebook widget (``tqdm.auto``);
- otherwise (CI, a log file, ``nohup``, a pipe) plain lines and never a carriage return: one line each time
  another ``percent`` percent of the stage is done or ``interval`` seconds have passed since the last line
  (checked at each update), and one at the end. A line reads
  ``certify: 40/100 inputs (40%), 2.31 inputs/s, elapsed 0:17, ETA 0:26, loss=0.31``: the rate counts the items
  done since the stage started (a resumed run's earlier items are not), the ETA is the items left at that rate.

Every reporter has ``update(n)``, ``set_postfix(**values)`` (shown on the bar, appended to the next line),
``write(message)`` (a line that does not break the bar) and ``close()``; it is also a context manager.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from typing import IO, Any

__all__ = ["LineProgress", "NullProgress", "progress", "format_seconds"]

MODES = ("auto", "bar", "lines", "off")


def format_seconds(seconds: float) -> str:
    """``H:MM:SS`` (``M:SS`` under an hour); ``?`` when unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class NullProgress:
    """A reporter that shows nothing (``enabled=False``); ``write`` still prints its line to stdout."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **values: Any) -> None:
        pass

    def write(self, message: str) -> None:
        print(message, file=sys.stdout, flush=True)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LineProgress(NullProgress):
    """Plain progress lines for a stream that is not a terminal (see the module docstring for the cadence)."""

    def __init__(self, total: int, *, desc: str = "", unit: str = "it", initial: int = 0, file: IO[str] | None = None,
                 percent: float = 5.0, interval: float = 30.0, clock: Callable[[], float] = time.monotonic):
        self.file = file
        if not 0 < percent <= 100:
            raise ValueError(f"percent must lie in (0, 100], got {percent!r}")
        if not interval > 0:
            raise ValueError(f"interval must be a positive number of seconds, got {interval!r}")
        self.total, self.desc, self.unit = max(int(total), 0), desc, unit
        self.n = self.initial = int(initial)
        self.percent, self.interval, self.clock = float(percent), float(interval), clock
        self.start = self.last_time = clock()
        self.last_mark = self._mark(self.n)
        self.postfix = ""
        self.closed = False

    def _stream(self) -> IO[str]:
        return self.file if self.file is not None else sys.stderr

    def _mark(self, n: int) -> int:
        """How many ``percent`` steps ``n`` items make."""
        return int(100.0 * n / (self.total * self.percent)) if self.total else 0

    def line(self) -> str:
        """The current state as one line (no newline)."""
        elapsed = self.clock() - self.start
        done = self.n - self.initial
        rate = done / elapsed if elapsed > 0 else math.nan
        eta = (self.total - self.n) / rate if done > 0 and rate > 0 else math.nan
        share = f" ({100.0 * self.n / self.total:.0f}%)" if self.total else ""
        units = self.unit + ("es" if self.unit.endswith(("s", "sh", "ch", "x")) else "s")
        text = (f"{self.desc + ': ' if self.desc else ''}{self.n}/{self.total} {units}{share}, "
                f"{rate:.3g} {units}/s, elapsed {format_seconds(elapsed)}, ETA {format_seconds(eta)}")
        return text + (f", {self.postfix}" if self.postfix else "")

    def _emit(self) -> None:
        print(self.line(), file=self._stream(), flush=True)
        self.last_time = self.clock()
        self.last_mark = self._mark(self.n)

    def update(self, n: int = 1) -> None:
        self.n += int(n)
        if self.n >= self.total:
            return   # the final line comes with close()
        if self._mark(self.n) > self.last_mark or self.clock() - self.last_time >= self.interval:
            self._emit()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.n > self.initial:
                self._emit()


class _Bar(NullProgress):
    """A tqdm bar (terminal or notebook) behind the reporter interface."""

    def __init__(self, tqdm_class, total: int, desc: str, unit: str, initial: int, file: IO[str] | None):
        self.tqdm = tqdm_class
        self.bar = tqdm_class(total=total, initial=initial, desc=desc or None, unit=unit, file=file,
                              dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        self.bar.update(n)

    def set_postfix(self, **values: Any) -> None:
        self.bar.set_postfix(values, refresh=False)

    def write(self, message: str) -> None:
        self.tqdm.write(message)

    def close(self) -> None:
        self.bar.close()


def _width(stream) -> int | None:
    """The terminal's number of columns, None when the stream has no file descriptor."""
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return None


def _in_notebook() -> bool:
    shell = sys.modules.get("IPython")
    ip = shell.get_ipython() if shell is not None and hasattr(shell, "get_ipython") else None
    return ip is not None and "IPKernelApp" in getattr(ip, "config", {})


def progress(total: int, *, desc: str = "", unit: str = "it", initial: int = 0, enabled: bool = True,
             mode: str = "auto", file: IO[str] | None = None, percent: float = 5.0, interval: float = 30.0):
    """The reporter for one stage of ``total`` items (``initial`` already done); see the module docstring.

    ``mode``: ``auto`` (a bar on a terminal or in a notebook, lines otherwise), ``bar``, ``lines`` or ``off``;
    ``enabled=False`` is ``off``. ``file`` defaults to ``sys.stderr``.
    """
    if mode not in MODES:
        raise ValueError(f"unknown progress mode {mode!r}; choose one of: {', '.join(MODES)}")
    if not enabled or mode == "off":
        return NullProgress()
    stream = file if file is not None else sys.stderr
    if mode == "auto":
        tty = getattr(stream, "isatty", None)
        if tty is not None and tty() and _width(stream) != 0:   # a terminal of no width (some CI ptys): lines
            mode = "bar"
        elif file is None and _in_notebook():
            from tqdm.auto import tqdm as notebook_tqdm

            return _Bar(notebook_tqdm, total, desc, unit, initial, None)
        else:
            mode = "lines"
    if mode == "bar":
        from tqdm import tqdm

        return _Bar(tqdm, total, desc, unit, initial, stream)
    return LineProgress(total, desc=desc, unit=unit, initial=initial, file=file, percent=percent, interval=interval)
