"""The durable outbox: inference records in SQLite (WAL, synchronous=FULL) until the collector acks them.

Records arrive as columnar blocks (:class:`shared.codec.RecordBlock`) and are buffered in memory;
a *group commit* (at least once a second, or earlier after ``commit_max_records``) writes the
buffered blocks as *chunks*: one row per (role, model, version) holding up to
``chunk_max_records`` records as raw little-endian numpy columns in a msgpack map. Nothing is
converted to Python rows on the way in or out.

Seq numbers are monotonic per device and survive restarts. Before a seq is handed out, a
*reserved watermark* at or beyond it is committed; at open, seqs between the last committed record
and the watermark may have been handed out and lost with an uncommitted group (crash, power cut),
so they are declared as a ``crash`` gap and a ``spool_loss`` event, and numbering continues after
the watermark. Reservations are taken ``reserve_step`` seqs at a time (one extra fsync per step,
not per record), so a crash gap may also cover seqs that were reserved but never used: the
declared range is an upper bound, never an undercount. A clean close lowers the watermark, so a
clean restart declares nothing.

The spool is bounded in bytes: past ``max_bytes`` it drops its oldest chunks and declares them as
a ``spool_full`` gap and a ``spool_dropped`` event. Chunks are also bounded in bytes
(``chunk_max_bytes``) and batches in raw bytes (:data:`BATCH_MAX_BYTES`), so a batch always fits
the codec's payload and decompressed limits; a chunk that still cannot be published is split in
two, and a single record that cannot is declared as an ``oversized`` gap. If group commits keep
failing (disk full, I/O error), at most ``max_pending_records`` records wait in memory: the oldest
are dropped and declared as a ``spool_error`` gap by the next commit that succeeds (or as a crash
gap at the next open).

Gaps travel in every batch until an ``Ack`` lists them. Records are deleted only when ``Ack``s for
this spool's epoch cover them: a chunk goes once the union of the ranges acknowledged for it covers
all its seqs. A *quarantined* ``Ack`` names the envelope ``[seq_first, seq_last]`` of the payload
the collector rejected: it releases the chunks of the one in-flight batch with exactly that
envelope, nothing else (no two in-flight batches share an envelope). Re-sends after an ack timeout
back off exponentially per batch (``ack_timeout_s * 2^k``, at most :data:`MAX_BACKOFF_S`) until an
ack makes progress again.

Thread use: the main loop appends and commits, the uplink reads batches and releases acks; one
lock serialises them on a single connection. Only the agent process writes the spool;
:func:`inspect` reads one without touching it.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import msgpack
import numpy as np

from shared.codec import DEFAULT_LIMITS, Gap, RecordBlock
from shared.messages import Ack, DeviceEvent

log = logging.getLogger(__name__)

SCHEMA_VERSION: Final = 1
GAP_CRASH: Final = "crash"
GAP_SPOOL_FULL: Final = "spool_full"
GAP_OVERSIZED: Final = "oversized"
GAP_SPOOL_ERROR: Final = "spool_error"
EVENT_SPOOL_LOSS: Final = "spool_loss"
EVENT_SPOOL_DROPPED: Final = "spool_dropped"
EVENT_SPOOL_OVERSIZED: Final = "spool_oversized"
MAX_GAPS_PER_BATCH: Final = 256  # the codec accepts 1,024; the rest follow in later batches
# Raw column bytes: what a chunk holds (and, within a few hundred bytes, what it adds to a batch's
# msgpack body). zstd never grows its input by more than ~0.4 %, so 3 MiB of raw records stays
# under both the codec's 4 MiB payload limit and its 32 MiB decompressed limit.
CHUNK_MAX_BYTES: Final = 1024 * 1024
BATCH_MAX_BYTES: Final = 3 * 1024 * 1024
MAX_BACKOFF_S: Final = 600.0
MAX_PENDING_RECORDS: Final = 100_000
LOSS_COUNTERS: Final = (
    "crash_gaps",
    "crash_seqs",
    "dropped_chunks",
    "dropped_records",
    "oversized_records",
    "error_records",
)

# Columns of a block, in the codec's order; every one is stored as raw bytes with dtype and shape.
COLUMNS: Final = (
    "seq",
    "ts",
    "mono",
    "pred",
    "probs",
    "confidence",
    "calibrated",
    "features",
    "act_bits",
    "act_sample_idx",
    "act_sample",
    "coact",
    "latency_us",
    "sensor_flags",
    "label",
)
_PER_RECORD: Final = tuple(c for c in COLUMNS if c not in ("act_sample_idx", "act_sample"))

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    first_seq INTEGER NOT NULL,
    last_seq INTEGER NOT NULL,
    n INTEGER NOT NULL,
    role TEXT NOT NULL,
    model TEXT NOT NULL,
    version TEXT NOT NULL,
    hidden INTEGER NOT NULL,
    nbytes INTEGER NOT NULL,
    created REAL NOT NULL,
    data BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS chunks_first ON chunks (first_seq);
CREATE TABLE IF NOT EXISTS gaps (
    first INTEGER PRIMARY KEY,
    last INTEGER NOT NULL,
    reason TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS events (id INTEGER PRIMARY KEY AUTOINCREMENT, body TEXT NOT NULL);
"""


class SpoolError(RuntimeError):
    """A spool file that cannot be used (wrong schema, unreadable, corrupt)."""


@dataclass(frozen=True)
class ReplayCursor:
    """Where a replay stands: the file's identity and the next row to read."""

    file: str
    row: int


@dataclass
class PendingBatch:
    """Chunks (merged per block) and unacknowledged gaps ready to be published as one batch."""

    number: int
    chunk_ids: list[int]
    blocks: list[RecordBlock]
    gaps: list[Gap]
    seq_first: int
    seq_last: int

    @property
    def n_records(self) -> int:
        """Records across the blocks."""
        return sum(len(b) for b in self.blocks)


@dataclass
class SpoolStats:
    """Counters since this spool object was opened (loss counters are persisted, see :meth:`Spool.counters`)."""

    appended: int = 0
    committed: int = 0
    commits: int = 0
    released: int = 0
    acks: int = 0
    foreign_acks: int = 0
    quarantine_released: int = 0
    quarantine_unmatched: int = 0
    envelope_collisions: int = 0
    requeued_batches: int = 0
    commit_failures: int = 0
    commit_failures_in_a_row: int = 0
    pending_dropped: int = 0
    chunks_split: int = 0
    oversized_dropped: int = 0
    last_ack_at: float | None = None


@dataclass
class _Inflight:
    chunk_ids: set[int]
    gaps: set[int]
    sent_mono: float
    envelope: tuple[int, int]
    attempt: int  # ack timeouts its chunks and gaps have already had: the re-send backoff exponent
    has_records: bool


@dataclass
class _Pending:
    blocks: list[RecordBlock] = field(default_factory=list)
    records: int = 0
    since: float | None = None
    cursor: ReplayCursor | None = None


def _pack_block(block: RecordBlock) -> bytes:
    cols = {}
    for name in COLUMNS:
        arr = np.ascontiguousarray(getattr(block, name))
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        cols[name] = [arr.dtype.str, list(arr.shape), arr.tobytes()]
    return msgpack.packb({"v": 1, "cols": cols}, use_bin_type=True)


def _unpack_block(data: bytes, role: str, model: str, version: str, hidden: int) -> RecordBlock:
    doc = msgpack.unpackb(data, raw=False)
    arrays = {
        name: np.frombuffer(raw, dtype=np.dtype(d)).reshape(shape) for name, (d, shape, raw) in doc["cols"].items()
    }
    return RecordBlock(role=role, model_name=model, model_version=version, hidden_units=hidden, **arrays)


def _block_key(block: RecordBlock) -> tuple[str, str, str, int]:
    return (block.role, block.model_name, block.model_version, int(block.hidden_units))


def concat_blocks(blocks: list[RecordBlock]) -> RecordBlock:
    """Concatenate blocks of one (role, model, version) in order; sample positions are shifted."""
    if len(blocks) == 1:
        return blocks[0]
    first = blocks[0]
    offsets = np.cumsum([0] + [len(b) for b in blocks[:-1]])
    cols: dict[str, np.ndarray] = {name: np.concatenate([getattr(b, name) for b in blocks]) for name in _PER_RECORD}
    cols["act_sample_idx"] = np.concatenate(
        [b.act_sample_idx.astype(np.uint32) + np.uint32(off) for b, off in zip(blocks, offsets, strict=True)]
    )
    cols["act_sample"] = np.concatenate([b.act_sample for b in blocks])
    return RecordBlock(
        role=first.role,
        model_name=first.model_name,
        model_version=first.model_version,
        hidden_units=first.hidden_units,
        **cols,
    )


def slice_block(block: RecordBlock, start: int, stop: int) -> RecordBlock:
    """Records ``start:stop`` of a block (sampled activations follow their records)."""
    cols: dict[str, np.ndarray] = {name: getattr(block, name)[start:stop] for name in _PER_RECORD}
    idx = block.act_sample_idx
    keep = (idx >= start) & (idx < stop)
    cols["act_sample_idx"] = (idx[keep] - start).astype(np.uint32)
    cols["act_sample"] = block.act_sample[keep]
    return RecordBlock(
        role=block.role,
        model_name=block.model_name,
        model_version=block.model_version,
        hidden_units=block.hidden_units,
        **cols,
    )


def merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted union of inclusive integer ranges (adjacent ranges join)."""
    out: list[tuple[int, int]] = []
    for a, b in sorted((int(a), int(b)) for a, b in ranges if a <= b):
        if out and a <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


class Spool:
    """A durable, bounded outbox of inference records keyed by a persistent seq."""

    def __init__(
        self,
        path: Path | str,
        *,
        max_bytes: int,
        commit_interval_s: float = 1.0,
        commit_max_records: int = 1000,
        chunk_max_records: int = 500,
        reserve_step: int = 100,
        max_blocks_per_batch: int = DEFAULT_LIMITS.max_blocks,
        chunk_max_bytes: int = CHUNK_MAX_BYTES,
        max_pending_records: int = MAX_PENDING_RECORDS,
    ) -> None:
        if not 0 < commit_interval_s <= 1.0:
            raise ValueError("commit_interval_s must be in (0, 1]")
        if commit_max_records < 1 or chunk_max_records < 1 or reserve_step < 1:
            raise ValueError("commit_max_records, chunk_max_records and reserve_step must be positive")
        if chunk_max_records > DEFAULT_LIMITS.max_records:
            raise ValueError(f"chunk_max_records must be <= {DEFAULT_LIMITS.max_records} (one batch)")
        if not 0 < chunk_max_bytes <= BATCH_MAX_BYTES:
            raise ValueError(f"chunk_max_bytes must be in (0, {BATCH_MAX_BYTES}] (one batch)")
        if max_pending_records < commit_max_records:
            raise ValueError("max_pending_records must be >= commit_max_records")
        self.path = Path(path)
        self.max_bytes = int(max_bytes)
        self.commit_interval_s = commit_interval_s
        self.commit_max_records = commit_max_records
        self.chunk_max_records = chunk_max_records
        self.reserve_step = reserve_step
        self.max_blocks_per_batch = max_blocks_per_batch
        self.chunk_max_bytes = chunk_max_bytes
        self.max_pending_records = max_pending_records
        self.stats = SpoolStats()
        self._lock = threading.RLock()
        self._pending = _Pending()
        self._inflight: dict[int, _Inflight] = {}
        self._resend: list[int] = []  # chunk ids to send again, sorted
        self._send_cursor = 0  # highest chunk id handed out at least once in this session
        self._created_mono: dict[int, float] = {}  # chunk id -> commit time, for chunks committed this session
        self._gap_sent: set[int] = set()  # first seq of gaps currently in an unacknowledged batch
        self._acked: dict[int, list[tuple[int, int]]] = {}  # chunk id -> seqs acknowledged so far (partly)
        self._attempts: dict[int, int] = {}  # chunk id -> ack timeouts in a row, for the re-send backoff
        self._gap_attempts: dict[int, int] = {}  # gap first seq -> ack timeouts in a row
        self._lost_pending: list[tuple[int, int]] = []  # seqs dropped from memory, declared by the next commit
        self._commit_retry_at = -1e18  # after a failed commit, maybe_commit waits until then
        self._batch_no = 0
        self._closed = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
        except sqlite3.Error as exc:
            raise SpoolError(f"{self.path}: cannot open: {exc}") from None
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA busy_timeout=30000")
            with self._tx():
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        self._db.execute(statement)
                self._open_meta()
            row = self._db.execute("SELECT COALESCE(SUM(nbytes), 0), COALESCE(SUM(n), 0) FROM chunks").fetchone()
        except BaseException as exc:
            # A long-lived caller may retry: do not leak the connection (and its file descriptors).
            self._db.close()
            if isinstance(exc, sqlite3.DatabaseError):
                raise SpoolError(f"{self.path}: not a usable spool: {exc}") from None
            raise
        self._bytes, self._depth = int(row[0]), int(row[1])
        log.info(
            "spool %s open: epoch %s, next seq %d, %d records (%d bytes) waiting",
            self.path,
            self.epoch,
            self._next_seq,
            self._depth,
            self._bytes,
        )

    # ------------------------------------------------------------------------------ internals

    @contextlib.contextmanager
    def _tx(self) -> Iterator[None]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
                self._db.execute("COMMIT")
            except BaseException:
                # SQLite rolls back by itself on some errors (SQLITE_FULL, I/O errors): a second
                # ROLLBACK would raise and hide the real error. A failed COMMIT leaves it open.
                if self._db.in_transaction:
                    try:
                        self._db.execute("ROLLBACK")
                    except sqlite3.Error as exc:
                        log.error("spool rollback failed: %s", exc)
                raise

    @contextlib.contextmanager
    def _recounting(self) -> Iterator[None]:
        """Re-read the byte and record counters if the block fails (its transaction rolled back)."""
        try:
            yield
        except BaseException:
            self._recount()
            raise

    def _meta_get(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def _meta_set(self, key: str, value: object) -> None:
        self._db.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, str(value)),
        )

    def _count(self, key: str, amount: int) -> None:
        self._meta_set(key, int(self._meta_get(key) or 0) + amount)

    def _open_meta(self) -> None:
        version = self._meta_get("schema_version")
        if version is None:
            self.epoch = uuid.uuid4().hex
            self._meta_set("schema_version", SCHEMA_VERSION)
            self._meta_set("epoch", self.epoch)
            self._meta_set("next_seq", 0)
            self._meta_set("reserved", -1)
            self._meta_set("created", time.time())
            self._next_seq, self._reserved = 0, -1
            return
        if int(version) != SCHEMA_VERSION:
            raise SpoolError(f"{self.path}: spool schema {version}, this agent reads {SCHEMA_VERSION}")
        self.epoch = self._meta_get("epoch") or ""
        self._next_seq = int(self._meta_get("next_seq") or 0)
        self._reserved = int(self._meta_get("reserved") or -1)
        if self._reserved >= self._next_seq:
            first, last = self._next_seq, self._reserved
            log.warning(
                "spool %s: seq %d-%d were handed out but never committed (crash); declaring them",
                self.path,
                first,
                last,
            )
            self._declare_loss(
                EVENT_SPOOL_LOSS,
                GAP_CRASH,
                [(first, last)],
                last - first + 1,
                f"seq {first}-{last} lost with an uncommitted group (crash or power cut)",
            )
            self._count("crash_gaps", 1)
            self._count("crash_seqs", last - first + 1)
            self._next_seq = last + 1
            self._meta_set("next_seq", self._next_seq)

    def _add_gap(self, first: int, last: int, reason: str) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO gaps (first, last, reason, created) VALUES (?, ?, ?, ?)",
            (first, last, reason, time.time()),
        )

    def _declare_loss(self, kind: str, reason: str, ranges: list[tuple[int, int]], records: int, message: str) -> None:
        """Record ``ranges`` as gaps of ``reason`` and queue one event saying so (every kind of loss alike)."""
        for first, last in ranges:
            self._add_gap(first, last, reason)
        data = {
            "first": ranges[0][0],
            "last": ranges[-1][1],
            "ranges": [list(r) for r in ranges],
            "records": records,
            "reason": reason,
        }
        self._queue_event(kind, message, data)

    def _queue_event(self, kind: str, message: str, data: dict[str, Any]) -> None:
        event = DeviceEvent(kind=kind, ts=time.time(), message=message, data=data)
        self._db.execute("INSERT INTO events (body) VALUES (?)", (event.model_dump_json(),))

    # ----------------------------------------------------------------------------- producer

    @property
    def next_seq(self) -> int:
        """The seq the next appended record gets."""
        return self._next_seq

    def append(self, block: RecordBlock, *, cursor: ReplayCursor | None = None) -> np.ndarray:
        """Buffer ``block``, assigning its ``seq`` column in place; return the seqs.

        ``cursor`` (replay) is stored in the same transaction as the group holding this block.
        """
        n = len(block)
        with self._lock:
            if self._closed:
                raise SpoolError("spool is closed")
            first = self._next_seq
            last = first + n - 1
            if n and last > self._reserved:
                # Persist the reservation before any seq beyond the old watermark leaves this method.
                reserve = max(last, self._reserved + self.reserve_step)
                with self._tx():
                    self._meta_set("reserved", reserve)
                self._reserved = reserve
            block.seq = np.arange(first, first + n, dtype=np.uint64)
            self._next_seq = first + n
            if n:
                self._pending.blocks.append(block)
                self._pending.records += n
                if self._pending.since is None:
                    self._pending.since = time.monotonic()
            if cursor is not None:
                self._pending.cursor = cursor
            self.stats.appended += n
            return block.seq

    def pending_records(self) -> int:
        """Records buffered and not yet committed."""
        return self._pending.records

    def maybe_commit(self, now: float | None = None) -> int:
        """Commit the buffered group if it is old enough or big enough; return records committed.

        After a failed commit the next attempt waits ``commit_interval_s``, so a failing disk is
        not hammered on every tick (the caller counts the failures this raises).
        """
        now = time.monotonic() if now is None else now
        p = self._pending
        if now < self._commit_retry_at:
            return 0
        if (
            p.records >= self.commit_max_records
            or (p.since is not None and now - p.since >= self.commit_interval_s)
            or (p.records == 0 and p.cursor is not None)
            or self._lost_pending
        ):
            return self.commit()
        return 0

    def commit(self) -> int:
        """Write the buffered group (and the replay cursor) in one durable transaction.

        On failure the group stays buffered for the next attempt and the error is raised; past
        ``max_pending_records`` buffered records the oldest are dropped, and the next commit that
        succeeds declares them as a ``spool_error`` gap (a restart declares them as a crash gap).
        """
        with self._lock:
            pending, self._pending = self._pending, _Pending()
            lost = merge_ranges(self._lost_pending)
            if not pending.blocks and pending.cursor is None and not lost:
                return 0
            groups: dict[tuple[str, str, str, int], list[RecordBlock]] = {}
            for block in pending.blocks:
                groups.setdefault(_block_key(block), []).append(block)
            now_wall, now_mono = time.time(), time.monotonic()
            new_ids: list[int] = []
            dropped: list[int] = []
            try:
                with self._tx():
                    for key, blocks in groups.items():
                        for part, data in self._chunk_parts(concat_blocks(blocks)):
                            new_ids.append(self._insert_chunk(part, key, data, now_wall))
                    if lost:
                        self._declare_lost_pending(lost)
                    self._meta_set("next_seq", self._next_seq)
                    if pending.cursor is not None:
                        self._meta_set("cursor", json.dumps({"file": pending.cursor.file, "row": pending.cursor.row}))
                    if self._bytes > self.max_bytes:
                        dropped = self._drop_oldest()
            except BaseException:
                self._restore_pending(pending)
                self._recount()
                self.stats.commit_failures += 1
                self.stats.commit_failures_in_a_row += 1
                self._commit_retry_at = time.monotonic() + self.commit_interval_s
                raise
            # In-memory state follows the database only once the transaction is durable.
            self._lost_pending = []
            self._commit_retry_at = -1e18
            self.stats.commit_failures_in_a_row = 0
            for cid in new_ids:
                self._created_mono[cid] = now_mono
            self._forget_chunks(set(dropped))
            self.stats.committed += pending.records
            self.stats.commits += 1
            return pending.records

    def _chunk_parts(self, block: RecordBlock) -> Iterator[tuple[RecordBlock, bytes]]:
        """Consecutive slices of ``block`` packed as chunks of at most ``chunk_max_records`` and ``chunk_max_bytes``."""
        n = len(block)
        per_record = max(1, sum(np.asarray(getattr(block, c)).nbytes for c in COLUMNS) // max(1, n))
        step = max(1, min(self.chunk_max_records, self.chunk_max_bytes * 9 // 10 // per_record))
        todo = [(a, min(a + step, n)) for a in range(0, n, step)][::-1]
        while todo:
            a, b = todo.pop()
            part = slice_block(block, a, b)
            data = _pack_block(part)
            if len(data) > self.chunk_max_bytes and b - a > 1:
                # Sampled activations are not spread evenly: halve until it fits.
                mid = (a + b) // 2
                todo += [(mid, b), (a, mid)]
                continue
            yield part, data

    def _insert_chunk(self, part: RecordBlock, key: tuple[str, str, str, int], data: bytes, created: float) -> int:
        cur = self._db.execute(
            "INSERT INTO chunks (first_seq, last_seq, n, role, model, version, hidden, nbytes, created, data)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (int(part.seq[0]), int(part.seq[-1]), len(part), *key, len(data), created, data),
        )
        self._bytes += len(data)
        self._depth += len(part)
        return int(cur.lastrowid or 0)

    def _restore_pending(self, pending: _Pending) -> None:
        """Put a group whose commit failed back in front of the buffer, within ``max_pending_records``."""
        p = self._pending
        p.blocks[:0] = pending.blocks
        p.records += pending.records
        p.since = pending.since if pending.since is not None else p.since
        p.cursor = p.cursor or pending.cursor
        dropped = 0
        while p.records > self.max_pending_records and p.blocks:
            block = p.blocks.pop(0)
            p.records -= len(block)
            dropped += len(block)
            self._lost_pending.append((int(block.seq[0]), int(block.seq[-1])))
        if dropped:
            self.stats.pending_dropped += dropped
            log.error(
                "spool commits keep failing: dropped %d buffered records (over %d in memory); they will be declared",
                dropped,
                self.max_pending_records,
            )

    def _declare_lost_pending(self, lost: list[tuple[int, int]]) -> None:
        records = sum(b - a + 1 for a, b in lost)
        self._declare_loss(
            EVENT_SPOOL_LOSS,
            GAP_SPOOL_ERROR,
            lost,
            records,
            f"{records} records dropped from memory while spool commits were failing",
        )
        self._count("error_records", records)

    def _recount(self) -> None:
        row = self._db.execute("SELECT COALESCE(SUM(nbytes), 0), COALESCE(SUM(n), 0) FROM chunks").fetchone()
        self._bytes, self._depth = int(row[0]), int(row[1])

    def _drop_oldest(self) -> list[int]:
        """Delete the oldest chunks until under ``max_bytes`` and declare them; return their ids.

        Runs inside the commit's transaction: the caller forgets the ids in memory after COMMIT.
        """
        dropped: list[tuple[int, int, int, int]] = []
        while self._bytes > self.max_bytes:
            row = self._db.execute(
                "SELECT id, first_seq, last_seq, n, nbytes FROM chunks ORDER BY id LIMIT 1"
            ).fetchone()
            if row is None:
                break
            cid, first, last, n, nbytes = (int(x) for x in row)
            self._db.execute("DELETE FROM chunks WHERE id = ?", (cid,))
            self._bytes -= nbytes
            self._depth -= n
            dropped.append((cid, first, last, n))
        if not dropped:
            return []
        ranges = merge_ranges([(f, la) for _c, f, la, _n in dropped])
        records = sum(n for *_x, n in dropped)
        self._declare_loss(
            EVENT_SPOOL_DROPPED,
            GAP_SPOOL_FULL,
            ranges,
            records,
            f"spool over {self.max_bytes} bytes: dropped {records} oldest records",
        )
        self._count("dropped_chunks", len(dropped))
        self._count("dropped_records", records)
        log.warning("spool full: dropped %d oldest records %s", records, ranges)
        return [c for c, *_x in dropped]

    def _forget_chunks(self, gone: set[int]) -> None:
        """Drop deleted chunks from the in-memory bookkeeping (call under the lock, after COMMIT)."""
        if not gone:
            return
        for cid in gone:
            self._created_mono.pop(cid, None)
            self._acked.pop(cid, None)
            self._attempts.pop(cid, None)
        for no in list(self._inflight):
            batch = self._inflight[no]
            batch.chunk_ids.difference_update(gone)
            if not batch.chunk_ids and not batch.gaps:
                del self._inflight[no]

    def flush(self) -> int:
        """Commit whatever is buffered (on stop)."""
        return self.commit()

    def cursor(self) -> ReplayCursor | None:
        """The replay cursor committed with the last group, if any."""
        with self._lock:
            raw = self._meta_get("cursor")
        if raw is None:
            return None
        doc = json.loads(raw)
        return ReplayCursor(str(doc["file"]), int(doc["row"]))

    def clear_cursor(self) -> None:
        """Forget the replay cursor (a replay of a different file starts)."""
        with self._tx():
            self._db.execute("DELETE FROM meta WHERE key = 'cursor'")

    def close(self) -> None:
        """Flush, lower the reservation watermark (clean stop: no crash gap next time) and close.

        If the final commit fails, the watermark stays up, so the next open declares what was lost.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self.flush()
                with self._tx():
                    self._meta_set("reserved", self._next_seq - 1)
                self._reserved = self._next_seq - 1
            except sqlite3.Error as exc:
                log.error("spool %s: final commit failed (%s); the next start declares what was lost", self.path, exc)
            finally:
                self._db.close()

    # ------------------------------------------------------------------------------- uplink

    def ready(self, max_records: int, max_age_s: float, now: float | None = None) -> bool:
        """Whether a batch is due: enough unsent records, an old one, a re-send, or an unsent gap."""
        now = time.monotonic() if now is None else now
        with self._lock:
            if self._resend:
                return True
            row = self._db.execute(
                "SELECT MIN(id), COALESCE(SUM(n), 0) FROM chunks WHERE id > ?", (self._send_cursor,)
            ).fetchone()
            oldest, unsent = row[0], int(row[1])
            if unsent >= max_records:
                return True
            if oldest is not None and now - self._created_mono.get(int(oldest), -1e18) >= max_age_s:
                return True
            return any(g not in self._gap_sent for g in self._gap_firsts())

    def _gap_firsts(self) -> list[int]:
        return [int(r[0]) for r in self._db.execute("SELECT first FROM gaps ORDER BY first")]

    def next_batch(self, max_records: int) -> PendingBatch | None:
        """The next batch to publish: re-sends first, then unsent chunks, oldest first, plus open gaps.

        At most ``max_records`` records and :data:`BATCH_MAX_BYTES` raw bytes (one chunk at least).
        The envelope ``[seq_first, seq_last]`` spans the records and the gaps; it is never the
        envelope of another batch in flight, because a quarantined ``Ack`` names a batch by it.
        """
        with self._lock:
            rows = self._take_chunks(max_records)
            gap_rows = self._db.execute(
                "SELECT first, last, reason FROM gaps ORDER BY first LIMIT ?", (MAX_GAPS_PER_BATCH,)
            ).fetchall()
            gaps = [Gap(int(a), int(b), str(r)) for a, b, r in gap_rows]
            if not rows and not [g for g in gaps if g.first not in self._gap_sent]:
                return None
            groups: dict[tuple[str, str, str, int], list[RecordBlock]] = {}
            for _cid, role, model, version, hidden, data in rows:
                block = _unpack_block(data, role, model, version, hidden)
                groups.setdefault((role, model, version, hidden), []).append(block)
            blocks = [concat_blocks(bs) for bs in groups.values()]
            record_bounds = [int(b.seq[0]) for b in blocks] + [int(b.seq[-1]) for b in blocks]
            taken = {b.envelope for b in self._inflight.values()}
            envelope = _envelope(record_bounds + [g.first for g in gaps] + [g.last for g in gaps])
            if envelope in taken and record_bounds:
                # Open gaps stretch every envelope (e.g. one below and one above all records): this
                # batch leaves them to the batch already carrying them.
                gaps, envelope = [], _envelope(record_bounds)
            if envelope in taken:
                # Only when declared gaps overlap records (drop-oldest of interleaved blocks): wait
                # for the other batch's ack or timeout rather than make a quarantine ambiguous.
                self.stats.envelope_collisions += 1
                self._requeue_chunks([int(r[0]) for r in rows])
                log.debug("batch envelope %s is in flight already; holding %d chunks back", envelope, len(rows))
                return None
            self._batch_no += 1
            return PendingBatch(
                number=self._batch_no,
                chunk_ids=[int(r[0]) for r in rows],
                blocks=blocks,
                gaps=gaps,
                seq_first=envelope[0],
                seq_last=envelope[1],
            )

    def _take_chunks(self, max_records: int) -> list[tuple[Any, ...]]:
        select = "SELECT id, role, model, version, hidden, data, n, nbytes FROM chunks WHERE "
        rows: list[tuple[Any, ...]] = []
        keys: set[tuple[str, str, str, int]] = set()
        total = 0
        total_bytes = 0

        def fits(row: tuple[Any, ...]) -> bool:
            key = (row[1], row[2], row[3], int(row[4]))
            n, nbytes = int(row[6]), int(row[7])
            if rows and (
                total + n > max_records
                or total_bytes + nbytes > BATCH_MAX_BYTES
                or (key not in keys and len(keys) >= self.max_blocks_per_batch)
            ):
                return False
            keys.add(key)
            return True

        while self._resend:
            cid = self._resend[0]
            row = self._db.execute(select + "id = ?", (cid,)).fetchone()
            if row is None:  # released or dropped meanwhile
                self._resend.pop(0)
                continue
            if not fits(row):
                break
            self._resend.pop(0)
            rows.append(row)
            total += int(row[6])
            total_bytes += int(row[7])
        if rows:
            return [r[:6] for r in rows]
        for row in self._db.execute(select + "id > ? ORDER BY id LIMIT 256", (self._send_cursor,)):
            if not fits(row):
                break
            rows.append(row)
            total += int(row[6])
            total_bytes += int(row[7])
        if rows:
            self._send_cursor = max(self._send_cursor, max(int(r[0]) for r in rows))
            for r in rows:
                self._created_mono.pop(int(r[0]), None)
        return [r[:6] for r in rows]

    def mark_sent(self, batch: PendingBatch, now: float | None = None) -> None:
        """Record that ``batch`` is being published and waits for its ack (call before publishing)."""
        with self._lock:
            gaps = {g.first for g in batch.gaps}
            attempt = max(
                [self._attempts.get(c, 0) for c in batch.chunk_ids] + [self._gap_attempts.get(g, 0) for g in gaps],
                default=0,
            )
            self._inflight[batch.number] = _Inflight(
                set(batch.chunk_ids),
                gaps,
                time.monotonic() if now is None else now,
                (batch.seq_first, batch.seq_last),
                attempt,
                bool(batch.chunk_ids),
            )
            self._gap_sent.update(gaps)

    def unsend(self, batch: PendingBatch) -> None:
        """Put a batch that could not be published back in line (before anything newer)."""
        with self._lock:
            self._inflight.pop(batch.number, None)
            self._requeue_chunks(batch.chunk_ids)
            self._gap_sent.difference_update(g.first for g in batch.gaps)

    def _requeue_chunks(self, chunk_ids: list[int] | set[int]) -> None:
        for cid in chunk_ids:
            pos = bisect.bisect_left(self._resend, cid)
            if pos == len(self._resend) or self._resend[pos] != cid:
                self._resend.insert(pos, cid)

    def inflight(self) -> int:
        """Batches published and not yet acknowledged."""
        return len(self._inflight)

    def requeue_unacked(
        self, older_than: float, now: float | None = None, *, max_backoff_s: float = MAX_BACKOFF_S
    ) -> int:
        """Queue again every batch not acknowledged in time; return how many.

        A batch's time is ``older_than * 2^k`` (at most ``max_backoff_s``), where ``k`` counts the
        ack timeouts its chunks have had in a row: a collector that is down is not flooded. Any
        ack that releases something resets ``k``.
        """
        now = time.monotonic() if now is None else now
        with self._lock:
            stale = [
                no
                for no, b in self._inflight.items()
                if now - b.sent_mono >= _backoff(older_than, b.attempt, max_backoff_s)
            ]
            for no in stale:
                batch = self._inflight.pop(no)
                self._requeue_chunks(batch.chunk_ids)
                self._gap_sent.difference_update(batch.gaps)
                if older_than > float("-inf"):
                    for cid in batch.chunk_ids:
                        self._attempts[cid] = batch.attempt + 1
                    for first in batch.gaps:
                        self._gap_attempts[first] = batch.attempt + 1
            self.stats.requeued_batches += len(stale)
            return len(stale)

    def requeue_all(self) -> int:
        """Queue again everything in flight at once (after a reconnect), without backing off."""
        return self.requeue_unacked(older_than=float("-inf"))

    def release(self, ack: Ack) -> int:
        """Apply an ``Ack``; return records released.

        A normal ack lists seqs the collector settled: a chunk is deleted once the ranges of all
        acks received for it cover every one of its seqs. A quarantined ack is handled by
        :meth:`release_quarantined`.
        """
        if ack.spool_epoch != self.epoch:
            self.stats.foreign_acks += 1
            log.warning("ack for spool epoch %s ignored (this spool is %s)", ack.spool_epoch, self.epoch)
            return 0
        if ack.quarantined:
            return self.release_quarantined(ack) or 0
        ranges = merge_ranges(list(ack.ranges))
        with self._lock:
            released = 0
            deleted: set[int] = set()
            partial: dict[int, list[tuple[int, int]]] = {}
            gone_gaps: set[int] = set()
            with self._recounting(), self._tx():
                touched: dict[int, tuple[int, ...]] = {}
                for a, b in ranges:
                    for row in self._db.execute(
                        "SELECT id, first_seq, last_seq, n, nbytes FROM chunks WHERE last_seq >= ? AND first_seq <= ?",
                        (a, b),
                    ):
                        touched[int(row[0])] = tuple(int(x) for x in row)
                for cid, (_id, first, last, n, nbytes) in sorted(touched.items()):
                    clipped = [(max(a, first), min(b, last)) for a, b in ranges if a <= last and b >= first]
                    acked = merge_ranges(self._acked.get(cid, []) + clipped)
                    if not (acked == [(first, last)] or (n < last - first + 1 and self._chunk_covered(cid, acked))):
                        partial[cid] = acked
                        continue
                    self._db.execute("DELETE FROM chunks WHERE id = ?", (cid,))
                    deleted.add(cid)
                    released += n
                    self._bytes -= nbytes
                    self._depth -= n
                for a, b in merge_ranges(list(ack.gaps)):
                    for (first,) in self._db.execute(
                        "SELECT first FROM gaps WHERE first >= ? AND last <= ?", (a, b)
                    ).fetchall():
                        gone_gaps.add(int(first))
                    self._db.execute("DELETE FROM gaps WHERE first >= ? AND last <= ?", (a, b))
            self._acked.update(partial)
            self._settled(deleted, gone_gaps)
            self.stats.released += released
            self.stats.acks += 1
            self.stats.last_ack_at = time.time()
            return released

    def _chunk_covered(self, cid: int, ranges: list[tuple[int, int]]) -> bool:
        # A chunk interleaved with another block has holes: check its actual seqs.
        row = self._db.execute("SELECT role, model, version, hidden, data FROM chunks WHERE id = ?", (cid,)).fetchone()
        role, model, version, hidden, data = row
        seq = _unpack_block(data, role, model, version, hidden).seq.astype(np.int64)
        return _covered(seq, ranges)

    def release_quarantined(self, ack: Ack) -> int | None:
        """Release the in-flight batch a quarantined ``Ack`` names by its envelope; None if none matches.

        Never deletes by range: the envelope spans open gaps, so it may cover chunks of other
        batches. The batch's gaps stay (they travel in the next batch) unless it held only gaps.
        """
        if ack.spool_epoch != self.epoch:
            self.stats.foreign_acks += 1
            return None
        with self._lock:
            matches = [no for no, b in self._inflight.items() if len(ack.ranges) == 1 and b.envelope == ack.ranges[0]]
            if len(matches) != 1:
                self.stats.quarantine_unmatched += 1
                log.warning(
                    "quarantined ack %s (%s) names no batch in flight: nothing released", ack.ranges, ack.reason
                )
                return None
            batch = self._inflight[matches[0]]
            chunk_ids = sorted(batch.chunk_ids)
            gaps = set() if batch.has_records else set(batch.gaps)
            released = 0
            deleted: set[int] = set()
            with self._recounting(), self._tx():
                for cid in chunk_ids:
                    row = self._db.execute("SELECT n, nbytes FROM chunks WHERE id = ?", (cid,)).fetchone()
                    if row is None:
                        continue
                    self._db.execute("DELETE FROM chunks WHERE id = ?", (cid,))
                    deleted.add(cid)
                    released += int(row[0])
                    self._bytes -= int(row[1])
                    self._depth -= int(row[0])
                for first in gaps:
                    self._db.execute("DELETE FROM gaps WHERE first = ?", (first,))
            del self._inflight[matches[0]]
            self._settled(deleted, gaps)
            self.stats.released += released
            self.stats.quarantine_released += released
            self.stats.acks += 1
            self.stats.last_ack_at = time.time()
            return released

    def _settled(self, deleted: set[int], gone_gaps: set[int]) -> None:
        """Forget what an ack released (under the lock, after COMMIT); progress resets the backoff."""
        self._forget_chunks(deleted)
        self._gap_sent.difference_update(gone_gaps)
        for first in gone_gaps:
            self._gap_attempts.pop(first, None)
        for no in list(self._inflight):
            batch = self._inflight[no]
            batch.gaps.difference_update(gone_gaps)
            if not batch.chunk_ids and not batch.gaps:
                del self._inflight[no]
        if deleted or gone_gaps:
            self._attempts.clear()
            self._gap_attempts.clear()
            for batch in self._inflight.values():
                batch.attempt = 0

    def split_chunk(self, chunk_id: int) -> int:
        """Rewrite a chunk too big to publish as two halves; return the records still stored.

        A chunk of one record cannot be split: it is deleted and declared as an ``oversized`` gap
        (and a ``spool_oversized`` event), so it is not lost silently.
        """
        with self._lock:
            row = self._db.execute(
                "SELECT first_seq, last_seq, n, nbytes, role, model, version, hidden, data, created FROM chunks"
                " WHERE id = ?",
                (chunk_id,),
            ).fetchone()
            if row is None:
                return 0
            first, last, n, nbytes, role, model, version, hidden, data, created = row
            key = (str(role), str(model), str(version), int(hidden))
            with self._recounting(), self._tx():
                if n > 1:
                    block = _unpack_block(data, *key)
                    mid = n // 2
                    head, tail = slice_block(block, 0, mid), slice_block(block, mid, n)
                    head_data = _pack_block(head)
                    self._db.execute(
                        "UPDATE chunks SET last_seq = ?, n = ?, nbytes = ?, data = ? WHERE id = ?",
                        (int(head.seq[-1]), len(head), len(head_data), head_data, chunk_id),
                    )
                    self._bytes += len(head_data) - int(nbytes)
                    self._depth -= len(tail)
                    self._insert_chunk(tail, key, _pack_block(tail), float(created))
                else:
                    self._db.execute("DELETE FROM chunks WHERE id = ?", (chunk_id,))
                    self._bytes -= int(nbytes)
                    self._depth -= int(n)
                    self._declare_loss(
                        EVENT_SPOOL_OVERSIZED,
                        GAP_OVERSIZED,
                        [(int(first), int(last))],
                        int(n),
                        f"record seq {first} is {nbytes} bytes: too big for any batch, dropped",
                    )
                    self._count("oversized_records", int(n))
            if n > 1:
                self._acked.pop(chunk_id, None)
                self.stats.chunks_split += 1
                log.warning("chunk %d (%d records, %d bytes) too big to publish: split in two", chunk_id, n, nbytes)
                return int(n)
            self._forget_chunks({chunk_id})
            self.stats.oversized_dropped += int(n)
            log.error("record seq %d (%d bytes) too big for any batch: dropped and declared", first, nbytes)
            return 0

    # ------------------------------------------------------------------------------ events

    def queue_event(self, event: DeviceEvent) -> None:
        """Add an event to the durable outbox."""
        with self._tx():
            self._db.execute("INSERT INTO events (body) VALUES (?)", (event.model_dump_json(),))

    def pending_events(self, limit: int = 100) -> list[tuple[int, DeviceEvent]]:
        """Events waiting for publication, oldest first."""
        with self._lock:
            rows = self._db.execute("SELECT id, body FROM events ORDER BY id LIMIT ?", (limit,)).fetchall()
        return [(int(i), DeviceEvent.model_validate_json(body)) for i, body in rows]

    def event_published(self, event_id: int) -> None:
        """Remove an event the broker has accepted."""
        with self._tx():
            self._db.execute("DELETE FROM events WHERE id = ?", (event_id,))

    # ------------------------------------------------------------------------------- stats

    def depth(self) -> int:
        """Records stored (committed, not yet acknowledged)."""
        return self._depth

    def bytes(self) -> int:
        """Bytes of stored records."""
        return self._bytes

    def gaps(self) -> list[Gap]:
        """Gaps not yet acknowledged."""
        with self._lock:
            rows = self._db.execute("SELECT first, last, reason FROM gaps ORDER BY first").fetchall()
        return [Gap(int(a), int(b), str(r)) for a, b, r in rows]

    def counters(self) -> dict[str, int]:
        """Persisted loss counters: crash gaps and seqs, dropped chunks and records, oversized and error records."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT key, value FROM meta WHERE key IN ({', '.join('?' * len(LOSS_COUNTERS))})", LOSS_COUNTERS
            ).fetchall()
        out = dict.fromkeys(LOSS_COUNTERS, 0)
        out.update({str(k): int(v) for k, v in rows})
        return out

    def empty(self) -> bool:
        """Nothing buffered, stored, undeclared or unpublished: everything is acknowledged."""
        with self._lock:
            if self._pending.records or self._depth:
                return False
            row = self._db.execute(
                "SELECT (SELECT COUNT(*) FROM gaps) + (SELECT COUNT(*) FROM events) + (SELECT COUNT(*) FROM chunks)"
            ).fetchone()
            return int(row[0]) == 0


def _envelope(bounds: list[int]) -> tuple[int, int]:
    return (min(bounds), max(bounds))


def _backoff(base: float, attempt: int, cap: float) -> float:
    """``base * 2^attempt``, at most ``cap`` (never below ``base``)."""
    return min(base * 2.0 ** min(attempt, 32), max(base, cap))


def _covered(seq: np.ndarray, ranges: list[tuple[int, int]]) -> bool:
    starts = np.array([a for a, _b in ranges], np.int64)
    ends = np.array([b for _a, b in ranges], np.int64)
    pos = np.searchsorted(starts, seq, side="right") - 1
    return bool(((pos >= 0) & (seq <= ends[np.clip(pos, 0, None)])).all())


def inspect(path: Path | str) -> dict[str, Any]:
    """Read a spool's epoch, depth, bytes, gaps and counters without modifying it."""
    path = Path(path)
    if not path.exists():
        raise SpoolError(f"{path}: no spool here")
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)
    except sqlite3.Error as exc:
        raise SpoolError(f"{path}: cannot open: {exc}") from None
    try:
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        n, nbytes, chunks = db.execute(
            "SELECT COALESCE(SUM(n), 0), COALESCE(SUM(nbytes), 0), COUNT(*) FROM chunks"
        ).fetchone()
        gaps = [list(r) for r in db.execute("SELECT first, last, reason FROM gaps ORDER BY first")]
        events = int(db.execute("SELECT COUNT(*) FROM events").fetchone()[0])
    except sqlite3.Error as exc:
        raise SpoolError(f"{path}: not a spool: {exc}") from None
    finally:
        db.close()
    return {
        "epoch": meta.get("epoch"),
        "next_seq": int(meta.get("next_seq", 0)),
        "depth": int(n),
        "bytes": int(nbytes),
        "chunks": int(chunks),
        "gaps": gaps,
        "events_pending": events,
        "cursor": json.loads(meta["cursor"]) if "cursor" in meta else None,
        "counters": {k: int(meta.get(k, 0)) for k in LOSS_COUNTERS},
    }
