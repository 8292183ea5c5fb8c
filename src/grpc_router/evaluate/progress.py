"""The eval's progress line on stderr: a bar redrawn in place on a terminal, a line every ten
seconds otherwise (so that CI logs stay short)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressBar:
    """A one-line progress bar on a terminal, periodic lines otherwise."""

    def __init__(self, total: int, stream: TextIO = sys.stderr) -> None:
        self.total = total
        self.stream = stream
        self.start = time.perf_counter()
        self.tty = stream.isatty()
        self._last = 0.0

    def update(self, done: int, correct: int) -> None:
        """Show `done` of the cases run, `correct` of them right; throttled, except the last."""
        now = time.perf_counter()
        if done < self.total and now - self._last < (0.2 if self.tty else 10.0):
            return
        self._last = now
        width = 30
        filled = int(width * done / self.total)
        rate = done / max(now - self.start, 1e-9)
        line = (
            f"[{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} "
            f"acc {correct / max(done, 1):.1%} {rate:.0f}/s"
        )
        if self.tty:
            end = "\n" if done >= self.total else ""
            print("\r" + line, end=end, file=self.stream, flush=True)
        else:
            print(line, file=self.stream, flush=True)
