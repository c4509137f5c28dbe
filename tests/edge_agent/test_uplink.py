"""The uplink against a real Mosquitto, with the test playing the collector (decode, then Ack).

:class:`CollectorPeer` is a real protocol peer: it subscribes to ``fleet/v1/+/telemetry``,
decodes every batch with :func:`shared.codec.decode_batch` and publishes
:class:`shared.messages.Ack` on the device's ``ack`` topic as the collector does after its
commit: the exact seqs it received as ranges, the declared gaps, and for a quarantined payload
the envelope range. Behaviours the collector can show (never acking, quarantining) are switches
on it. The last test runs the agent's uplink against the real collector ingest service.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.config import MqttSection, UplinkSection
from edge_agent.spool import EVENT_SPOOL_LOSS, GAP_CRASH, Spool, _pack_block, _unpack_block, concat_blocks, merge_ranges
from edge_agent.uplink import Uplink, clock_synced
from shared.codec import Batch, BatchError, RecordBlock, decode_batch, encode_batch
from shared.messages import Ack, DeviceEvent, Status
from shared.topics import Kind, parse, subscription, topic
from tests.edge_agent.test_spool import make_block
from tests.services import Mosquitto

REPO = Path(__file__).resolve().parents[2]


def wait_for(predicate: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    """Poll ``predicate`` until true; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class CollectorPeer:
    """Decodes telemetry and acknowledges it on the device's ``ack`` topic."""

    def __init__(self, url: str, *, mode: str = "ack", skip_acks: int = 0) -> None:
        parts = urlsplit(url)
        self.mode = mode  # "ack" | "quarantine" | "silent"
        self.skip_acks = skip_acks  # leave this many batches unacknowledged first
        self.batches: list[Batch] = []
        self.bad: list[str] = []
        self.events: list[DeviceEvent] = []
        self.statuses: dict[str, list[dict]] = {}
        self.seqs: dict[str, list[int]] = {}
        self._lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"peer-{uuid.uuid4().hex[:8]}")
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(1, 1)
        self._subscribed = threading.Event()
        self.client.on_subscribe = lambda *_a: self._subscribed.set()
        self.client.connect(parts.hostname or "127.0.0.1", parts.port or 1883)
        self.client.loop_start()
        assert self._subscribed.wait(10), "peer could not subscribe"

    def _on_connect(self, client: mqtt.Client, _u: object, _f: object, rc: object, _p: object) -> None:
        client.subscribe(
            [(subscription(Kind.TELEMETRY), 1), (subscription(Kind.EVENTS), 1), (subscription(Kind.STATUS), 1)]
        )

    def _on_message(self, client: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        device, kind = parse(msg.topic)
        if kind == Kind.STATUS:
            with self._lock:
                self.statuses.setdefault(device, []).append(json.loads(msg.payload))
            return
        if kind == Kind.EVENTS:
            with self._lock:
                self.events.append(DeviceEvent.model_validate_json(msg.payload))
            return
        try:
            batch = decode_batch(bytes(msg.payload))
        except BatchError as exc:
            self.bad.append(exc.reason)
            return
        with self._lock:
            self.batches.append(batch)
            self.seqs.setdefault(device, []).extend(int(s) for b in batch.blocks for s in b.seq)
            if self.mode == "silent":
                return
            if self.skip_acks > 0:
                self.skip_acks -= 1
                return
        if self.mode == "quarantine":
            # The collector names a payload it rejects whole by its envelope range.
            ack = Ack(
                spool_epoch=batch.spool_epoch,
                ranges=[(batch.seq_first, batch.seq_last)],
                quarantined=True,
                reason="bad_value",
            )
        else:
            seqs = [(int(s), int(s)) for b in batch.blocks for s in b.seq]
            ack = Ack(
                spool_epoch=batch.spool_epoch,
                ranges=merge_ranges(seqs),
                gaps=[(g.first, g.last) for g in batch.gaps],
            )
        client.publish(topic(device, Kind.ACK), ack.model_dump_json(), qos=1)

    def unique(self, device: str) -> set[int]:
        with self._lock:
            return set(self.seqs.get(device, []))

    def received(self, device: str) -> list[int]:
        with self._lock:
            return list(self.seqs.get(device, []))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def new_device() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


def make_uplink(spool: Spool, url: str, device: str, **settings: object) -> Uplink:
    base: dict = {"batch_max_records": 100, "batch_max_age_s": 0.1, "ack_timeout_s": 2.0, "max_inflight_batches": 4}
    base.update(settings)
    return Uplink(
        device_id=device,
        spool=spool,
        mqtt_settings=MqttSection(url=url, reconnect_min_delay_s=1, reconnect_max_delay_s=1),
        settings=UplinkSection(**base),
        boot_id="boot-1",
        profile="sim-v1",
        agent_version="0.1.0",
        status=lambda: Status(state="online", spool_epoch=spool.epoch, spool_depth=spool.depth()),
    )


def fill(spool: Spool, n: int, per_block: int = 50) -> None:
    for i in range(0, n, per_block):
        spool.append(make_block(min(per_block, n - i), seed=i))
    spool.commit()


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    s = Spool(tmp_path / "spool.db", max_bytes=64 * 1024 * 1024, chunk_max_records=100)
    yield s
    s.close()


@pytest.fixture
def peer(broker: Mosquitto) -> Iterator[CollectorPeer]:
    p = CollectorPeer(broker.url)
    yield p
    p.close()


def test_everything_acked_empties_the_spool(broker: Mosquitto, peer: CollectorPeer, spool: Spool) -> None:
    device = new_device()
    fill(spool, 1000)
    uplink = make_uplink(spool, broker.url, device)
    uplink.start()
    try:
        wait_for(lambda: spool.depth() == 0 and spool.inflight() == 0, what="spool to empty")
    finally:
        uplink.stop()
    assert peer.unique(device) == set(range(1000))
    assert uplink.counters.records_released == 1000
    assert uplink.counters.bad_acks == 0
    batches = [b for b in peer.batches if b.device_id == device]
    assert all(b.spool_epoch == spool.epoch and b.boot_id == "boot-1" and b.profile == "sim-v1" for b in batches)
    assert all(b.n_records <= 100 for b in batches)
    assert all(b.clock_synced == clock_synced() for b in batches)
    # Status: online on connect, stopped (retained) on the clean stop.
    wait_for(lambda: [s["state"] for s in peer.statuses.get(device, [])][-1:] == ["stopped"], what="stopped")
    assert peer.statuses[device][0]["state"] == "online"


def test_unacknowledged_batch_is_sent_again_after_the_timeout(broker: Mosquitto, spool: Spool) -> None:
    device = new_device()
    peer = CollectorPeer(broker.url, skip_acks=1)
    fill(spool, 300)
    uplink = make_uplink(spool, broker.url, device, ack_timeout_s=1.0)
    uplink.start()
    try:
        wait_for(lambda: spool.depth() == 0, what="spool to empty")
    finally:
        uplink.stop()
        peer.close()
    received = peer.received(device)
    assert set(received) == set(range(300))
    assert len(received) > 300, "the unacknowledged batch must have been sent twice"
    assert uplink.counters.batches_resent >= 1


def test_quarantined_ack_releases(broker: Mosquitto, spool: Spool) -> None:
    device = new_device()
    peer = CollectorPeer(broker.url, mode="quarantine")
    fill(spool, 150)
    uplink = make_uplink(spool, broker.url, device)
    uplink.start()
    try:
        wait_for(lambda: spool.depth() == 0, what="quarantined records to be released")
    finally:
        uplink.stop()
        peer.close()
    assert uplink.counters.quarantined >= 2
    assert uplink.counters.records_released == 150


def test_garbage_on_the_ack_topic_is_counted(broker: Mosquitto, peer: CollectorPeer, spool: Spool) -> None:
    device = new_device()
    uplink = make_uplink(spool, broker.url, device)
    uplink.start()
    try:
        assert uplink.wait_connected(10)
        wait_for(lambda: device in peer.statuses, what="online status")  # subscribed by now
        ack_topic = topic(device, Kind.ACK)
        for payload in (b"not json", b'{"spool_epoch": 1}', b"\xff\xfe", b'{"spool_epoch": "x", "ranges": "all"}'):
            peer.client.publish(ack_topic, payload, qos=1)
        peer.client.publish(ack_topic, Ack(spool_epoch="other-epoch", ranges=[(0, 10)]).model_dump_json(), qos=1)
        wait_for(lambda: uplink.counters.bad_acks == 4 and uplink.counters.foreign_acks == 1, what="bad acks")
        fill(spool, 120)  # still works afterwards
        uplink.notify()
        wait_for(lambda: spool.depth() == 0, what="spool to empty")
    finally:
        uplink.stop()
    assert peer.unique(device) == set(range(120))


def test_gaps_travel_in_the_envelope_and_as_events(broker: Mosquitto, peer: CollectorPeer, tmp_path: Path) -> None:
    device = new_device()
    path = tmp_path / "crashed.db"
    crashed = Spool(path, max_bytes=1 << 24, reserve_step=1)
    crashed.append(make_block(30))
    crashed.commit()
    crashed.append(make_block(5, seed=1))  # lost: seq 30-34
    spool = Spool(path, max_bytes=1 << 24, reserve_step=1)
    fill(spool, 20)
    uplink = make_uplink(spool, broker.url, device)
    uplink.start()
    try:
        wait_for(lambda: spool.empty(), what="records, gap and event to be settled")
    finally:
        uplink.stop()
        spool.close()
    assert peer.unique(device) == set(range(30)) | set(range(35, 55))
    declared = {(g.first, g.last, g.reason) for b in peer.batches if b.device_id == device for g in b.gaps}
    assert declared == {(30, 34, GAP_CRASH)}
    wait_for(lambda: any(e.kind == EVENT_SPOOL_LOSS for e in peer.events), what="spool_loss event")
    loss = next(e for e in peer.events if e.kind == EVENT_SPOOL_LOSS and e.data["first"] == 30)
    assert loss.data["last"] == 34


def test_broker_restart_resends_and_delivers_every_seq(private_broker: Callable[[], Mosquitto], tmp_path: Path) -> None:
    broker = private_broker()
    device = new_device()
    peer = CollectorPeer(broker.url, mode="silent")  # nothing is acknowledged before the broker dies
    spool = Spool(tmp_path / "spool.db", max_bytes=1 << 26, chunk_max_records=50)
    uplink = make_uplink(spool, broker.url, device, batch_max_records=50, ack_timeout_s=30.0)
    uplink.start()
    try:
        fill(spool, 500)
        uplink.notify()
        wait_for(lambda: len(peer.unique(device)) >= 200, what="first batches")
        assert spool.depth() == 500
        broker.stop(signal.SIGKILL)  # loses whatever it had not saved: the agent must not care
        wait_for(lambda: not uplink.connected, what="disconnect")
        fill(spool, 500)  # produced while the broker is down
        peer.mode = "ack"
        broker.start()
        # ack_timeout_s is long: only the reconnect can explain the re-sends that empty the spool.
        wait_for(lambda: spool.depth() == 0 and spool.inflight() == 0, timeout=40, what="spool to empty")
    finally:
        uplink.stop()
        peer.close()
        spool.close()
    assert peer.unique(device) == set(range(1000))
    assert len(peer.received(device)) > 1000, "what was in flight at the crash was sent again"
    assert uplink.counters.connects >= 2 and uplink.counters.batches_resent >= 1


def test_last_will_offline_when_the_process_is_killed(broker: Mosquitto, tmp_path: Path) -> None:
    device = new_device()
    script = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from pathlib import Path
        from edge_agent.spool import Spool
        from tests.edge_agent.test_uplink import make_uplink
        spool = Spool(Path({str(tmp_path / "spool.db")!r}), max_bytes=1 << 20)
        uplink = make_uplink(spool, {broker.url!r}, {device!r})
        uplink.start()
        assert uplink.wait_connected(10)
        print("connected", flush=True)
        time.sleep(60)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    peer = CollectorPeer(broker.url)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "connected"
        wait_for(lambda: [s["state"] for s in peer.statuses.get(device, [])][-1:] == ["online"], what="online")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        wait_for(lambda: peer.statuses[device][-1] == {"state": "offline"}, timeout=15, what="last will")
    finally:
        if proc.poll() is None:
            proc.kill()
        peer.close()
    # Retained: a late subscriber sees offline too.
    late = CollectorPeer(broker.url)
    try:
        wait_for(lambda: bool(late.statuses.get(device)), what="retained status")
        assert late.statuses[device][-1]["state"] == "offline"
    finally:
        late.close()


def legacy_spool(path: Path, block: RecordBlock) -> Spool:
    """A spool holding ``block`` as ONE chunk, as agents before byte-bounded chunks stored a group."""
    spool = Spool(path, max_bytes=1 << 30, chunk_max_records=20_000, commit_max_records=20_000)
    spool.append(block)
    spool.commit()
    spool.close()
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT role, model, version, hidden, data FROM chunks ORDER BY id").fetchall()
        merged = concat_blocks(
            [_unpack_block(data, role, model, version, hidden) for role, model, version, hidden, data in rows]
        )
        data = _pack_block(merged)
        db.execute("DELETE FROM chunks")
        db.execute(
            "INSERT INTO chunks (first_seq, last_seq, n, role, model, version, hidden, nbytes, created, data)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (int(merged.seq[0]), int(merged.seq[-1]), len(merged), *rows[0][:4], len(data), time.time(), data),
        )
    db.close()
    return Spool(path, max_bytes=1 << 30)


@pytest.mark.parametrize(
    ("n", "features", "fill_value"),
    [
        (12_000, 256, None),  # random features: the compressed payload is over 4 MiB
        (9_000, 1024, 1e6),  # one value, float32 on the wire: tiny payload, over 32 MiB decompressed
    ],
    ids=["payload", "decompressed"],
)
def test_a_chunk_too_big_to_publish_is_split_not_resent_forever(
    broker: Mosquitto, peer: CollectorPeer, tmp_path: Path, n: int, features: int, fill_value: float | None
) -> None:
    device = new_device()
    block = make_block(n, features=features)
    if fill_value is not None:
        block.features[:] = fill_value
    spool = legacy_spool(tmp_path / "spool.db", block)
    assert spool.depth() == n
    uplink = make_uplink(spool, broker.url, device, batch_max_records=20_000)
    uplink.start()
    try:
        wait_for(lambda: spool.depth() == 0 and spool.inflight() == 0, timeout=60, what="spool to empty")
    finally:
        uplink.stop()
        spool.close()
    assert peer.unique(device) == set(range(n)) and not peer.bad
    c = uplink.counters
    # Each oversized attempt split the chunk once (n -> 2 x n/2 -> 4 x n/4 at most): no busy loop.
    assert 1 <= c.chunks_split <= 7 and c.oversized_batches == c.chunks_split, asdict(c)
    assert spool.stats.oversized_dropped == 0


def test_a_batch_is_in_flight_before_it_is_published(broker: Mosquitto, peer: CollectorPeer, spool: Spool) -> None:
    device = new_device()
    uplink = make_uplink(spool, broker.url, device)
    seen: list[int] = []

    def on_log(_c: object, _u: object, _level: int, line: str) -> None:
        # paho logs each PUBLISH from inside publish(): a fast collector's ack may come right after it.
        if "Sending PUBLISH" in line and "/telemetry'" in line:
            seen.append(spool.inflight())

    uplink._client.on_log = on_log
    fill(spool, 300)
    uplink.start()
    try:
        wait_for(lambda: spool.depth() == 0 and spool.inflight() == 0, what="spool to empty")
    finally:
        uplink.stop()
    assert len(seen) >= 3 and min(seen) >= 1


def test_real_collector_settles_a_real_uplink_exactly(
    private_broker: Callable[[], Mosquitto], sqlite_url: str, tmp_path: Path
) -> None:
    """The agent's uplink against collector.ingest.Ingest: crash gap, a quarantined batch, a partial seq conflict."""
    from collector.config import Settings
    from collector.db import make_engine, upgrade
    from collector.ingest import Ingest

    broker = private_broker()
    upgrade(sqlite_url)
    ingest = Ingest(
        Settings(
            database_url=sqlite_url,
            mqtt_url=broker.url,
            mqtt_client_id=f"collector-{uuid.uuid4().hex[:8]}",
            ingest_max_delay_ms=5,
            data_dir=tmp_path / "collector",
        )
    )
    ingest.start()
    device = new_device()
    path = tmp_path / "spool.db"
    kw: dict = {"max_bytes": 1 << 26, "chunk_max_records": 100, "reserve_step": 1}

    def drain(spool: Spool) -> Uplink:
        uplink = make_uplink(spool, broker.url, device, batch_max_records=100, ack_timeout_s=30.0)
        uplink.start()
        try:
            wait_for(spool.empty, timeout=30, what="the spool to drain")
        finally:
            uplink.stop()
        return uplink

    try:
        assert ingest.wait_connected(15)
        # A first life: seq 0-149 reach the collector. A backup of the spool taken at seq 100 is
        # restored afterwards (an SD card image): seq 100-149 are reused with other content.
        spool = Spool(path, **kw)
        spool.append(make_block(100, seed=1))
        spool.close()
        shutil.copy(path, tmp_path / "backup.db")
        spool = Spool(path, **kw)
        spool.append(make_block(50, seed=2))
        spool.commit()
        drain(spool)
        spool.close()
        shutil.copy(tmp_path / "backup.db", path)

        spool = Spool(path, **kw)
        assert spool.depth() == 100 and spool.next_seq == 100
        spool.append(make_block(100, seed=3))  # 100-199: 100-149 conflict, 150-199 new, one chunk
        spool.commit()
        spool.append(make_block(30, seed=4))  # 200-229: lost in a crash
        spool = Spool(path, **kw)
        assert [(g.first, g.last) for g in spool.gaps()] == [(200, 229)]
        spool.append(make_block(100, seed=5))  # 230-329
        spool.commit()
        bad = make_block(100, seed=6)  # 330-429: an engine bug, rejected whole
        bad.probs[5, 0] = np.nan
        spool.append(bad)
        spool.commit()
        spool.append(make_block(100, seed=7))  # 430-529
        spool.commit()
        uplink = drain(spool)
        assert uplink.counters.quarantined == 1 and uplink.counters.quarantine_unmatched == 0
        assert uplink.counters.records_released == 500 and spool.stats.quarantine_released == 100
        spool.close()
    finally:
        stats = ingest.stats()
        ingest.stop(timeout=5)
    engine = make_engine(sqlite_url)
    with engine.connect() as conn:
        seqs = [int(r[0]) for r in conn.exec_driver_sql("SELECT seq FROM inference WHERE device_id = ?", (device,))]
        gaps = conn.exec_driver_sql(
            "SELECT seq_first, seq_last, reason FROM declared_gap WHERE device_id = ?", (device,)
        ).all()
        quarantined = conn.exec_driver_sql("SELECT reason FROM quarantine WHERE device_id = ?", (device,)).all()
    engine.dispose()
    assert sorted(seqs) == [*range(200), *range(230, 330), *range(430, 530)]
    assert [tuple(g) for g in gaps] == [(200, 229, "crash")]
    # The collector keeps the conflicting second versions of 100-149 in quarantine, the first stored.
    assert sorted(r[0] for r in quarantined) == ["non_finite", "seq_conflict"]
    assert stats["records_conflict"] == 50


def test_live_batches_compress_hard_and_a_backlog_drains_fast(spool: Spool) -> None:
    uplink = make_uplink(spool, "mqtt://127.0.0.1:1", "veh-level", compression_level=19, catchup_compression_level=3)
    fill(spool, 1000)
    spool.commit()
    assert uplink._compression_level() == 19  # 1,000 records: ten full batches of 100 at most
    fill(spool, 100)
    spool.commit()
    assert uplink._compression_level() == 3  # 1,100 records: a backlog
    batch = spool.next_batch(100)
    assert batch is not None
    # Either level yields a payload the decoder accepts; the strong one is not larger.
    strong = encode_batch(make_batch_from(batch), level=19)
    fast = encode_batch(make_batch_from(batch), level=3)
    assert len(strong) <= len(fast)
    assert decode_batch(strong).n_records == decode_batch(fast).n_records == batch.n_records


def make_batch_from(batch) -> Batch:
    return Batch(
        device_id="veh-level",
        boot_id="b",
        spool_epoch="e" * 16,
        seq_first=batch.seq_first,
        seq_last=batch.seq_last,
        sent_at=1.7e9,
        sent_mono=1.0,
        clock_synced=True,
        profile="sim-v1",
        agent_version="0.1.0",
        blocks=batch.blocks,
        gaps=batch.gaps,
    )
