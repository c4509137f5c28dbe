"""Per-device sequential change detectors for alarms within minutes (river's Page-Hinkley and ADWIN).

Windows and their tests (``drift.py``) answer "has this window moved?" every 15 minutes; a sequential
detector watches each device's record stream as it arrives and raises an alarm a few dozen records after a
change. Two signals are watched per (device, model version):

* ``"calibrated"``: the calibrated top-class confidence, the per-record expected accuracy. Only a DROP
  alarms (a model that got more confident is not an incident).
* ``"coact"``: the number of rare neuron co-activations per record. Only an INCREASE alarms: inputs from
  classes absent in training fire far more rare pairs (Myllyaho et al. 2022).

Page-Hinkley (the default) keeps the running mean ``xbar_t`` and the cumulative deviations

.. math::

    U_t = \\alpha U_{t-1} + (x_t - \\bar x_t - \\delta), \\qquad
    L_t = \\alpha L_{t-1} + (x_t - \\bar x_t + \\delta)

and alarms on an increase when ``U_t - min_{s<=t} U_s > \\lambda`` or on a drop when
``max_{s<=t} L_s - L_t > \\lambda`` (after ``min_instances`` values). ``delta`` is the size of change that
is tolerated, ``lambda`` (``threshold``) trades delay against false alarms: a step of size ``d > delta``
is detected after about ``lambda / (d - delta)`` records; on a stationary stream of variance
``sigma^2`` a false alarm needs an excursion of probability about ``exp(-2 delta lambda / sigma^2)``.
Its state is O(1). ``alpha`` defaults to 1 (river's default is ``1 - 1e-4``): with forgetting, ``U_t``
settles at ``-delta / (1 - alpha)`` where the ``delta`` penalty no longer pulls it down, and long
stationary streams then alarm (seen in simulation: 17 false alarms in 40 streams of 20,000 values with
``alpha = 1 - 1e-4``, none with ``alpha = 1``).

ADWIN keeps an adaptive window in O(log W) exponential-histogram buckets and drops its older part when
the means of the two parts differ by more than a Hoeffding/Bernstein bound at confidence ``delta``; it is
two-sided, so a detection in the direction not watched is counted in ``n_ignored`` and not alarmed.

Values are divided by ``scale`` before they reach a detector, so that one set of thresholds fits signals
of different units (use the reference p99 of the co-activation count as its scale).

Memory stays bounded: streams live in an LRU map of at most ``max_streams`` entries, and streams idle for
longer than ``idle_timeout`` seconds are evicted (their detector restarts from scratch if the device
returns, which delays, never invents, an alarm).

Examples
--------
>>> import numpy as np
>>> rng = np.random.default_rng(7)
>>> detectors = StreamDetectors()
>>> before = np.clip(rng.normal(0.9, 0.05, 500), 0, 1)
>>> after = np.clip(rng.normal(0.6, 0.05, 500), 0, 1)
>>> detectors.update_many("dev-1", "m1", before, signal="calibrated", now=0.0)
[]
>>> alarm = detectors.update_many("dev-1", "m1", after, signal="calibrated", now=60.0)[0]
>>> alarm.device_id, alarm.signal, alarm.direction, alarm.index
('dev-1', 'calibrated', 'drop', 536)

References
----------
Page, E. S. (1954). Continuous inspection schemes. Biometrika 41, 100-115.
Bifet, A., Gavalda, R. (2007). Learning from time-changing data with adaptive windowing. SDM 2007.
Myllyaho, L. et al. (2022). On misbehaviour and fault tolerance in machine learning systems. JSS 183.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt
from river import drift
from river.base import DriftDetector

log = logging.getLogger(__name__)

Signal = Literal["calibrated", "coact"]
Direction = Literal["drop", "increase"]
DetectorMethod = Literal["page_hinkley", "adwin"]

WATCHED: dict[str, Direction] = {"calibrated": "drop", "coact": "increase"}
"""The direction of change that raises an alarm, per signal."""


@dataclass(frozen=True, slots=True)
class DetectorSpec:
    """Hyperparameters of one signal's detectors (validated on construction).

    ``threshold``, ``delta``, ``min_instances`` and ``alpha`` are Page-Hinkley's; ``adwin_delta``,
    ``clock``, ``max_buckets``, ``min_window_length`` and ``grace_period`` are ADWIN's. ``scale`` divides
    every value before it reaches the detector.
    """

    method: DetectorMethod = "page_hinkley"
    scale: float = 1.0
    threshold: float = 10.0
    delta: float = 0.02
    min_instances: int = 30
    alpha: float = 1.0
    adwin_delta: float = 0.002
    clock: int = 32
    max_buckets: int = 5
    min_window_length: int = 5
    grace_period: int = 10

    def __post_init__(self) -> None:
        problems = []
        if self.method not in ("page_hinkley", "adwin"):
            problems.append(f"method must be 'page_hinkley' or 'adwin', got {self.method!r}")
        if not (math.isfinite(self.scale) and self.scale > 0):
            problems.append(f"scale must be a positive number, got {self.scale!r}")
        if not (math.isfinite(self.threshold) and self.threshold > 0):
            problems.append(f"threshold must be a positive number, got {self.threshold!r}")
        if not (math.isfinite(self.delta) and self.delta >= 0):
            problems.append(f"delta must be >= 0, got {self.delta!r}")
        if self.min_instances < 1:
            problems.append(f"min_instances must be >= 1, got {self.min_instances!r}")
        if not 0.0 < self.alpha <= 1.0:
            problems.append(f"alpha must be in (0, 1], got {self.alpha!r}")
        if not 0.0 < self.adwin_delta < 1.0:
            problems.append(f"adwin_delta must be in (0, 1), got {self.adwin_delta!r}")
        for name in ("clock", "max_buckets", "min_window_length", "grace_period"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if problems:
            raise ValueError("; ".join(problems))

    def build(self, direction: Direction) -> DriftDetector:
        """A fresh river detector watching for ``direction``."""
        if self.method == "adwin":
            return drift.ADWIN(
                delta=self.adwin_delta,
                clock=self.clock,
                max_buckets=self.max_buckets,
                min_window_length=self.min_window_length,
                grace_period=self.grace_period,
            )
        return drift.PageHinkley(
            min_instances=self.min_instances,
            delta=self.delta,
            threshold=self.threshold,
            alpha=self.alpha,
            mode="down" if direction == "drop" else "up",
        )


DEFAULT_CALIBRATED = DetectorSpec()
"""Calibrated confidence in [0, 1]: a sustained drop of 0.05 is alarmed after a few hundred records."""

DEFAULT_COACT = DetectorSpec(delta=0.05, threshold=20.0)
"""Rare co-activation count divided by its reference p99 (pass ``scale``): wider, as counts are skewed."""


@dataclass(frozen=True, slots=True)
class Alarm:
    """A change detected on one device stream.

    ``index`` counts the stream's values from 0 since its detector was created (eviction restarts it);
    ``at`` is the triggering record's timestamp when given, else the time of the update.
    """

    device_id: str
    model_version: str
    signal: Signal
    direction: Direction
    method: DetectorMethod
    at: float
    index: int
    value: float


@dataclass(slots=True)
class _Stream:
    detector: DriftDetector
    n_seen: int = 0
    last_seen: float = field(default=0.0)


StreamKey = tuple[str, str, str]


class StreamDetectors:
    """Page-Hinkley or ADWIN detectors per (device, model version, signal), in bounded memory.

    Parameters
    ----------
    calibrated
        Detector settings for the calibrated confidence (values in [0, 1], alarms on a drop).
    coact
        Detector settings for the rare co-activation count (alarms on an increase); default
        ``DEFAULT_COACT``, whose thresholds assume ``scale`` set to the reference p99 of the count, e.g.
        ``dataclasses.replace(DEFAULT_COACT, scale=max(profile.coactivation.p99, 1.0))``.
    max_streams
        Most streams kept; the least recently updated is evicted beyond it.
    idle_timeout
        Seconds without an update after which a stream is evicted.
    clock
        Source of the current time when ``update_many`` is given neither ``now`` nor ``times``.
    """

    def __init__(
        self,
        calibrated: DetectorSpec | None = None,
        coact: DetectorSpec | None = None,
        *,
        max_streams: int = 50_000,
        idle_timeout: float = 6 * 3600.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_streams < 1:
            raise ValueError(f"max_streams must be >= 1, got {max_streams!r}")
        if not idle_timeout > 0:
            raise ValueError(f"idle_timeout must be > 0 seconds, got {idle_timeout!r}")
        self.calibrated = calibrated if calibrated is not None else DEFAULT_CALIBRATED
        self.coact = coact if coact is not None else DEFAULT_COACT
        self.max_streams = max_streams
        self.idle_timeout = idle_timeout
        self.clock = clock
        self.reset()

    def reset(self) -> None:
        """Forget every stream and zero the counters."""
        self._streams: OrderedDict[StreamKey, _Stream] = OrderedDict()
        self.n_alarms = 0
        self.n_evicted = 0
        self.n_skipped = 0
        self.n_ignored = 0

    def __len__(self) -> int:
        """Number of live streams."""
        return len(self._streams)

    def spec(self, signal: str) -> DetectorSpec:
        """The detector settings of a signal."""
        if signal == "calibrated":
            return self.calibrated
        if signal == "coact":
            return self.coact
        raise ValueError(f"unknown signal {signal!r}; expected 'calibrated' or 'coact'")

    def evict_idle(self, now: float) -> int:
        """Drop streams idle for more than ``idle_timeout`` seconds at ``now``; return how many."""
        horizon = now - self.idle_timeout
        evicted = 0
        # Streams are ordered by last update, oldest first, so the scan stops at the first live one.
        while self._streams:
            key, stream = next(iter(self._streams.items()))
            if stream.last_seen >= horizon:
                break
            del self._streams[key]
            evicted += 1
        self.n_evicted += evicted
        return evicted

    def _stream(self, key: StreamKey, spec: DetectorSpec, direction: Direction, now: float) -> _Stream:
        stream = self._streams.get(key)
        if stream is None:
            while len(self._streams) >= self.max_streams:
                self._streams.popitem(last=False)
                self.n_evicted += 1
            stream = _Stream(spec.build(direction), last_seen=now)
            self._streams[key] = stream
        else:
            self._streams.move_to_end(key)
        return stream

    def update_many(
        self,
        device_id: str,
        model_version: str,
        values: npt.ArrayLike,
        *,
        signal: Signal,
        times: npt.ArrayLike | None = None,
        now: float | None = None,
    ) -> list[Alarm]:
        """Feed one block of a device's values (arrival order) to its detector; return the alarms raised.

        Non-finite values are skipped and counted in ``n_skipped``. ``times`` (one per value, seconds)
        stamps the alarms; ``now`` (default: the latest of ``times``, else ``clock()``) drives eviction.
        """
        spec = self.spec(signal)
        direction = WATCHED[signal]
        arr = np.asarray(values, dtype=np.float64).ravel()
        stamps: npt.NDArray[np.float64] | None = None
        if times is not None:
            stamps = np.asarray(times, dtype=np.float64).ravel()
            if stamps.shape != arr.shape:
                raise ValueError(f"{arr.size} values but {stamps.size} timestamps")
        if now is None:
            # A block with no usable timestamp must not set "now" to NaN: every stream would look idle.
            good = stamps[np.isfinite(stamps)] if stamps is not None else np.empty(0)
            now = float(good.max()) if good.size else self.clock()
        elif not math.isfinite(now):
            raise ValueError(f"now must be a finite time in seconds, got {now!r}")
        finite = np.isfinite(arr)
        if not finite.all():
            self.n_skipped += int(arr.size - np.count_nonzero(finite))
            arr = arr[finite]
            if stamps is not None:
                stamps = stamps[finite]
        self.evict_idle(now)
        key = (device_id, model_version, signal)
        stream = self._stream(key, spec, direction, now)
        stream.last_seen = now
        if arr.size == 0:
            return []
        scaled = (arr / spec.scale).tolist() if spec.scale != 1.0 else arr.tolist()
        detector = stream.detector
        if isinstance(detector, drift.ADWIN):
            hits = self._run_adwin(detector, scaled, direction)
        else:
            hits = self._run(detector, scaled)
        start = stream.n_seen
        stream.n_seen += arr.size
        alarms = [
            Alarm(
                device_id=device_id,
                model_version=model_version,
                signal=signal,
                direction=direction,
                method=spec.method,
                at=float(stamps[i]) if stamps is not None and math.isfinite(stamps[i]) else now,
                index=start + i,
                value=float(arr[i]),
            )
            for i in hits
        ]
        if alarms:
            self.n_alarms += len(alarms)
            log.info("%d %s alarm(s) on %s/%s", len(alarms), signal, device_id, model_version)
        return alarms

    @staticmethod
    def _run(detector: DriftDetector, values: list[float]) -> list[int]:
        # Page-Hinkley is one-sided by its mode, so every detection is an alarm.
        update = detector.update
        hits = []
        for i, x in enumerate(values):
            update(x)
            if detector.drift_detected:
                hits.append(i)
        return hits

    def _run_adwin(self, detector: drift.ADWIN, values: list[float], direction: Direction) -> list[int]:
        # ADWIN is two-sided: on a detection it drops its older sub-window; the sign of (kept mean - dropped
        # mean) gives the direction of the change.
        hits = []
        for i, x in enumerate(values):
            total, width = detector.total, detector.width
            detector.update(x)
            if not detector.drift_detected:
                continue
            kept_total, kept_width = detector.total, detector.width
            dropped_width = width + 1 - kept_width
            if kept_width <= 0 or dropped_width <= 0:
                continue
            dropped_mean = (total + x - kept_total) / dropped_width
            kept_mean = kept_total / kept_width
            if (kept_mean < dropped_mean) == (direction == "drop"):
                hits.append(i)
            else:
                self.n_ignored += 1
        return hits
