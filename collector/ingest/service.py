"""The ingest service: MQTT messages to committed rows, exactly once, acknowledged only after commit.

A decoder thread drains the queue that the MQTT client fills, in groups of up to
``ingest_max_batch_messages`` messages or ``ingest_max_delay_ms`` after the first, and decodes
them while the one writer thread commits the previous group. A group is written in ONE
transaction and committed; only then is every message of the group
acknowledged to the broker (in arrival order) and an :class:`~shared.messages.Ack` published to
each device for its batches. Invalid payloads are stored in quarantine with a reason, counted and
acknowledged, so they never block the stream.

Failures: a database that is unreachable or locked makes the writer back off and retry the same
group, without acknowledging anything (if the process dies meanwhile, the broker redelivers the
session's unacknowledged messages). A group that fails for a reason that retrying cannot fix is
written message by message, and a message that still fails alone is quarantined as
``store_failed``: no payload can stop the writer. Such a message was valid, so its device gets
no Ack: it keeps the batch and re-sends it until the database takes it. A group that fails in a
way nothing here expects restarts the broker session, so that the broker redelivers what was not
acknowledged instead of holding it in flight.

Acks (see docs/PROTOCOL.md): a decoded batch gets one Ack naming every seq it settled (new,
duplicate or conflicting), split if its JSON would pass the device's 64 KiB limit; a payload
rejected whole gets a quarantined Ack naming its envelope range, when the envelope can be read.

Monitoring (with ``monitoring_enabled``): in the same transaction, the newly stored records are
sketched into their windows, range-checked against their device's hardware profile
(:mod:`collector.monitoring.windows`), and fed to the per-device sequential detectors, whose alarms
are stored as ``sequential_alarm`` rows (:mod:`collector.monitoring.streams`). The detectors' state
follows the transaction: it becomes live when the group commits and is dropped when it fails.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgpack
import numpy as np
import zstandard
from pydantic import BaseModel, ValidationError
from sqlalchemy import exc as sa_exc
from sqlalchemy import insert, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.sql.schema import Table

from collector import metrics
from collector.config import Settings
from collector.db.engine import make_engine
from collector.db.models import NAME_LEN, DeclaredGap, Device, DeviceEvent, Inference, IngestBatch, Quarantine
from collector.ingest.bulk import InferenceRows, WriteOutcome, write_inferences
from collector.monitoring.streams import SequentialWatch
from collector.monitoring.windows import NewRecords, WindowWriter, load_reference_bins
from collector.mqtt import CollectorMqtt, InboundMessage
from shared import messages, topics
from shared.codec import DEFAULT_LIMITS, MAGIC, Batch, BatchError, decode_batch

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)

_MAX_DETAIL = 2000
_MAX_TOPIC = 1024
_MAX_JSON_DEPTH = 32
_BACKOFF_MIN_S = 0.1
_BACKOFF_MAX_S = 5.0
_DROP_LOG_EVERY_S = 10.0
# Decoded columns held by one group at most: a group of maximal batches must not exhaust memory.
MAX_GROUP_BYTES = 256 * 1024 * 1024
# What a peek reads of a payload over the codec's limits: the envelope's epoch and seq come first.
PEEK_BYTES = 256 * 1024

DEVICE_TABLE: Table = Device.__table__  # type: ignore[attr-defined]
GAP_TABLE: Table = DeclaredGap.__table__  # type: ignore[attr-defined]
BATCH_TABLE: Table = IngestBatch.__table__  # type: ignore[attr-defined]
QUARANTINE_TABLE: Table = Quarantine.__table__  # type: ignore[attr-defined]
EVENT_TABLE: Table = DeviceEvent.__table__  # type: ignore[attr-defined]
assert Inference.__tablename__ == "inference"  # written by collector.ingest.bulk


class Invalid(Exception):
    """A message that cannot be stored as what it claims to be: quarantined under ``reason``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def clean_text(value: str, limit: int = _MAX_DETAIL) -> str:
    """``value`` cut to ``limit`` and made storable anywhere (no NUL, no lone surrogates)."""
    value = value[:limit].replace("\x00", "\\x00")
    return value.encode("utf-8", "backslashreplace").decode("utf-8")


def seq_ranges(seqs: np.ndarray) -> list[tuple[int, int]]:
    """Sorted, distinct ``seqs`` as inclusive ``(first, last)`` runs."""
    if not seqs.size:
        return []
    a = np.unique(seqs.astype(np.int64))
    breaks = np.flatnonzero(np.diff(a) != 1)
    starts = a[np.concatenate([[0], breaks + 1])]
    ends = a[np.concatenate([breaks, [a.size - 1]])]
    return [(int(s), int(e)) for s, e in zip(starts, ends, strict=True)]


# ------------------------------------------------------------------------------- validation


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _check_json(value: Any, depth: int = 0) -> None:
    """Refuse what a database cannot store: NUL, lone surrogates, non-finite numbers, > 64-bit integers."""
    if depth > _MAX_JSON_DEPTH:
        raise Invalid("bad_json", f"nested deeper than {_MAX_JSON_DEPTH}")
    if isinstance(value, str):
        if "\x00" in value:
            raise Invalid("bad_json", "a string holds a NUL character")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise Invalid("bad_json", "a string holds a lone surrogate") from None
    elif isinstance(value, bool) or value is None:
        return
    elif isinstance(value, int):
        if not -(2**63) <= value < 2**63:
            raise Invalid("bad_json", f"integer {value} does not fit in 64 bits")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise Invalid("bad_json", "a number is not finite")
    elif isinstance(value, list):
        for v in value:
            _check_json(v, depth + 1)
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_json(k, depth + 1)
            _check_json(v, depth + 1)


def parse_json_message(payload: bytes, model: type[M]) -> M:
    """Validate a JSON message of ``model``'s shape; raise :class:`Invalid` (``bad_json``, ``payload_too_large``)."""
    if len(payload) > messages.MAX_MESSAGE_BYTES:
        raise Invalid("payload_too_large", f"{len(payload)} bytes > limit {messages.MAX_MESSAGE_BYTES}")
    try:
        obj = json.loads(payload.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError as exc:
        raise Invalid("bad_json", f"not UTF-8: {exc}") from None
    except (ValueError, RecursionError) as exc:
        raise Invalid("bad_json", f"not JSON: {exc}") from None
    _check_json(obj)
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        errors = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in exc.errors()[:5])
        raise Invalid("bad_json", f"not a valid {model.__name__}: {errors}") from None


def _check_name(value: str | None, what: str) -> None:
    if value is not None and (len(value) > NAME_LEN or "\x00" in value):
        raise Invalid("bad_json", f"{what} must be at most {NAME_LEN} characters without NUL")


def _check_batch_strings(batch: Batch) -> None:
    """The codec bounds string lengths; a NUL would still break PostgreSQL text columns."""
    names = [batch.boot_id, batch.spool_epoch, batch.profile, batch.agent_version]
    names += [s for b in batch.blocks for s in (b.model_name, b.model_version)]
    names += [g.reason for g in batch.gaps]
    if any("\x00" in s for s in names):
        raise Invalid("bad_envelope", "a string field holds a NUL character")


class _BoundedStream:
    """At most ``budget`` decompressed bytes of a zstd frame; a corrupt or truncated frame reads as its end."""

    def __init__(self, frame: memoryview, budget: int) -> None:
        self._reader = zstandard.ZstdDecompressor().stream_reader(frame, read_across_frames=False)
        self._left = budget

    def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (never past the budget); ``b""`` at the end."""
        n = self._left if n < 0 else min(n, self._left)
        if n <= 0:
            return b""
        try:
            data: bytes = self._reader.read(n)
        except zstandard.ZstdError:
            data, self._left = b"", 0
        self._left -= len(data)
        return data


def peek_envelope(payload: bytes) -> tuple[str, tuple[int, int]] | None:
    """The spool epoch and seq range of a payload that failed validation, when its envelope still says them.

    Lets the collector tell the device which batch was quarantined, so the device releases it
    instead of re-sending it forever. The envelope is read as a stream, key by key, and the
    reading stops once ``epoch`` and ``seq`` are known: a payload over the codec's limits
    (``payload_too_large``, ``decompressed_too_large``) is peeked at through its first
    ``PEEK_BYTES`` only (compressed and decompressed), one within them under the decoder's limits.
    """
    limits = DEFAULT_LIMITS
    if payload[: len(MAGIC)] != MAGIC or len(payload) <= len(MAGIC) + 1:
        return None
    frame = memoryview(payload)[len(MAGIC) + 1 :]
    try:
        declared = zstandard.frame_content_size(frame)
    except zstandard.ZstdError:
        return None
    budget = limits.max_decompressed_bytes
    if len(payload) > limits.max_payload_bytes or declared > limits.max_decompressed_bytes:
        budget, frame = PEEK_BYTES, frame[:PEEK_BYTES]
    unpacker = msgpack.Unpacker(
        _BoundedStream(frame, budget),
        read_size=min(64 * 1024, budget),
        max_buffer_size=budget,
        raw=False,
        strict_map_key=True,
        max_str_len=limits.max_string * 16,
        max_bin_len=budget,
        max_array_len=max(limits.max_gaps, 64),
        max_map_len=64,
        max_ext_len=0,
    )
    found: dict[str, Any] = {}
    try:
        for _ in range(unpacker.read_map_header()):
            key = unpacker.unpack()
            if key in ("epoch", "seq"):
                found[key] = unpacker.unpack()
                if len(found) == 2:
                    break
            else:
                unpacker.skip()
    except Exception:  # not a map, too deep, too big, cut short: no envelope to name a batch by
        return None
    epoch, seq = found.get("epoch"), found.get("seq")
    if not isinstance(epoch, str) or not 0 < len(epoch) <= limits.max_string or "\x00" in epoch:
        return None
    if not (isinstance(seq, list) and len(seq) == 2 and all(type(x) is int for x in seq)):
        return None
    if not 0 <= seq[0] <= seq[1] < 2**63:
        return None
    return epoch, (seq[0], seq[1])


def split_ack(ack: messages.Ack, limit: int = messages.MAX_MESSAGE_BYTES) -> list[messages.Ack]:
    """``ack`` as consecutive Acks whose JSON each fits in ``limit`` bytes (the device refuses larger ones).

    The ranges (then the gaps) are spread over them in order; together they say exactly what
    ``ack`` says. A batch with scattered seqs can need thousands of ranges.
    """
    if len(ack.model_dump_json()) <= limit:
        return [ack]
    base = len(ack.model_copy(update={"ranges": [], "gaps": []}).model_dump_json())
    parts: list[messages.Ack] = []
    ranges: list[tuple[int, int]] = []
    gaps: list[tuple[int, int]] = []
    size = base
    items = [(ranges, r) for r in ack.ranges] + [(gaps, g) for g in ack.gaps]
    for target, (a, b) in items:
        cost = len(f"[{a},{b}],")
        if size + cost > limit and (ranges or gaps):
            parts.append(ack.model_copy(update={"ranges": list(ranges), "gaps": list(gaps)}))
            ranges.clear()
            gaps.clear()
            size = base
        target.append((a, b))
        size += cost
    parts.append(ack.model_copy(update={"ranges": list(ranges), "gaps": list(gaps)}))
    return parts


# ------------------------------------------------------------------------------- one message


@dataclass
class Prepared:
    """One message on its way through a group: what it is, and what became of it."""

    msg: InboundMessage
    kind: topics.Kind | None = None
    device_id: str | None = None
    batch: Batch | None = None
    rows: list[InferenceRows] = field(default_factory=list)
    status: messages.Status | None = None
    event: messages.DeviceEvent | None = None
    reported: messages.Reported | None = None
    cleared: bool = False  # an empty retained payload (a retained topic being cleared): nothing to store
    reason: str | None = None  # set when quarantined
    detail: str = ""
    peeked: tuple[str, tuple[int, int]] | None = None
    refused: bool = False  # valid, but the database would not store it (``store_failed``): the device re-sends
    outcomes: list[WriteOutcome] = field(default_factory=list)
    new_lost: int = 0  # records of gaps this batch declared for the first time
    unsketched: int = 0  # new records not sketched into monitoring windows (model version without a bundle)
    unranged: int = 0  # new records sketched without range checks (the batch's hardware profile is unknown)
    alarms: Counter[str] = field(default_factory=Counter)  # sequential alarms raised on its records, per signal
    stale: int = 0  # new records not fed to the sequential detectors (older than their device's new stream)
    settled: bool = False  # committed and accounted for

    @property
    def n_records(self) -> int:
        """Inference records this message carries (0 unless valid telemetry)."""
        return sum(len(r) for r in self.rows)

    @property
    def nbytes(self) -> int:
        """Memory this message holds (payload and decoded columns)."""
        return len(self.msg.payload) + sum(r.nbytes for r in self.rows)

    def quarantine(self, reason: str, detail: str) -> Prepared:
        """Mark for quarantine under ``reason``; whatever was parsed is dropped."""
        self.reason, self.detail = reason, clean_text(detail)
        self.batch, self.rows, self.status, self.event, self.reported = None, [], None, None, None
        self.outcomes, self.new_lost = [], 0
        self.unsketched = self.unranged = self.stale = 0
        self.alarms = Counter()
        return self


def prepare(msg: InboundMessage) -> Prepared:
    """Parse and validate one message (never raises; an invalid one comes back marked for quarantine)."""
    item = Prepared(msg)
    try:
        item.device_id, item.kind = topics.parse(msg.topic)
    except topics.TopicError as exc:
        return item.quarantine("bad_topic", str(exc))
    try:
        if item.kind is topics.Kind.TELEMETRY:
            _prepare_telemetry(item)
        elif not msg.payload and item.kind in (topics.Kind.STATUS, topics.Kind.REPORTED):
            item.cleared = True
        elif item.kind is topics.Kind.STATUS:
            item.status = parse_json_message(msg.payload, messages.Status)
            s = item.status
            for name in ("agent_version", "boot_id", "spool_epoch", "profile"):
                _check_name(getattr(s, name), name)
            if s.model is not None:
                _check_name(s.model.name, "model.name")
                _check_name(s.model.version, "model.version")
        elif item.kind is topics.Kind.EVENTS:
            item.event = parse_json_message(msg.payload, messages.DeviceEvent)
            if not math.isfinite(item.event.ts):
                raise Invalid("bad_json", "ts is not finite")
        elif item.kind is topics.Kind.REPORTED:
            item.reported = parse_json_message(msg.payload, messages.Reported)
            if item.reported.model is not None:
                _check_name(item.reported.model.name, "model.name")
                _check_name(item.reported.model.version, "model.version")
        else:
            raise Invalid("bad_topic", f"the collector does not take {item.kind.value!r} messages")
    except Invalid as exc:
        return item.quarantine(exc.reason, exc.detail)
    except Exception as exc:  # a bug of ours must not stop the stream: keep the payload for a look
        log.exception("unexpected error preparing a message on %s", msg.topic)
        return item.quarantine("internal_error", f"{type(exc).__name__}: {exc}")
    return item


def _prepare_telemetry(item: Prepared) -> None:
    msg = item.msg
    try:
        batch = decode_batch(msg.payload)
    except BatchError as exc:
        item.peeked = peek_envelope(msg.payload)
        raise Invalid(exc.reason, exc.detail) from None
    item.peeked = (batch.spool_epoch, (batch.seq_first, batch.seq_last))
    if batch.device_id != item.device_id:
        raise Invalid("device_mismatch", f"envelope device {batch.device_id!r} != topic device {item.device_id!r}")
    _check_batch_strings(batch)
    item.batch = batch
    item.rows = [InferenceRows.from_block(batch, block, msg.received_at) for block in batch.blocks]


# ------------------------------------------------------------------------------- the service


def _queued_size(msg: InboundMessage) -> int:
    """Memory a queued message is counted for: its payload and topic plus a fixed overhead."""
    return len(msg.payload) + len(msg.topic) + 256


class _Transient(Exception):
    """A failure retrying can fix (database unreachable, locked, restarting)."""


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(
        exc, sa_exc.OperationalError | sa_exc.InterfaceError | sa_exc.TimeoutError | sa_exc.DisconnectionError | OSError
    )


@dataclass
class _Stats:
    messages: Counter[str] = field(default_factory=Counter)
    quarantined: Counter[str] = field(default_factory=Counter)
    records_inserted: int = 0
    records_duplicate: int = 0
    records_conflict: int = 0
    declared_lost: int = 0
    records_unsketched: int = 0
    records_unranged: int = 0
    sequential_alarms: Counter[str] = field(default_factory=Counter)
    batches: int = 0
    groups: int = 0
    commits: int = 0
    commit_failures: int = 0
    acks_published: int = 0
    mqtt_acks_skipped: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    forced_reconnects: int = 0
    last_commit_at: float | None = None
    last_error: str | None = None


class Ingest:
    """MQTT ingest: ``start()``, ``stop()``, ``stats()``; the schema must already be migrated."""

    def __init__(self, settings: Settings, engine: Engine | None = None) -> None:
        self.settings = settings
        self._own_engine = engine is None
        self.engine = engine if engine is not None else make_engine(settings.database)
        self.windows: WindowWriter | None = None
        self.streams: SequentialWatch | None = None
        if settings.monitoring_enabled:
            bins = load_reference_bins(settings.monitoring_bundles, settings.monitoring_trusted_keys)
            self.windows = WindowWriter.from_settings(settings, bins)
            if settings.monitoring_sequential_enabled:
                self.streams = SequentialWatch.from_settings(settings, bins)
        self._queue: queue.SimpleQueue[InboundMessage] = queue.SimpleQueue()  # bounded in _enqueue
        self.mqtt = CollectorMqtt(settings, self._enqueue)
        self._stop = threading.Event()
        self._abort = threading.Event()
        self._threads: list[threading.Thread] = []
        # Decoded groups waiting for the writer: one, so decoding overlaps the previous commit without running ahead.
        self._groups: queue.Queue[list[Prepared] | None] = queue.Queue(maxsize=1)
        self._lock = threading.Lock()
        self._stats = _Stats()
        self._pending = 0  # messages received and not yet acknowledged or given up
        self._queued_bytes = 0  # payload bytes waiting in ``_queue``
        self._last_drop_log = 0.0
        self._drops_unlogged: Counter[str] = Counter()

    def _enqueue(self, msg: InboundMessage) -> None:
        """Called on paho's network thread for every message: queue it for the decoder, or drop a QoS 0 one.

        QoS 1 messages are bounded by the broker's in-flight window (``max_inflight_messages``),
        so they are always taken (blocking this thread would stop the keepalive too). QoS 0
        bypasses that window and can never be acknowledged: QoS 0 telemetry is dropped (a device
        that cannot be told what was stored must use QoS 1), and any other QoS 0 message is
        dropped while ``ingest_max_queued_bytes`` are waiting.
        """
        size = _queued_size(msg)
        over = False
        with self._lock:
            if msg.qos == 0 and msg.topic.endswith("/" + topics.Kind.TELEMETRY.value):
                drop = "qos0"
            elif msg.qos == 0 and self._queued_bytes + size > self.settings.ingest_max_queued_bytes:
                drop = "queue_full"
            else:
                drop = None
                self._pending += 1
                self._queued_bytes += size
                over = self._queued_bytes > self.settings.ingest_max_queued_bytes
        if drop is not None:
            self._drop(msg, drop)
            return
        if over:
            self._note_drop_or_excess("over_limit", msg)
        metrics.INGEST_QUEUE_DEPTH.inc()
        self._queue.put(msg)

    def _dequeued(self, msg: InboundMessage) -> InboundMessage:
        with self._lock:
            self._queued_bytes -= _queued_size(msg)
        return msg

    def _drop(self, msg: InboundMessage, reason: str) -> None:
        metrics.INGEST_DROPPED.labels(reason).inc()
        with self._lock:
            self._stats.dropped[reason] += 1
        self._note_drop_or_excess(reason, msg)

    def _note_drop_or_excess(self, reason: str, msg: InboundMessage) -> None:
        """Log drops (and QoS 1 messages over the queue limit) at most every ``_DROP_LOG_EVERY_S``."""
        now = time.monotonic()
        with self._lock:
            self._drops_unlogged[reason] += 1
            if now - self._last_drop_log < _DROP_LOG_EVERY_S:
                return
            self._last_drop_log = now
            counts, self._drops_unlogged = dict(self._drops_unlogged), Counter()
            queued = self._queued_bytes
        log.warning(
            "ingest queue: %s since the last report (latest on %s, QoS %d; %d bytes queued, limit %d). "
            "qos0: QoS 0 telemetry is dropped, it cannot be acknowledged; queue_full: a QoS 0 message "
            "dropped while the queue is full; over_limit: QoS 1 messages beyond the limit (is the broker's "
            "max_inflight_messages set?)",
            ", ".join(f"{k} {v}" for k, v in sorted(counts.items())),
            clean_text(msg.topic, 200),
            msg.qos,
            queued,
            self.settings.ingest_max_queued_bytes,
        )

    # ------------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Start the decoder and writer threads, then connect to the broker."""
        if self._threads:
            return
        self._stop.clear()
        self._abort.clear()
        self._threads = [
            threading.Thread(target=self._decode_loop, name="ingest-decoder", daemon=True),
            threading.Thread(target=self._write_loop, name="ingest-writer", daemon=True),
        ]
        for t in self._threads:
            t.start()
        self.mqtt.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop taking messages, commit and acknowledge what was received, then disconnect.

        If the database does not let the writer finish within ``timeout``, the rest stays
        unacknowledged at the broker and comes again to the next session.
        """
        self.mqtt.pause()
        self._stop.set()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in self._threads):
            log.warning("ingest writer still busy after %.1fs; leaving the rest to the broker", timeout)
            self._abort.set()
            for t in self._threads:
                t.join(_BACKOFF_MAX_S + 5)
        self._threads = []
        while not self._groups.empty():
            self._groups.get_nowait()
        self.mqtt.stop()
        with self._lock:
            metrics.INGEST_QUEUE_DEPTH.dec(self._pending)
            self._pending = 0
            self._queued_bytes = 0
        # Messages still queued were never acknowledged: the broker redelivers them.
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if self._own_engine:
            self.engine.dispose()

    @property
    def connected(self) -> bool:
        """True while the MQTT client is connected and subscribed."""
        return self.mqtt.connected

    def wait_connected(self, timeout: float = 10.0) -> bool:
        """Block until connected and subscribed (or ``timeout``)."""
        return self.mqtt.wait_connected(timeout)

    def stats(self) -> dict[str, Any]:
        """Counters of this instance (the Prometheus metrics add up all instances of the process)."""
        with self._lock:
            s = self._stats
            return {
                "connected": self.connected,
                "pending": self._pending,
                "messages": dict(s.messages),
                "quarantined": dict(s.quarantined),
                "records_inserted": s.records_inserted,
                "records_duplicate": s.records_duplicate,
                "records_conflict": s.records_conflict,
                "declared_lost": s.declared_lost,
                "records_unsketched": s.records_unsketched,
                "records_unranged": s.records_unranged,
                "sequential_alarms": dict(s.sequential_alarms),
                "batches": s.batches,
                "groups": s.groups,
                "commits": s.commits,
                "commit_failures": s.commit_failures,
                "acks_published": s.acks_published,
                "mqtt_acks_skipped": s.mqtt_acks_skipped,
                "dropped": dict(s.dropped),
                "forced_reconnects": s.forced_reconnects,
                "queued_bytes": self._queued_bytes,
                "last_commit_at": s.last_commit_at,
                "last_error": s.last_error,
            }

    # ------------------------------------------------------------------------- writer thread

    def _decode_loop(self) -> None:
        """Collect and decode groups; ends (with a None for the writer) once stopped and drained."""
        while not self._abort.is_set():
            try:
                group = self._collect()
            except Exception:  # prepare() never raises; this guards the loop itself
                log.exception("ingest decoder failed; reconnecting so the broker redelivers its messages")
                self._give_up([])
                continue
            if not group:
                if self._stop.is_set():
                    break
                continue
            self._hand_over(group)
        self._hand_over(None)

    def _hand_over(self, group: list[Prepared] | None) -> None:
        while not self._abort.is_set():
            try:
                self._groups.put(group, timeout=0.1)
                return
            except queue.Full:
                continue

    def _write_loop(self) -> None:
        """Commit groups in arrival order until the decoder says it is done (or stop gives up)."""
        while not self._abort.is_set():
            try:
                group = self._groups.get(timeout=0.1)
            except queue.Empty:
                continue
            if group is None:
                return
            try:
                self._commit(group)
            except Exception:
                # What of the group was not acknowledged holds a broker in-flight slot each until the
                # session restarts: reconnect now, so the broker redelivers it and the slots come back.
                log.exception("ingest group of %d messages failed unexpectedly; reconnecting to the broker", len(group))
                self._give_up([item for item in group if not item.settled])

    def _give_up(self, items: list[Prepared]) -> None:
        """Forget ``items`` (taken, not acknowledged) and restart the session so the broker redelivers them."""
        with self._lock:
            self._pending -= len(items)
            self._stats.forced_reconnects += 1
        metrics.INGEST_QUEUE_DEPTH.dec(len(items))
        metrics.INGEST_FORCED_RECONNECTS.inc()
        if not self._stop.is_set():
            self.mqtt.reconnect()

    def _collect(self) -> list[Prepared]:
        """The next group: up to the message or record limit, the delay after its first message, or the memory cap."""
        try:
            first = self._dequeued(self._queue.get(timeout=0.1))
        except queue.Empty:
            return []
        group = [prepare(first)]
        held, records = group[0].nbytes, group[0].n_records
        deadline = time.monotonic() + self.settings.ingest_max_delay_ms / 1000
        while (
            len(group) < self.settings.ingest_max_batch_messages
            and records < self.settings.ingest_max_batch_records
            and held < MAX_GROUP_BYTES
        ):
            remaining = deadline - time.monotonic()
            try:
                msg = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            self._dequeued(msg)
            group.append(prepare(msg))
            held += group[-1].nbytes
            records += group[-1].n_records
        return group

    def _commit(self, items: list[Prepared]) -> bool:
        """Write ``items`` in one transaction, retrying while the failure is transient; then acknowledge.

        Returns False when the service is aborting and ``items`` (or the rest of them) were left
        unacknowledged for the broker to redeliver.
        """
        delay = _BACKOFF_MIN_S
        while True:
            started = time.perf_counter()
            try:
                acks = self._transaction(items)
            except Exception as exc:
                self._count_failure(exc)
                if _is_transient(exc) or isinstance(exc, _Transient):
                    log.warning("ingest commit failed (%s); retrying in %.1fs, nothing acknowledged", exc, delay)
                elif len(items) > 1:
                    log.warning("ingest group failed (%s); writing its %d messages one by one", exc, len(items))
                    # Stopping: the first message not committed and every later one are left to the
                    # broker, so the acknowledgements stay in arrival order.
                    return all(not self._abort.is_set() and self._commit([item]) for item in items)
                elif items[0].reason is None:
                    self._refuse(items[0], exc)
                    continue
                elif items[0].reason != "store_failed":
                    item = items[0]
                    log.error("quarantining a message on %s failed (%s); now store_failed", item.msg.topic, exc)
                    item.quarantine("store_failed", f"was {item.reason}: {item.detail}; {type(exc).__name__}: {exc}")
                    continue
                else:
                    # Even the quarantine row failed: that is the database, not the payload. Wait and retry.
                    log.warning("storing a quarantine row failed (%s); retrying in %.1fs", exc, delay)
                if self._abort.wait(delay):
                    log.warning("ingest stopping with %d messages uncommitted; the broker keeps them", len(items))
                    return False
                delay = min(delay * 2, _BACKOFF_MAX_S)
                continue
            metrics.INGEST_COMMIT_SECONDS.observe(time.perf_counter() - started)
            self._after_commit(items, acks)
            return True

    def _refuse(self, item: Prepared, exc: BaseException) -> None:
        """A valid message the database refuses: keep it whole in quarantine and tell the device nothing.

        Without an Ack the device keeps the batch and re-sends it after its ack timeout, so the
        records land once the database is fixed; the MQTT message itself is acknowledged so the
        stream goes on.
        """
        what = f"{item.kind.value if item.kind else 'unknown'} message"
        then = ""
        if item.batch is not None:
            b = item.batch
            what = f"telemetry batch (epoch {b.spool_epoch}, seq {b.seq_first}-{b.seq_last}, {b.n_records} records)"
            then = " NOT acknowledged to the device, which re-sends it until the database takes it."
        log.error(
            "DATABASE REFUSED a valid %s from %s: %s: %s. Kept whole in quarantine as store_failed.%s "
            "Fix the database.",
            what,
            item.device_id,
            type(exc).__name__,
            exc,
            then,
        )
        item.quarantine("store_failed", f"{type(exc).__name__}: {exc}")
        item.refused = True

    def _count_failure(self, exc: BaseException) -> None:
        metrics.INGEST_COMMIT_FAILURES.inc()
        with self._lock:
            self._stats.commit_failures += 1
            self._stats.last_error = clean_text(f"{type(exc).__name__}: {exc}", 500)

    # ------------------------------------------------------------------------- the transaction

    def _transaction(self, items: list[Prepared]) -> list[tuple[str, messages.Ack]]:
        streams = self.streams
        if streams is not None:
            streams.begin()  # detector state follows the transaction: live on commit, dropped on failure
        try:
            with self.engine.connect().execution_options(sqlite_begin="IMMEDIATE") as conn, conn.begin():
                acks = write_group(conn, items, self.settings.quarantine_max_payload_bytes, self.windows, streams)
        except BaseException:
            if streams is not None:
                streams.rollback()
            raise
        if streams is not None:
            streams.commit()
        return acks

    def _after_commit(self, items: list[Prepared], acks: list[tuple[str, messages.Ack]]) -> None:
        skipped = 0
        for item in items:  # arrival order
            if not self.mqtt.ack(item.msg):
                skipped += 1
        for device_id, ack in acks:
            self.mqtt.publish_ack(device_id, ack)
        self._account(items, len(acks), skipped)

    def _account(self, items: list[Prepared], n_acks: int, skipped: int) -> None:
        inserted = duplicate = conflict = lost = batches = unsketched = unranged = stale = 0
        alarms: Counter[str] = Counter()
        kinds: Counter[str] = Counter()
        reasons: Counter[str] = Counter()
        for item in items:
            item.settled = True
            kinds[item.kind.value if item.kind else "unknown"] += 1
            if item.reason:
                reasons[item.reason] += 1
            for o in item.outcomes:
                inserted += o.inserted
                duplicate += o.duplicates
                conflict += int(o.conflicts.size)
            if item.outcomes and int(sum(o.conflicts.size for o in item.outcomes)):
                reasons["seq_conflict"] += 1
            if item.batch is not None:
                batches += 1
                lost += item.new_lost
                unsketched += item.unsketched
                unranged += item.unranged
                stale += item.stale
                alarms.update(item.alarms)
        for kind, n in kinds.items():
            metrics.INGEST_MESSAGES.labels(kind).inc(n)
        for reason, n in reasons.items():
            metrics.INGEST_QUARANTINED.labels(reason).inc(n)
        metrics.INGEST_RECORDS.labels("inserted").inc(inserted)
        metrics.INGEST_RECORDS.labels("duplicate").inc(duplicate)
        metrics.INGEST_RECORDS.labels("conflict").inc(conflict)
        metrics.INGEST_DECLARED_LOST.inc(lost)
        metrics.MONITORING_UNSKETCHED.inc(unsketched)
        metrics.MONITORING_UNKNOWN_PROFILE.inc(unranged)
        metrics.SEQUENTIAL_STALE.inc(stale)
        for signal, n in alarms.items():
            metrics.SEQUENTIAL_ALARMS.labels(signal).inc(n)
        if self.streams is not None:
            metrics.SEQUENTIAL_STREAMS.set(len(self.streams))
        metrics.INGEST_COMMITS.inc()
        metrics.INGEST_GROUP_MESSAGES.observe(len(items))
        metrics.INGEST_QUEUE_DEPTH.dec(len(items))
        with self._lock:
            s = self._stats
            s.messages.update(kinds)
            s.quarantined.update(reasons)
            s.records_inserted += inserted
            s.records_duplicate += duplicate
            s.records_conflict += conflict
            s.declared_lost += lost
            s.records_unsketched += unsketched
            s.records_unranged += unranged
            s.sequential_alarms.update(alarms)
            s.batches += batches
            s.groups += 1
            s.commits += 1
            s.acks_published += n_acks
            s.mqtt_acks_skipped += skipped
            s.last_commit_at = time.time()
            self._pending -= len(items)


# ----------------------------------------------------------------------------------- writing


def _insert_ignore(conn: Connection, table: Table, keys: list[str]) -> Any:
    """``INSERT … ON CONFLICT (keys) DO NOTHING`` in the connection's dialect."""
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    return dialect.insert(table).on_conflict_do_nothing(index_elements=keys)


def _quarantine_row(item: Prepared, reason: str, detail: str, cap: int) -> dict[str, Any]:
    payload = item.msg.payload
    return {
        "received_at": item.msg.received_at,
        "topic": clean_text(item.msg.topic, _MAX_TOPIC),
        "device_id": item.device_id,
        "reason": reason,
        "detail": clean_text(detail),
        "payload": payload[:cap],
        "payload_bytes": len(payload),
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
    }


@dataclass
class _DeviceChange:
    first_seen: float
    last_seen: float
    values: dict[str, Any] = field(default_factory=dict)
    records: int = 0
    lost: int = 0


def write_group(
    conn: Connection,
    items: list[Prepared],
    cap: int,
    windows: WindowWriter | None = None,
    streams: SequentialWatch | None = None,
) -> list[tuple[str, messages.Ack]]:
    """Everything of one group, on ``conn`` inside its transaction; returns the Acks to publish after commit.

    With ``windows``, the newly inserted records are also sketched into their monitoring windows
    (range-checked against the hardware profile their batch names); with ``streams``, they are fed
    to the sequential detectors and the alarms raised are inserted.
    """
    devices: dict[str, _DeviceChange] = {}
    for item in items:
        if item.device_id is not None and not item.cleared:
            change = devices.setdefault(item.device_id, _DeviceChange(item.msg.received_at, item.msg.received_at))
            change.last_seen = max(change.last_seen, item.msg.received_at)
    if devices:
        conn.execute(
            _insert_ignore(conn, DEVICE_TABLE, ["id"]),
            [
                {
                    "id": dev,
                    "first_seen": c.first_seen,
                    "last_seen": c.first_seen,
                    "status": "unknown",
                    "sensors": {},
                    "tags": [],
                    "records": 0,
                    "declared_lost": 0,
                }
                # Sorted: replicas sharing a subscription take row locks in the same order (no deadlock).
                for dev, c in sorted(devices.items())
            ],
        )

    telemetry = [it for it in items if it.batch is not None]
    for it in telemetry:
        it.new_lost = 0
    outcomes = write_inferences(conn, [r for it in telemetry for r in it.rows])
    pos = 0
    for it in telemetry:
        it.outcomes = outcomes[pos : pos + len(it.rows)]
        pos += len(it.rows)
    if telemetry and (windows is not None or streams is not None):
        written = [NewRecords(it.rows, it.outcomes, it.batch.profile if it.batch else None) for it in telemetry]
        if windows is not None:
            for it, missed in zip(telemetry, windows.write(conn, written), strict=True):
                it.unsketched, it.unranged = missed.unsketched, missed.unranged
        if streams is not None:
            for it, seen in zip(telemetry, streams.observe(conn, written), strict=True):
                it.alarms, it.stale = seen.alarms, seen.stale

    quarantine: list[dict[str, Any]] = []
    batch_rows: list[dict[str, Any]] = []
    gap_rows: dict[tuple[str, str, int, int], tuple[dict[str, Any], Prepared]] = {}
    events: list[dict[str, Any]] = []
    acks: list[tuple[str, messages.Ack]] = []
    for item in items:
        if item.reason is not None:
            # A refused valid message is kept whole (up to the codec's limit) so an operator can recover it.
            keep = max(cap, DEFAULT_LIMITS.max_payload_bytes) if item.refused else cap
            quarantine.append(_quarantine_row(item, item.reason, item.detail, keep))
            if item.refused:
                # Valid, but the database refused it: no Ack, so the device keeps the batch and
                # re-sends it until the database takes it.
                continue
            if item.kind is topics.Kind.TELEMETRY and item.peeked is not None and item.device_id is not None:
                epoch, (first, last) = item.peeked
                acks.append(
                    (
                        item.device_id,
                        messages.Ack(spool_epoch=epoch, ranges=[(first, last)], quarantined=True, reason=item.reason),
                    )
                )
            continue
        assert item.device_id is not None
        known = devices.get(item.device_id)
        if item.batch is not None and known is not None:
            acks.extend(_telemetry(item, known, quarantine, batch_rows, gap_rows, cap))
        elif item.status is not None and known is not None:
            _apply_status(item.status, item.msg.received_at, known)
        elif item.reported is not None and known is not None:
            known.values["reported"] = item.reported.model_dump(mode="json")
            known.values["reported_at"] = item.msg.received_at
            if item.reported.model is not None:
                known.values["model_name"] = item.reported.model.name
                known.values["model_version"] = item.reported.model.version
        elif item.event is not None:
            ev = item.event
            events.append(
                {
                    "device_id": item.device_id,
                    "ts": ev.ts,
                    "kind": ev.kind,
                    "message": ev.message,
                    "data": ev.data,
                    "received_at": item.msg.received_at,
                }
            )

    if gap_rows:
        g = GAP_TABLE.c
        stmt = _insert_ignore(conn, GAP_TABLE, ["device_id", "spool_epoch", "seq_first", "seq_last"]).returning(
            g.device_id, g.spool_epoch, g.seq_first, g.seq_last
        )
        for dev, epoch, first, last in conn.execute(stmt, [row for row, _owner in gap_rows.values()]).all():
            # Only a first declaration counts as lost records; a re-sent batch repeats its gaps.
            n = int(last) - int(first) + 1
            devices[dev].lost += n
            gap_rows[(dev, epoch, int(first), int(last))][1].new_lost += n
    if batch_rows:
        conn.execute(insert(BATCH_TABLE), batch_rows)
    if quarantine:
        conn.execute(insert(QUARANTINE_TABLE), quarantine)
    if events:
        conn.execute(insert(EVENT_TABLE), events)
    c = DEVICE_TABLE.c
    for dev, change in sorted(devices.items()):
        conn.execute(
            update(DEVICE_TABLE)
            .where(c.id == dev)
            .values(
                last_seen=change.last_seen,
                records=c.records + change.records,
                declared_lost=c.declared_lost + change.lost,
                **change.values,
            )
        )
    return acks


def _telemetry(
    item: Prepared,
    change: _DeviceChange,
    quarantine: list[dict[str, Any]],
    batch_rows: list[dict[str, Any]],
    gap_rows: dict[tuple[str, str, int, int], tuple[dict[str, Any], Prepared]],
    cap: int,
) -> list[tuple[str, messages.Ack]]:
    batch = item.batch
    assert batch is not None and item.device_id is not None
    received = item.msg.received_at
    inserted = sum(o.inserted for o in item.outcomes)
    duplicates = sum(o.duplicates for o in item.outcomes)
    conflicts = np.concatenate([o.conflicts for o in item.outcomes]) if item.outcomes else np.zeros(0, np.int64)
    change.records += inserted
    change.values.update(
        boot_id=batch.boot_id,
        spool_epoch=batch.spool_epoch,
        profile=batch.profile,
        agent_version=batch.agent_version,
    )
    active = next((b for b in batch.blocks if b.role == "active"), None)
    if active is not None:
        change.values.update(model_name=active.model_name, model_version=active.model_version)
    if conflicts.size:
        runs = seq_ranges(conflicts)
        shown = ", ".join(f"{a}-{b}" if a != b else str(a) for a, b in runs[:50])
        more = f" and {len(runs) - 50} more ranges" if len(runs) > 50 else ""
        quarantine.append(
            _quarantine_row(
                item,
                "seq_conflict",
                f"{conflicts.size} records of epoch {batch.spool_epoch} reuse stored seqs with different content "
                f"(first version kept): {shown}{more}",
                cap,
            )
        )
    batch_rows.append(
        {
            "device_id": batch.device_id,
            "spool_epoch": batch.spool_epoch,
            "boot_id": batch.boot_id,
            "seq_first": batch.seq_first,
            "seq_last": batch.seq_last,
            "n_records": batch.n_records,
            "inserted": inserted,
            "duplicates": duplicates,
            "conflicts": int(conflicts.size),
            "sent_at": batch.sent_at,
            "sent_mono": batch.sent_mono,
            "clock_synced": batch.clock_synced,
            "profile": batch.profile,
            "agent_version": batch.agent_version,
            "received_at": received,
            "payload_bytes": len(item.msg.payload),
        }
    )
    for g in batch.gaps:
        gap_rows.setdefault(
            (batch.device_id, batch.spool_epoch, g.first, g.last),
            (
                {
                    "device_id": batch.device_id,
                    "spool_epoch": batch.spool_epoch,
                    "seq_first": g.first,
                    "seq_last": g.last,
                    "reason": g.reason,
                    "received_at": received,
                },
                item,
            ),
        )
    # Every record of the batch is settled now (stored new, a duplicate, or a conflict kept in
    # quarantine), so ONE Ack names them all: a chunk mixing fresh and conflicting seqs is released.
    seqs = np.concatenate([r.seq for r in item.rows]) if item.rows else np.zeros(0, np.int64)
    ack = messages.Ack(
        spool_epoch=batch.spool_epoch,
        ranges=seq_ranges(seqs),
        gaps=[(g.first, g.last) for g in batch.gaps],
        reason="seq_conflict" if conflicts.size else None,
    )
    return [(batch.device_id, part) for part in split_ack(ack)]


def _apply_status(status: messages.Status, received_at: float, change: _DeviceChange) -> None:
    v = change.values
    v["status"] = status.state
    v["status_at"] = received_at
    given = status.model_fields_set
    for name in ("agent_version", "boot_id", "spool_epoch", "profile", "spool_depth", "spool_bytes", "inference_rate"):
        if name in given and getattr(status, name) is not None:
            v[name] = getattr(status, name)
    if "model" in given and status.model is not None:
        v["model_name"] = status.model.name
        v["model_version"] = status.model.version
    if "sensors" in given:
        v["sensors"] = {k: s.model_dump(mode="json") for k, s in status.sensors.items()}
    if "tags" in given:
        v["tags"] = list(status.tags)
