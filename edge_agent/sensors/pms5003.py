"""Plantower PMS5003-class particle sensor over a UART (pyserial, 9600 8N1).

Wire format (Plantower PMS5003 datasheet, appendix I and II):

* data frame, 32 bytes: ``0x42 0x4D``, frame length ``28`` (big-endian 16 bit, = 13 data words
  + checksum), 13 big-endian words (PM1.0/PM2.5/PM10 at CF=1, PM1.0/PM2.5/PM10 under atmospheric
  environment, particle counts above 0.3/0.5/1.0/2.5/5/10 µm per 0.1 L, reserved), checksum = 16-bit
  sum of all preceding bytes;
* command, 7 bytes: ``0x42 0x4D CMD DATAH DATAL LRCH LRCL`` (LRC = 16-bit sum of the first five);
  ``0xE1`` mode (0 passive, 1 active), ``0xE2`` read in passive mode, ``0xE4`` sleep (0) / wake (1);
* command answer, 8 bytes: ``0x42 0x4D 0x00 0x04 CMD DATA`` + checksum; recognised and skipped.

The pimoroni ``pms5003`` package was considered and not used: its constructor drives the enable and
reset pins through gpiod (our boards wire only RX/TX), it reads the port one byte per call, has no
passive mode, and raises on a checksum mismatch instead of resynchronising.

Parsing is :class:`FrameParser` (pure, no I/O); :class:`Pms5003` owns the port, the modes, timeouts
and disconnects. One driver object is used from one thread.
"""

from __future__ import annotations

import logging
import struct
import time
from dataclasses import dataclass
from typing import Any, Literal, NoReturn, Protocol

import serial

from edge_agent.sensors.errors import SensorDataError, SensorDisconnected, SensorError

log = logging.getLogger(__name__)

START = b"\x42\x4d"
DATA_LENGTH = 28
"""Frame length field of a data frame: 13 data words and the checksum."""
ACK_LENGTH = 4
"""Frame length field of a command answer: command, data, checksum."""
DATA_FRAME_SIZE = 4 + DATA_LENGTH
ACK_FRAME_SIZE = 4 + ACK_LENGTH

CMD_MODE = 0xE1
CMD_READ = 0xE2
CMD_SLEEP = 0xE4

BAUD = 9600
POLL_S = 0.2
"""Port read timeout: bounds how far a read may overshoot ``read_timeout_s``."""

Mode = Literal["active", "passive"]

_WORDS = struct.Struct(">13H")
_U16 = struct.Struct(">H")
# A port fails in one of these ways when a USB-serial adapter is unplugged or a pty's master closes.
_PORT_ERRORS = (serial.SerialException, OSError)


class SerialPort(Protocol):
    """What the driver needs from a pyserial ``Serial``."""

    timeout: float | None

    @property
    def in_waiting(self) -> int:
        """Bytes received and not yet read."""
        ...

    def read(self, size: int = 1) -> bytes:
        """Up to ``size`` bytes; fewer when the port timeout expires first."""
        ...

    def write(self, data: bytes, /) -> int | None:
        """Send ``data``."""
        ...

    def reset_input_buffer(self) -> None:
        """Drop everything received and not yet read."""
        ...

    def close(self) -> None:
        """Release the device."""
        ...


@dataclass(frozen=True, slots=True)
class PmsReading:
    """One data frame: mass concentrations in µg/m³ and particle counts per 0.1 L (dl) of air."""

    pm1_cf1: int
    pm25_cf1: int
    pm10_cf1: int
    pm1: int
    pm25: int
    pm10: int
    particles_per_dl: tuple[int, int, int, int, int, int]
    """Counts of particles above 0.3, 0.5, 1.0, 2.5, 5 and 10 µm in 0.1 L of air."""


def command(cmd: int, data: int) -> bytes:
    """The 7-byte command frame ``42 4D CMD DATAH DATAL LRCH LRCL`` for a 16-bit ``data``."""
    head = START + bytes((cmd,)) + _U16.pack(data)
    return head + _U16.pack(sum(head) & 0xFFFF)


MODE_PASSIVE = command(CMD_MODE, 0)
MODE_ACTIVE = command(CMD_MODE, 1)
READ_PASSIVE = command(CMD_READ, 0)
SLEEP = command(CMD_SLEEP, 0)
WAKE = command(CMD_SLEEP, 1)


class FrameParser:
    """Finds frames in a byte stream fed in arbitrary pieces.

    Synchronises on ``0x42 0x4D`` with ``bytes.find``; a candidate with an unknown length or a wrong
    checksum is a false start: one byte is dropped and the search goes on from the next byte, so a
    real frame that begins inside the bad one is still found. Every byte fed ends up in exactly one
    of: a data frame, a command answer, ``garbage_bytes``, or the pending tail (:meth:`pending`).
    """

    def __init__(self) -> None:
        """Start with an empty buffer and zero counters."""
        self._buf = bytearray()
        self.counters: dict[str, int] = {
            "bytes": 0,
            "frames": 0,
            "acks": 0,
            "garbage_bytes": 0,
            "checksum_errors": 0,
            "length_errors": 0,
        }
        self.last_ack: tuple[int, int] | None = None
        """``(command, data)`` of the latest command answer."""

    def feed(self, data: bytes) -> list[PmsReading]:
        """Add received bytes; return the data frames completed by them, oldest first."""
        counters = self.counters
        counters["bytes"] += len(data)
        buf = self._buf
        buf += data
        readings: list[PmsReading] = []
        pos = 0
        size = len(buf)
        while True:
            start = buf.find(START, pos)
            if start < 0:
                # A trailing 0x42 may be the first half of a start sequence still on the wire.
                keep = size - 1 if size > pos and buf[-1] == START[0] else size
                counters["garbage_bytes"] += keep - pos
                pos = keep
                break
            counters["garbage_bytes"] += start - pos
            pos = start
            if size - start < 4:
                break
            length = (buf[start + 2] << 8) | buf[start + 3]
            if length != DATA_LENGTH and length != ACK_LENGTH:
                counters["length_errors"] += 1
                counters["garbage_bytes"] += 1
                pos = start + 1
                continue
            end = start + 4 + length
            if size < end:
                break
            if sum(buf[start : end - 2]) & 0xFFFF != (buf[end - 2] << 8) | buf[end - 1]:
                counters["checksum_errors"] += 1
                counters["garbage_bytes"] += 1
                pos = start + 1
                continue
            if length == DATA_LENGTH:
                words = _WORDS.unpack_from(buf, start + 4)
                readings.append(
                    PmsReading(
                        pm1_cf1=words[0],
                        pm25_cf1=words[1],
                        pm10_cf1=words[2],
                        pm1=words[3],
                        pm25=words[4],
                        pm10=words[5],
                        particles_per_dl=(words[6], words[7], words[8], words[9], words[10], words[11]),
                    )
                )
                counters["frames"] += 1
            else:
                self.last_ack = (buf[start + 4], buf[start + 5])
                counters["acks"] += 1
            pos = end
        del buf[:pos]
        return readings

    def pending(self) -> int:
        """Bytes held back as the possible beginning of a frame."""
        return len(self._buf)

    def missing(self) -> int:
        """Bytes still needed to complete the pending candidate (a data frame when its length is unknown)."""
        buf = self._buf
        if len(buf) >= 4:
            return max(1, 4 + ((buf[2] << 8) | buf[3]) - len(buf))
        return DATA_FRAME_SIZE - len(buf)

    def clear(self) -> None:
        """Forget the pending tail (the port was reopened); it is counted as garbage."""
        self.counters["garbage_bytes"] += len(self._buf)
        self._buf.clear()


class Pms5003:
    """A PMS5003-class sensor on a serial port, in active (streaming) or passive (polled) mode.

    ``read`` returns the freshest complete data frame, waiting for one: in active mode older frames
    already waiting are counted as ``stale_frames`` and dropped, so a reader that fell behind never
    lags; :meth:`poll` is the non-blocking variant. ``read`` raises
    :class:`SensorDisconnected` when the port fails (after which only :meth:`reopen` helps),
    :class:`SensorDataError` (``checksum`` or ``bad_data``) when bytes came but no valid frame, and
    :class:`SensorError` ``timeout`` when nothing came within ``read_timeout_s``.
    """

    def __init__(
        self,
        port: SerialPort,
        *,
        mode: Mode = "active",
        read_timeout_s: float = 3.0,
        sensor: str = "pms5003",
    ) -> None:
        """Take over ``port`` (its timeout becomes the poll interval) and put the sensor in ``mode``."""
        if mode not in ("active", "passive"):
            raise ValueError(f"mode must be 'active' or 'passive', not {mode!r}")
        if not read_timeout_s > 0:
            raise ValueError(f"read_timeout_s must be positive, not {read_timeout_s!r}")
        self.mode: Mode = mode
        self.read_timeout_s = read_timeout_s
        self.sensor = sensor
        self._parser = FrameParser()
        self._extra: dict[str, int] = {
            "stale_frames": 0,
            "requests": 0,
            "timeouts": 0,
            "disconnects": 0,
            "reopens": 0,
        }
        self._device: str | None = None
        self._baud = BAUD
        self._port: SerialPort | None = port
        self._configure()

    @classmethod
    def open(cls, device: str, baud: int = BAUD, **kw: Any) -> Pms5003:
        """Open ``device`` (a path or pyserial URL) at ``baud`` 8N1 and set the sensor's mode."""
        port = _open_port(device, baud, kw.get("sensor", "pms5003"))
        try:
            driver = cls(port, **kw)
        except BaseException:
            port.close()
            raise
        driver._device = device
        driver._baud = baud
        return driver

    @property
    def counters(self) -> dict[str, int]:
        """Frame, error and port counters since construction (survive :meth:`reopen`)."""
        return {**self._parser.counters, **self._extra}

    @property
    def port(self) -> SerialPort | None:
        """The open port, or None after a disconnect or :meth:`close`."""
        return self._port

    @property
    def last_ack(self) -> tuple[int, int] | None:
        """``(command, data)`` of the sensor's latest command answer."""
        return self._parser.last_ack

    def read(self) -> PmsReading:
        """The freshest data frame, waiting at most ``read_timeout_s`` for one."""
        port = self._require_port()
        counters = self._parser.counters
        before = (counters["bytes"], counters["checksum_errors"], counters["length_errors"], counters["garbage_bytes"])
        now = time.monotonic()
        deadline = now + self.read_timeout_s
        passive = self.mode == "passive"
        # Frames already waiting: the newest is the answer in active mode; in passive mode they
        # answer earlier requests whose reads gave up, and are stale.
        latest = self._take(self._receive(port, self._in_waiting(port)), keep=not passive)
        # A request or its answer can be lost on the wire: ask again twice within the timeout.
        retry_s = self.read_timeout_s / 3
        next_request = now
        while latest is None:
            now = time.monotonic()
            if now >= deadline:
                self._give_up(before)
            if passive and now >= next_request:
                self._send(port, READ_PASSIVE)
                self._extra["requests"] += 1
                next_request = now + retry_s
            want = max(self._parser.missing(), self._in_waiting(port))
            latest = self._take(self._receive(port, want))
        return latest

    def poll(self) -> PmsReading | None:
        """The freshest data frame already received, or None; never blocks.

        For a caller on a fixed tick that must not wait for the sensor. In passive mode each call
        also sends the read request whose answer the next call picks up.
        """
        port = self._require_port()
        latest = self._take(self._receive(port, self._in_waiting(port)))
        if self.mode == "passive":
            self._send(port, READ_PASSIVE)
            self._extra["requests"] += 1
        return latest

    def set_mode(self, mode: Mode) -> None:
        """Switch the sensor between streaming (``active``) and answering read requests (``passive``)."""
        if mode not in ("active", "passive"):
            raise ValueError(f"mode must be 'active' or 'passive', not {mode!r}")
        self._send(self._require_port(), MODE_ACTIVE if mode == "active" else MODE_PASSIVE)
        self.mode = mode

    def sleep(self) -> None:
        """Stop the fan and laser (the sensor answers nothing but ``wake`` until woken)."""
        self._send(self._require_port(), SLEEP)

    def wake(self) -> None:
        """Start the fan again; the datasheet asks for 30 s before readings are stable."""
        self._send(self._require_port(), WAKE)

    def reopen(self) -> None:
        """Close the port and open the same device again, putting the sensor back in its mode."""
        if self._device is None:
            raise SensorError(self.sensor, "not_reopenable", "the driver was given a port, not a device to open")
        self.close()
        self._port = _open_port(self._device, self._baud, self.sensor)
        self._extra["reopens"] += 1
        log.info("%s: reopened %s", self.sensor, self._device)
        self._configure()

    def close(self) -> None:
        """Release the port (idempotent); a later :meth:`read` raises :class:`SensorDisconnected`."""
        port, self._port = self._port, None
        self._parser.clear()
        if port is not None:
            try:
                port.close()
            except _PORT_ERRORS as exc:
                log.debug("%s: closing the port failed: %s", self.sensor, exc)

    def __enter__(self) -> Pms5003:
        """Use as a context manager that closes the port."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Close the port."""
        self.close()

    def _configure(self) -> None:
        # The sensor keeps its mode while powered, so a previous run may have left it passive.
        port = self._require_port()
        try:
            port.timeout = POLL_S
            port.reset_input_buffer()
        except _PORT_ERRORS as exc:
            self._lost(exc)
        self.set_mode(self.mode)

    def _require_port(self) -> SerialPort:
        if self._port is None:
            raise SensorDisconnected(self.sensor, "disconnected", f"{self._device or 'port'} is closed; reopen it")
        return self._port

    def _receive(self, port: SerialPort, size: int) -> bytes:
        if size <= 0:
            return b""
        try:
            return bytes(port.read(size))
        except _PORT_ERRORS as exc:
            self._lost(exc)

    def _send(self, port: SerialPort, frame: bytes) -> None:
        try:
            port.write(frame)
        except _PORT_ERRORS as exc:
            self._lost(exc)

    def _in_waiting(self, port: SerialPort) -> int:
        try:
            return int(port.in_waiting)
        except _PORT_ERRORS as exc:
            self._lost(exc)

    def _take(self, data: bytes, *, keep: bool = True) -> PmsReading | None:
        if not data:
            return None
        readings = self._parser.feed(data)
        if not readings:
            return None
        self._extra["stale_frames"] += len(readings) - (1 if keep else 0)
        return readings[-1] if keep else None

    def _lost(self, exc: BaseException) -> NoReturn:
        self._extra["disconnects"] += 1
        self.close()
        log.warning("%s: port %s lost: %s", self.sensor, self._device or "", exc)
        raise SensorDisconnected(self.sensor, "disconnected", f"{self._device or 'port'}: {exc}") from exc

    def _give_up(self, before: tuple[int, int, int, int]) -> NoReturn:
        self._extra["timeouts"] += 1
        counters = self._parser.counters
        bad_sums = counters["checksum_errors"] - before[1]
        bad_lengths = counters["length_errors"] - before[2]
        garbage = counters["garbage_bytes"] - before[3]
        window = f"in {self.read_timeout_s:g} s"
        if bad_sums:
            raise SensorDataError(
                self.sensor, "checksum", f"{bad_sums} frame(s) with a wrong checksum and no valid frame {window}"
            )
        if bad_lengths:
            raise SensorDataError(
                self.sensor, "bad_data", f"{bad_lengths} frame(s) of a length other than {DATA_LENGTH} {window}"
            )
        if garbage or self._parser.pending():
            raise SensorDataError(
                self.sensor,
                "bad_data",
                f"{counters['bytes'] - before[0]} bytes but no data frame {window} (wrong baud rate or device?)",
            )
        raise SensorError(self.sensor, "timeout", f"no data frame {window} ({self.mode} mode)")


def _open_port(device: str, baud: int, sensor: str) -> SerialPort:
    try:
        port: SerialPort = serial.serial_for_url(
            device,
            baudrate=baud,
            bytesize=serial.EIGHTBITS,
            parity=serial.PARITY_NONE,
            stopbits=serial.STOPBITS_ONE,
            timeout=POLL_S,
            exclusive=True,
        )
    except _PORT_ERRORS as exc:
        raise SensorDisconnected(sensor, "disconnected", f"cannot open {device}: {exc}") from exc
    return port
