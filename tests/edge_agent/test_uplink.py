"""The uplink against a real Mosquitto, with the test playing the collector (decode, then Ack).

:class:`CollectorPeer` is a real protocol peer: it subscribes to ``fleet/v1/+/telemetry``,
decodes every batch with :func:`shared.codec.decode_batch` and publishes
:class:`shared.messages.Ack` on the device's ``ack`` topic, as the collector does after its
commit. Behaviours the collector can show (never acking, quarantining) are switches on it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.config import MqttSection, UplinkSection
from edge_agent.spool import EVENT_SPOOL_LOSS, GAP_CRASH, Spool
from edge_agent.uplink import Uplink, clock_synced
from shared.codec import Batch, BatchError, decode_batch
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
        ack = Ack(
            spool_epoch=batch.spool_epoch,
            ranges=[(batch.seq_first, batch.seq_last)],
            gaps=[(g.first, g.last) for g in batch.gaps],
            quarantined=self.mode == "quarantine",
            reason="bad_value" if self.mode == "quarantine" else None,
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
