"""Ingest without the broker: validation of every kind of hostile payload, and one group's transaction."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from typing import Any

import msgpack
import numpy as np
import pytest
import sqlalchemy as sa
import zstandard
from sqlalchemy.engine import Engine

from collector.db import make_engine, upgrade
from collector.ingest.service import Prepared, parse_json_message, peek_envelope, prepare, seq_ranges, write_group
from collector.mqtt import InboundMessage
from shared import messages
from shared.codec import MAGIC, Batch, Gap, encode_batch
from tests.shared.test_codec import make_batch, make_block

T0 = 1.76e9 + 100.0


def msg(topic: str, payload: bytes | str, at: float = T0) -> InboundMessage:
    data = payload.encode() if isinstance(payload, str) else payload
    return InboundMessage(mid=1, qos=1, topic=topic, payload=data, received_at=at, session=1)


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
    assert [a.model_dump() for a in by_device["veh-001"]] == [
        {"spool_epoch": "e" * 16, "ranges": [(10, 59)], "gaps": [(0, 9)], "quarantined": False, "reason": None},
        {"spool_epoch": "e" * 16, "ranges": [(10, 59)], "gaps": [(0, 9)], "quarantined": False, "reason": None},
        {"spool_epoch": "e" * 16, "ranges": [(60, 69)], "gaps": [(0, 9)], "quarantined": False, "reason": None},
        {"spool_epoch": "e" * 16, "ranges": [(50, 59)], "gaps": [], "quarantined": True, "reason": "seq_conflict"},
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
    assert [a.ranges for _d, a in again if not a.quarantined] == [[(10, 59)], [(10, 59)], [(60, 69)]]
    assert rows(engine, "SELECT count(*) FROM inference") == [(60,)]
    assert rows(engine, "SELECT records, declared_lost FROM device WHERE id = 'veh-001'") == [(60, 10)]
    assert rows(engine, "SELECT count(*) FROM declared_gap") == [(1,)]
