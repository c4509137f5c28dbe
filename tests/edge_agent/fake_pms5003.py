"""A fake PMS5003 on the master side of a pseudo-terminal, for driver tests without hardware.

Frames are built here from values with ``struct`` and the datasheet's checksum rule, independently
of the driver's parser. A thread streams frames in active mode, answers the commands the driver
writes (mode, passive read, sleep/wake) like the datasheet says, and plays scripts of raw bytes,
pauses and a vanishing port, in order.
"""

from __future__ import annotations

import contextlib
import os
import queue
import select
import struct
import threading
import time
import tty
from collections.abc import Sequence
from dataclasses import dataclass

START = b"\x42\x4d"


def checksum(body: bytes) -> bytes:
    """The 16-bit big-endian sum of ``body``, as the sensor appends it."""
    return struct.pack(">H", sum(body) & 0xFFFF)


@dataclass(frozen=True)
class Values:
    """What the fake sensor measures: the 13 data words of a frame."""

    pm1_cf1: int = 0
    pm25_cf1: int = 0
    pm10_cf1: int = 0
    pm1: int = 0
    pm25: int = 0
    pm10: int = 0
    particles_per_dl: tuple[int, int, int, int, int, int] = (0, 0, 0, 0, 0, 0)
    reserved: int = 0

    def words(self) -> tuple[int, ...]:
        """The data words in frame order."""
        return (
            self.pm1_cf1,
            self.pm25_cf1,
            self.pm10_cf1,
            self.pm1,
            self.pm25,
            self.pm10,
            *self.particles_per_dl,
            self.reserved,
        )


def data_frame(values: Values) -> bytes:
    """A valid 32-byte data frame carrying ``values``."""
    body = START + struct.pack(">H13H", 28, *values.words())
    return body + checksum(body)


def ack_frame(cmd: int, data: int) -> bytes:
    """The sensor's 8-byte answer to command ``cmd`` with data low byte ``data``."""
    body = START + bytes((0x00, 0x04, cmd, data))
    return body + checksum(body)


def bad_checksum(frame: bytes) -> bytes:
    """``frame`` with its checksum off by one."""
    total = struct.unpack(">H", frame[-2:])[0]
    return frame[:-2] + struct.pack(">H", (total + 1) & 0xFFFF)


def frame_of_length(length: int, words: Sequence[int] = ()) -> bytes:
    """A frame with a correct checksum but frame length ``length`` (e.g. another sensor model's)."""
    body = START + struct.pack(">H", length) + struct.pack(f">{len(words)}H", *words)
    return body + checksum(body)


class Vanish:
    """Script item: close the master side, as when a USB-serial adapter is pulled out."""


VANISH = Vanish()

ScriptItem = bytes | float | Vanish


class FakePms5003:
    """A PMS5003 behind a pty: ``device`` is the path a driver opens.

    ``interval_s`` is the active-mode frame period (None: no streaming, only scripts and answers).
    The next ``drop_reads`` passive read requests are ignored, as if lost on the wire.
    ``received`` lists every 7-byte command the driver wrote, in order.
    """

    def __init__(self, values: Values | None = None, *, interval_s: float | None = 0.05, mode: str = "active") -> None:
        """Create the pty pair; the slave is raw from the start so no byte is translated or echoed."""
        self.master, self._slave = os.openpty()
        tty.setraw(self._slave)
        self.device = os.ttyname(self._slave)
        self.values = values or Values()
        self.interval_s = interval_s
        self.mode = mode
        self.asleep = False
        self.drop_reads = 0
        self.received: list[bytes] = []
        self.frames_sent = 0
        self._script: queue.Queue[ScriptItem] = queue.Queue()
        self._script_busy = 0
        self._lock = threading.Condition()
        self._stop = threading.Event()
        self._vanished = False
        self._vanish = threading.Event()
        self._inbox = bytearray()
        self._thread = threading.Thread(target=self._run, name="fake-pms5003", daemon=True)
        self._thread.start()

    def play(self, *items: ScriptItem) -> None:
        """Queue bytes to write, pauses (float seconds) and :data:`VANISH`, played in order."""
        with self._lock:
            self._script_busy += len(items)
        for item in items:
            self._script.put(item)

    def wait_played(self, timeout: float = 5.0) -> None:
        """Block until everything queued with :meth:`play` has been written."""
        with self._lock:
            if not self._lock.wait_for(lambda: self._script_busy == 0, timeout):
                raise TimeoutError("fake PMS5003 script not played")

    def wait_received(self, count: int, timeout: float = 5.0) -> list[bytes]:
        """Block until ``count`` commands have arrived; return them."""
        with self._lock:
            if not self._lock.wait_for(lambda: len(self.received) >= count, timeout):
                raise TimeoutError(f"fake PMS5003 got {self.received!r}, expected {count} commands")
            return list(self.received)

    def vanish(self, timeout: float = 5.0) -> None:
        """Close the master side now (done by the fake's thread, so no other thread can reuse the fd)."""
        self._vanish.set()
        with self._lock:
            if not self._lock.wait_for(lambda: self._vanished, timeout):
                raise TimeoutError("fake PMS5003 did not vanish")

    def close(self) -> None:
        """Stop the thread and close both sides."""
        self._stop.set()
        self._thread.join(timeout=5)
        self._close_master()
        with contextlib.suppress(OSError):
            os.close(self._slave)

    def __enter__(self) -> FakePms5003:
        """Use as a context manager."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Close."""
        self.close()

    def _close_master(self) -> None:
        with self._lock:
            if not self._vanished:
                self._vanished = True
                os.close(self.master)
            self._lock.notify_all()

    def _write(self, data: bytes) -> None:
        if not self._vanished:
            os.write(self.master, data)

    def _run(self) -> None:
        next_frame = time.monotonic()
        resume_at = 0.0
        while not self._stop.is_set():
            if self._vanish.is_set():
                self._close_master()
                return
            now = time.monotonic()
            if now >= resume_at and not self._script.empty():
                item = self._script.get()
                if isinstance(item, float):
                    resume_at = now + item
                elif isinstance(item, Vanish):
                    self._vanish.set()
                else:
                    self._write(item)
                with self._lock:
                    self._script_busy -= 1
                    self._lock.notify_all()
                continue
            scripted = now < resume_at or not self._script.empty()
            streaming = self.interval_s is not None and self.mode == "active" and not self.asleep and not scripted
            if streaming and now >= next_frame and self.interval_s is not None:
                self._write(data_frame(self.values))
                self.frames_sent += 1
                next_frame = now + self.interval_s
            wait = 0.02
            if streaming:
                wait = min(wait, max(0.0, next_frame - now))
            if now < resume_at:
                wait = min(wait, resume_at - now)
            ready, _, _ = select.select([self.master], [], [], wait)
            if ready:
                try:
                    self._inbox += os.read(self.master, 256)
                except OSError:
                    # EIO: no process has the slave open (the driver closed its port); keep waiting.
                    time.sleep(wait)
            self._answer()

    def _answer(self) -> None:
        inbox = self._inbox
        while True:
            start = inbox.find(START)
            if start < 0 or len(inbox) - start < 7:
                return
            frame = bytes(inbox[start : start + 7])
            del inbox[: start + 7]
            if frame[-2:] != checksum(frame[:-2]):
                continue
            cmd, data = frame[2], frame[4]
            answer = b""
            if cmd == 0xE1:
                self.mode = "active" if data else "passive"
                answer = ack_frame(cmd, data)
            elif cmd == 0xE2:
                if self.drop_reads > 0:
                    self.drop_reads -= 1
                elif self.mode == "passive" and not self.asleep:
                    answer = data_frame(self.values)
                    self.frames_sent += 1
            elif cmd == 0xE4:
                # The sensor answers sleep, and simply starts its fan on wake.
                if data == 0:
                    answer = ack_frame(cmd, data)
                self.asleep = data == 0
            # Recorded (with the new state) before answering, so a driver holding the answer finds the
            # command recorded; the answer still goes out before any script item played later.
            with self._lock:
                self.received.append(frame)
                self._lock.notify_all()
            if answer:
                self._write(answer)
