"""Late labels: ground truth that arrives after inference, stored per record and joined on its key.

A label names one inference record by its idempotency key ``(device_id, spool_epoch, seq)`` and
its true class, as an index into the model's label list or as a class name. Names are resolved at
push time against the class names of the model that made the stored record, taken from the
reference bundles in the settings (``monitoring_bundles``, verified with
``monitoring_trusted_keys``). A label may arrive before its record (the device is still offline);
its class name is then resolved only when every known bundle has the same label list, since the
record's model cannot be known yet. Labels are stored as class indices, so nothing needs to be
resolved when the record arrives later.

Pushing a label again for the same record replaces it (``ON CONFLICT … DO UPDATE``). One push of up
to :data:`MAX_ITEMS` labels costs a fixed number of statements, whatever its size: the keys are looked
up in ``inference`` in one statement (PostgreSQL: one JSON parameter and a primary-key probe per label;
SQLite: a temporary table joined on the key), and the labels are upserted in one statement. 100,000
labels through ``fleetctl`` cost about 4 CPU-seconds end to end (``benchmarks/labels_push.py``).

Realized accuracy (:func:`label_stats`) is aggregated in the database: every record with a late
label (or, failing that, a label that came inline with the record, ``inference.label``) contributes
its calibrated confidence and whether its prediction was right, as
:class:`~collector.monitoring.performance.GapStats` per (model name, model version).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from collector.db.models import NAME_LEN, Inference, Label
from collector.monitoring.catalog import ReferenceCatalog
from collector.monitoring.performance import (
    MIN_N,
    AccuracyEstimate,
    AccuracyGap,
    ConfidenceStats,
    GapStats,
    GapTracker,
    RealizedStats,
    expected_accuracy,
    realized_accuracy,
)
from collector.queries import decode_cursor, encode_cursor
from shared.topics import valid_device_id

MAX_ITEMS = 10_000
"""Most labels in one push (``POST /api/v1/labels``); a file is sent in chunks of at most this many."""

MAX_CLASS_INDEX = 32_767
"""Largest class index the ``label`` column (SMALLINT) holds."""

MAX_SEQ = (1 << 63) - 1
"""Largest seq the ``seq`` column (BIGINT) holds."""

REJECT_CODES = (
    "bad_item",
    "bad_device_id",
    "bad_spool_epoch",
    "bad_seq",
    "bad_label",
    "class_out_of_range",
    "unknown_class",
    "unknown_model",
    "no_class_names",
    "ambiguous_class_name",
)
"""Why one label of a push was rejected (the ``code`` of a rejection, a label of the Prometheus counter)."""

LABEL_TABLE: sa.Table = Label.__table__  # type: ignore[attr-defined]
INFERENCE_TABLE: sa.Table = Inference.__table__  # type: ignore[attr-defined]

ModelKey = tuple[str, str]


# ------------------------------------------------------------------------------------- class names


class ClassNames:
    """The label list of every model version with a trusted reference bundle, for resolving class names."""

    def __init__(self, lists: Mapping[ModelKey, Sequence[str]]) -> None:
        self._lists = {key: tuple(names) for key, names in lists.items()}
        self._index = {key: {name: i for i, name in enumerate(names)} for key, names in self._lists.items()}
        distinct = set(self._lists.values())
        # The one label list every known bundle shares: what a label of a record not yet stored resolves against.
        self.common: tuple[str, ...] | None = next(iter(distinct)) if len(distinct) == 1 else None

    @classmethod
    def from_catalog(cls, catalog: ReferenceCatalog) -> ClassNames:
        """The label lists of the catalog's verified bundles."""
        return cls({key: entry.labels for key in catalog if (entry := catalog.get(*key)) is not None})

    def __len__(self) -> int:
        return len(self._lists)

    def get(self, model_name: str, model_version: str) -> tuple[str, ...] | None:
        """The label list of one model version, or ``None`` when no bundle of it is known."""
        return self._lists.get((model_name, model_version))

    def index(self, model_name: str, model_version: str, name: str) -> int | None:
        """The index of class ``name`` of one model version (``None``: unknown model or class)."""
        return self._index.get((model_name, model_version), {}).get(name)


# ------------------------------------------------------------------------------------------- push


@dataclass(frozen=True, slots=True)
class Rejection:
    """One label of a push that was not stored: its position in the push, a code and a readable reason."""

    index: int
    code: str
    reason: str


@dataclass
class PushResult:
    """What one push did: ``accepted = inserted + replaced``; ``matched``: accepted labels whose record is stored."""

    accepted: int = 0
    inserted: int = 0
    replaced: int = 0
    matched: int = 0
    rejected: list[Rejection] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The API's JSON shape."""
        return {
            "accepted": self.accepted,
            "inserted": self.inserted,
            "replaced": self.replaced,
            "matched": self.matched,
            "rejected": [{"index": r.index, "code": r.code, "reason": r.reason} for r in self.rejected],
        }


class _Item(NamedTuple):
    """A label whose shape is valid (a tuple: built ten thousand times per push)."""

    pos: int  # position in the push
    key: tuple[str, str, int]  # (device_id, spool_epoch, seq)
    label: int | str


@dataclass(frozen=True, slots=True)
class _Record:
    """What a push needs to know of a stored record: its model and how many classes it has."""

    model_name: str
    model_version: str
    n_classes: int


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def text_problem(value: Any, max_len: int) -> str | None:
    """What is wrong with a string bound for a text column, or ``None`` (NUL and lone surrogates cannot be stored)."""
    if not isinstance(value, str):
        return f"must be a string, not {type(value).__name__}"
    if not 0 < len(value) <= max_len:
        return f"must be 1-{max_len} characters"
    if "\x00" in value:
        return "must not contain NUL"
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "must be valid Unicode (it has a lone surrogate)"
    return None


def parse_item(index: int, raw: Any) -> _Item | Rejection:
    """Check the shape of one pushed label; class names are resolved later, against the stored record."""
    if not isinstance(raw, dict):
        return Rejection(index, "bad_item", f"an item must be an object, not {type(raw).__name__}")
    try:
        device_id, epoch, seq, label = raw["device_id"], raw["spool_epoch"], raw["seq"], raw["label"]
    except KeyError:
        missing = [k for k in ("device_id", "spool_epoch", "seq", "label") if k not in raw]
        return Rejection(index, "bad_item", f"missing field(s): {', '.join(missing)}")
    if not isinstance(device_id, str) or not valid_device_id(device_id):
        return Rejection(index, "bad_device_id", f"device_id {device_id!r} is not a valid device id")
    problem = text_problem(epoch, NAME_LEN)
    if problem:
        return Rejection(index, "bad_spool_epoch", f"spool_epoch {problem}")
    if not _is_int(seq) or not 0 <= seq <= MAX_SEQ:
        return Rejection(index, "bad_seq", f"seq must be a whole number in [0, 2^63), not {seq!r}")
    if _is_int(label):
        if not 0 <= label <= MAX_CLASS_INDEX:
            return Rejection(index, "bad_label", f"class index {label} is outside [0, {MAX_CLASS_INDEX}]")
    else:
        problem = text_problem(label, NAME_LEN)
        if problem:
            return Rejection(index, "bad_label", f"label must be a class index or a class name: it {problem}")
    return _Item(index, (device_id, epoch, seq), label)


def _resolve(item: _Item, record: _Record | None, classes: ClassNames) -> int | Rejection:
    """The class index of ``item``'s label, checked against the stored record's model when there is one."""
    if isinstance(item.label, int):
        if record is not None and item.label >= record.n_classes:
            return Rejection(
                item.pos,
                "class_out_of_range",
                f"class index {item.label} is out of range: the record's model {record.model_name} "
                f"{record.model_version} has {record.n_classes} classes",
            )
        return item.label
    name = item.label
    if record is not None:
        names = classes.get(record.model_name, record.model_version)
        if names is None:
            return Rejection(
                item.pos,
                "unknown_model",
                f"no reference bundle of the record's model {record.model_name} {record.model_version} is "
                f"configured to resolve class name {name!r}: send the class index",
            )
        found = classes.index(record.model_name, record.model_version, name)
        if found is None:
            return Rejection(
                item.pos,
                "unknown_class",
                f"{name!r} is not a class of {record.model_name} {record.model_version} ({', '.join(names)})",
            )
        return found
    if not len(classes):
        return Rejection(
            item.pos,
            "no_class_names",
            f"class name {name!r} cannot be resolved: the record is not stored yet and no reference bundle "
            "is configured; send the class index",
        )
    if classes.common is None:
        return Rejection(
            item.pos,
            "ambiguous_class_name",
            f"class name {name!r} cannot be resolved yet: the record is not stored and the known models "
            "have different label lists; push it again once the record has arrived, or send the class index",
        )
    if name not in classes.common:
        return Rejection(
            item.pos, "unknown_class", f"{name!r} is not a class of any known model ({', '.join(classes.common)})"
        )
    return classes.common.index(name)


def push_labels(
    conn: Connection,
    items: Sequence[Any],
    classes: ClassNames,
    *,
    source: str = "api",
    now: float | None = None,
) -> PushResult:
    """Validate and upsert ``items`` (dicts with ``device_id, spool_epoch, seq, label``) on ``conn``.

    Runs inside the caller's transaction (on SQLite take it with ``BEGIN IMMEDIATE``, so the count of
    replaced labels is exact). A bad item is rejected on its own, with its position and reason; the
    good ones are stored. When a record's key occurs twice in ``items`` the later label wins and the
    earlier one counts as replaced.
    """
    if len(items) > MAX_ITEMS:
        raise ValueError(f"at most {MAX_ITEMS} labels per push, got {len(items)}")
    now = time.time() if now is None else now
    result = PushResult()
    parsed: list[_Item] = []
    for i, raw in enumerate(items):
        item = parse_item(i, raw)
        if isinstance(item, Rejection):
            result.rejected.append(item)
        else:
            parsed.append(item)
    if not parsed:
        return result
    records = _lookup_records(conn, list(dict.fromkeys(item.key for item in parsed)))
    final: dict[tuple[str, str, int], int] = {}
    for item in parsed:
        record = records.get(item.key)
        resolved = _resolve(item, record, classes)
        if isinstance(resolved, Rejection):
            result.rejected.append(resolved)
            continue
        if item.key in final:
            result.replaced += 1  # an earlier item of this push, replaced by this one
        final[item.key] = resolved
        result.accepted += 1
        result.matched += record is not None
    result.rejected.sort(key=lambda r: r.index)
    if final:
        replaced = _upsert(conn, final, source=source, received_at=now)
        result.replaced += replaced
        result.inserted = len(final) - replaced
    return result


# PostgreSQL gets the keys as ONE JSON parameter (json.dumps and the server's JSON parser are C; binding
# three 10,000-element arrays costs more than the statement). The lookup is a LATERAL probe of the primary
# key per label (LIMIT 1 stops the planner from flattening it into a hash join over the whole inference
# table): its cost follows the push, not the table.
_PG_LOOKUP = """
SELECT k.d, k.e, k.s, i.model_name, i.model_version, length(i.probs) / 2
FROM json_to_recordset(%s::json) AS k(d text, e text, s int8)
CROSS JOIN LATERAL (
    SELECT model_name, model_version, probs FROM inference
    WHERE device_id = k.d AND spool_epoch = k.e AND seq = k.s LIMIT 1
) AS i
"""
# xmax = 0 on a returned row: it was inserted, not updated (the updated row version carries our xid).
_PG_UPSERT = """
WITH up AS (
    INSERT INTO label (device_id, spool_epoch, seq, label, received_at, source)
    SELECT k.d, k.e, k.s, k.l, %s, %s FROM json_to_recordset(%s::json) AS k(d text, e text, s int8, l int2)
    ON CONFLICT (device_id, spool_epoch, seq) DO UPDATE
    SET label = excluded.label, received_at = excluded.received_at, source = excluded.source
    RETURNING (xmax = 0) AS fresh
)
SELECT count(*) FILTER (WHERE NOT fresh) FROM up
"""
_SQLITE_KEYS = "fleet_label_keys"
_SQLITE_KEYS_DDL = (
    f"CREATE TEMP TABLE IF NOT EXISTS {_SQLITE_KEYS} "
    "(device_id TEXT NOT NULL, spool_epoch TEXT NOT NULL, seq INTEGER NOT NULL, label INTEGER)"
)
_SQLITE_LOOKUP = f"""
SELECT k.device_id, k.spool_epoch, k.seq, i.model_name, i.model_version, length(i.probs) / 2
FROM {_SQLITE_KEYS} k
JOIN inference i ON i.device_id = k.device_id AND i.spool_epoch = k.spool_epoch AND i.seq = k.seq
"""
_SQLITE_EXISTING = f"""
SELECT count(*) FROM {_SQLITE_KEYS} k
JOIN label l ON l.device_id = k.device_id AND l.spool_epoch = k.spool_epoch AND l.seq = k.seq
"""
# ``WHERE true`` keeps SQLite from reading ON CONFLICT as a join constraint of the SELECT.
_SQLITE_UPSERT = f"""
INSERT INTO label (device_id, spool_epoch, seq, label, received_at, source)
SELECT device_id, spool_epoch, seq, label, ?, ? FROM {_SQLITE_KEYS} WHERE true
ON CONFLICT (device_id, spool_epoch, seq) DO UPDATE
SET label = excluded.label, received_at = excluded.received_at, source = excluded.source
"""


def _json_rows(rows: Iterable[tuple[str, str, int, int | None]]) -> str:
    """Keys (and labels) as the JSON array of objects ``json_to_recordset`` reads."""
    return json.dumps([{"d": d, "e": e, "s": s, "l": label} for d, e, s, label in rows], separators=(",", ":"))


def _sqlite_stage(cur: Any, rows: Iterable[tuple[str, str, int, int | None]]) -> None:
    """Fill the temporary key table (emptied first: a connection from the pool may have used it)."""
    cur.execute(_SQLITE_KEYS_DDL)
    cur.execute(f"DELETE FROM {_SQLITE_KEYS}")
    cur.executemany(f"INSERT INTO {_SQLITE_KEYS} VALUES (?, ?, ?, ?)", rows)


def _count(cur: Any) -> int:
    """The single number a ``count(*)`` statement returned."""
    row = cur.fetchone()
    return int(row[0]) if row else 0


def _lookup_records(conn: Connection, keys: list[tuple[str, str, int]]) -> dict[tuple[str, str, int], _Record]:
    """The model and class count of every stored record among ``keys``, in one join."""
    cur = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        if conn.dialect.name == "postgresql":
            cur.execute(_PG_LOOKUP, (_json_rows((d, e, s, None) for d, e, s in keys),))
        else:
            _sqlite_stage(cur, ((d, e, s, None) for d, e, s in keys))
            cur.execute(_SQLITE_LOOKUP)
        return {(d, e, int(s)): _Record(name, version, int(n)) for d, e, s, name, version, n in cur.fetchall()}
    finally:
        cur.close()


def _upsert(conn: Connection, rows: Mapping[tuple[str, str, int], int], *, source: str, received_at: float) -> int:
    """Insert or replace ``rows`` (key → class index) in one statement; return how many replaced a stored label."""
    cur = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        if conn.dialect.name == "postgresql":
            cur.execute(_PG_UPSERT, (received_at, source, _json_rows((*key, label) for key, label in rows.items())))
            return _count(cur)
        _sqlite_stage(cur, ((d, e, s, label) for (d, e, s), label in rows.items()))
        cur.execute(_SQLITE_EXISTING)
        replaced = _count(cur)
        cur.execute(_SQLITE_UPSERT, (received_at, source))
        cur.execute(f"DELETE FROM {_SQLITE_KEYS}")
        return replaced
    finally:
        cur.close()


# ------------------------------------------------------------------------------------- statistics


def label_stats(
    conn: Connection | Session,
    *,
    device_ids: Sequence[str] | None = None,
    model_name: str | None = None,
    model_version: str | None = None,
    role: str | None = "active",
    since: float | None = None,
    until: float | None = None,
) -> dict[ModelKey, GapStats]:
    """Labelled records of a scope summarised per (model name, model version), aggregated in the database.

    A record counts when it has a late label or an inline one (the late label wins); it contributes its
    calibrated confidence and whether ``pred`` equals the label. ``device_ids=None`` means every device
    (an empty list: none); ``role=None`` every role; ``since`` (inclusive) and ``until`` (exclusive)
    bound the record's corrected time ``ts_corrected``. Model versions without a labelled record are absent.
    """
    if device_ids is not None and not device_ids:
        return {}
    i, lab = INFERENCE_TABLE.c, LABEL_TABLE.c
    scope: list[sa.ColumnElement[bool]] = []
    if device_ids is not None:
        scope.append(i.device_id.in_(list(device_ids)))
    if model_name is not None:
        scope.append(i.model_name == model_name)
    if model_version is not None:
        scope.append(i.model_version == model_version)
    if role is not None:
        scope.append(i.role == role)
    if since is not None:
        scope.append(i.ts_corrected >= since)
    if until is not None:
        scope.append(i.ts_corrected < until)
    same_key = sa.and_(lab.device_id == i.device_id, lab.spool_epoch == i.spool_epoch, lab.seq == i.seq)
    late = sa.select(i.model_name, i.model_version, i.pred, i.calibrated, lab.label.label("truth")).select_from(
        LABEL_TABLE.join(INFERENCE_TABLE, same_key)
    )
    # Inline labels only where no late label overrides them.
    inline = sa.select(i.model_name, i.model_version, i.pred, i.calibrated, i.label.label("truth")).where(
        i.label.is_not(None), ~sa.exists().where(same_key)
    )
    labelled = sa.union_all(late.where(*scope), inline.where(*scope)).subquery()
    u = labelled.c
    p = sa.cast(u.calibrated, sa.Double)  # PostgreSQL sums a REAL column in single precision
    correct = u.pred == u.truth
    stmt = sa.select(
        u.model_name,
        u.model_version,
        sa.func.count(),
        sa.func.sum(p),
        sa.func.sum(p * (1.0 - p)),
        sa.func.sum(sa.case((correct, 1), else_=0)),
        sa.func.sum(sa.case((correct, p), else_=0.0)),
    ).group_by(u.model_name, u.model_version)
    out: dict[ModelKey, GapStats] = {}
    for name, version, n, sum_p, sum_p1mp, n_correct, sum_p_correct in conn.execute(stmt).all():
        out[(name, version)] = GapStats(
            n=int(n),
            sum_p=float(sum_p),
            sum_p1mp=float(sum_p1mp),
            n_correct=int(n_correct),
            sum_p_correct=float(sum_p_correct),
        )
    return out


@dataclass(frozen=True, slots=True)
class AccuracyComparison:
    """Realized accuracy of one model version beside the label-free estimate on the same labelled records."""

    model_name: str
    model_version: str
    stats: GapStats
    realized: AccuracyEstimate
    expected: AccuracyEstimate
    gap: AccuracyGap

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the three results and the counts behind them."""

        def interval(e: AccuracyEstimate) -> dict[str, Any]:
            return {"estimate": e.estimate, "low": e.low, "high": e.high, "method": e.method}

        return {
            "model_name": self.model_name,
            "model_version": self.model_version,
            "n_labelled": self.stats.n,
            "n_correct": self.stats.n_correct,
            "level": self.realized.level,
            "realized": interval(self.realized),
            "expected": interval(self.expected),
            "gap": {
                "gap": self.gap.gap,
                "low": self.gap.low,
                "high": self.gap.high,
                "stderr": self.gap.stderr,
                "calibration_pvalue": self.gap.calibration_pvalue,
            },
        }


def compare_accuracy(
    model_name: str, model_version: str, stats: GapStats, *, level: float = 0.95, min_n: int = MIN_N
) -> AccuracyComparison:
    """Realized accuracy (Wilson), expected accuracy (CBPE, normal approximation) and their gap, from ``stats``.

    All three are computed on the same labelled records, so the gap measures the estimator, not a
    difference between the labelled records and the rest.
    """
    tracker = GapTracker(level, min_n)
    tracker.add_stats(model_version, stats)
    return AccuracyComparison(
        model_name,
        model_version,
        stats,
        realized_accuracy(RealizedStats(stats.n, stats.n_correct), level, min_n=min_n),
        expected_accuracy(ConfidenceStats(stats.n, stats.sum_p, stats.sum_p1mp), level, min_n=min_n),
        tracker.gap(model_version),
    )


# ------------------------------------------------------------------------------------------- list


def list_labels(
    conn: Connection | Session,
    *,
    limit: int,
    cursor: str | None = None,
    device_id: str | None = None,
    spool_epoch: str | None = None,
) -> tuple[list[dict[str, Any]], int, str | None]:
    """Stored labels by key, each with its record's model and prediction (``None`` until the record arrives).

    Returns ``(page, total, next cursor)``; the cursor is :func:`collector.queries.encode_cursor` of the last key.
    """
    lab, i = LABEL_TABLE.c, INFERENCE_TABLE.c
    where: list[sa.ColumnElement[bool]] = []
    if device_id is not None:
        where.append(lab.device_id == device_id)
    if spool_epoch is not None:
        where.append(lab.spool_epoch == spool_epoch)
    total = int(conn.execute(sa.select(sa.func.count()).select_from(LABEL_TABLE).where(*where)).scalar_one())
    if cursor is not None:
        after = decode_cursor(cursor, (str, str, int))
        where.append(sa.tuple_(lab.device_id, lab.spool_epoch, lab.seq) > sa.tuple_(*after))
    same_key = sa.and_(i.device_id == lab.device_id, i.spool_epoch == lab.spool_epoch, i.seq == lab.seq)
    stmt = (
        sa.select(*LABEL_TABLE.c, i.model_name, i.model_version, i.pred)
        .select_from(LABEL_TABLE.outerjoin(INFERENCE_TABLE, same_key))
        .where(*where)
        .order_by(lab.device_id, lab.spool_epoch, lab.seq)
        .limit(limit + 1)
    )
    rows = [dict(r._mapping) for r in conn.execute(stmt)]
    for row in rows:
        row["matched"] = row["pred"] is not None
    nxt = None
    if len(rows) > limit:
        last = rows[limit - 1]
        nxt = encode_cursor([last["device_id"], last["spool_epoch"], last["seq"]])
    return rows[:limit], total, nxt
