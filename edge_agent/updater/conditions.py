"""When an update may start (parked, depot network, time window) and whether a bundle fits the device.

Each condition answers :meth:`Condition.check` with ``None`` (satisfied) or a :class:`Blocked`
naming a stable reason. The parked signal is a small interface (:class:`ParkedSignal`): a fixed
answer from the configuration for the simulated and replay backends (and vehicles without an
ignition signal), or a flag file written by whatever integration knows (ignition line, CAN bus).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from shared.bundle import Manifest
from shared.update import Reason

_WINDOW = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]):([0-5]\d)$")
_VERSION = re.compile(r"^v?(\d+(?:\.\d+)*)(.*)$")


@dataclass(frozen=True)
class Blocked:
    """Why an update cannot go ahead: a stable reason code and a sentence."""

    reason: str
    detail: str


class Condition(Protocol):
    """One precondition of starting an update."""

    def check(self) -> Blocked | None:
        """``None`` when satisfied, else why not."""


class ParkedSignal(Protocol):
    """Tells whether the vehicle is parked."""

    def parked(self) -> bool:
        """True while the vehicle is parked."""


@dataclass
class FixedParked:
    """A configured answer (simulated and replay backends, vehicles without an ignition signal)."""

    value: bool

    def parked(self) -> bool:
        """The configured value."""
        return self.value


@dataclass
class FlagFileParked:
    """Parked while a file exists (written by the ignition or CAN-bus integration)."""

    path: Path

    def parked(self) -> bool:
        """Whether the flag file exists."""
        return self.path.exists()


@dataclass
class Parked:
    """The vehicle must be parked."""

    signal: ParkedSignal

    def check(self) -> Blocked | None:
        """Blocked with ``not_parked`` while the vehicle moves."""
        if self.signal.parked():
            return None
        return Blocked(Reason.NOT_PARKED, "the vehicle is not parked")


def route_address(host: str, port: int) -> str | None:
    """The local address this device reaches ``host`` from (no packet is sent: a UDP connect)."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, port))
            return str(s.getsockname()[0])
    except OSError:
        return None


@dataclass
class DepotNetwork:
    """The device must be on a depot network: a flag file, or its route to the broker in a depot CIDR."""

    networks: list[str]
    flag_file: Path | None
    broker: tuple[str, int]
    address_of: Callable[[str, int], str | None] = route_address

    def check(self) -> Blocked | None:
        """Blocked with ``not_on_depot_network`` unless one of the configured signals says depot."""
        if not self.networks and self.flag_file is None:
            return None
        if self.flag_file is not None and self.flag_file.exists():
            return None
        if self.networks:
            address = self.address_of(*self.broker)
            if address is not None:
                ip = ipaddress.ip_address(address)
                if any(ip in ipaddress.ip_network(n, strict=False) for n in self.networks):
                    return None
            where = f"address {address}" if address else "no route to the broker"
            return Blocked(Reason.NOT_ON_DEPOT_NETWORK, f"{where} is outside the depot networks {self.networks}")
        return Blocked(Reason.NOT_ON_DEPOT_NETWORK, f"depot flag file {self.flag_file} is absent")


def parse_window(text: str) -> tuple[dt.time, dt.time]:
    """``"HH:MM-HH:MM"`` as two times (raise ValueError otherwise)."""
    m = _WINDOW.match(text.strip())
    if not m:
        raise ValueError(f"time window {text!r} must look like 22:00-05:30")
    a, b = dt.time(int(m[1]), int(m[2])), dt.time(int(m[3]), int(m[4]))
    if a == b:
        raise ValueError(f"time window {text!r} is empty")
    return a, b


def in_window(now: dt.time, window: tuple[dt.time, dt.time]) -> bool:
    """Whether ``now`` is inside ``[start, end)``; a window may cross midnight."""
    start, end = window
    return start <= now < end if start < end else now >= start or now < end


@dataclass
class TimeWindow:
    """Updates start only inside one of the local-time windows."""

    windows: list[str]
    clock: Callable[[], dt.datetime] = dt.datetime.now

    def check(self) -> Blocked | None:
        """Blocked with ``outside_window`` outside every window."""
        if not self.windows:
            return None
        now = self.clock().time()
        if any(in_window(now, parse_window(w)) for w in self.windows):
            return None
        return Blocked(Reason.OUTSIDE_WINDOW, f"{now.strftime('%H:%M')} is outside the update windows {self.windows}")


def first_blocked(conditions: list[Condition]) -> Blocked | None:
    """The first condition that blocks, if any."""
    for condition in conditions:
        blocked = condition.check()
        if blocked is not None:
            return blocked
    return None


# ------------------------------------------------------------------------------ compatibility


def version_key(text: str) -> tuple[tuple[int, ...], int, str]:
    """A sortable key of a release version: numeric parts, then a pre-release sorts before its release."""
    m = _VERSION.match(text.strip())
    if not m:
        raise ValueError(f"version {text!r} does not start with a number")
    numbers = tuple(int(p) for p in m[1].split("."))
    while len(numbers) > 1 and numbers[-1] == 0:
        numbers = numbers[:-1]
    suffix = m[2].lstrip(".-+")
    return numbers, 0 if suffix and not m[2].startswith("+") else 1, suffix


def compatibility(manifest: Manifest, *, profile: str, agent_version: str) -> Blocked | None:
    """Whether this device may install the bundle: its hardware profile and the agent's version."""
    allowed = manifest.compatibility.hardware_profiles
    if "*" not in allowed and profile not in allowed:
        return Blocked(
            Reason.INCOMPATIBLE_PROFILE, f"bundle is for hardware profiles {allowed}; this device is {profile!r}"
        )
    need = manifest.compatibility.min_agent_version
    try:
        too_old = version_key(agent_version) < version_key(need)
    except ValueError as exc:
        return Blocked(Reason.AGENT_TOO_OLD, f"cannot compare agent version {agent_version!r} with {need!r}: {exc}")
    if too_old:
        return Blocked(Reason.AGENT_TOO_OLD, f"bundle needs agent {need} or newer; this agent is {agent_version}")
    return None
