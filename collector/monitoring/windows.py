"""Per-window sketches written by ingest into ``monitoring_window``, exactly once with the records.

Ingest hands :meth:`WindowWriter.write` the blocks it just wrote and their
:class:`~collector.ingest.bulk.WriteOutcome`; only the NEWLY inserted rows are sketched (a
re-sent batch's duplicates and a conflicting batch's rejected records are not), inside the same
transaction, so a window counts every stored record once. The group's sketches are merged per
key in memory first, then each key's row is read, added to and written back.

Concurrency: the rows of the group's keys are first created empty (``INSERT … ON CONFLICT DO
NOTHING``, which on PostgreSQL waits for a replica inserting the same key to commit), then read
``FOR UPDATE`` in key order (replicas lock in the same order, so no deadlock), merged in Python
and updated. SQLite has a single writer (``BEGIN IMMEDIATE``), so the read-modify-write is safe there.

The reference bins come from the bundles named in the settings (there is no model registry yet),
keyed by (model name, version). Records of any other model version are counted, never an error.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.sql.schema import Table

from collector.db.models import MonitoringWindow
from collector.ingest.bulk import InferenceRows, WriteOutcome
from collector.monitoring.sketches import DEFAULT_WINDOW_S, ReferenceBins, SketchError, WindowSketch, split_by_window

log = logging.getLogger(__name__)

WINDOW_TABLE: Table = MonitoringWindow.__table__  # type: ignore[attr-defined]
# (device_id, model_name, model_version, role, window_start, window_s): the table's primary key.
WindowKey = tuple[str, str, str, str, float, float]
KEY_COLUMNS = ("device_id", "model_name", "model_version", "role", "window_start", "window_s")


def load_reference_bins(bundles: Sequence[Path], key_files: Sequence[Path]) -> dict[tuple[str, str], ReferenceBins]:
    """Reference bins of every bundle that loads with a valid signature, keyed by (model name, version).

    A bundle or key file that cannot be read or verified is logged and skipped; without any
    trusted key no bundle is loaded (an unsigned reference would decide what drift is). The
    loading is :class:`~collector.monitoring.catalog.ReferenceCatalog`'s, shared with the service.
    """
    # Imported here: the catalog imports sketches, which imports collector.ingest, which imports this module.
    from collector.monitoring.catalog import ReferenceCatalog

    return ReferenceCatalog.from_paths(bundles, key_files).bins()


@dataclass
class WindowWriter:
    """Sketches newly stored records per (device, model version, role, window) and merges them into the table."""

    bins: dict[tuple[str, str], ReferenceBins]
    window_s: float = DEFAULT_WINDOW_S

    def sketch(
        self, blocks: Sequence[InferenceRows], outcomes: Sequence[WriteOutcome], all_seqs: Sequence[np.ndarray | None]
    ) -> tuple[dict[WindowKey, WindowSketch], int]:
        """The merged sketches per key of the new rows of ``blocks``, and how many new rows could not be sketched.

        ``all_seqs[i]`` are the seqs of every block of block ``i``'s batch (seq gaps across interleaved blocks).
        """
        merged: dict[WindowKey, WindowSketch] = {}
        unsketched = 0
        for rows, outcome, seqs in zip(blocks, outcomes, all_seqs, strict=True):
            if not outcome.inserted:
                continue
            bins = self.bins.get((rows.model_name, rows.model_version))
            if bins is None:
                unsketched += outcome.inserted
                continue
            new = outcome.new
            fresh = rows if new is None or bool(new.all()) else rows.take(new)
            try:
                windows = split_by_window(bins, fresh, self.window_s, all_seqs=seqs)
            except (SketchError, ValueError) as exc:
                # Valid for storage but not for the reference (e.g. another feature count): count, go on.
                log.warning("monitoring: block of %s not sketched: %s", rows.device_id, exc)
                unsketched += outcome.inserted
                continue
            for start, s in windows.items():
                key = (rows.device_id, rows.model_name, rows.model_version, rows.role, start, float(self.window_s))
                old = merged.get(key)
                merged[key] = s if old is None else old + s
        return merged, unsketched

    def write(
        self, conn: Connection, batches: Sequence[tuple[Sequence[InferenceRows], Sequence[WriteOutcome]]]
    ) -> list[int]:
        """Merge the new rows of every batch's blocks into ``monitoring_window`` on ``conn`` (caller's transaction).

        Returns, per batch, the newly inserted records that were not sketched (unknown model version).
        """
        merged: dict[WindowKey, WindowSketch] = {}
        unsketched = []
        for blocks, outcomes in batches:
            # Seqs of the whole batch: an active block interleaved with a shadow one has no real gaps.
            seqs = np.concatenate([b.seq for b in blocks]) if len(blocks) > 1 else None
            part, missed = self.sketch(blocks, outcomes, [seqs] * len(blocks))
            unsketched.append(missed)
            for key, s in part.items():
                old = merged.get(key)
                merged[key] = s if old is None else old + s
        if merged:
            merge_into_table(conn, merged)
        return unsketched


def merge_into_table(conn: Connection, merged: dict[WindowKey, WindowSketch]) -> None:
    """Add ``merged`` to the stored windows of its keys (rows created when missing), on ``conn``."""
    keys = sorted(merged)
    now = time.time()
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    c = WINDOW_TABLE.c
    # Placeholders first, so every key has a row to lock; n = 0 marks one never merged into.
    conn.execute(
        dialect.insert(WINDOW_TABLE).on_conflict_do_nothing(index_elements=list(KEY_COLUMNS)),
        [dict(zip(KEY_COLUMNS, k, strict=True), n=0, sketch=b"", updated_at=now) for k in keys],
    )
    stored: dict[WindowKey, tuple[int, bytes]] = {}
    cols = [c[name] for name in KEY_COLUMNS]
    for lo in range(0, len(keys), 500):  # bounded IN lists
        chunk = keys[lo : lo + 500]
        stmt = sa.select(*cols, c.n, c.sketch).where(sa.tuple_(*cols).in_(chunk)).order_by(*cols)
        if conn.dialect.name == "postgresql":
            stmt = stmt.with_for_update()
        for row in conn.execute(stmt):
            key: WindowKey = (row[0], row[1], row[2], row[3], float(row[4]), float(row[5]))
            stored[key] = (int(row.n), bytes(row.sketch))
    updates = []
    for key in keys:
        total = merged[key]
        n_old, blob = stored.get(key, (0, b""))
        if n_old or blob:
            total = WindowSketch.from_bytes(blob) + total
        row_values = {f"k_{name}": v for name, v in zip(KEY_COLUMNS, key, strict=True)}
        updates.append({**row_values, "v_n": total.n, "v_sketch": total.to_bytes(), "v_at": now})
    stmt_u = (
        sa.update(WINDOW_TABLE)
        .where(*[c[name] == sa.bindparam(f"k_{name}") for name in KEY_COLUMNS])
        .values(n=sa.bindparam("v_n"), sketch=sa.bindparam("v_sketch"), updated_at=sa.bindparam("v_at"))
    )
    conn.execute(stmt_u, updates)
