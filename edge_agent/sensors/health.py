"""Per-sensor health: a small state machine over read *windows*, with reasons, hysteresis and reopening.

Every read attempt of a sensor is one *window*, classified as good, bad (with a reason) or, for
a window that simply brought no new data, neutral until that lasts. The state follows runs of
windows, so one bad read does not flap it:

=============  ==============================================  ==========
from           condition                                       to
=============  ==============================================  ==========
ok             ``degrade_after`` bad windows in a row          degraded
ok, degraded   ``fail_after`` *hard* bad windows in a row      failed
degraded/failed ``recover_after`` good windows in a row        ok
=============  ==============================================  ==========

A window is *hard* bad when the sensor gave nothing usable (a failed read, no device, stuck
values, no data); a reading that is only partly wrong (soft error rate, out of range, a named
problem) is *partial* bad and can degrade the sensor but never fail it.

What makes a window bad (its *reason*), in priority order:

* the read raised a :class:`~edge_agent.sensors.errors.SensorError` (``disconnected``, ``timeout``,
  ``checksum``, ``bad_chip_id``...), or no device is open (the reason it was lost with);
* ``stuck``: the reading is identical to the previous ones for ``stuck_after`` windows (a frozen
  register or a muted microphone); the stuck values are rejected (NaN);
* a *soft* error (``checksum`` frames the driver skipped, audio ``overrun``) happened in more than
  ``max_soft_error_rate`` of the last ``soft_error_window`` attempts;
* ``out_of_range``: a value lies outside the hardware profile's range for that feature; that value
  is rejected (NaN), the others are kept;
* a problem the caller names for a partial reading (``gas_invalid`` when the heater is unstable);
* ``no_data``: ``no_data_after`` windows in a row without new data (fewer are neutral).

A device that vanished (or that keeps failing for ``reopen_after`` windows) is closed and opened
again after an exponential backoff (``backoff_initial_s`` doubling up to ``backoff_max_s``; reset by
a good read). Every state change is a :class:`shared.messages.DeviceEvent` of kind
``sensor_state``, queued for :meth:`SensorMonitor.take_events`, and the current state is a
:class:`shared.messages.SensorHealth` for ``status``. The clocks are injectable, so the logic is
tested exactly, window by window.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final, Literal

from shared.messages import DeviceEvent, SensorHealth
from shared.profile import ValueRange

log = logging.getLogger(__name__)

State = Literal["ok", "degraded", "failed"]
EVENT_SENSOR_STATE: Final = "sensor_state"
STUCK: Final = "stuck"
OUT_OF_RANGE: Final = "out_of_range"
NO_DATA: Final = "no_data"
DISCONNECTED: Final = "disconnected"


@dataclass(frozen=True)
class HealthPolicy:
    """Thresholds of the health state machine, in windows (one window = one read attempt)."""

    degrade_after: int = 3
    fail_after: int = 10
    recover_after: int = 5
    no_data_after: int = 5
    stuck_after: int = 60
    soft_error_window: int = 30
    max_soft_error_rate: float = 0.2
    soft_reasons: tuple[str, ...] = ("checksum", "overrun")
    reopen_after: int = 10
    backoff_initial_s: float = 1.0
    backoff_factor: float = 2.0
    backoff_max_s: float = 60.0

    def __post_init__(self) -> None:
        if not 1 <= self.degrade_after <= self.fail_after:
            raise ValueError("need 1 <= degrade_after <= fail_after")
        if min(self.recover_after, self.no_data_after, self.stuck_after, self.soft_error_window, self.reopen_after) < 1:
            raise ValueError("recover_after, no_data_after, stuck_after, soft_error_window, reopen_after must be >= 1")
        if not 0.0 <= self.max_soft_error_rate < 1.0:
            raise ValueError("max_soft_error_rate must be in [0, 1)")
        if not (0 < self.backoff_initial_s <= self.backoff_max_s and self.backoff_factor >= 1.0):
            raise ValueError("need 0 < backoff_initial_s <= backoff_max_s and backoff_factor >= 1")


class Backoff:
    """Exponential delays ``initial * factor**k``, capped at ``cap``; :meth:`reset` starts over."""

    def __init__(self, initial: float, factor: float, cap: float) -> None:
        self.initial = initial
        self.factor = factor
        self.cap = cap
        self._next = initial

    def next(self) -> float:
        """The delay to wait now; the following call returns the next, longer one."""
        delay = self._next
        self._next = min(self.cap, self._next * self.factor)
        return delay

    def reset(self) -> None:
        """Back to the initial delay."""
        self._next = self.initial


def apply_ranges(values: Mapping[str, float], ranges: Mapping[str, ValueRange]) -> tuple[dict[str, float], list[str]]:
    """``values`` with those outside their (inclusive) profile range set to NaN, and what was rejected."""
    out = dict(values)
    rejected = []
    for name, value in out.items():
        bounds = ranges.get(name)
        if bounds is not None and not math.isnan(value) and not bounds.min <= value <= bounds.max:
            out[name] = math.nan
            rejected.append(f"{name}={value:g} outside [{bounds.min:g}, {bounds.max:g}]")
    return out, rejected


def _same(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    # NaN == NaN here: a sensor stuck on "no value" is as stuck as one frozen on a number.
    return len(a) == len(b) and all(x == y or (math.isnan(x) and math.isnan(y)) for x, y in zip(a, b, strict=True))


class SensorMonitor:
    """The health of one sensor: feed it every window; read its state, events and reopen schedule."""

    def __init__(
        self,
        sensor: str,
        policy: HealthPolicy | None = None,
        *,
        ranges: Mapping[str, ValueRange] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.sensor = sensor
        self.policy = policy or HealthPolicy()
        self.ranges = dict(ranges or {})
        self._clock = clock
        self._wall = wall_clock
        self._lock = threading.Lock()
        self.state: State = "ok"
        self.reason: str | None = None
        self.detail = ""
        self.bad_run = 0
        self.hard_run = 0
        self.good_run = 0
        self.no_data_run = 0
        self.windows = 0
        self.reasons: Counter[str] = Counter()
        self.transitions = 0
        self._attempts: deque[str | None] = deque(maxlen=self.policy.soft_error_window)
        self._last: tuple[float, ...] | None = None
        self._same_run = 0
        self._events: list[DeviceEvent] = []
        p = self.policy
        self._backoff = Backoff(p.backoff_initial_s, p.backoff_factor, p.backoff_max_s)
        self.is_open = False
        self.bad_since_open = 0
        self.next_open_at = clock()  # the first open is due at once
        self.opens = 0
        self.open_failures = 0
        self._lost_reason = DISCONNECTED
        self._lost_detail = ""

    # ------------------------------------------------------------------------------- windows

    def reading(
        self,
        values: Mapping[str, float],
        *,
        soft_errors: Mapping[str, int] | None = None,
        problem: str | None = None,
        detail: str = "",
    ) -> dict[str, float]:
        """Record a window that brought a reading; return the values with rejected ones set to NaN.

        ``values`` are keyed by feature name (so profile ranges apply); ``soft_errors`` counts
        errors the driver recovered from since the last window (skipped checksum frames,
        overruns); ``problem`` names what is wrong with a partial reading.
        """
        p = self.policy
        with self._lock:
            self.no_data_run = 0
            for reason, n in (soft_errors or {}).items():
                for _ in range(max(0, int(n))):
                    self._attempts.append(reason)
            self._attempts.append(None)
            current = tuple(float(v) for v in values.values())
            if self._last is not None and _same(current, self._last):
                self._same_run += 1
            else:
                self._same_run = 1
            self._last = current
            out, rejected = apply_ranges(values, self.ranges)
            soft = self._soft_reason()
            if self._same_run >= p.stuck_after:
                out = dict.fromkeys(out, math.nan)
                self._window(STUCK, f"identical readings for {self._same_run} windows")
            elif soft is not None:
                self._window(soft[0], f"{soft[1]} of the last {p.soft_error_window} attempts", partial=True)
            elif rejected:
                self._window(OUT_OF_RANGE, "; ".join(rejected), partial=True)
            else:
                self._window(problem, detail, partial=True)
            return out

    def error(self, reason: str, detail: str = "") -> None:
        """Record a window whose read failed (a driver's :class:`SensorError` reason, or the device is closed)."""
        with self._lock:
            self.no_data_run = 0
            self._attempts.append(reason)
            self._window(reason, detail)

    def no_data(self, detail: str = "") -> None:
        """Record a window without new data: neutral at first, bad (``no_data``) once it lasts."""
        with self._lock:
            self.no_data_run += 1
            if self.no_data_run >= self.policy.no_data_after:
                self._window(NO_DATA, detail or f"no data for {self.no_data_run} windows")

    def _soft_reason(self) -> tuple[str, int] | None:
        p = self.policy
        counts = Counter(r for r in self._attempts if r in p.soft_reasons)
        if not counts:
            return None
        reason, n = counts.most_common(1)[0]
        # Divide by the full window even while it fills: a single early error is not a 100% rate.
        if n / p.soft_error_window > p.max_soft_error_rate:
            return reason, n
        return None

    def _window(self, problem: str | None, detail: str, *, partial: bool = False) -> None:
        p = self.policy
        self.windows += 1
        if problem is None:
            self.good_run += 1
            self.bad_run = 0
            self.bad_since_open = 0
            self.hard_run = 0
            self._backoff.reset()
        else:
            self.bad_run += 1
            self.bad_since_open += 1
            self.hard_run = 0 if partial else self.hard_run + 1
            self.good_run = 0
            self.reasons[problem] += 1
        target: State = self.state
        if self.hard_run >= p.fail_after:
            target = "failed"
        elif self.bad_run >= p.degrade_after and self.state == "ok":
            target = "degraded"
        elif self.good_run >= p.recover_after:
            target = "ok"
        if target != self.state:
            self._transition(target, problem, detail)
        elif problem is not None and self.state != "ok":
            self.reason, self.detail = problem, detail  # still unhealthy: show the latest cause

    def _transition(self, target: State, reason: str | None, detail: str) -> None:
        previous = self.state
        self.state = target
        self.reason = reason if target != "ok" else None
        self.detail = detail if target != "ok" else ""
        self.transitions += 1
        message = f"{self.sensor}: {previous} -> {target}" + (f" ({reason}: {detail})" if reason else "")
        log.log(logging.INFO if target == "ok" else logging.WARNING, "%s", message)
        self._events.append(
            DeviceEvent(
                kind=EVENT_SENSOR_STATE,
                ts=self._wall(),
                message=message,
                data={
                    "sensor": self.sensor,
                    "state": target,
                    "previous": previous,
                    "reason": self.reason,
                    "detail": detail[:500],
                    "bad_windows": self.bad_run,
                    "good_windows": self.good_run,
                },
            )
        )

    # ------------------------------------------------------------------------------- reopening

    def open_due(self) -> bool:
        """Whether the device is closed and its (re)open attempt is due."""
        with self._lock:
            return not self.is_open and self._clock() >= self.next_open_at

    def opened(self) -> None:
        """The device was opened."""
        with self._lock:
            self.is_open = True
            self.bad_since_open = 0
            self.opens += 1

    def open_failed(self, reason: str, detail: str = "") -> float:
        """Opening failed: schedule the next attempt after the backoff; return that delay."""
        with self._lock:
            self.open_failures += 1
            self._lost_reason, self._lost_detail = reason, detail
            return self._schedule()

    def closed(self, reason: str = DISCONNECTED, detail: str = "") -> float:
        """The device was closed after a failure: schedule a reopen after the backoff; return the delay."""
        with self._lock:
            self._lost_reason, self._lost_detail = reason, detail
            return self._schedule()

    def _schedule(self) -> float:
        self.is_open = False
        delay = self._backoff.next()
        self.next_open_at = self._clock() + delay
        return delay

    def closed_window(self) -> None:
        """Record a window in which no device was open: bad, with the reason it was lost.

        Before the first open attempt (another thread opens the device) the window is only
        ``no_data``, so a slow device enumeration at start does not read as a disconnect.
        """
        with self._lock:
            never_tried = self.opens == 0 and self.open_failures == 0
        if never_tried:
            self.no_data("the device is being opened")
        else:
            self.error(self._lost_reason, self._lost_detail)

    def should_reopen(self) -> bool:
        """Whether an open device has failed ``reopen_after`` windows in a row since it was opened."""
        with self._lock:
            return self.is_open and self.bad_since_open >= self.policy.reopen_after

    # --------------------------------------------------------------------------------- reports

    def health(self) -> SensorHealth:
        """The state for ``status``."""
        with self._lock:
            return SensorHealth(state=self.state, reason=self.reason)

    def take_events(self) -> list[DeviceEvent]:
        """The state-change events since the last call (oldest first)."""
        with self._lock:
            events, self._events = self._events, []
            return events

    def snapshot(self) -> dict[str, object]:
        """State, reason, detail and counters, for `edge-agent sensors check` and the status file."""
        with self._lock:
            return {
                "state": self.state,
                "reason": self.reason,
                "detail": self.detail,
                "windows": self.windows,
                "bad_run": self.bad_run,
                "good_run": self.good_run,
                "reasons": dict(self.reasons),
                "open": self.is_open,
                "opens": self.opens,
                "open_failures": self.open_failures,
            }
