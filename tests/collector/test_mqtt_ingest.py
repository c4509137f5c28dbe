"""Ingest end to end over a real Mosquitto: exactly once, ack after commit, hostile payloads, restarts, outages."""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as paho
import pytest
import sqlalchemy as sa
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from prometheus_client import REGISTRY
from sqlalchemy.engine import Engine

from collector.config import Settings
from collector.db import make_engine, upgrade
from collector.ingest import Ingest
from shared.codec import MAGIC, Gap, encode_batch
from shared.messages import Ack
from tests.services import Mosquitto, Postgres
from tests.shared.test_codec import make_batch, make_block

pytestmark = pytest.mark.services


def wait_until(cond: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def payload(device: str, first: int, n: int = 200, *, seed: int = 0, epoch: str = "e" * 16, **kw: Any) -> bytes:
    blk = make_block(n, first_seq=first, seed=seed)
    kw.setdefault("gaps", [])
    return encode_batch(
        make_batch(blk, device_id=device, spool_epoch=epoch, seq_first=first, seq_last=first + n - 1, **kw)
    )


class FakeVehicle:
    """Stands in for an agent's uplink: publishes on its topics and collects the collector's Acks."""

    def __init__(
        self,
        url: str,
        device_id: str,
        *,
        on_ack: Callable[[str, Ack], Any] | None = None,
        will: bool = False,
        protocol: MQTTProtocolVersion = MQTTProtocolVersion.MQTTv5,
    ) -> None:
        self.device_id = device_id
        self.acks: list[Ack] = []
        self.checks: list[Any] = []
        self._on_ack = on_ack
        self._subscribed = threading.Event()
        host, port = url.removeprefix("mqtt://").split(":")
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=f"veh-{uuid.uuid4().hex[:8]}", protocol=protocol
        )
        if will:
            self.client.will_set(self.topic("status"), '{"state": "offline"}', qos=1, retain=True)
        self.client.on_connect = lambda c, *_: c.subscribe(self.topic("ack"), qos=1)
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.on_message = self._message
        self.client.connect(host, int(port))
        self.client.loop_start()
        assert self._subscribed.wait(10), "vehicle could not subscribe to its ack topic"

    def topic(self, kind: str) -> str:
        return f"fleet/v1/{self.device_id}/{kind}"

    def _message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        ack = Ack.model_validate_json(msg.payload)
        if self._on_ack is not None:
            self.checks.append(self._on_ack(self.device_id, ack))
        self.acks.append(ack)

    def publish(
        self, kind: str, data: bytes | str, *, retain: bool = False, topic: str | None = None, qos: int = 1
    ) -> None:
        info = self.client.publish(topic or self.topic(kind), data, qos=qos, retain=retain)
        info.wait_for_publish(10)

    def acked(self, first: int, last: int, *, quarantined: bool = False) -> bool:
        return any((first, last) in a.ranges and a.quarantined == quarantined for a in list(self.acks))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def collector_settings(url: str, broker_url: str, tmp_path: Path, **kw: Any) -> Settings:
    return Settings(
        database_url=url,
        mqtt_url=broker_url,
        mqtt_client_id=kw.pop("mqtt_client_id", f"collector-{uuid.uuid4().hex[:8]}"),
        ingest_max_delay_ms=kw.pop("ingest_max_delay_ms", 5),
        data_dir=tmp_path,
        **kw,
    )


@pytest.fixture
def started() -> Iterator[Callable[[Settings], Ingest]]:
    """Start Ingest instances; stop whatever is still running after the test."""
    running: list[Ingest] = []

    def start(settings: Settings) -> Ingest:
        ingest = Ingest(settings)
        ingest.start()
        running.append(ingest)
        assert ingest.wait_connected(15), "collector did not connect and subscribe"
        return ingest

    yield start
    for ingest in running:
        ingest.stop(timeout=5)


@pytest.fixture
def vehicles(broker: Mosquitto) -> Iterator[Callable[..., FakeVehicle]]:
    made: list[FakeVehicle] = []

    def make(device_id: str, **kw: Any) -> FakeVehicle:
        v = FakeVehicle(kw.pop("url", broker.url), device_id, **kw)
        made.append(v)
        return v

    yield make
    for v in made:
        # Clear retained status/reported so later collectors do not hear of this test's devices.
        for kind in ("status", "reported"):
            v.client.publish(v.topic(kind), b"", qos=1, retain=True).wait_for_publish(5)
        v.close()


def count(engine: Engine, sql: str, **params: Any) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.text(sql), params).scalar_one())


def counter(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def stored_check(engine: Engine) -> Callable[[str, Ack], tuple[int, int]]:
    """Runs when an Ack arrives: how many of the acked records are visible in the database right then."""

    def check(device: str, ack: Ack) -> tuple[int, int]:
        if ack.quarantined:
            return (0, 0)
        expected = sum(b - a + 1 for a, b in ack.ranges)
        found = sum(
            count(
                engine,
                "SELECT count(*) FROM inference WHERE device_id = :d AND spool_epoch = :e AND seq BETWEEN :a AND :b",
                d=device,
                e=ack.spool_epoch,
                a=a,
                b=b,
            )
            for a, b in ack.ranges
        )
        return (expected, found)

    return check


def test_stream_lands_exactly_once_while_hostile_payloads_are_quarantined(
    broker: Mosquitto, sqlite_url: str, tmp_path: Path, started: Callable[[Settings], Ingest], vehicles: Any
) -> None:
    upgrade(sqlite_url)
    reader = make_engine(sqlite_url)
    ingest = started(collector_settings(sqlite_url, broker.url, tmp_path))
    tag = uuid.uuid4().hex[:6]
    a = vehicles(f"veh-a-{tag}", on_ack=stored_check(reader))
    b = vehicles(f"veh-b-{tag}", on_ack=stored_check(reader))
    before = {r: counter("fleet_ingest_quarantined_total", reason=r) for r in ("bad_magic", "seq_conflict")}

    nan = make_block(50, first_seq=5000, seed=9)
    nan.probs[0, 0] = np.nan
    conflicting = payload(a.device_id, 150, 100, seed=42)  # seq 150..249 collide with batch 0..199 (and 200..399)
    bomb = MAGIC + b"\x01" + __import__("zstandard").ZstdCompressor(level=1).compress(b"\x00" * (40 << 20))
    hostile: list[tuple[FakeVehicle, str, bytes | str, str | None]] = [
        (a, "telemetry", np.random.default_rng(3).bytes(5000), "bad_magic"),
        (a, "telemetry", payload(a.device_id, 9000)[:300], "bad_compression"),
        (
            a,
            "telemetry",
            payload(a.device_id, 9000)[:3] + b"\x07" + payload(a.device_id, 9000)[4:],
            "unsupported_version",
        ),
        (b, "telemetry", bomb, "decompressed_too_large"),
        (
            b,
            "telemetry",
            encode_batch(make_batch(nan, device_id=b.device_id, seq_first=5000, seq_last=5049, gaps=[])),
            "non_finite",
        ),
        (a, "telemetry", payload(b.device_id, 7000), "device_mismatch"),
        (a, "telemetry", conflicting, "seq_conflict"),
        (b, "status", '{"state": "sleeping"}', "bad_json"),
        (b, "events", "{" * 10, "bad_json"),
        (b, "status", json.dumps({"state": "online", "tags": ["x" * 70_000]}), "payload_too_large"),
    ]
    expected_reasons: dict[str, int] = {}
    for i in range(10):
        a.publish("telemetry", payload(a.device_id, i * 200, seed=i))
        b.publish("telemetry", payload(b.device_id, i * 200, seed=100 + i, gaps=[Gap(5000, 5009, "crash")]))
        if i < len(hostile):
            veh, kind, data, reason = hostile[i]
            veh.publish(kind, data)
            if reason:
                expected_reasons[reason] = expected_reasons.get(reason, 0) + 1
    a.publish("", payload(a.device_id, 0), topic=f"fleet/v1/bad id {tag}/telemetry")
    expected_reasons["bad_topic"] = 1
    a.publish("telemetry", payload(a.device_id, 0, seed=0))  # re-sent batch: a duplicate, acknowledged again

    wait_until(lambda: sum(ingest.stats()["quarantined"].values()) >= sum(expected_reasons.values()), what="quarantine")
    wait_until(
        lambda: (
            sum(1 for x in a.acks if x.ranges == [(0, 199)]) == 2
            and all(v.acked(i * 200, i * 200 + 199) for v in (a, b) for i in range(10))
        ),
        what="acks",
    )
    for dev in (a.device_id, b.device_id):
        # Batches 150..249 conflicted with stored records: the first versions stay, nothing is added twice.
        assert count(reader, "SELECT count(*) FROM inference WHERE device_id = :d", d=dev) == 2000
    quarantined = {}
    with reader.connect() as conn:
        for reason, n in conn.execute(sa.text("SELECT reason, count(*) FROM quarantine GROUP BY reason")).all():
            quarantined[reason] = n
    assert quarantined == expected_reasons
    assert ingest.stats()["quarantined"] == expected_reasons
    for reason, n in before.items():
        assert counter("fleet_ingest_quarantined_total", reason=reason) == n + 1
    # Every Ack came after its records were committed: the records were visible when it arrived.
    assert all(found == expected for expected, found in a.checks + b.checks)
    assert sum(1 for x in a.acks if x.ranges == [(0, 199)] and not x.quarantined) == 2  # original and re-send
    # The conflicting batch is settled as a whole (first versions kept, newcomers in quarantine):
    # one Ack names all its seqs, with the reason for information, so the device releases it.
    assert any(x.ranges == [(150, 249)] and not x.quarantined and x.reason == "seq_conflict" for x in a.acks)
    assert b.acked(5000, 5049, quarantined=True)  # the NaN batch, named from its envelope
    assert all(x.gaps == [(5000, 5009)] for x in b.acks if not x.quarantined)
    stats = ingest.stats()
    assert stats["records_inserted"] == 4000
    assert stats["records_duplicate"] == 200
    assert stats["records_conflict"] == 100
    assert count(reader, "SELECT declared_lost FROM device WHERE id = :d", d=b.device_id) == 10  # counted once
    reader.dispose()


def test_restart_receives_what_the_broker_queued_in_the_persistent_session(
    broker: Mosquitto, sqlite_url: str, tmp_path: Path, started: Callable[[Settings], Ingest], vehicles: Any
) -> None:
    upgrade(sqlite_url)
    reader = make_engine(sqlite_url)
    settings = collector_settings(sqlite_url, broker.url, tmp_path)
    first = started(settings)
    veh = vehicles(f"veh-r-{uuid.uuid4().hex[:6]}")
    veh.publish("telemetry", payload(veh.device_id, 0))
    wait_until(lambda: veh.acked(0, 199), what="first ack")
    first.stop()
    assert not first.connected

    for i in range(1, 8):  # the collector is down: the broker queues these for its session
        veh.publish("telemetry", payload(veh.device_id, i * 200, seed=i))

    second = started(settings)  # same client id: the same broker session
    wait_until(lambda: all(veh.acked(i * 200, i * 200 + 199) for i in range(8)), what="acks after restart")
    assert count(reader, "SELECT count(*) FROM inference") == 1600
    # The fake vehicle never re-sends: all seven came from the session's queue at the broker, and
    # the batch acknowledged before the stop was not delivered again.
    assert second.stats()["messages"] == {"telemetry": 7}
    assert (second.stats()["records_inserted"], second.stats()["records_duplicate"]) == (1400, 0)
    reader.dispose()


def _kill_connection(client: paho.Client) -> None:
    """Drop the TCP connection without DISCONNECT, as a power cut would: the broker sends the last will."""
    client.loop_stop()
    sock = client.socket()
    assert isinstance(sock, socket.socket)
    sock.shutdown(socket.SHUT_RDWR)
    sock.close()


def test_registration_status_last_will_events_and_reported(
    broker: Mosquitto, sqlite_url: str, tmp_path: Path, started: Callable[[Settings], Ingest], vehicles: Any
) -> None:
    upgrade(sqlite_url)
    reader = make_engine(sqlite_url)
    started(collector_settings(sqlite_url, broker.url, tmp_path))
    veh = vehicles(f"veh-s-{uuid.uuid4().hex[:6]}", will=True)
    dev = veh.device_id

    def device() -> Any:
        with reader.connect() as conn:
            return conn.execute(sa.text("SELECT * FROM device WHERE id = :d"), {"d": dev}).one_or_none()

    veh.publish("events", json.dumps({"kind": "self_test", "ts": 12.0, "message": "ok", "data": {"golden": 8}}))
    wait_until(lambda: device() is not None, what="registration from an event")
    assert device().status == "unknown"
    status = {
        "state": "online",
        "agent_version": "0.1.0",
        "boot_id": "b1",
        "spool_epoch": "e1",
        "profile": "rpi4-cabin",
        "model": {"name": "cabin-events", "version": "1.0.0"},
        "spool_depth": 3,
        "inference_rate": 10.0,
        "sensors": {"pms5003": {"state": "failed", "reason": "no frames"}},
        "tags": ["depot-a"],
    }
    veh.publish("status", json.dumps(status), retain=True)
    wait_until(lambda: device().status == "online", what="online")
    row = device()
    assert (row.agent_version, row.profile, row.model_version, row.spool_depth) == ("0.1.0", "rpi4-cabin", "1.0.0", 3)
    assert json.loads(row.sensors) == {"pms5003": {"state": "failed", "reason": "no frames"}}
    assert json.loads(row.tags) == ["depot-a"]
    veh.publish(
        "reported",
        json.dumps(
            {
                "model": {"name": "cabin-events", "version": "1.1.0"},
                "update": {"state": "committed", "progress": 1.0, "result": "success"},
            }
        ),
        retain=True,
    )
    wait_until(lambda: device().model_version == "1.1.0", what="reported model")
    assert json.loads(device().reported)["update"]["state"] == "committed"

    _kill_connection(veh.client)
    wait_until(lambda: device().status == "offline", what="last will")
    assert device().agent_version == "0.1.0"  # the will carries only the state; the rest stays
    assert count(reader, "SELECT count(*) FROM device_event WHERE device_id = :d AND kind = 'self_test'", d=dev) == 1
    # Reconnect so the fixture can clear the retained topics.
    veh.client.reconnect()
    veh.client.loop_start()
    reader.dispose()


def test_database_outage_acknowledges_nothing_until_committed(
    broker: Mosquitto, private_pg: Postgres, tmp_path: Path, started: Callable[[Settings], Ingest], vehicles: Any
) -> None:
    upgrade(private_pg.url)
    reader = make_engine(private_pg.url)
    settings = collector_settings(private_pg.url, broker.url, tmp_path)
    ingest = started(settings)
    veh = vehicles(f"veh-o-{uuid.uuid4().hex[:6]}")
    veh.publish("telemetry", payload(veh.device_id, 0))
    wait_until(lambda: veh.acked(0, 199), what="ack before the outage")

    # Outage 1: the writer keeps the group, retries, and acknowledges once the database is back.
    private_pg.stop("immediate")
    veh.publish("telemetry", payload(veh.device_id, 200, seed=1))
    wait_until(lambda: ingest.stats()["commit_failures"] >= 2, what="failed commits")
    assert not veh.acked(200, 399)
    private_pg.start()
    wait_until(lambda: veh.acked(200, 399), timeout=30, what="ack after recovery")

    # Outage 2: the collector stops while the database is down; the broker still holds the message.
    private_pg.stop("immediate")
    veh.publish("telemetry", payload(veh.device_id, 400, seed=2))
    wait_until(lambda: ingest.stats()["commit_failures"] >= 4, what="failed commits")
    ingest.stop(timeout=0.5)
    assert not veh.acked(400, 599)
    private_pg.start()
    started(settings)  # same session: the unacknowledged message is redelivered
    wait_until(lambda: veh.acked(400, 599), timeout=30, what="ack after restart")
    assert count(reader, "SELECT count(*) FROM inference") == 600
    assert count(reader, "SELECT records FROM device") == 600
    reader.dispose()


@pytest.fixture
def embedded_url() -> Iterator[str]:
    """The demo's embedded amqtt broker (MQTT 3.1.1 only)."""
    from collector.broker import EmbeddedBroker
    from tests.services import free_port

    embedded = EmbeddedBroker(port=free_port()).start()
    yield embedded.url
    embedded.stop()


def test_mqtt_311_with_the_embedded_broker(
    embedded_url: str, sqlite_url: str, tmp_path: Path, started: Callable[[Settings], Ingest], vehicles: Any
) -> None:
    upgrade(sqlite_url)
    reader = make_engine(sqlite_url)
    settings = collector_settings(sqlite_url, embedded_url, tmp_path, mqtt_protocol="3.1.1")
    first = started(settings)
    veh = vehicles("veh-311", url=embedded_url, protocol=MQTTProtocolVersion.MQTTv311)
    for i in range(3):
        veh.publish("telemetry", payload(veh.device_id, i * 200, seed=i))
    wait_until(lambda: all(veh.acked(i * 200, i * 200 + 199) for i in range(3)), what="acks over MQTT 3.1.1")
    first.stop()
    # amqtt queues nothing for an anonymous client while it is away (the agent re-sends until acked),
    # but the restarted collector resumes its session and takes the next batches.
    started(settings)
    veh.publish("telemetry", payload(veh.device_id, 600, seed=3))
    wait_until(lambda: veh.acked(600, 799), what="ack after restart over MQTT 3.1.1")
    assert count(reader, "SELECT count(*) FROM inference") == 800
    reader.dispose()


def test_a_message_the_database_refuses_is_isolated_and_quarantined(
    broker: Mosquitto, sqlite_url: str, tmp_path: Path, started: Callable[[Settings], Ingest], vehicles: Any
) -> None:
    upgrade(sqlite_url)
    reader = make_engine(sqlite_url)
    with reader.begin() as conn:
        # Real constraints stand in for whatever a database may refuse that validation let through
        # (a missing partition, a revoked permission, a new CHECK).
        conn.exec_driver_sql(
            "CREATE TRIGGER refuse_boom BEFORE INSERT ON device_event WHEN NEW.kind = 'boom' "
            "BEGIN SELECT RAISE(ABORT, 'boom refused'); END"
        )
        conn.exec_driver_sql(
            "CREATE TRIGGER refuse_rows BEFORE INSERT ON inference WHEN NEW.seq BETWEEN 1000 AND 1199 "
            "BEGIN SELECT RAISE(ABORT, 'no partition of relation inference found for row'); END"
        )
    settings = collector_settings(
        sqlite_url, broker.url, tmp_path, ingest_max_delay_ms=200, quarantine_max_payload_bytes=1024
    )
    ingest = started(settings)
    veh = vehicles(f"veh-p-{uuid.uuid4().hex[:6]}")
    refused = payload(veh.device_id, 1000, seed=7)
    veh.publish("telemetry", payload(veh.device_id, 0))
    veh.publish("events", json.dumps({"kind": "boom", "ts": 1.0}))
    veh.publish("telemetry", refused)
    veh.publish("events", json.dumps({"kind": "fine", "ts": 2.0}))
    veh.publish("telemetry", payload(veh.device_id, 200, seed=1))
    wait_until(lambda: veh.acked(0, 199) and veh.acked(200, 399), what="acks around the refused messages")
    wait_until(lambda: ingest.stats()["quarantined"].get("store_failed") == 2, what="store_failed")
    # Acks go out in arrival order: had the refused batch got one, it would have come before 200..399's.
    # The device was told nothing about it, so it keeps the batch and re-sends it.
    assert not [a for a in veh.acks if any(first <= 1199 and last >= 1000 for first, last in a.ranges)]
    assert count(reader, "SELECT count(*) FROM inference") == 400
    assert count(reader, "SELECT count(*) FROM device_event WHERE kind = 'fine'") == 1
    with reader.connect() as conn:
        kept = conn.execute(sa.text("SELECT reason, detail, payload, payload_bytes FROM quarantine ORDER BY id")).all()
    assert [(r.reason, "boom refused" in r.detail) for r in kept] == [("store_failed", True), ("store_failed", False)]
    assert "no partition" in kept[1].detail
    assert kept[1].payload == refused and kept[1].payload_bytes == len(refused) > 1024  # whole, past the cap

    # The database is fixed; the device re-sends the batch no Ack released.
    with reader.begin() as conn:
        conn.exec_driver_sql("DROP TRIGGER refuse_rows")
    veh.publish("telemetry", refused)
    wait_until(lambda: veh.acked(1000, 1199), what="ack of the re-sent batch")
    assert count(reader, "SELECT count(*) FROM inference") == 600
    assert ingest.stats()["quarantined"].get("store_failed") == 2

    # Every MQTT message was acknowledged: a new collector on the same session gets only what comes next.
    assert ingest.stats()["pending"] == 0
    ingest.stop()
    again = started(settings)
    veh.publish("events", json.dumps({"kind": "marker", "ts": 3.0}))
    wait_until(lambda: again.stats()["messages"].get("events") == 1, what="the next message")
    assert again.stats()["messages"] == {"events": 1}
    reader.dispose()


class _FailsOnce(Ingest):
    """The real service with one fault injected after a commit, before acknowledging (stands in for a bug)."""

    injected = 0

    def _after_commit(self, items: Any, acks: Any) -> None:
        if not self.injected:
            self.injected += 1
            raise RuntimeError("injected fault after the commit")
        super()._after_commit(items, acks)


def test_a_group_that_fails_unexpectedly_is_redelivered_after_a_reconnect(
    broker: Mosquitto, sqlite_url: str, tmp_path: Path, vehicles: Any
) -> None:
    upgrade(sqlite_url)
    reader = make_engine(sqlite_url)
    ingest = _FailsOnce(collector_settings(sqlite_url, broker.url, tmp_path))
    ingest.start()
    try:
        assert ingest.wait_connected(15)
        veh = vehicles(f"veh-f-{uuid.uuid4().hex[:6]}")
        veh.publish("telemetry", payload(veh.device_id, 0))
        # Unacknowledged, the message would hold a broker in-flight slot for the rest of the session;
        # the service restarts the session instead, the broker redelivers it, and it is acknowledged.
        wait_until(lambda: veh.acked(0, 199), what="ack after the redelivery")
        stats = ingest.stats()
        assert (ingest.injected, stats["forced_reconnects"]) == (1, 1)
        assert (stats["records_inserted"], stats["records_duplicate"]) == (0, 200)  # stored by the failed group
        assert count(reader, "SELECT count(*) FROM inference") == 200
        wait_until(lambda: ingest.stats()["pending"] == 0, what="nothing pending")
    finally:
        ingest.stop(timeout=5)
        reader.dispose()


def test_qos0_telemetry_is_dropped_and_counted(
    broker: Mosquitto, sqlite_url: str, tmp_path: Path, started: Callable[[Settings], Ingest], vehicles: Any
) -> None:
    upgrade(sqlite_url)
    reader = make_engine(sqlite_url)
    ingest = started(collector_settings(sqlite_url, broker.url, tmp_path))
    veh = vehicles(f"veh-q-{uuid.uuid4().hex[:6]}")
    before = counter("fleet_ingest_dropped_total", reason="qos0")
    veh.publish("telemetry", payload(veh.device_id, 0), qos=0)  # cannot be acknowledged
    veh.publish("telemetry", payload(veh.device_id, 200, seed=1))
    wait_until(lambda: ingest.stats()["dropped"].get("qos0") == 1, what="the QoS 0 batch dropped")
    wait_until(lambda: veh.acked(200, 399), what="ack of the QoS 1 batch")
    assert counter("fleet_ingest_dropped_total", reason="qos0") == before + 1
    assert count(reader, "SELECT count(*) FROM inference") == 200
    assert count(reader, "SELECT count(*) FROM inference WHERE seq < 200") == 0
    assert not [a for a in veh.acks if a.ranges != [(200, 399)]]
    reader.dispose()


def test_replicas_share_the_load_with_a_shared_subscription(
    broker: Mosquitto, sqlite_url: str, tmp_path: Path, started: Callable[[Settings], Ingest], vehicles: Any
) -> None:
    upgrade(sqlite_url)
    reader = make_engine(sqlite_url)
    replicas = [
        started(collector_settings(sqlite_url, broker.url, tmp_path, mqtt_shared_subscription=True)) for _ in range(2)
    ]
    veh = vehicles(f"veh-m-{uuid.uuid4().hex[:6]}")
    for i in range(12):
        veh.publish("telemetry", payload(veh.device_id, i * 100, 100, seed=i))
    wait_until(lambda: all(veh.acked(i * 100, i * 100 + 99) for i in range(12)), what="acks from both replicas")
    assert count(reader, "SELECT count(*) FROM inference") == 1200
    shares = [r.stats()["records_inserted"] for r in replicas]
    assert sum(shares) == 1200 and all(shares), shares  # each replica took part of the stream
    reader.dispose()
