"""Late labels: ground truth that becomes known after inference, written for `fleetctl labels push`.

The simulator knows the truth of every window; a real vehicle learns it later (a driver report, a
workshop finding). For a configurable fraction of the records whose observation carries ``truth``
the agent appends ``device_id,spool_epoch,seq,label`` to a CSV; the collector joins it on the
record's idempotency key. Several simulated vehicles in one process may share one file, so
writes to a path are serialised by a per-path lock and each line is written whole.
"""

from __future__ import annotations

import csv
import io
import logging
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

HEADER = ("device_id", "spool_epoch", "seq", "label")
_locks: dict[Path, threading.Lock] = {}
_locks_guard = threading.Lock()


def _lock_for(path: Path) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(path, threading.Lock())


class LateLabels:
    """Appends a seeded random fraction of (record key, truth) pairs to a CSV."""

    def __init__(self, path: Path | str, fraction: float, *, seed: int = 0) -> None:
        if not 0.0 <= fraction <= 1.0:
            raise ValueError("late label fraction must be in [0, 1]")
        self.path = Path(path).resolve()
        self.fraction = fraction
        self.written = 0
        self.errors = 0
        self._rng = np.random.default_rng([seed, 0x1A8E1])
        self._lock = _lock_for(self.path)

    @property
    def enabled(self) -> bool:
        """Whether any label will ever be written."""
        return self.fraction > 0

    def offer(self, device_id: str, spool_epoch: str, seqs: np.ndarray, truths: Sequence[str | None]) -> int:
        """Consider records ``seqs`` with their truths; write the sampled ones; return how many."""
        if not self.enabled or len(truths) == 0:
            return 0
        chosen = np.flatnonzero(self._rng.random(len(truths)) < self.fraction)
        rows = [(device_id, spool_epoch, int(seqs[i]), truths[i]) for i in chosen if truths[i] is not None]
        if not rows:
            return 0
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerows(rows)
        try:
            with self._lock:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with self.path.open("a", encoding="utf-8", newline="") as fh:
                    if fh.tell() == 0:
                        fh.write(",".join(HEADER) + "\n")
                    fh.write(buf.getvalue())
        except OSError as exc:
            self.errors += 1
            if self.errors == 1 or self.errors % 100 == 0:
                log.error("cannot write late labels to %s (%d failures): %s", self.path, self.errors, exc)
            return 0
        self.written += len(rows)
        return len(rows)
