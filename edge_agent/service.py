"""systemd integration: ``sd_notify`` over a datagram socket, a progress-gated watchdog, ``STATUS=`` lines.

No dependency: the notify protocol is one datagram of ``KEY=value`` lines to the AF_UNIX socket
named by ``$NOTIFY_SOCKET`` (a path, or an abstract socket written ``@name``). Outside systemd the
variable is unset and every call is a cheap no-op, so the same code runs in a terminal.

The watchdog is *progress gated*: the main loop calls :meth:`Service.kick` every iteration, and a
separate thread sends ``WATCHDOG=1`` every half ``$WATCHDOG_USEC`` only if the loop kicked since
the previous ping. A loop stuck in a sensor read or in the interpreter therefore stops the pings
and systemd restarts the unit after ``WatchdogSec=``, while a thread that merely stays alive
cannot keep a hung service up.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)

DEFAULT_STATUS_INTERVAL_S = 10.0


class Notifier:
    """Sends ``sd_notify`` datagrams to ``$NOTIFY_SOCKET``; inert when the variable is unset."""

    def __init__(self, address: str | None) -> None:
        self.address = address or None
        self.sent = 0
        self.errors = 0
        self._target: str | None = None
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        if self.address is None:
            return
        if self.address.startswith("@"):
            self._target = "\0" + self.address[1:]  # Linux abstract namespace
        elif self.address.startswith("/"):
            self._target = self.address
        else:
            # vsock: addresses (VMs) are not something a Pi in a vehicle is started with.
            log.warning("NOTIFY_SOCKET %r is not a path or an abstract socket: notifications disabled", self.address)
            return
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """A notifier for ``$NOTIFY_SOCKET`` of ``environ`` (default: this process's environment)."""
        env = os.environ if environ is None else environ
        return cls(env.get("NOTIFY_SOCKET"))

    @property
    def enabled(self) -> bool:
        """Whether a notify socket is configured."""
        return self._sock is not None

    def notify(self, state: str) -> bool:
        """Send ``state`` (``KEY=value`` lines); return whether it was delivered to the socket."""
        if self._sock is None or self._target is None:
            return False
        try:
            with self._lock:
                self._sock.sendto(state.encode("utf-8", "replace"), self._target)
        except OSError as exc:
            # systemd may be restarting or the socket gone; a notification is never worth a crash.
            self.errors += 1
            log.warning("sd_notify %r to %s failed: %s", state.split("\n", 1)[0], self.address, exc)
            return False
        self.sent += 1
        return True

    def close(self) -> None:
        """Close the socket."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def sd_notify(state: str, environ: Mapping[str, str] | None = None) -> bool:
    """One-shot ``sd_notify(state)`` to ``$NOTIFY_SOCKET``; False when there is none or sending failed."""
    notifier = Notifier.from_environment(environ)
    try:
        return notifier.notify(state)
    finally:
        notifier.close()


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of ``$WATCHDOG_USEC``), or None when no watchdog applies."""
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid and pid.strip() != str(os.getpid()):
        return None  # the watchdog is meant for another process (we were forked or exec'd by it)
    try:
        value = int(usec)
    except ValueError:
        log.warning("WATCHDOG_USEC=%r is not a number: watchdog disabled", usec)
        return None
    if value <= 0:
        return None
    return value / 2e6


class Service:
    """What systemd is told about this process: readiness, progress-gated watchdog, status, stop and reload."""

    def __init__(
        self,
        notifier: Notifier | None = None,
        *,
        environ: Mapping[str, str] | None = None,
        status: Callable[[], str] | None = None,
        status_interval_s: float = DEFAULT_STATUS_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.notifier = notifier or Notifier.from_environment(environ)
        self.watchdog_s = watchdog_interval(environ)
        self.status_interval_s = status_interval_s
        self._status = status
        self._clock = clock
        self._kicks = 0
        self._pinged_kicks = 0  # the first ping also needs a kick
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.pings = 0
        self.withheld = 0
        self.ready_sent = False

    def kick(self) -> None:
        """The main loop made progress (call every iteration; cheap, lock-free)."""
        self._kicks += 1

    def ready(self) -> None:
        """Tell systemd the service is up (``READY=1`` with a status line); start the watchdog/status thread."""
        text = self._status_text()
        self.notifier.notify("READY=1" + (f"\nSTATUS={text}" if text else ""))
        self.ready_sent = True
        if self._thread is None and (self.notifier.enabled and (self.watchdog_s or self._status is not None)):
            self._thread = threading.Thread(target=self._run, name="systemd-notify", daemon=True)
            self._thread.start()
        if self.watchdog_s:
            log.info("systemd watchdog: pinging every %.1f s while the main loop makes progress", self.watchdog_s)

    def reloading(self) -> None:
        """A configuration reload starts (``RELOADING=1``); call :meth:`reloaded` when it is done."""
        self.notifier.notify(f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def reloaded(self, summary: str = "") -> None:
        """The reload is done: ``READY=1`` again, with ``summary`` in the status line."""
        text = self._status_text()
        if summary:
            text = f"{text}; {summary}" if text else summary
        self.notifier.notify("READY=1" + (f"\nSTATUS={text}" if text else ""))

    def stopping(self) -> None:
        """Tell systemd a clean stop has begun (``STOPPING=1``); the watchdog pings end."""
        self._stop.set()
        self.notifier.notify("STOPPING=1\nSTATUS=stopping: flushing the spool")
        if self._thread is not None:
            self._thread.join(2.0)

    def close(self) -> None:
        """Stop the thread and close the socket."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2.0)
        self.notifier.close()

    def _status_text(self) -> str:
        if self._status is None:
            return ""
        try:
            return self._status().replace("\n", " ")
        except Exception:
            log.exception("building the systemd status line failed")
            return ""

    def _run(self) -> None:
        next_ping = self._clock() + (self.watchdog_s or 0.0)
        next_status = self._clock() + self.status_interval_s
        warned = False
        while True:
            now = self._clock()
            due = [t for t, on in ((next_ping, bool(self.watchdog_s)), (next_status, self._status is not None)) if on]
            if self._stop.wait(max(0.0, min(due) - now)):
                return
            now = self._clock()
            if self.watchdog_s and now >= next_ping:
                next_ping = now + self.watchdog_s
                kicks = self._kicks
                if kicks != self._pinged_kicks:
                    self._pinged_kicks = kicks
                    if self.notifier.notify("WATCHDOG=1"):
                        self.pings += 1
                    warned = False
                else:
                    self.withheld += 1
                    if not warned:
                        # Withholding is the point: systemd will restart us if the loop stays stuck.
                        log.error(
                            "main loop made no progress for %.1f s: withholding the watchdog ping", self.watchdog_s
                        )
                        warned = True
            if self._status is not None and now >= next_status:
                next_status = now + self.status_interval_s
                text = self._status_text()
                if text:
                    self.notifier.notify(f"STATUS={text}")
