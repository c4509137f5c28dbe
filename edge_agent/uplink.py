"""MQTT uplink: telemetry batches from the spool, acks back into it, status, events and reported state.

The only agent module that imports paho. One client per device (paho 2.x, callback API v2) with a
persistent session, a retained last will ``{"state": "offline"}`` on ``status``, ``online`` on
every connect and ``stopped`` on a clean stop. A *pump* thread publishes batches at QoS 1 when the
spool has ``batch_max_records`` waiting or its oldest record is ``batch_max_age_s`` old, with at
most ``max_inflight_batches`` unacknowledged.

Delivery is settled by the collector, not by the broker: records leave the spool only when
``Ack``s for this spool epoch cover them. A ``quarantined`` ack (the collector rejected a payload
as invalid) releases, loudly, exactly the in-flight batch whose envelope it names, or nothing. A
batch not acknowledged within ``ack_timeout_s`` is sent again, with the timeout doubling per
unanswered re-send (at most 10 minutes) until acks make progress again; after a reconnect
everything in flight is sent again at once. No batch exceeds the codec's payload or decompressed
limits: an oversized one is re-cut, a chunk split in the spool. Garbage on the ack topic is
counted and logged, never raised.

The device's retained ``desired`` topic is subscribed on every connect; a payload that parses as a
:class:`shared.messages.Desired` is handed to the updater's queue (its signature and serial are
checked in the updater's thread, never here: paho's callback thread only parses and queues). A
malformed payload is counted and logged; an empty one (a retained message cleared) is ignored.
"""

from __future__ import annotations

import ctypes
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import zstandard
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import ValidationError

from edge_agent.config import MqttSection, UplinkSection
from edge_agent.spool import PendingBatch, Spool
from shared.codec import DEFAULT_LIMITS, MAGIC, Batch, encode_batch
from shared.messages import MAX_MESSAGE_BYTES, Ack, Desired, Reported, Status
from shared.topics import Kind, topic

log = logging.getLogger(__name__)

SESSION_EXPIRY_S = 7 * 24 * 3600
_TIME_ERROR = 5  # adjtimex() return value while the kernel clock is unsynchronised
_SYNC_FILE = Path("/run/systemd/timesync/synchronized")
_sync_cache: tuple[float, bool] = (-1e18, False)


def clock_synced() -> bool:
    """Whether the wall clock is NTP-synchronised (systemd-timesyncd flag file, else the kernel's adjtimex)."""
    global _sync_cache
    now = time.monotonic()
    if now - _sync_cache[0] < 60.0:
        return _sync_cache[1]
    synced = False
    try:
        if _SYNC_FILE.exists():
            synced = True
        else:
            libc = ctypes.CDLL(None, use_errno=True)
            # struct timex is ~208 bytes on 64-bit Linux; a zeroed buffer means modes=0: read only.
            buf = ctypes.create_string_buffer(512)
            state = int(libc.adjtimex(buf))
            synced = state not in (-1, _TIME_ERROR)
    except (OSError, AttributeError):
        synced = False
    _sync_cache = (now, synced)
    return synced


def decompressed_size(payload: bytes) -> int:
    """The msgpack body size a telemetry payload declares in its zstd frame header (-1 if unknown)."""
    try:
        return int(zstandard.frame_content_size(payload[len(MAGIC) + 1 :]))
    except zstandard.ZstdError:
        return -1


@dataclass
class UplinkCounters:
    """What the uplink did since it started."""

    connects: int = 0
    connect_failures: int = 0
    disconnects: int = 0
    batches_sent: int = 0
    records_sent: int = 0
    batches_resent: int = 0
    publish_errors: int = 0
    oversized_batches: int = 0
    acks: int = 0
    records_released: int = 0
    bad_acks: int = 0
    foreign_acks: int = 0
    quarantined: int = 0
    quarantine_unmatched: int = 0
    chunks_split: int = 0
    events_published: int = 0
    subscribe_failures: int = 0
    desired_received: int = 0
    bad_desired: int = 0


class Uplink:
    """Publishes the spool over MQTT and releases what the collector acknowledges."""

    def __init__(
        self,
        *,
        device_id: str,
        spool: Spool,
        mqtt_settings: MqttSection,
        settings: UplinkSection,
        boot_id: str,
        profile: str,
        agent_version: str,
        client_id: str | None = None,
        status: Callable[[], Status] | None = None,
        reported: Callable[[], Reported] | None = None,
        on_desired: Callable[[Desired], None] | None = None,
    ) -> None:
        self.device_id = device_id
        self.spool = spool
        self.mqtt = mqtt_settings
        self.settings = settings
        self.boot_id = boot_id
        self.profile = profile
        self.agent_version = agent_version
        self.client_id = client_id or f"edge-{device_id}"
        self._status = status or (lambda: Status(state="online"))
        self._reported = reported
        self._on_desired = on_desired
        self._reported_stale = False  # a change happened while offline: publish once connected
        self.counters = UplinkCounters()
        self.topics = {kind: topic(device_id, kind) for kind in Kind}
        self._connected = threading.Event()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._event_mids: dict[int, int] = {}  # MQTT mid -> spool event id awaiting PUBACK
        self._events_inflight: set[int] = set()
        self._last_status = -1e18
        self._pump: threading.Thread | None = None
        self._client = self._make_client()

    # --------------------------------------------------------------------------------- setup

    def _make_client(self) -> mqtt.Client:
        v5 = self.mqtt.protocol == "5"
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            # A persistent session keeps acks the collector publishes while we are away.
            clean_session=None if v5 else False,
        )
        if self.mqtt.username:
            password = self.mqtt.password.get_secret_value() if self.mqtt.password else None
            client.username_pw_set(self.mqtt.username, password)
        if self.mqtt.tls:
            client.tls_set()
        client.will_set(self.topics[Kind.STATUS], json.dumps({"state": "offline"}), qos=1, retain=True)
        client.reconnect_delay_set(
            min_delay=max(1, round(self.mqtt.reconnect_min_delay_s)),
            max_delay=max(1, round(self.mqtt.reconnect_max_delay_s)),
        )
        client.max_inflight_messages_set(max(20, self.settings.max_inflight_batches + 20))
        client.max_queued_messages_set(0)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        return client

    def start(self) -> None:
        """Connect in the background (paho reconnects with backoff) and start the pump thread."""
        properties = None
        clean_start: Any = mqtt.MQTT_CLEAN_START_FIRST_ONLY
        if self.mqtt.protocol == "5":
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = SESSION_EXPIRY_S
            clean_start = False
        self._client.connect_async(
            self.mqtt.host,
            self.mqtt.port,
            keepalive=self.mqtt.keepalive,
            clean_start=clean_start,
            properties=properties,
        )
        self._client.loop_start()
        self._pump = threading.Thread(target=self._run_pump, name=f"uplink-{self.device_id}", daemon=True)
        self._pump.start()
        log.info("uplink %s -> %s (MQTT %s)", self.device_id, self.mqtt.url, self.mqtt.protocol)

    def stop(self, *, clean: bool = True, timeout: float = 5.0) -> None:
        """Stop the pump; on a clean stop publish the retained ``stopped`` status; disconnect."""
        self._stop.set()
        self._wake.set()
        if self._pump is not None:
            self._pump.join(timeout)
        if clean and self._connected.is_set():
            try:
                status = self._status().model_copy(update={"state": "stopped", "ts": time.time()})
                info = self._client.publish(
                    self.topics[Kind.STATUS], status.model_dump_json(exclude_none=True), qos=1, retain=True
                )
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError) as exc:
                log.warning("could not publish the stopped status: %s", exc)
        self._client.disconnect()
        self._client.loop_stop()

    @property
    def connected(self) -> bool:
        """Whether the client holds an accepted connection."""
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        """Block until connected or ``timeout``."""
        return self._connected.wait(timeout)

    def notify(self) -> None:
        """Wake the pump (records were committed)."""
        self._wake.set()

    # ----------------------------------------------------------------------------- callbacks

    def _on_connect(self, client: mqtt.Client, _userdata: Any, _flags: Any, reason_code: Any, _props: Any) -> None:
        if reason_code.is_failure:
            self.counters.connect_failures += 1
            log.error("broker %s refused the connection: %s", self.mqtt.url, reason_code)
            return
        self.counters.connects += 1
        wanted = [(self.topics[Kind.ACK], 1)]
        if self._on_desired is not None:
            wanted.append((self.topics[Kind.DESIRED], 1))
        result, _mid = client.subscribe(wanted)
        if result != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self.counters.subscribe_failures += 1
            log.error("subscribe to %s failed: %s", [t for t, _q in wanted], mqtt.error_string(result))
        with self._lock:
            self._event_mids.clear()
            self._events_inflight.clear()
        requeued = self.spool.requeue_all()
        if requeued:
            self.counters.batches_resent += requeued
            log.info("reconnected: %d unacknowledged batches will be sent again", requeued)
        self._publish_status(client)
        if self._reported is not None:
            self._reported_stale = False
            client.publish(
                self.topics[Kind.REPORTED], self._reported().model_dump_json(exclude_none=True), qos=1, retain=True
            )
        self._connected.set()
        self._wake.set()
        log.info("connected to %s as %s", self.mqtt.url, self.client_id)

    def _on_connect_fail(self, _client: mqtt.Client, _userdata: Any) -> None:
        self.counters.connect_failures += 1
        log.debug("connection to %s failed; paho retries with backoff", self.mqtt.url)

    def _on_disconnect(self, _client: mqtt.Client, _userdata: Any, _flags: Any, reason_code: Any, _p: Any) -> None:
        if self._connected.is_set():
            self.counters.disconnects += 1
            level = logging.INFO if self._stop.is_set() else logging.WARNING
            log.log(level, "disconnected from %s: %s", self.mqtt.url, reason_code)
        self._connected.clear()

    def _on_subscribe(self, _client: mqtt.Client, _userdata: Any, _mid: int, codes: list[Any], _p: Any) -> None:
        for code in codes:
            if code.is_failure:
                self.counters.subscribe_failures += 1
                log.error("broker refused a subscription (ack/desired) of %s: %s", self.device_id, code)

    def _on_publish(self, _client: mqtt.Client, _userdata: Any, mid: int, reason_code: Any, _p: Any) -> None:
        with self._lock:
            event_id = self._event_mids.pop(mid, None)
        if event_id is None:
            return
        if getattr(reason_code, "is_failure", False):
            log.warning("broker refused event %d: %s", event_id, reason_code)
            with self._lock:
                self._events_inflight.discard(event_id)
            return
        self.spool.event_published(event_id)
        self.counters.events_published += 1
        with self._lock:
            self._events_inflight.discard(event_id)

    def _on_message(self, _client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        if message.topic == self.topics[Kind.DESIRED]:
            self._on_desired_message(message)
            return
        if message.topic != self.topics[Kind.ACK]:
            return
        try:
            if len(message.payload) > MAX_MESSAGE_BYTES:
                raise ValueError(f"{len(message.payload)} bytes")
            ack = Ack.model_validate_json(message.payload)
        except (ValidationError, ValueError) as exc:
            self.counters.bad_acks += 1
            log.warning("bad payload on %s ignored (%d so far): %s", message.topic, self.counters.bad_acks, exc)
            return
        self.handle_ack(ack)

    def _on_desired_message(self, message: mqtt.MQTTMessage) -> None:
        if not message.payload or self._on_desired is None:
            return  # a cleared retained desired state: nothing to act on
        self.counters.desired_received += 1
        try:
            if len(message.payload) > MAX_MESSAGE_BYTES:
                raise ValueError(f"{len(message.payload)} bytes > {MAX_MESSAGE_BYTES}")
            desired = Desired.model_validate_json(message.payload)
        except (ValidationError, ValueError) as exc:
            self.counters.bad_desired += 1
            log.warning(
                "malformed desired state on %s ignored (%d so far): %s",
                message.topic,
                self.counters.bad_desired,
                str(exc).splitlines()[0],
            )
            return
        self._on_desired(desired)

    def handle_ack(self, ack: Ack) -> int:
        """Release what ``ack`` covers from the spool; return records released."""
        if ack.spool_epoch != self.spool.epoch:
            self.counters.foreign_acks += 1
            log.warning("ack for another spool epoch %s ignored", ack.spool_epoch)
            return 0
        try:
            if ack.quarantined:
                self.counters.quarantined += 1
                quarantined = self.spool.release_quarantined(ack)
                if quarantined is None:
                    # Stale (the batch was re-sent meanwhile) or not ours: the re-send gets its own ack.
                    self.counters.quarantine_unmatched += 1
                    return 0
                released = quarantined
                log.error(
                    "COLLECTOR QUARANTINED batch %s (reason %s): released its %d records, they will never be accepted",
                    ack.ranges,
                    ack.reason,
                    released,
                )
            else:
                released = self.spool.release(ack)
        except Exception:
            log.exception("releasing ack %s failed", ack.ranges)
            return 0
        self.counters.acks += 1
        self.counters.records_released += released
        self._wake.set()
        return released

    # ---------------------------------------------------------------------------------- pump

    def _run_pump(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(0.25)
            self._wake.clear()
            if self._stop.is_set() or not self._connected.is_set():
                continue
            try:
                self._pump_once()
            except Exception:
                # The pump must outlive a bad moment (a full disk, a codec bug): log and go on.
                log.exception("uplink pump failed; retrying")
                self._stop.wait(1.0)

    def _pump_once(self) -> None:
        s = self.settings
        now = time.monotonic()
        stale = self.spool.requeue_unacked(s.ack_timeout_s, now)
        if stale:
            self.counters.batches_resent += stale
            log.info(
                "%d batches not acknowledged in time (%.0f s, doubling per re-send): sending again",
                stale,
                s.ack_timeout_s,
            )
        max_records = s.batch_max_records
        while (
            self._connected.is_set()
            and self.spool.inflight() < s.max_inflight_batches
            and self.spool.ready(s.batch_max_records, s.batch_max_age_s)
        ):
            batch = self.spool.next_batch(max_records)
            if batch is None:
                break
            result = self._publish_batch(batch)
            if result == "oversized" and len(batch.chunk_ids) > 1:
                max_records = max(1, batch.n_records // 2)
                continue
            if result == "oversized":
                # One chunk too big (stored by an older agent, or a freak record): cut it in two
                # in the spool, or declare a lone record as a gap. Never try the same payload again.
                if batch.chunk_ids:
                    self.spool.split_chunk(batch.chunk_ids[0])
                    self.counters.chunks_split += 1
                    self._wake.set()
                break
            if result == "error":
                break
            max_records = s.batch_max_records
        self._publish_events()
        if self._reported_stale and self._reported is not None:
            self.publish_reported(self._reported())
        if now - self._last_status >= s.status_interval_s:
            self._publish_status(self._client)

    def _compression_level(self) -> int:
        """Strong compression for live telemetry; fast compression while a backlog drains."""
        s = self.settings
        backlog = self.spool.depth() > 10 * s.batch_max_records
        return s.catchup_compression_level if backlog else s.compression_level

    def _publish_batch(self, batch: PendingBatch) -> str:
        payload = encode_batch(
            Batch(
                device_id=self.device_id,
                boot_id=self.boot_id,
                spool_epoch=self.spool.epoch,
                seq_first=batch.seq_first,
                seq_last=batch.seq_last,
                sent_at=time.time(),
                sent_mono=time.monotonic(),
                clock_synced=clock_synced(),
                profile=self.profile,
                agent_version=self.agent_version,
                blocks=batch.blocks,
                gaps=batch.gaps,
            ),
            level=self._compression_level(),
        )
        body = decompressed_size(payload)
        if len(payload) > DEFAULT_LIMITS.max_payload_bytes or body > DEFAULT_LIMITS.max_decompressed_bytes:
            self.spool.unsend(batch)
            self.counters.oversized_batches += 1
            log.warning(
                "batch of %d records in %d chunks is %d bytes (%d decompressed): over the codec's limits",
                batch.n_records,
                len(batch.chunk_ids),
                len(payload),
                body,
            )
            return "oversized"
        # In flight before it can be acknowledged: a fast collector's ack may beat publish()'s return.
        self.spool.mark_sent(batch)
        try:
            info = self._client.publish(self.topics[Kind.TELEMETRY], payload, qos=1)
        except BaseException:
            self.spool.unsend(batch)
            raise
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self.spool.unsend(batch)
            self.counters.publish_errors += 1
            log.warning("publish failed (%s); will retry", mqtt.error_string(info.rc))
            return "error"
        self.counters.batches_sent += 1
        self.counters.records_sent += batch.n_records
        log.debug(
            "sent batch seq %d-%d (%d records, %d bytes)",
            batch.seq_first,
            batch.seq_last,
            batch.n_records,
            len(payload),
        )
        return "ok"

    def _publish_events(self) -> None:
        for event_id, event in self.spool.pending_events():
            with self._lock:
                if event_id in self._events_inflight:
                    continue
            info = self._client.publish(self.topics[Kind.EVENTS], event.model_dump_json(), qos=1)
            if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return
            with self._lock:
                self._events_inflight.add(event_id)
                self._event_mids[info.mid] = event_id
            if info.is_published():
                # PUBACK may have arrived before the mid was registered.
                self._on_publish(self._client, None, info.mid, None, None)

    def _publish_status(self, client: mqtt.Client) -> None:
        self._last_status = time.monotonic()
        try:
            status = self._status()
        except Exception:
            log.exception("building the status failed")
            return
        client.publish(self.topics[Kind.STATUS], status.model_dump_json(exclude_none=True), qos=1, retain=True)

    def publish_reported(self, reported: Reported) -> None:
        """Publish the retained ``reported`` state now; while offline, once connected again.

        Offline changes are not queued one by one in paho (a long outage during a download would
        pile up stale progress): the latest state is published after the reconnect.
        """
        if not self._connected.is_set():
            self._reported_stale = True
            return
        self._reported_stale = False
        self._client.publish(
            self.topics[Kind.REPORTED], reported.model_dump_json(exclude_none=True), qos=1, retain=True
        )

    def snapshot(self) -> dict[str, Any]:
        """Counters and connection state, for the status file."""
        return {"connected": self.connected, "inflight": self.spool.inflight(), **asdict(self.counters)}
