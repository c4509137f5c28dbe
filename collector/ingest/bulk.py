"""Idempotent bulk writers of inference records: SQLite ``executemany`` and PostgreSQL binary COPY.

Both take the records of one ingest transaction as columnar blocks (:class:`InferenceRows`,
one per record block of a batch) and return, per block, how many rows were new, how many were
already stored with the same content (duplicates: a re-sent batch) and which ``seq`` were already
stored with *different* content (conflicts: a reused seq; the first version is kept).

PostgreSQL: COPY has no ``ON CONFLICT``, so rows go by binary COPY into a temporary staging
table, then ``INSERT … SELECT … ON CONFLICT DO NOTHING`` into ``inference``. When its row count
shows that some rows were already stored (rare: a re-sent batch), the insert is undone to a
savepoint and redone with ``RETURNING`` to learn which; only those rows come back to Python and
only they are compared by digest. The COPY stream is laid out by numpy: all rows of a block have
the same field sizes, so one structured dtype (field count, then length and big-endian value of
every field) describes a whole run of tuples and ``tobytes()`` produces the stream without a
Python loop per row.

SQLite: one ``executemany`` of ``INSERT … ON CONFLICT DO NOTHING``. New rows get rowids above the
table's largest rowid before the insert (SQLite allocates max(rowid)+1, and no other writer can
commit inside this transaction), so when fewer rows were inserted than sent, the stored rows with
a rowid at or below that mark are the ones that already existed.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sqlalchemy.engine import Connection

from shared.codec import NO_LABEL, Batch, RecordBlock, record_digests

# Column order of the writers (and of the PostgreSQL staging table after its leading ``ord``).
INFERENCE_COLUMNS: tuple[str, ...] = (
    "device_id",
    "spool_epoch",
    "seq",
    "role",
    "model_name",
    "model_version",
    "ts",
    "ts_corrected",
    "received_at",
    "pred",
    "label",
    "confidence",
    "calibrated",
    "probs",
    "features",
    "features_dtype",
    "act_bits",
    "act_sample",
    "coact",
    "latency_us",
    "sensor_flags",
    "digest",
)

_EMPTY_I8 = np.zeros(0, np.int64)


@dataclass
class InferenceRows:
    """The records of one block of one batch, columnar and typed as they are stored.

    Byte columns (``probs``, ``features``, ``act_bits``, ``act_sample``) are 2-D ``uint8`` arrays
    with one row of raw little-endian bytes per record, except ``act_sample``, which has one row
    per *sampled* record, at the increasing positions ``sample_idx`` (the others store NULL; a
    full-height array would let a tiny payload claim gigabytes). ``label`` is ``-1`` where unknown (NULL).
    """

    device_id: str
    spool_epoch: str
    role: str
    model_name: str
    model_version: str
    received_at: float
    features_dtype: str
    seq: np.ndarray  # int64
    ts: np.ndarray  # float64, device clock
    ts_corrected: np.ndarray  # float64
    pred: np.ndarray  # int16
    label: np.ndarray  # int16, -1 unknown
    confidence: np.ndarray  # float32
    calibrated: np.ndarray  # float32
    probs: np.ndarray  # uint8 [n, 2 * classes] (float16)
    features: np.ndarray  # uint8 [n, itemsize * features]
    act_bits: np.ndarray  # uint8 [n, ceil(hidden / 8)]
    act_sample: np.ndarray  # uint8 [k, 2 * hidden] (float16)
    sample_idx: np.ndarray  # int64 [k], increasing positions of the sampled records
    coact: np.ndarray  # int32
    latency_us: np.ndarray  # float32
    sensor_flags: np.ndarray  # int32
    digest: np.ndarray  # int64, shared.codec.record_digests

    def __len__(self) -> int:
        return int(self.seq.shape[0])

    @classmethod
    def from_block(cls, batch: Batch, block: RecordBlock, received_at: float) -> InferenceRows:
        """Columns of ``block`` ready to store; ``ts_corrected`` from the envelope's clocks when unsynced."""
        n = len(block)
        ts = np.asarray(block.ts, dtype=np.float64)
        if batch.clock_synced:
            ts_corrected = ts
        else:
            # Age of each record by the device's monotonic clock, applied to our receive time. A
            # negative age means the record is from an earlier boot (another monotonic clock): keep ts.
            age = batch.sent_mono - np.asarray(block.mono, dtype=np.float64)
            ts_corrected = np.where(age >= 0, received_at - age, ts)
        features = np.ascontiguousarray(block.features)
        if features.dtype.str not in ("<f2", "<f4"):
            features = features.astype("<f4")
        idx = np.asarray(block.act_sample_idx, dtype=np.int64)
        act_sample = np.asarray(block.act_sample, dtype="<f2").reshape(idx.size, int(block.hidden_units))
        return cls(
            device_id=batch.device_id,
            spool_epoch=batch.spool_epoch,
            role=block.role,
            model_name=block.model_name,
            model_version=block.model_version,
            received_at=float(received_at),
            features_dtype=features.dtype.str,
            seq=np.asarray(block.seq).astype(np.int64),
            ts=ts,
            ts_corrected=np.asarray(ts_corrected, dtype=np.float64),
            pred=np.asarray(block.pred, dtype=np.int16),
            label=np.asarray(block.label, dtype=np.int16),
            confidence=np.asarray(block.confidence, dtype=np.float32),
            calibrated=np.asarray(block.calibrated, dtype=np.float32),
            probs=_byte_rows(np.asarray(block.probs, dtype="<f2"), n),
            features=_byte_rows(features, n),
            act_bits=_byte_rows(np.asarray(block.act_bits, dtype=np.uint8), n),
            act_sample=np.ascontiguousarray(act_sample).view(np.uint8),
            sample_idx=idx,
            coact=np.asarray(block.coact, dtype=np.int32),
            latency_us=np.asarray(block.latency_us, dtype=np.float32),
            sensor_flags=np.asarray(block.sensor_flags, dtype=np.int32),
            digest=record_digests(block),
        )

    @property
    def sampled(self) -> np.ndarray:
        """Boolean mask of the records with sampled activations."""
        mask = np.zeros(len(self), dtype=bool)
        mask[self.sample_idx] = True
        return mask

    @property
    def nbytes(self) -> int:
        """Memory held by the columns."""
        return sum(v.nbytes for v in self.__dict__.values() if isinstance(v, np.ndarray))

    def take(self, mask: np.ndarray) -> InferenceRows:
        """The rows where the boolean ``mask`` is true, as a new block."""
        per_sample = ("act_sample", "sample_idx")
        values: dict[str, Any] = {
            name: value[mask] if isinstance(value, np.ndarray) and name not in per_sample else value
            for name, value in self.__dict__.items()
        }
        kept = mask[self.sample_idx]
        values["act_sample"] = self.act_sample[kept]
        # New positions of the kept sampled records: how many kept rows precede each.
        values["sample_idx"] = (np.cumsum(mask) - 1)[self.sample_idx[kept]]
        return InferenceRows(**values)


def _byte_rows(arr: np.ndarray, n: int) -> np.ndarray:
    """The raw bytes of ``arr`` as ``n`` rows of ``uint8`` (little-endian dtypes assumed)."""
    return np.ascontiguousarray(arr).reshape(n, -1).view(np.uint8)


@dataclass
class WriteOutcome:
    """What happened to the rows of one block."""

    inserted: int = 0
    duplicates: int = 0
    conflicts: np.ndarray = field(default_factory=lambda: _EMPTY_I8)  # seqs stored earlier with other content
    new: np.ndarray | None = None  # bool per row of the block: stored by this write (what monitoring sketches)

    @property
    def total(self) -> int:
        """Rows of the block."""
        return self.inserted + self.duplicates + int(self.conflicts.size)


def write_inferences(conn: Connection, blocks: Sequence[InferenceRows]) -> list[WriteOutcome]:
    """Insert ``blocks`` idempotently on ``conn`` (inside the caller's transaction); one outcome per block.

    A key that occurs twice in ``blocks`` (the same batch received twice in one transaction) is
    written once; the later copy is a duplicate, or a conflict when its digest differs.
    """
    blocks = [b for b in blocks]
    if not blocks:
        return []
    sizes = np.array([len(b) for b in blocks], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    total = int(offsets[-1])
    pair_ids: dict[tuple[str, str], int] = {}
    pair = np.concatenate(
        [np.full(len(b), pair_ids.setdefault((b.device_id, b.spool_epoch), len(pair_ids)), np.int64) for b in blocks]
    )
    seq = np.concatenate([b.seq for b in blocks])
    digest = np.concatenate([b.digest for b in blocks])

    first_of = _first_occurrence(pair, seq)
    keep = first_of == np.arange(total)
    kept_blocks = [
        b if keep[offsets[i] : offsets[i + 1]].all() else b.take(keep[offsets[i] : offsets[i + 1]])
        for i, b in enumerate(blocks)
    ]
    kept_blocks_nonempty = [b for b in kept_blocks if len(b)]
    if conn.dialect.name == "postgresql":
        existed_k, stored_k = _write_postgresql(conn, kept_blocks_nonempty)
    elif conn.dialect.name == "sqlite":
        existed_k, stored_k = _write_sqlite(conn, kept_blocks_nonempty)
    else:
        raise ValueError(f"no bulk writer for {conn.dialect.name}")

    existed = np.zeros(total, dtype=bool)
    winner = digest.copy()
    kept_pos = np.flatnonzero(keep)
    existed[kept_pos] = existed_k
    winner[kept_pos] = np.where(existed_k, stored_k, digest[kept_pos])
    winner = winner[first_of]  # the stored (first) version decides for every copy of a key
    conflict = winner != digest
    new = keep & ~existed
    outcomes = []
    for i, b in enumerate(blocks):
        sl = slice(int(offsets[i]), int(offsets[i + 1]))
        n_new = int(new[sl].sum())
        conflicting = b.seq[conflict[sl]]
        outcomes.append(WriteOutcome(n_new, len(b) - n_new - int(conflicting.size), conflicting, new[sl]))
    return outcomes


def _first_occurrence(pair: np.ndarray, seq: np.ndarray) -> np.ndarray:
    """For every row, the position of the first row with the same ``(pair, seq)`` key."""
    n = seq.size
    order = np.lexsort((np.arange(n), seq, pair))
    s_pair, s_seq = pair[order], seq[order]
    repeat = np.zeros(n, dtype=bool)
    repeat[1:] = (s_pair[1:] == s_pair[:-1]) & (s_seq[1:] == s_seq[:-1])
    if not repeat.any():
        return np.arange(n)
    starts = np.flatnonzero(~repeat)
    run = np.cumsum(~repeat) - 1
    first = np.empty(n, dtype=np.int64)
    first[order] = order[starts[run]]
    return first


# ------------------------------------------------------------------------------------- SQLite

_SQLITE_INSERT = (
    f"INSERT INTO inference ({', '.join(INFERENCE_COLUMNS)}) VALUES ({', '.join('?' * len(INFERENCE_COLUMNS))}) "
    "ON CONFLICT (device_id, spool_epoch, seq) DO NOTHING"
)


def _blobs(rows: np.ndarray) -> list[bytes]:
    """One ``bytes`` per row of a 2-D uint8 array (a void view keeps trailing zero bytes, unlike ``S``)."""
    rows = np.ascontiguousarray(rows)
    return rows.view(f"V{rows.shape[1]}").ravel().tolist() if rows.shape[1] else [b""] * rows.shape[0]


def _sqlite_rows(b: InferenceRows) -> Iterator[tuple[Any, ...]]:
    n = len(b)
    labels: list[int | None] = b.label.tolist()
    if (b.label == NO_LABEL).any():
        labels = [None if x == NO_LABEL else x for x in labels]
    samples: list[bytes | None] = [None] * n
    for i, blob in zip(b.sample_idx.tolist(), _blobs(b.act_sample), strict=True):
        samples[i] = blob
    const = itertools.repeat
    return zip(
        const(b.device_id, n),
        const(b.spool_epoch, n),
        b.seq.tolist(),
        const(b.role, n),
        const(b.model_name, n),
        const(b.model_version, n),
        b.ts.tolist(),
        b.ts_corrected.tolist(),
        const(b.received_at, n),
        b.pred.tolist(),
        labels,
        b.confidence.tolist(),
        b.calibrated.tolist(),
        _blobs(b.probs),
        _blobs(b.features),
        const(b.features_dtype, n),
        _blobs(b.act_bits),
        samples,
        b.coact.tolist(),
        b.latency_us.tolist(),
        b.sensor_flags.tolist(),
        b.digest.tolist(),
        strict=True,
    )


def _write_sqlite(conn: Connection, blocks: list[InferenceRows]) -> tuple[np.ndarray, np.ndarray]:
    total = sum(len(b) for b in blocks)
    existed = np.zeros(total, dtype=bool)
    stored = np.zeros(total, dtype=np.int64)
    if not total:
        return existed, stored
    cur = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        mark = cur.execute("SELECT coalesce(max(rowid), 0) FROM inference").fetchone()[0]
        cur.executemany(_SQLITE_INSERT, list(itertools.chain.from_iterable(_sqlite_rows(b) for b in blocks)))
        if cur.rowcount == total:
            return existed, stored
        offset = 0
        for b in blocks:
            found = cur.execute(
                "SELECT seq, digest, rowid <= ? FROM inference WHERE device_id = ? AND spool_epoch = ? "
                "AND seq BETWEEN ? AND ? ORDER BY seq",
                (mark, b.device_id, b.spool_epoch, int(b.seq.min()), int(b.seq.max())),
            ).fetchall()
            table = np.array(found, dtype=np.int64).reshape(-1, 3)
            pos = np.searchsorted(table[:, 0], b.seq)
            hit = pos < table.shape[0]
            hit[hit] = table[pos[hit], 0] == b.seq[hit]
            old = np.zeros(len(b), dtype=bool)
            old[hit] = table[pos[hit], 2] == 1
            sl = slice(offset, offset + len(b))
            existed[sl] = old
            stored[sl][old] = table[pos[old], 1]
            offset += len(b)
        return existed, stored
    finally:
        cur.close()


# --------------------------------------------------------------------------------- PostgreSQL

STAGE_TABLE = "fleet_inference_stage"
_STAGE_DDL = f"""
CREATE TEMP TABLE IF NOT EXISTS {STAGE_TABLE} (
    ord int4 NOT NULL, device_id varchar NOT NULL, spool_epoch varchar NOT NULL, seq int8 NOT NULL,
    role varchar NOT NULL, model_name varchar NOT NULL, model_version varchar NOT NULL,
    ts float8 NOT NULL, ts_corrected float8 NOT NULL, received_at float8 NOT NULL,
    pred int2 NOT NULL, label int2 NOT NULL, confidence float4 NOT NULL, calibrated float4 NOT NULL,
    probs bytea NOT NULL, features bytea NOT NULL, features_dtype varchar NOT NULL, act_bits bytea NOT NULL,
    act_sample bytea, coact int4 NOT NULL, latency_us float4 NOT NULL, sensor_flags int4 NOT NULL,
    digest int8 NOT NULL
) ON COMMIT DELETE ROWS
"""
_COPY = f"COPY {STAGE_TABLE} (ord, {', '.join(INFERENCE_COLUMNS)}) FROM STDIN (FORMAT BINARY)"
_SELECTED = ", ".join(f"NULLIF(label, {NO_LABEL})" if c == "label" else c for c in INFERENCE_COLUMNS)
_KEY_MATCH = "{a}.device_id = {b}.device_id AND {a}.spool_epoch = {b}.spool_epoch AND {a}.seq = {b}.seq"
_INSERT = f"""
INSERT INTO inference ({", ".join(INFERENCE_COLUMNS)})
SELECT {_SELECTED} FROM {STAGE_TABLE}
ON CONFLICT (device_id, spool_epoch, seq) DO NOTHING
"""
# When some rows were already stored: the rows the INSERT skipped are the staged rows its RETURNING does not list.
_INSERT_SKIPPED = f"""
WITH ins AS ({_INSERT} RETURNING device_id, spool_epoch, seq)
SELECT s.ord FROM {STAGE_TABLE} s WHERE NOT EXISTS (SELECT 1 FROM ins WHERE {_KEY_MATCH.format(a="ins", b="s")})
"""
_STORED = f"""
SELECT s.ord, i.digest FROM {STAGE_TABLE} s JOIN inference i ON {_KEY_MATCH.format(a="i", b="s")}
WHERE s.ord = ANY(%s)
"""
_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
_COPY_TRAILER = struct.pack(">h", -1)


def copy_text(value: str) -> tuple[np.dtype, bytes]:
    """A text field of binary COPY whose value is the same in every row."""
    raw = value.encode("utf-8")
    return np.dtype(f"S{len(raw)}"), raw


def copy_tuples(fields: list[tuple[np.dtype | None, Any]], n: int) -> bytes:
    """``n`` binary COPY tuples whose every field has the same size in every row (None dtype: NULL)."""
    layout: list[tuple[str, Any]] = [("count", ">i2")]
    for i, (dtype, _value) in enumerate(fields):
        layout.append((f"l{i}", ">i4"))
        if dtype is not None and dtype.itemsize:
            layout.append((f"v{i}", dtype))
    out = np.empty(n, dtype=np.dtype(layout))
    out["count"] = len(fields)
    for i, (dtype, value) in enumerate(fields):
        if dtype is None:
            out[f"l{i}"] = -1
            continue
        out[f"l{i}"] = dtype.itemsize
        if dtype.itemsize:
            out[f"v{i}"] = value
    return out.tobytes()


def copy_bytea(rows: np.ndarray) -> tuple[np.dtype, np.ndarray]:
    """A bytea field of binary COPY from equal-length byte rows ``[n, width]``."""
    return np.dtype((np.uint8, (rows.shape[1],))), rows


def _copy_stream(b: InferenceRows, ords: np.ndarray) -> bytes:
    """The binary COPY tuples of one block: a run without and a run with ``act_sample`` (its NULL-ness varies)."""
    parts = []
    for with_sample in (False, True):
        sampled = b.sampled
        mask = sampled if with_sample else ~sampled
        if not mask.any():
            continue
        rows = b if mask.all() else b.take(mask)
        fields: list[tuple[np.dtype | None, Any]] = [
            (np.dtype(">i4"), ords[mask]),
            copy_text(b.device_id),
            copy_text(b.spool_epoch),
            (np.dtype(">i8"), rows.seq),
            copy_text(b.role),
            copy_text(b.model_name),
            copy_text(b.model_version),
            (np.dtype(">f8"), rows.ts),
            (np.dtype(">f8"), rows.ts_corrected),
            (np.dtype(">f8"), b.received_at),
            (np.dtype(">i2"), rows.pred),
            (np.dtype(">i2"), rows.label),
            (np.dtype(">f4"), rows.confidence),
            (np.dtype(">f4"), rows.calibrated),
            copy_bytea(rows.probs),
            copy_bytea(rows.features),
            copy_text(b.features_dtype),
            copy_bytea(rows.act_bits),
            copy_bytea(rows.act_sample) if with_sample else (None, None),
            (np.dtype(">i4"), rows.coact),
            (np.dtype(">f4"), rows.latency_us),
            (np.dtype(">i4"), rows.sensor_flags),
            (np.dtype(">i8"), rows.digest),
        ]
        parts.append(copy_tuples(fields, len(rows)))
    return b"".join(parts)


def _write_postgresql(conn: Connection, blocks: list[InferenceRows]) -> tuple[np.ndarray, np.ndarray]:
    total = sum(len(b) for b in blocks)
    existed = np.zeros(total, dtype=bool)
    stored = np.zeros(total, dtype=np.int64)
    if not total:
        return existed, stored
    cur = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        cur.execute(_STAGE_DDL)
        # Empty unless an earlier write in this same transaction left rows (commit empties it).
        cur.execute(f"DELETE FROM {STAGE_TABLE}")
        stream = [_COPY_HEADER]
        offset = 0
        for b in blocks:
            stream.append(_copy_stream(b, np.arange(offset, offset + len(b), dtype=np.int32)))
            offset += len(b)
        stream.append(_COPY_TRAILER)
        with cur.copy(_COPY) as copy:
            copy.write(b"".join(stream))
        # Fast path: everything is new (the usual case), known from the row count alone. Otherwise undo
        # and insert again, asking which rows were skipped (that costs a join of all staged rows).
        cur.execute("SAVEPOINT fleet_bulk_insert")
        cur.execute(_INSERT)
        if cur.rowcount == total:
            cur.execute("RELEASE SAVEPOINT fleet_bulk_insert")
            return existed, stored
        cur.execute("ROLLBACK TO SAVEPOINT fleet_bulk_insert")
        cur.execute("SET LOCAL work_mem = '64MB'")
        cur.execute(_INSERT_SKIPPED)
        skipped = np.array([row[0] for row in cur.fetchall()], dtype=np.int64)
        if not skipped.size:
            return existed, stored
        existed[skipped] = True
        # A key committed by a concurrent writer after our snapshot cannot be compared: count it a duplicate.
        digests = np.concatenate([b.digest for b in blocks])
        stored[skipped] = digests[skipped]
        cur.execute(_STORED, (skipped.tolist(),))
        for ord_, dig in cur.fetchall():
            stored[ord_] = dig
        return existed, stored
    finally:
        cur.close()
