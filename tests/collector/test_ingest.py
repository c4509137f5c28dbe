"""Ingest without the broker: validation of every kind of hostile payload, and one group's transaction."""

from __future__ import annotations

import dataclasses
import json
import tracemalloc
from collections.abc import Iterator
from typing import Any

import msgpack
import numpy as np
import pytest
import sqlalchemy as sa
import zstandard
from prometheus_client import REGISTRY
from sqlalchemy.engine import Engine

from collector.config import Settings
from collector.db import make_engine, upgrade
from collector.ingest.service import (
    PEEK_BYTES,
    Ingest,
    Prepared,
    parse_json_message,
    peek_envelope,
    prepare,
    seq_ranges,
    split_ack,
    write_group,
)
from collector.mqtt import InboundMessage
from shared import messages
from shared.codec import DEFAULT_LIMITS, MAGIC, Batch, Gap, encode_batch
from tests.shared.test_codec import make_batch, make_block

T0 = 1.76e9 + 100.0


def msg(topic: str, payload: bytes | str, at: float = T0, qos: int = 1) -> InboundMessage:
    data = payload.encode() if isinstance(payload, str) else payload
    return InboundMessage(mid=1, qos=qos, topic=topic, payload=data, received_at=at, session=1)


def tele(device: str = "veh-001") -> str:
    return f"fleet/v1/{device}/telemetry"


def batch(n: int = 50, first: int = 10, seed: int = 0, **changes: Any) -> Batch:
    blk = make_block(n, first_seq=first, seed=seed)
    changes.setdefault("gaps", [])
    return make_batch(blk, seq_first=first, seq_last=first + n - 1, **changes)


def bomb(declared: bool) -> bytes:
    body = b"\x00" * (40 * 1024 * 1024)
    return MAGIC + b"\x01" + zstandard.ZstdCompressor(level=1, write_content_size=declared).compress(body)


def nan_batch() -> bytes:
    b = batch()
    probs = b.blocks[0].probs.copy()
    probs[3, 1] = np.nan
    return encode_batch(dataclasses.replace(b, blocks=[dataclasses.replace(b.blocks[0], probs=probs)]))


def nul_model_batch() -> bytes:
    b = batch()
    return encode_batch(dataclasses.replace(b, blocks=[dataclasses.replace(b.blocks[0], model_name="cabin\x00x")]))


def wrong_version() -> bytes:
    payload = encode_batch(batch())
    return payload[:3] + b"\x02" + payload[4:]


HOSTILE_TELEMETRY = {
    "bad_magic": lambda: np.random.default_rng(1).bytes(3000),
    "bad_compression": lambda: encode_batch(batch(500))[:400],  # truncated
    "unsupported_version": wrong_version,
    "payload_too_large": lambda: MAGIC + b"\x01" + b"\x00" * (4 * 1024 * 1024),
    "decompressed_too_large": lambda: bomb(declared=True),
    "bad_msgpack": lambda: MAGIC + b"\x01" + zstandard.ZstdCompressor().compress(b"\xc1\xc1\xc1"),
    "non_finite": nan_batch,
    "bad_envelope": nul_model_batch,
}


@pytest.mark.parametrize("reason", sorted(HOSTILE_TELEMETRY))
def test_hostile_telemetry_is_marked_with_its_reason(reason: str) -> None:
    item = prepare(msg(tele(), HOSTILE_TELEMETRY[reason]()))
    assert (item.reason, item.batch, item.rows) == (reason, None, [])
    assert item.device_id == "veh-001" and item.detail


def test_bomb_without_declared_size_is_stopped_while_streaming() -> None:
    assert prepare(msg(tele(), bomb(declared=False))).reason == "decompressed_too_large"


def test_device_mismatch_and_envelope_peek() -> None:
    item = prepare(msg(tele("veh-002"), encode_batch(batch(first=10, n=50))))
    assert item.reason == "device_mismatch"
    assert item.peeked == ("e" * 16, (10, 59))  # so the device can be told which batch was refused
    # A payload that fails deeper than its envelope still names its epoch and range.
    assert prepare(msg(tele(), nan_batch())).peeked == ("e" * 16, (10, 59))
    assert peek_envelope(b"garbage") is None
    assert peek_envelope(bomb(declared=True)) is None
    doc = msgpack.packb({"epoch": "x", "seq": [5, 1]})
    assert peek_envelope(MAGIC + b"\x01" + zstandard.ZstdCompressor().compress(doc)) is None


@pytest.mark.parametrize(
    "topic",
    ["fleet/v1/bad id!/telemetry", "fleet/v2/veh-001/telemetry", "fleet/v1/veh-001/weather", "fleet/v1/veh-001/ack"],
)
def test_bad_topics(topic: str) -> None:
    item = prepare(msg(topic, encode_batch(batch())))
    assert item.reason == "bad_topic"


BAD_STATUS = {
    "not json": "bad_json",
    '{"state": "dancing"}': "bad_json",
    '{"state": "online", "unknown_field": 1}': "bad_json",
    '{"state": "online", "inference_rate": NaN}': "bad_json",
    '{"state": "online", "inference_rate": 1e999}': "bad_json",
    '{"state": "online", "spool_depth": 100000000000000000000000}': "bad_json",
    '{"state": "online", "agent_version": "a\\u0000b"}': "bad_json",
    '{"state": "online", "agent_version": "\\ud800"}': "bad_json",
    json.dumps({"state": "online", "agent_version": "x" * 129}): "bad_json",
    "[" * 5000 + "]" * 5000: "bad_json",
    json.dumps({"state": "online", "tags": ["x" * 70_000]}): "payload_too_large",
}


@pytest.mark.parametrize("payload", list(BAD_STATUS), ids=range(len(BAD_STATUS)))
def test_bad_status_json(payload: str) -> None:
    item = prepare(msg("fleet/v1/veh-001/status", payload))
    assert item.reason == BAD_STATUS[payload]
    assert item.status is None


def test_bad_event_and_reported_json() -> None:
    assert prepare(msg("fleet/v1/veh-001/events", '{"kind": "", "ts": 1}')).reason == "bad_json"
    assert prepare(msg("fleet/v1/veh-001/events", b"\xff\xfe")).reason == "bad_json"
    assert prepare(msg("fleet/v1/veh-001/reported", '{"model": {"name": 1}}')).reason == "bad_json"
    assert prepare(msg("fleet/v1/veh-001/events", b"")).reason == "bad_json"


def test_valid_json_messages_and_cleared_retained_topics() -> None:
    status = prepare(msg("fleet/v1/veh-001/status", '{"state": "offline"}'))
    assert status.reason is None and status.status is not None and status.status.state == "offline"
    event = prepare(msg("fleet/v1/veh-001/events", '{"kind": "spool_loss", "ts": 5.0, "data": {"first": 1}}'))
    assert event.event is not None and event.event.data == {"first": 1}
    cleared = prepare(msg("fleet/v1/veh-001/status", b""))
    assert cleared.cleared and cleared.reason is None
    with pytest.raises(Exception, match="bad_json"):
        parse_json_message(b"{}", messages.Status)


def test_seq_ranges() -> None:
    assert seq_ranges(np.array([5, 1, 2, 3, 9, 7, 8], np.int64)) == [(1, 3), (5, 5), (7, 9)]
    assert seq_ranges(np.zeros(0, np.int64)) == []


# ------------------------------------------------------------------------------- one group


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.services)])
def engine(request: pytest.FixtureRequest) -> Iterator[Engine]:
    url = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")
    upgrade(url)
    eng = make_engine(url)
    yield eng
    eng.dispose()


def run_group(engine: Engine, items: list[Prepared]) -> list[tuple[str, messages.Ack]]:
    with engine.connect().execution_options(sqlite_begin="IMMEDIATE") as conn, conn.begin():
        return write_group(conn, items, 1024)


def rows(engine: Engine, sql: str) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(sa.text(sql)).all())


def test_one_group_stores_everything_and_returns_the_acks(engine: Engine) -> None:
    good = batch(50, first=10, gaps=[Gap(0, 9, "spool_full")])
    payload = encode_batch(good)
    conflicting = encode_batch(batch(20, first=50, seed=5, gaps=[Gap(0, 9, "spool_full")]))
    status = json.dumps(
        {
            "state": "online",
            "agent_version": "0.1.0",
            "model": {"name": "cabin-events", "version": "1.0.0"},
            "spool_depth": 12,
            "sensors": {"bme680": {"state": "ok"}},
            "tags": ["depot-a"],
        }
    )
    group = [
        msg("fleet/v1/veh-001/status", status, T0),
        msg(tele(), payload, T0 + 1),
        msg(tele(), payload, T0 + 2),  # re-sent inside the same group
        msg(tele(), conflicting, T0 + 3),  # seq 50..59 reused with other content, 60..69 new
        msg("fleet/v1/veh-001/events", '{"kind": "sensor_fault", "ts": 12.5, "message": "pms5003 timeout"}'),
        msg("fleet/v1/veh-001/reported", '{"model": {"name": "cabin-events", "version": "1.1.0"}}'),
        msg(tele("veh-002"), b"random junk"),
        msg("fleet/v1/veh-003/status", "{broken", T0 + 4),
    ]
    acks = run_group(engine, [prepare(m) for m in group])
    by_device: dict[str, list[messages.Ack]] = {}
    for dev, ack in acks:
        by_device.setdefault(dev, []).append(ack)
    # ONE Ack per batch naming every seq it settled: the conflicting batch's 50..59 (kept in
    # quarantine) as well as its new 60..69, so a chunk holding both is released.
    assert [a.model_dump() for a in by_device["veh-001"]] == [
        {"spool_epoch": "e" * 16, "ranges": [(10, 59)], "gaps": [(0, 9)], "quarantined": False, "reason": None},
        {"spool_epoch": "e" * 16, "ranges": [(10, 59)], "gaps": [(0, 9)], "quarantined": False, "reason": None},
        {
            "spool_epoch": "e" * 16,
            "ranges": [(50, 69)],
            "gaps": [(0, 9)],
            "quarantined": False,
            "reason": "seq_conflict",
        },
    ]
    assert "veh-002" not in by_device  # junk has no envelope to name a batch by
    assert rows(engine, "SELECT count(*) FROM inference") == [(60,)]
    assert rows(engine, "SELECT inserted, duplicates, conflicts FROM ingest_batch ORDER BY id") == [
        (50, 0, 0),
        (0, 50, 0),
        (10, 0, 10),
    ]
    assert rows(engine, "SELECT device_id, seq_first, seq_last, reason FROM declared_gap") == [
        ("veh-001", 0, 9, "spool_full")
    ]
    quarantined = rows(engine, "SELECT device_id, reason, payload_bytes, length(payload), detail FROM quarantine")
    assert sorted((q[0], q[1]) for q in quarantined) == [
        ("veh-001", "seq_conflict"),
        ("veh-002", "bad_magic"),
        ("veh-003", "bad_json"),
    ]
    conflict = next(q for q in quarantined if q[1] == "seq_conflict")
    assert conflict[2] == len(conflicting) and conflict[3] == min(1024, len(conflicting))  # capped copy
    assert "50-59" in conflict[4]
    dev = rows(
        engine,
        "SELECT id, status, status_at, agent_version, model_name, model_version, spool_depth, records, "
        "declared_lost, first_seen, last_seen FROM device ORDER BY id",
    )
    assert [d[0] for d in dev] == ["veh-001", "veh-002", "veh-003"]  # registered on first contact, any topic
    v1 = dev[0]
    assert (v1.status, v1.status_at, v1.agent_version, v1.spool_depth) == ("online", T0, "0.1.0", 12)
    assert (v1.model_name, v1.model_version) == ("cabin-events", "1.1.0")  # `reported` came last
    assert (v1.records, v1.declared_lost, v1.first_seen, v1.last_seen) == (60, 10, T0, T0 + 3)
    assert dev[2].status == "unknown"
    assert rows(engine, "SELECT kind, ts, message FROM device_event") == [("sensor_fault", 12.5, "pms5003 timeout")]

    # The whole group again (the broker redelivered it): nothing new, the gap is not counted twice.
    again = run_group(engine, [prepare(m) for m in group])
    assert [a.ranges for _d, a in again] == [[(10, 59)], [(10, 59)], [(50, 69)]]
    assert rows(engine, "SELECT count(*) FROM inference") == [(60,)]
    assert rows(engine, "SELECT records, declared_lost FROM device WHERE id = 'veh-001'") == [(60, 10)]
    assert rows(engine, "SELECT count(*) FROM declared_gap") == [(1,)]


def test_a_valid_message_the_database_refused_is_kept_whole_and_not_acknowledged(engine: Engine) -> None:
    payload = encode_batch(batch(500, first=10))
    assert len(payload) > 1024  # larger than run_group's quarantine cap
    refused = prepare(msg(tele(), payload))
    refused.quarantine("store_failed", "IntegrityError: no partition of relation inference found for row")
    refused.refused = True
    assert run_group(engine, [refused]) == []  # the device keeps the batch and re-sends it
    assert rows(engine, "SELECT reason, payload_bytes, length(payload) FROM quarantine") == [
        ("store_failed", len(payload), len(payload))
    ]


# ------------------------------------------------------------------------------- Ack size


def test_split_ack_keeps_every_range_and_gap_under_the_message_limit() -> None:
    small = messages.Ack(spool_epoch="e" * 16, ranges=[(0, 9)], gaps=[(10, 19)])
    assert split_ack(small) == [small]
    big = messages.Ack(
        spool_epoch="e" * 16,
        ranges=[(10**15 + 3 * i, 10**15 + 3 * i + 1) for i in range(3000)],
        gaps=[(10**16 + 2 * i, 10**16 + 2 * i) for i in range(1024)],
        reason="seq_conflict",
    )
    parts = split_ack(big)
    assert len(parts) > 1
    assert all(len(p.model_dump_json()) <= messages.MAX_MESSAGE_BYTES for p in parts)
    assert [r for p in parts for r in p.ranges] == big.ranges
    assert [g for p in parts for g in p.gaps] == big.gaps
    assert all((p.spool_epoch, p.quarantined, p.reason) == ("e" * 16, False, "seq_conflict") for p in parts)


def test_a_batch_with_scattered_seqs_is_acked_in_pieces_the_device_accepts(engine: Engine) -> None:
    n = 6000
    blk = make_block(n, first_seq=0)
    blk.seq = (10**12 + 2 * np.arange(n)).astype(np.uint64)  # every other seq: 6,000 one-seq ranges
    scattered = make_batch(blk, seq_first=int(blk.seq[0]), seq_last=int(blk.seq[-1]), gaps=[])
    acks = run_group(engine, [prepare(msg(tele(), encode_batch(scattered)))])
    assert len(acks) > 1
    assert all(len(a.model_dump_json()) <= messages.MAX_MESSAGE_BYTES for _d, a in acks)
    assert [r for _d, a in acks for r in a.ranges] == [(s, s) for s in blk.seq.tolist()]
    assert all(d == "veh-001" and not a.quarantined and a.reason is None for d, a in acks)


# ------------------------------------------------------------------------------- past the codec's limits


def _envelope_then(pad: bytes, *, declared: bool = True) -> bytes:
    """A payload whose envelope starts like a real batch's (epoch e*16, seq 10..59), followed by ``pad``."""
    doc = msgpack.unpackb(zstandard.ZstdDecompressor().decompress(encode_batch(batch())[4:]), raw=False)
    doc["pad"] = pad
    body = msgpack.packb(doc, use_bin_type=True)
    return MAGIC + b"\x01" + zstandard.ZstdCompressor(level=1, write_content_size=declared).compress(body)


OVER_LIMITS = {
    "payload_too_large": lambda: _envelope_then(np.random.default_rng(2).bytes(DEFAULT_LIMITS.max_payload_bytes)),
    "decompressed_too_large": lambda: _envelope_then(b"\x00" * (DEFAULT_LIMITS.max_decompressed_bytes + 1)),
    "streamed_bomb": lambda: _envelope_then(b"\x00" * (DEFAULT_LIMITS.max_decompressed_bytes + 1), declared=False),
}


@pytest.mark.parametrize("kind", sorted(OVER_LIMITS))
def test_a_payload_over_the_limits_still_names_its_batch(kind: str, engine: Engine) -> None:
    payload = OVER_LIMITS[kind]()
    assert len(payload) > DEFAULT_LIMITS.max_payload_bytes or kind != "payload_too_large"
    item = prepare(msg(tele(), payload))
    assert item.reason == ("decompressed_too_large" if kind == "streamed_bomb" else kind)
    assert item.peeked == ("e" * 16, (10, 59))
    # Peeking reads the start of the envelope only: nowhere near the 32 MiB the body inflates to.
    tracemalloc.start()
    try:
        assert peek_envelope(payload) == ("e" * 16, (10, 59))
        _size, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * PEEK_BYTES, peak
    # So the device is told, and releases the batch instead of re-sending it forever.
    assert run_group(engine, [item]) == [
        ("veh-001", messages.Ack(spool_epoch="e" * 16, ranges=[(10, 59)], quarantined=True, reason=item.reason))
    ]


# ------------------------------------------------------------------------------- the service without a broker


def test_the_one_by_one_fallback_stops_when_aborting(sqlite_url: str) -> None:
    upgrade(sqlite_url)
    eng = make_engine(sqlite_url)
    with eng.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TRIGGER refuse BEFORE INSERT ON inference WHEN NEW.seq BETWEEN 1000 AND 1999 "
            "BEGIN SELECT RAISE(ABORT, 'refused'); END"
        )
    ingest = Ingest(Settings(database_url=sqlite_url, mqtt_url="mqtt://127.0.0.1:1"), engine=eng)
    group = [prepare(msg(tele(), encode_batch(batch(50, first=first)))) for first in (0, 1000, 2000)]
    ingest._abort.set()  # stop() gave up waiting for the writer
    assert ingest._commit(group) is False
    # Nothing was written one by one: all three stay for the broker to redeliver, in order.
    assert rows(eng, "SELECT count(*) FROM inference") == [(0,)]
    assert rows(eng, "SELECT count(*) FROM quarantine") == [(0,)]

    ingest._abort.clear()
    assert ingest._commit(group) is True
    assert rows(eng, "SELECT min(seq), max(seq), count(*) FROM inference") == [(0, 2049, 100)]
    assert rows(eng, "SELECT reason FROM quarantine") == [("store_failed",)]
    assert ingest.stats()["quarantined"] == {"store_failed": 1}
    eng.dispose()


def counter(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_qos0_telemetry_is_dropped_and_the_queue_is_bounded(sqlite_url: str) -> None:
    limit = 8 * 1024 * 1024
    settings = Settings(database_url=sqlite_url, mqtt_url="mqtt://127.0.0.1:1", ingest_max_queued_bytes=limit)
    ingest = Ingest(settings, engine=make_engine(sqlite_url))
    qos0_before = counter("fleet_ingest_dropped_total", reason="qos0")
    full_before = counter("fleet_ingest_dropped_total", reason="queue_full")

    ingest._enqueue(msg(tele(), encode_batch(batch()), qos=0))  # can never be acknowledged: dropped
    assert ingest.stats()["dropped"] == {"qos0": 1} and ingest.stats()["pending"] == 0
    big = msg(tele(), b"x" * (limit // 2))
    ingest._enqueue(big)
    ingest._enqueue(big)  # QoS 1 is always taken: the broker's in-flight window bounds it
    status = msg("fleet/v1/veh-001/status", '{"state": "online"}', qos=0)
    ingest._enqueue(status)  # the queue is full: a QoS 0 message is dropped
    assert ingest.stats()["dropped"] == {"qos0": 1, "queue_full": 1}
    assert ingest.stats()["pending"] == 2 and ingest.stats()["queued_bytes"] > limit
    assert counter("fleet_ingest_dropped_total", reason="qos0") == qos0_before + 1
    assert counter("fleet_ingest_dropped_total", reason="queue_full") == full_before + 1

    assert len(ingest._collect()) == 2  # the decoder took them: there is room again
    assert ingest.stats()["queued_bytes"] == 0
    ingest._enqueue(status)
    assert ingest.stats()["pending"] == 3 and ingest.stats()["dropped"] == {"qos0": 1, "queue_full": 1}
    assert [m.topic for m in [ingest._queue.get_nowait()]] == ["fleet/v1/veh-001/status"]
    ingest.engine.dispose()
