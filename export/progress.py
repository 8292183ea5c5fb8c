"""Progress of the long export steps on stderr, and the summary table.

On a terminal each running step shows as a rich progress line (spinner, step name, how many
steps are done, elapsed time) and leaves a timed line behind when it ends. Elsewhere (a pipe, a
log file, a test reading stderr) the same steps print plain lines:

    [export] int8: quantize ...
    [export] int8: quantize: done in 3.2 s (peak RSS 1.10 GiB)
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TextIO

from rich.console import Console
from rich.progress import Progress as Bar
from rich.progress import SpinnerColumn, TextColumn, TimeElapsedColumn


def peak_rss_gib() -> float:
    """Peak resident set size of this process and of its waited-for children, in GiB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / (1024 * 1024)  # ru_maxrss is KiB on Linux


class Progress:
    """`with progress.step("export fp32"): ...` shows the step while it runs and prints a timed
    line when it ends; `info` prints a line. Step durations are kept in `timings`."""

    def __init__(
        self, prefix: str = "export", stream: TextIO | None = None, *, live: bool | None = None
    ) -> None:
        """`live`: draw rich's live progress line (default: when `stream` is a terminal)."""
        self.prefix = prefix
        self.console = Console(file=stream or sys.stderr, highlight=False)
        self.live = self.console.is_terminal if live is None else live
        self.timings: dict[str, float] = {}
        self.done = 0
        self._drawing = False  # rich draws one live display at a time: nested steps do not

    def info(self, message: str) -> None:
        line = f"[{self.prefix}] {message}"
        if self.live:
            self.console.print(line, markup=False, soft_wrap=True)
        else:  # byte for byte what was asked: no wrapping, no styles
            self.console.file.write(line + "\n")
            self.console.file.flush()

    @contextmanager
    def step(self, what: str) -> Iterator[None]:
        if not self.live:
            self.info(f"{what} ...")
        start = time.perf_counter()
        try:
            with self._bar(what):
                yield
        except BaseException:
            self.info(f"{what}: FAILED after {time.perf_counter() - start:.1f} s")
            raise
        elapsed = time.perf_counter() - start
        self.timings[what] = elapsed
        self.done += 1
        self.info(f"{what}: done in {elapsed:.1f} s (peak RSS {peak_rss_gib():.2f} GiB)")

    @contextmanager
    def _bar(self, what: str) -> Iterator[None]:
        """rich's transient progress line for one step (nothing when not live)."""
        if not self.live or self._drawing:
            yield
            return
        columns = (
            SpinnerColumn(),
            TextColumn(f"[{self.prefix}] {{task.description}}", markup=False),
            TextColumn(f"({self.done} done)", markup=False),
            TimeElapsedColumn(),
        )
        self._drawing = True
        try:
            with Bar(*columns, console=self.console, transient=True) as bar:
                bar.add_task(what, total=None)
                yield
        finally:
            self._drawing = False


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub Markdown table; cells are str()-ed."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def human_size(num_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if num_bytes < 1024 or unit == "GiB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.2f} {unit}"
        num_bytes /= 1024
    raise AssertionError("unreachable")
