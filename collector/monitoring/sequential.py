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

Speed: Page-Hinkley runs as :class:`BlockPageHinkley`, river's algorithm on a whole block at once with
numpy (cumulative sums and running extrema; a Python step only at each detection), about 40 times faster
than river's per-value ``update`` and with the same decisions (checked against river on seeded streams in
the tests). ADWIN is river's own, value by value. river is imported only when an ADWIN is built.

Transactions: ingest writes alarms in the transaction that stores their records, and a transaction can
fail and be retried. Between :meth:`StreamDetectors.begin` and :meth:`~StreamDetectors.commit` every
update works on copies of the streams it touches; :meth:`~StreamDetectors.rollback` drops them, so a
retried block is not fed twice and an alarm whose rows were rolled back is raised again.

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

import copy
import logging
import math
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, TypeAlias

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from river.drift import ADWIN

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

    def build(self, direction: Direction) -> Detector:
        """A fresh detector watching for ``direction`` (Page-Hinkley block-wise, ADWIN from river)."""
        if self.method == "adwin":
            from river import drift  # imported on first use: river takes seconds to import

            return drift.ADWIN(
                delta=self.adwin_delta,
                clock=self.clock,
                max_buckets=self.max_buckets,
                min_window_length=self.min_window_length,
                grace_period=self.grace_period,
            )
        return BlockPageHinkley(
            min_instances=self.min_instances,
            delta=self.delta,
            threshold=self.threshold,
            alpha=self.alpha,
            up=direction == "increase",
        )


@dataclass(slots=True)
class BlockPageHinkley:
    """river's one-sided ``PageHinkley`` (``mode="up"`` or ``"down"``), fed a block of values at a time.

    Same state and the same decisions as river's (its quirks included: the decrease statistic starts
    from a maximum of -1, and the detector resets on the value after a detection), but a block is
    processed with cumulative sums: the running mean as ``(n0 * mean0 + cumsum(x)) / n``, the
    cumulative deviation as a ``cumsum`` and its extremum by ``maximum.accumulate``/``minimum.accumulate``.
    The running mean is rounded differently from river's incremental one (a few ulps), which moves a
    decision only when a statistic lands within about 1e-12 of the threshold. With forgetting
    (``alpha < 1``) the recursion runs value by value.
    """

    min_instances: int
    delta: float
    threshold: float
    alpha: float
    up: bool
    n: int = 0
    mean: float = 0.0
    total: float = 0.0  # river's _sum_increase (up) or _sum_decrease (down)
    extreme: float = math.nan  # river's _min_increase (up) or _max_decrease (down); set by reset()
    drift_detected: bool = False

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget everything, as river's ``_reset``."""
        self.n, self.mean, self.total = 0, 0.0, 0.0
        self.extreme = math.inf if self.up else -1.0
        self.drift_detected = False

    def update(self, x: float) -> None:
        """One value (river's interface)."""
        self.update_many(np.array([x], dtype=np.float64))

    def update_many(self, values: npt.NDArray[np.float64]) -> list[int]:
        """Feed ``values`` in order; return the positions at which a change was detected."""
        hits: list[int] = []
        pos, m = 0, int(values.size)
        while pos < m:
            if self.drift_detected:
                self.reset()
            x = values[pos:]
            count = np.arange(self.n + 1, self.n + x.size + 1, dtype=np.float64)
            means = (self.n * self.mean + np.cumsum(x)) / count
            step = (x - means) - self.delta if self.up else (x - means) + self.delta
            if self.alpha == 1.0:
                totals = self.total + np.cumsum(step)
            else:
                totals = np.empty_like(step)
                acc = self.total
                for i, d in enumerate(step.tolist()):
                    acc = self.alpha * acc + d
                    totals[i] = acc
            if self.up:
                extremes = np.minimum(np.minimum.accumulate(totals), self.extreme)
                stat = totals - extremes
            else:
                extremes = np.maximum(np.maximum.accumulate(totals), self.extreme)
                stat = extremes - totals
            over = np.flatnonzero((stat > self.threshold) & (count >= self.min_instances))
            last = int(over[0]) if over.size else x.size - 1
            self.n += last + 1
            self.mean, self.total, self.extreme = float(means[last]), float(totals[last]), float(extremes[last])
            self.drift_detected = bool(over.size)
            if over.size:
                hits.append(pos + last)
            pos += last + 1
        return hits


Detector: TypeAlias = "BlockPageHinkley | ADWIN"


DEFAULT_CALIBRATED = DetectorSpec()
"""Calibrated confidence in [0, 1]: a sustained drop of 0.05 is alarmed after a few hundred records."""

DEFAULT_COACT = DetectorSpec(delta=0.05, threshold=20.0)
"""Rare co-activation count divided by its reference p99 (pass ``scale``): wider, as counts are skewed."""


@dataclass(frozen=True, slots=True)
class Alarm:
    """A change detected on one device stream.

    ``index`` counts the stream's values from 0 since its detector was created (eviction restarts it);
    ``at`` is the triggering record's timestamp when given, else the time of the update; ``position`` is
    the triggering value's position in the ``values`` given to :meth:`StreamDetectors.update_many`.
    """

    device_id: str
    model_version: str
    signal: Signal
    direction: Direction
    method: DetectorMethod
    at: float
    index: int
    value: float
    # Where in the block it was raised: which record to name, not part of what the alarm is.
    position: int = field(default=-1, compare=False)


@dataclass(slots=True)
class _Stream:
    detector: Detector
    n_seen: int = 0
    last_seen: float = field(default=0.0)

    def copy(self) -> _Stream:
        """An independent copy (a staged update must not touch the live detector)."""
        det = self.detector
        # A Page-Hinkley state is a few numbers; an ADWIN holds its buckets (about 0.4 ms to copy).
        clone = copy.copy(det) if isinstance(det, BlockPageHinkley) else copy.deepcopy(det)
        return _Stream(clone, self.n_seen, self.last_seen)


StreamKey = tuple[str, str, str]
_COUNTERS = ("n_alarms", "n_skipped", "n_ignored")


@dataclass
class _Staged:
    """What a transaction changed: copies of the streams it touched, streams it forgot, counters."""

    streams: dict[StreamKey, _Stream] = field(default_factory=dict)
    forgotten: set[StreamKey] = field(default_factory=set)
    counts: Counter[str] = field(default_factory=Counter)
    now: float = -math.inf


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
        """Forget every stream and zero the counters (and drop a transaction in progress)."""
        self._streams: OrderedDict[StreamKey, _Stream] = OrderedDict()
        self._staged: _Staged | None = None
        self.n_alarms = 0
        self.n_evicted = 0
        self.n_skipped = 0
        self.n_ignored = 0

    def __len__(self) -> int:
        """Number of live streams (committed ones, during a transaction)."""
        return len(self._streams)

    def spec(self, signal: str) -> DetectorSpec:
        """The detector settings of a signal."""
        if signal == "calibrated":
            return self.calibrated
        if signal == "coact":
            return self.coact
        raise ValueError(f"unknown signal {signal!r}; expected 'calibrated' or 'coact'")

    # ------------------------------------------------------------------------------ transactions

    def begin(self) -> None:
        """Stage every update until :meth:`commit` (or drop them with :meth:`rollback`)."""
        self._staged = _Staged()

    def commit(self) -> None:
        """Make the staged updates live: touched streams replace theirs, forgotten ones go, counters add up."""
        staged, self._staged = self._staged, None
        if staged is None:
            return
        for key in staged.forgotten:
            self._streams.pop(key, None)
        for key, stream in staged.streams.items():
            self._streams[key] = stream
            self._streams.move_to_end(key)
        self._bound()
        for name, n in staged.counts.items():
            setattr(self, name, getattr(self, name) + n)
        if math.isfinite(staged.now):
            self.evict_idle(staged.now)

    def rollback(self) -> None:
        """Drop the staged updates: the streams are as they were at :meth:`begin`."""
        self._staged = None

    @property
    def in_transaction(self) -> bool:
        """True between :meth:`begin` and :meth:`commit`/:meth:`rollback`."""
        return self._staged is not None

    def _count(self, name: str, n: int) -> None:
        if self._staged is not None:
            self._staged.counts[name] += n
        else:
            setattr(self, name, getattr(self, name) + n)

    # ------------------------------------------------------------------------------ streams

    def forget(self, device_id: str, model_version: str, signals: Iterable[Signal] = ("calibrated", "coact")) -> None:
        """Drop the streams of ``device_id``/``model_version``: its next value starts a fresh detector."""
        for signal in signals:
            key = (device_id, model_version, signal)
            if self._staged is not None:
                self._staged.streams.pop(key, None)
                self._staged.forgotten.add(key)
            else:
                self._streams.pop(key, None)

    def evict_idle(self, now: float) -> int:
        """Drop streams idle for more than ``idle_timeout`` seconds at ``now``; return how many.

        During a transaction this waits for the commit (which evicts at the latest ``now`` it saw).
        """
        if self._staged is not None:
            self._staged.now = max(self._staged.now, now)
            return 0
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

    def _bound(self) -> None:
        while len(self._streams) > self.max_streams:
            self._streams.popitem(last=False)
            self.n_evicted += 1

    def _stream(self, key: StreamKey, spec: DetectorSpec, direction: Direction, now: float) -> _Stream:
        staged = self._staged
        if staged is not None:
            stream = staged.streams.get(key)
            if stream is None:
                live = None if key in staged.forgotten else self._streams.get(key)
                stream = live.copy() if live is not None else _Stream(spec.build(direction), last_seen=now)
                staged.streams[key] = stream
            return stream
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
        kept: npt.NDArray[np.intp] | None = None  # positions of the finite values in ``values``
        if not finite.all():
            self._count("n_skipped", int(arr.size - np.count_nonzero(finite)))
            kept = np.flatnonzero(finite)
            arr = arr[finite]
            if stamps is not None:
                stamps = stamps[finite]
        self.evict_idle(now)
        key = (device_id, model_version, signal)
        stream = self._stream(key, spec, direction, now)
        stream.last_seen = now
        if arr.size == 0:
            return []
        scaled = arr / spec.scale if spec.scale != 1.0 else arr
        detector = stream.detector
        if isinstance(detector, BlockPageHinkley):
            hits = detector.update_many(scaled)
        else:
            hits = self._run_adwin(detector, scaled.tolist(), direction)
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
                position=i if kept is None else int(kept[i]),
            )
            for i in hits
        ]
        if alarms:
            self._count("n_alarms", len(alarms))
            log.info("%d %s alarm(s) on %s/%s", len(alarms), signal, device_id, model_version)
        return alarms

    def _run_adwin(self, detector: ADWIN, values: list[float], direction: Direction) -> list[int]:
        # ADWIN is two-sided: on a detection it drops its older sub-window; the sign of (kept mean - dropped
        # mean) gives the direction of the change.
        hits = []
        ignored = 0
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
                ignored += 1
        if ignored:
            self._count("n_ignored", ignored)
        return hits
