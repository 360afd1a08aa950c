"""Progress of long loops, visible on a terminal and in a log file alike.

``progress(total, desc, enabled)`` returns one object for every long loop (extraction, HOW
description, re-ranking, diffusion): ``update(n)`` after each step, ``close()`` at the end (or
use it as a context manager).

- On a terminal (the stream's ``isatty()``): a tqdm bar, cleared when closed.
- Otherwise (output sent to a file, as cluster jobs run): one plain line each time another
  ``every_fraction`` of the total is done or ``every_seconds`` have passed since the last line,
  whichever comes first, e.g. ``extract: 40/133 img (30%), 1.52 img/s, ETA 1 min 01 s``.
- ``enabled=False``: nothing is written.
"""
from __future__ import annotations

import math
import sys
import time
from typing import Callable, TextIO

from tqdm.auto import tqdm

__all__ = ["Progress", "progress", "format_duration"]

EVERY_SECONDS = 30.0  # a line at least this often in a log (seconds)
EVERY_FRACTION = 0.1  # and each time another tenth of the total is done


def format_duration(seconds: float) -> str:
    """``seconds`` for a person: ``"45 s"``, ``"3 min 05 s"``, ``"2 h 04 min"``."""
    if not math.isfinite(seconds):
        return "?"
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class Progress:
    """Counts steps of a loop and reports them (see the module docstring); made by `progress`.

    Args:
        total: number of steps (``None``: unknown, lines then give no percentage or ETA).
        desc: what is counted, the prefix of every line.
        enabled: ``False`` writes nothing.
        unit: the steps' unit (``"img"``, ``"query"``).
        stream: where to write (default: ``sys.stderr`` at creation).
        every_seconds, every_fraction: how often a log line is written (the first that comes).
        clock: seconds, monotonic (for tests).
    """

    def __init__(self, total: int | None, desc: str, enabled: bool = True, unit: str = "img", stream: TextIO | None = None,
                 every_seconds: float = EVERY_SECONDS, every_fraction: float = EVERY_FRACTION,
                 clock: Callable[[], float] = time.monotonic):
        if total is not None and total < 0:
            raise ValueError(f"progress: total must be >= 0, got {total}")
        if not every_seconds > 0 or not 0 < every_fraction <= 1:
            raise ValueError(f"progress: every_seconds must be > 0 and every_fraction in (0, 1], got {every_seconds}, "
                             f"{every_fraction}")
        self.total, self.desc, self.unit = total, desc, unit
        self.count = 0
        self.stream = stream if stream is not None else sys.stderr
        self.every_seconds, self.every_fraction, self.clock = float(every_seconds), float(every_fraction), clock
        self._bar = None
        self._lines = False
        if enabled:
            isatty = getattr(self.stream, "isatty", None)
            if isatty is not None and isatty():
                self._bar = tqdm(total=total, desc=desc, unit=unit, leave=False, file=self.stream)
            else:
                self._lines = True
        self._start = self._last = clock()
        self._next_fraction = every_fraction

    def update(self, n: int = 1) -> None:
        """``n`` more steps are done."""
        self.count += n
        if self._bar is not None:
            self._bar.update(n)
        elif self._lines:
            now = self.clock()
            due = now - self._last >= self.every_seconds
            if self.total:
                fraction = self.count / self.total
                if fraction >= self._next_fraction - 1e-12:
                    due = True
                    # the next multiple of every_fraction above what is done
                    self._next_fraction = (math.floor(fraction / self.every_fraction + 1e-9) + 1) * self.every_fraction
            if due:
                self._write(now)

    def line(self, now: float | None = None) -> str:
        """The log line for the current count."""
        now = self.clock() if now is None else now
        elapsed = now - self._start
        rate = self.count / elapsed if elapsed > 0 else float("inf")
        text = f"{self.desc}: {self.count}"
        if self.total is not None:
            text += f"/{self.total} {self.unit} ({100 * self.count / max(self.total, 1):.0f}%)"
        else:
            text += f" {self.unit}"
        text += f", {rate:.2f} {self.unit}/s" if math.isfinite(rate) else ", - /s"
        if self.total is not None:
            left = self.total - self.count
            eta = 0.0 if left <= 0 else (left / rate if rate > 0 else float("inf"))
            text += f", ETA {format_duration(eta)}" if left > 0 else f", done in {format_duration(elapsed)}"
        return text

    def _write(self, now: float) -> None:
        self._last = now
        print(self.line(now), file=self.stream, flush=True)

    def close(self) -> None:
        """Clear the bar (a terminal); the log lines stay."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._lines = False

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False


def progress(total: int | None, desc: str, enabled: bool = True, unit: str = "img", **options) -> Progress:
    """A `Progress` for a loop of ``total`` steps: a bar on a terminal, a line per tenth
    of the total or per 30 s in a log, nothing when ``enabled`` is false. ``options``: the other
    arguments of `Progress` (``stream``, ``every_seconds``, ``every_fraction``, ``clock``)."""
    return Progress(total, desc, enabled, unit, **options)
