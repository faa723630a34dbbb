"""Progress lines on stderr for slow stages; silent under --quiet or when stderr is not a terminal."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """Callable ``(stage, done, total)`` that redraws one status line, at most ~10 times a second."""

    def __init__(self, stream: TextIO | None = None, *, enabled: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self._last = 0.0
        self._stage = None
        self._start = time.monotonic()

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if stage != self._stage:
            self._stage, self._start = stage, now
        if done < total and now - self._last < 0.1:
            return
        self._last = now
        pct = 100.0 * done / total if total else 100.0
        end = "\n" if done >= total else ""
        self.stream.write(f"\r{stage:<10} {done:>7}/{total:<7} {pct:5.1f}%  {now - self._start:6.1f} s{end}")
        self.stream.flush()
