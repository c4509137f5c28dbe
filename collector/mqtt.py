"""The collector's MQTT client (the only collector module that imports paho).

A persistent session with manual acknowledgements: ``on_message`` only hands each message to the
ingest queue; the ingest writer calls :meth:`CollectorMqtt.ack` after the message's transaction
committed, so a message whose records are not stored stays unacknowledged at the broker, which
redelivers it when the collector reconnects (MQTT 5: ``clean_start=False`` and a session expiry;
MQTT 3.1.1: ``clean_session=False``). Subscriptions are (re)made in ``on_connect`` and their
reason codes checked; paho's network thread reconnects with exponential backoff.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from collector import metrics
from collector.config import Settings
from shared import topics
from shared.messages import Ack, Desired

log = logging.getLogger(__name__)

INGEST_KINDS: tuple[topics.Kind, ...] = (
    topics.Kind.TELEMETRY,
    topics.Kind.STATUS,
    topics.Kind.EVENTS,
    topics.Kind.REPORTED,
)


@dataclass(frozen=True)
class InboundMessage:
    """One received message, as handed to the ingest queue. ``session`` tells which connection it came on."""

    mid: int
    qos: int
    topic: str
    payload: bytes
    received_at: float
    session: int
    retain: bool = False


@dataclass(frozen=True)
class BrokerAddress:
    """Where and how to connect, parsed from ``mqtt_url``."""

    host: str
    port: int
    tls: bool
    username: str | None
    password: str | None


def parse_mqtt_url(url: str) -> BrokerAddress:
    """Split ``mqtt[s]://[user[:password]@]host[:port]`` into its parts."""
    parts = urlsplit(url)
    tls = parts.scheme in ("mqtts", "ssl")
    if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl") or not parts.hostname:
        raise ValueError(f"MQTT URL {url!r} must look like mqtt://host:port or mqtts://host:port")
    return BrokerAddress(
        host=parts.hostname,
        port=parts.port or (8883 if tls else 1883),
        tls=tls,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
    )


class _QuietStop(logging.Filter):
    """paho 2.2 logs "Client is not connected" at ERROR once after every clean disconnect: drop that one."""

    def __init__(self, owner: CollectorMqtt) -> None:
        super().__init__()
        self._owner = owner

    def filter(self, record: logging.LogRecord) -> bool:
        quiet = self._owner._paused or self._owner._restarting
        return not (quiet and str(record.msg).startswith("Client is not connected"))


def _topic_text(msg: paho.MQTTMessage) -> str:
    try:
        return msg.topic
    except UnicodeDecodeError:
        # A broker should refuse such a topic; keep something printable for the quarantine row.
        return bytes(msg._topic).decode("utf-8", "replace")


class Delivery:
    """One QoS 1 publication in flight: :meth:`wait` tells whether the broker acknowledged it."""

    def __init__(self, info: paho.MQTTMessageInfo) -> None:
        self._info = info

    def wait(self, timeout: float) -> bool:
        """Block until the broker's PUBACK (or ``timeout``); True when the message was delivered to the broker."""
        try:
            self._info.wait_for_publish(max(0.0, timeout))
            return self._info.is_published()
        except (ValueError, RuntimeError):
            return False


RETAINED_BY_DEVICE: tuple[topics.Kind, ...] = (topics.Kind.DESIRED, topics.Kind.STATUS, topics.Kind.REPORTED)


class CollectorMqtt:
    """paho client with a persistent session, manual acks and ack/desired publishing."""

    def __init__(
        self,
        settings: Settings,
        deliver: Callable[[InboundMessage], None],
        *,
        kinds: Iterable[topics.Kind] = INGEST_KINDS,
    ) -> None:
        self.settings = settings
        self._deliver = deliver
        self._kinds = tuple(kinds)
        self._address = parse_mqtt_url(settings.mqtt_url)
        self._v5 = settings.mqtt_protocol == "5"
        self._shared = settings.mqtt_shared_subscription and self._v5
        if settings.mqtt_shared_subscription and not self._v5:
            log.warning("shared subscriptions need MQTT 5; subscribing with plain topics over MQTT 3.1.1")
        self._session = 0
        self._connected = threading.Event()
        self._paused = False
        self._subscribed = threading.Event()
        self._started = False
        self._restarting = False
        self._state_lock = threading.Lock()  # start, stop and reconnect one at a time
        self._client = self._make_client()

    # ------------------------------------------------------------------------------- set-up

    def _make_client(self) -> paho.Client:
        s = self.settings
        if self._v5:
            client = paho.Client(
                CallbackAPIVersion.VERSION2,
                client_id=s.mqtt_client_id,
                protocol=MQTTProtocolVersion.MQTTv5,
                manual_ack=True,
            )
        else:
            client = paho.Client(
                CallbackAPIVersion.VERSION2,
                client_id=s.mqtt_client_id,
                clean_session=False,
                protocol=MQTTProtocolVersion.MQTTv311,
                manual_ack=True,
            )
        # A private child logger (not registered globally) so the filter lives and dies with this client.
        paho_log = logging.Logger("collector.mqtt.paho")
        paho_log.parent = logging.getLogger("collector.mqtt.paho")
        paho_log.addFilter(_QuietStop(self))
        client.enable_logger(paho_log)
        username = s.mqtt_username or self._address.username
        password = s.mqtt_password or self._address.password
        if username:
            client.username_pw_set(username, password)
        if self._address.tls:
            client.tls_set(tls_version=ssl.PROTOCOL_TLS_CLIENT)
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.max_inflight_messages_set(100)  # our own ack/desired publishes
        client.max_queued_messages_set(0)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        return client

    def start(self) -> None:
        """Connect in the background (retrying until the broker answers) and start the network thread."""
        with self._state_lock:
            if self._started:
                return
            self._paused = False
            self._open()
            a = self._address
            log.info(
                "MQTT client %r connecting to %s:%d (MQTT %s, persistent session, manual acks)",
                self.settings.mqtt_client_id,
                a.host,
                a.port,
                self.settings.mqtt_protocol,
            )

    def _open(self) -> None:
        a = self._address
        if self._v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = self.settings.mqtt_session_expiry_s
            self._client.connect_async(
                a.host, a.port, keepalive=self.settings.mqtt_keepalive_s, clean_start=False, properties=props
            )
        else:
            self._client.connect_async(a.host, a.port, keepalive=self.settings.mqtt_keepalive_s)
        self._client.loop_start()
        self._started = True

    def pause(self) -> None:
        """Stop taking messages: from now on they stay unacknowledged, for the next session to receive."""
        self._paused = True

    def stop(self, timeout: float = 5.0) -> None:
        """Disconnect (after the acks queued so far are sent) and stop the network thread."""
        self._paused = True
        with self._state_lock:
            if self._started:
                self._close(timeout)

    def reconnect(self, timeout: float = 5.0) -> None:
        """Restart the session: disconnect, then connect again, so the broker redelivers every unacknowledged message.

        A message taken and never acknowledged holds one of the broker's in-flight slots until the
        session restarts; enough of them would stall the stream. Does nothing once paused or stopped.
        """
        with self._state_lock:
            if not self._started or self._paused:
                return
            log.warning("MQTT session restarting so the broker redelivers the messages not acknowledged")
            self._restarting = True
            try:
                self._close(timeout)
                self._open()
            finally:
                self._restarting = False

    def _close(self, timeout: float) -> None:
        self._client.disconnect()
        deadline = time.monotonic() + timeout
        while self._connected.is_set() and time.monotonic() < deadline:
            time.sleep(0.01)
        self._client.loop_stop()
        self._started = False
        self._connected.clear()
        metrics.MQTT_CONNECTED.set(0)

    @property
    def session(self) -> int:
        """Counts connections: it changes after every (re)connect."""
        return self._session

    @property
    def connected(self) -> bool:
        """True while connected and subscribed."""
        return self._connected.is_set() and self._subscribed.is_set()

    def wait_connected(self, timeout: float) -> bool:
        """Block until connected and subscribed (or ``timeout``); return whether it is."""
        return self._subscribed.wait(timeout) and self._connected.is_set()

    # ------------------------------------------------------------------------------- callbacks

    def _subscriptions(self) -> list[tuple[str, Any]]:
        subs = [topics.subscription(kind, shared=self._shared) for kind in self._kinds]
        if self._v5:
            return [(s, SubscribeOptions(qos=1)) for s in subs]
        return [(s, 1) for s in subs]

    def _on_connect(
        self, client: paho.Client, _userdata: Any, flags: Any, reason_code: ReasonCode, _props: Any
    ) -> None:
        if reason_code.is_failure:
            log.error("MQTT broker refused the connection: %s", reason_code)
            return
        self._session += 1
        self._connected.set()
        metrics.MQTT_CONNECTED.set(1)
        log.info("MQTT connected (session present: %s)", getattr(flags, "session_present", None))
        result, _mid = client.subscribe(self._subscriptions())
        if result != MQTTErrorCode.MQTT_ERR_SUCCESS:
            log.error("MQTT subscribe could not be sent: %s", paho.error_string(result))

    def _on_subscribe(
        self, _client: paho.Client, _userdata: Any, _mid: int, reason_codes: list[ReasonCode], _props: Any
    ) -> None:
        failed = [(kind.value, str(rc)) for kind, rc in zip(self._kinds, reason_codes, strict=False) if rc.is_failure]
        if failed:
            log.error("MQTT broker refused subscriptions: %s", failed)
            return
        log.info("MQTT subscribed to %s", ", ".join(s for s, _ in self._subscriptions()))
        self._subscribed.set()

    def _on_disconnect(
        self, _client: paho.Client, _userdata: Any, _flags: Any, reason_code: ReasonCode, _props: Any
    ) -> None:
        self._connected.clear()
        self._subscribed.clear()
        metrics.MQTT_CONNECTED.set(0)
        if self._paused or self._restarting:
            log.info("MQTT disconnected")
        else:
            log.warning("MQTT connection lost (%s); reconnecting", reason_code)

    def _on_message(self, _client: paho.Client, _userdata: Any, msg: paho.MQTTMessage) -> None:
        if self._paused:
            return
        self._deliver(
            InboundMessage(
                mid=msg.mid,
                qos=msg.qos,
                topic=_topic_text(msg),
                payload=bytes(msg.payload),
                received_at=time.time(),
                session=self._session,
                retain=bool(msg.retain),
            )
        )

    # ------------------------------------------------------------------------------- outbound

    def ack(self, message: InboundMessage) -> bool:
        """Acknowledge ``message`` to the broker; False when it came on an earlier connection (it is redelivered)."""
        if message.qos == 0:
            return True
        if message.session != self._session or not self._connected.is_set():
            return False
        return self._client.ack(message.mid, message.qos) == MQTTErrorCode.MQTT_ERR_SUCCESS

    def publish(self, topic: str, payload: bytes | str, *, qos: int = 1, retain: bool = False) -> None:
        """Publish (queued by paho while disconnected and sent after the reconnect)."""
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            log.warning("MQTT publish to %s failed: %s", topic, paho.error_string(info.rc))

    def publish_ack(self, device_id: str, ack: Ack) -> None:
        """Publish ``ack`` on the device's ``ack`` topic (QoS 1)."""
        self.publish(topics.topic(device_id, topics.Kind.ACK), ack.model_dump_json(), qos=1)

    def publish_desired(self, device_id: str, desired: Desired) -> Delivery:
        """Publish a signed desired state retained on the device's ``desired`` topic (QoS 1)."""
        info = self._client.publish(
            topics.topic(device_id, topics.Kind.DESIRED), desired.model_dump_json(), qos=1, retain=True
        )
        return Delivery(info)

    def clear_retained(self, device_id: str, kinds: tuple[topics.Kind, ...] = RETAINED_BY_DEVICE) -> list[Delivery]:
        """Empty the device's retained topics (an empty retained payload makes the broker forget the message)."""
        return [Delivery(self._client.publish(topics.topic(device_id, k), b"", qos=1, retain=True)) for k in kinds]
