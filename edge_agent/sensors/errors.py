"""Sensor error types shared by the hardware drivers and the health tracking.

Every driver turns its failures into one of these, with a stable ``reason`` code
that the health logic counts and reports (``disconnected``, ``checksum``,
``timeout``, ``bad_data``, ``not_found``, ``stuck``, ``bad_chip_id``...), and a
free-form ``detail`` for humans and logs.
"""

from __future__ import annotations


class SensorError(Exception):
    """A sensor read failed; ``reason`` is a stable code (disconnected, checksum, timeout, bad_data, stuck...)."""

    def __init__(self, sensor: str, reason: str, detail: str) -> None:
        """Record which sensor failed, a stable reason code and a human-readable detail."""
        super().__init__(f"{sensor}: {reason}: {detail}")
        self.sensor = sensor
        self.reason = reason
        self.detail = detail


class SensorDisconnected(SensorError):
    """The bus, port or device vanished or does not answer (reason ``disconnected``)."""

    def __init__(self, sensor: str, reason: str = "disconnected", detail: str = "") -> None:
        """Default the reason to ``disconnected``; a driver may give a more specific one."""
        super().__init__(sensor, reason, detail)


class SensorDataError(SensorError):
    """The device answered with something invalid (checksum, bad chip id, impossible value...)."""
