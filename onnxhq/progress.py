"""Progress lines on stderr for slow stages; silent under --quiet or when stderr is no terminal."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """Callable ``(stage, done, total)`` that redraws one status line, at most ~10 times a second.

    A stage's line ends (newline) when ``done`` reaches ``total``; a shorter line overwrites a
    longer one cleanly. ``enabled=None`` means: only when ``stream`` is a terminal.
    """

    def __init__(self, stream: TextIO | None = None, *, enabled: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = _isatty(self.stream) if enabled is None else enabled
        self._last = 0.0
        # per stage: interleaved stages (a sweep's) keep their clocks
        self._starts: dict[str, float] = {}
        self._width = 0  # length of the line on screen, 0 after a newline

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        start = self._starts.setdefault(stage, now)
        if done < total and now - self._last < 0.1:
            return
        self._last = now
        pct = 100.0 * done / total if total else 100.0
        line = f"{stage:<10} {done:>7}/{total:<7} {pct:5.1f}%  {now - start:6.1f} s"
        pad = " " * max(0, self._width - len(line))
        finished = done >= total
        self.stream.write(f"\r{line}{pad}" + ("\n" if finished else ""))
        self.stream.flush()
        self._width = 0 if finished else len(line)
        if finished:  # a stage that runs again (prune's Hessian, once per step) restarts its clock
            del self._starts[stage]


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
