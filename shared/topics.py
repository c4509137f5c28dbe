"""MQTT topic scheme of wire protocol v1: ``fleet/v1/<device_id>/<kind>``."""

from __future__ import annotations

import re
from enum import StrEnum

ROOT = "fleet/v1"
SHARED_GROUP = "collectors"
_DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")


class Kind(StrEnum):
    """The six per-device topics and who publishes them."""

    TELEMETRY = "telemetry"  # device -> collector, QoS 1
    STATUS = "status"  # device -> collector, QoS 1, retained, last will
    EVENTS = "events"  # device -> collector, QoS 1
    DESIRED = "desired"  # collector -> device, QoS 1, retained
    REPORTED = "reported"  # device -> collector, QoS 1, retained
    ACK = "ack"  # collector -> device, QoS 1


class TopicError(ValueError):
    """A topic or device id that does not follow the scheme."""


def valid_device_id(device_id: str) -> bool:
    """True when ``device_id`` is usable as one MQTT topic level (no wildcards, no slashes)."""
    return bool(_DEVICE_ID.match(device_id))


def check_device_id(device_id: str) -> str:
    """Return ``device_id`` or raise :class:`TopicError` saying why it is unusable."""
    if not valid_device_id(device_id):
        raise TopicError(
            f"device id {device_id!r} must be 1-64 characters of letters, digits, '_', '.', '-' "
            "and start with a letter or digit"
        )
    return device_id


def topic(device_id: str, kind: Kind | str) -> str:
    """The topic of ``kind`` for one device."""
    return f"{ROOT}/{check_device_id(device_id)}/{Kind(kind).value}"


def subscription(kind: Kind | str, *, shared: bool = False) -> str:
    """The wildcard subscription for ``kind`` across all devices (MQTT v5 shared if ``shared``)."""
    filt = f"{ROOT}/+/{Kind(kind).value}"
    return f"$share/{SHARED_GROUP}/{filt}" if shared else filt


def parse(topic_name: str) -> tuple[str, Kind]:
    """Split a concrete topic into ``(device_id, kind)``; raise :class:`TopicError` otherwise."""
    parts = topic_name.split("/")
    if len(parts) != 4 or f"{parts[0]}/{parts[1]}" != ROOT:
        raise TopicError(f"topic {topic_name!r} is not of the form {ROOT}/<device_id>/<kind>")
    try:
        kind = Kind(parts[3])
    except ValueError:
        raise TopicError(f"topic {topic_name!r} has unknown kind {parts[3]!r}") from None
    return check_device_id(parts[2]), kind
