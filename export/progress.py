"""Progress lines on stderr for long export steps, and the summary table."""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TextIO


def peak_rss_gib() -> float:
    """Peak resident set size of this process and of its waited-for children, in GiB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / (1024 * 1024)  # ru_maxrss is KiB on Linux


@dataclass
class Progress:
    """`with progress.step("export fp32"): ...` prints a start line and a timed done line."""

    prefix: str = "export"
    stream: TextIO = field(default_factory=lambda: sys.stderr)
    timings: dict[str, float] = field(default_factory=dict)

    def info(self, message: str) -> None:
        print(f"[{self.prefix}] {message}", file=self.stream, flush=True)

    @contextmanager
    def step(self, what: str) -> Iterator[None]:
        self.info(f"{what} ...")
        start = time.perf_counter()
        try:
            yield
        except BaseException:
            self.info(f"{what}: FAILED after {time.perf_counter() - start:.1f} s")
            raise
        elapsed = time.perf_counter() - start
        self.timings[what] = elapsed
        self.info(f"{what}: done in {elapsed:.1f} s (peak RSS {peak_rss_gib():.2f} GiB)")


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
