"""A transfer progress bar on stderr (redrawn in place; at most ten redraws a second)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

WIDTH = 30


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


class Progress:
    """``update(done)`` as bytes move, ``close()`` at the end; silent when ``enabled`` is False."""

    def __init__(self, label: str, total: int, *, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.label = label
        self.total = max(total, 0)
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.done = 0
        self._drawn = 0.0
        self._started = time.monotonic()

    def update(self, done: int) -> None:
        """Record ``done`` bytes so far and redraw if due."""
        self.done = done
        now = time.monotonic()
        if self.enabled and (now - self._drawn >= 0.1 or done >= self.total):
            self._drawn = now
            self._draw()

    def _draw(self) -> None:
        share = self.done / self.total if self.total else 1.0
        filled = int(WIDTH * min(share, 1.0))
        rate = self.done / max(time.monotonic() - self._started, 1e-6)
        self.stream.write(
            f"\r{self.label} [{'#' * filled}{'.' * (WIDTH - filled)}] {share:4.0%} "
            f"{_size(self.done)}/{_size(self.total)} {_size(rate)}/s "
        )
        self.stream.flush()

    def close(self) -> None:
        """Draw the final state and end the line."""
        if self.enabled:
            self._draw()
            self.stream.write("\n")
            self.stream.flush()
