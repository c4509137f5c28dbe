"""Sequential detectors wired into ingest: each device's active-model stream, alarms stored with the records.

Ingest hands :meth:`SequentialWatch.observe` every batch it just wrote. The NEWLY inserted records
of each ``active`` block (duplicates and conflicting records were seen before, or are not stored)
feed one :class:`~collector.monitoring.sequential.StreamDetectors` stream per device and model
version, per signal: the calibrated top-class confidence (alarm on a drop) and, for a model
version whose bundle is known, the rare co-activation count divided by its reference p99 (alarm on
an increase). Shadow blocks are not watched: a shadow model's confidence says nothing about what
the device decided.

Order: within one ingest transaction the records of a stream are fed in ``seq`` order; across
transactions in the order they were stored, which is ``seq`` order unless a device re-sends an
older batch after a newer one (the detectors then see a few values out of order, which moves a
detection by as many records, never invents one).

Resets: a stream belongs to one (spool epoch, model name, model version) of its device. When a
device's records come under another epoch (the device was re-flashed: a new spool) or another
model (an update or a rollback), its streams start again from scratch, so a new model is judged
against its own history only. Records of the previous identity that arrive afterwards and are older
than what the stream has seen (a late re-send) are not fed (counted as ``stale``); newer ones switch
the stream back, from scratch. Idle streams and device identities are evicted after
``monitoring_sequential_idle_s`` (the detector restarts if the device returns).

Alarms are :class:`~collector.db.models.SequentialAlarm` rows written in the SAME transaction as
the records, so an alarm exists if and only if the records it was raised on do. The detectors'
state is kept in step with the database: ingest calls :meth:`begin` before its transaction,
:meth:`commit` after the database committed and :meth:`rollback` when it failed, so a retried
group is fed once and an alarm whose rows were rolled back is raised again on the retry.

Replicas sharing a subscription each see part of a device's batches and run their own detectors on
that part: a change is still detected, later (each replica sees fewer records per minute).
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter, OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy import insert
from sqlalchemy.engine import Connection
from sqlalchemy.sql.schema import Table

from collector.db.models import SequentialAlarm
from collector.monitoring.sequential import (
    DEFAULT_CALIBRATED,
    DEFAULT_COACT,
    Alarm,
    DetectorSpec,
    Signal,
    StreamDetectors,
)

if TYPE_CHECKING:
    from collector.config import Settings
    from collector.monitoring.sketches import ReferenceBins
    from collector.monitoring.windows import NewRecords

log = logging.getLogger(__name__)

ALARM_TABLE: Table = SequentialAlarm.__table__  # type: ignore[attr-defined]
WATCHED_ROLE = "active"
# The most stream identities (devices) remembered at once: above it the least recently seen goes.
DEFAULT_MAX_DEVICES = 25_000


@dataclass(frozen=True, slots=True)
class StreamId:
    """What a device's stream belongs to; records of another identity reset it."""

    spool_epoch: str
    model_name: str
    model_version: str


@dataclass(slots=True)
class _Cursor:
    ident: StreamId
    last_ts: float  # latest record time fed (collector-corrected)
    seen_at: float  # collector time of the last update (eviction)


@dataclass
class _Part:
    """A stream's new records in one transaction, gathered from its blocks before they are fed."""

    received_at: float
    seq: list[np.ndarray] = field(default_factory=list)
    ts: list[np.ndarray] = field(default_factory=list)
    calibrated: list[np.ndarray] = field(default_factory=list)
    coact: list[np.ndarray] = field(default_factory=list)
    owners: list[int] = field(default_factory=list)  # index of the batch each block came from


@dataclass
class Observed:
    """What one batch's new records did to the detectors."""

    alarms: Counter[str] = field(default_factory=Counter)  # per signal
    stale: int = 0  # records of an older stream identity, not fed


class SequentialWatch:
    """Per-device sequential detectors over newly stored records; alarms into ``sequential_alarm``.

    ``coact_scales`` maps (model name, version) to the reference p99 of the co-activation count;
    model versions without one are watched on calibrated confidence only.
    """

    def __init__(
        self,
        detectors: StreamDetectors,
        coact_scales: Mapping[tuple[str, str], float],
        *,
        max_devices: int = DEFAULT_MAX_DEVICES,
    ) -> None:
        self.detectors = detectors
        self.coact_scales = {k: max(float(v), 1.0) for k, v in coact_scales.items()}
        self.max_devices = max_devices
        self._cursors: OrderedDict[str, _Cursor] = OrderedDict()
        self._staged: dict[str, _Cursor] | None = None
        self._staged_stale = 0
        self.n_stale = 0  # records not fed because they were stale (committed transactions only)

    @classmethod
    def from_settings(cls, settings: Settings, bins: Mapping[tuple[str, str], ReferenceBins]) -> SequentialWatch:
        """Detectors with the settings' parameters; co-activation scales from the reference bins."""
        method = settings.monitoring_sequential_method
        calibrated = dataclasses.replace(
            DEFAULT_CALIBRATED,
            method=method,
            threshold=settings.monitoring_sequential_calibrated_threshold,
            delta=settings.monitoring_sequential_calibrated_delta,
            min_instances=settings.monitoring_sequential_min_instances,
            adwin_delta=settings.monitoring_sequential_adwin_delta,
        )
        coact = dataclasses.replace(
            DEFAULT_COACT,
            method=method,
            threshold=settings.monitoring_sequential_coact_threshold,
            delta=settings.monitoring_sequential_coact_delta,
            min_instances=settings.monitoring_sequential_min_instances,
            adwin_delta=settings.monitoring_sequential_adwin_delta,
        )
        detectors = StreamDetectors(
            calibrated,
            coact,
            max_streams=2 * settings.monitoring_sequential_max_devices,
            idle_timeout=settings.monitoring_sequential_idle_s,
        )
        scales = {k: b.coact_p99 for k, b in bins.items()}
        return cls(detectors, scales, max_devices=settings.monitoring_sequential_max_devices)

    def __len__(self) -> int:
        """Devices with a live stream."""
        return len(self._cursors)

    # ---------------------------------------------------------------------------- transactions

    def begin(self) -> None:
        """Stage every change until :meth:`commit` (the ingest transaction committed) or :meth:`rollback`."""
        self.detectors.begin()
        self._staged = {}
        self._staged_stale = 0

    def commit(self) -> None:
        """The transaction committed: its detector states and stream identities become live."""
        self.detectors.commit()
        staged, self._staged = self._staged, None
        self.n_stale += self._staged_stale
        self._staged_stale = 0
        if not staged:
            return
        for device, cursor in staged.items():
            self._cursors[device] = cursor
            self._cursors.move_to_end(device)
        self._evict(max(c.seen_at for c in staged.values()))

    def rollback(self) -> None:
        """The transaction failed: forget what it did to the detectors."""
        self.detectors.rollback()
        self._staged = None

    def _cursor(self, device: str) -> _Cursor | None:
        if self._staged is not None and device in self._staged:
            return self._staged[device]
        return self._cursors.get(device)

    def _set_cursor(self, device: str, cursor: _Cursor) -> None:
        if self._staged is not None:
            self._staged[device] = cursor
        else:
            self._cursors[device] = cursor
            self._cursors.move_to_end(device)
            self._evict(cursor.seen_at)

    def _evict(self, now: float) -> None:
        """Bound the remembered identities: the least recently seen beyond ``max_devices``, and the idle."""
        while len(self._cursors) > self.max_devices:
            self._cursors.popitem(last=False)
        horizon = now - self.detectors.idle_timeout
        # Ordered by last update, oldest first: the scan stops at the first device seen since the horizon.
        while self._cursors:
            device, cursor = next(iter(self._cursors.items()))
            if cursor.seen_at >= horizon:
                break
            del self._cursors[device]

    # ---------------------------------------------------------------------------- feeding

    def observe(self, conn: Connection, batches: Sequence[NewRecords]) -> list[Observed]:
        """Feed the new active records of ``batches`` (arrival order); insert the alarms on ``conn``.

        Returns one :class:`Observed` per batch (alarms are credited to the batch of their record).
        """
        out, alarm_rows = self.feed(batches)
        if alarm_rows:
            conn.execute(insert(ALARM_TABLE), alarm_rows)
        return out

    def feed(self, batches: Sequence[NewRecords]) -> tuple[list[Observed], list[dict[str, Any]]]:
        """:meth:`observe` without the database: per batch what happened, and the ``sequential_alarm`` rows."""
        out = [Observed() for _ in batches]
        parts: dict[tuple[str, StreamId], _Part] = {}
        for owner, batch in enumerate(batches):
            for rows, outcome in zip(batch.blocks, batch.outcomes, strict=True):
                if rows.role != WATCHED_ROLE or not outcome.inserted:
                    continue
                new = outcome.new
                take = None if new is None or bool(new.all()) else new
                ident = StreamId(rows.spool_epoch, rows.model_name, rows.model_version)
                part = parts.setdefault((rows.device_id, ident), _Part(rows.received_at))
                part.received_at = max(part.received_at, rows.received_at)
                for name, column in (
                    ("seq", rows.seq),
                    ("ts", rows.ts_corrected),
                    ("calibrated", rows.calibrated),
                    ("coact", rows.coact),
                ):
                    getattr(part, name).append(column if take is None else column[take])
                part.owners.append(owner)
        alarm_rows: list[dict[str, Any]] = []
        for (device, ident), part in parts.items():
            alarm_rows += self._feed(device, ident, part, out)
        return out, alarm_rows

    def _feed(self, device: str, ident: StreamId, part: _Part, out: list[Observed]) -> list[dict[str, Any]]:
        seq = np.concatenate(part.seq)
        ts = np.concatenate(part.ts)
        sizes = [a.size for a in part.seq]
        owner = np.repeat(np.asarray(part.owners, dtype=np.intp), sizes)
        order = None
        if seq.size > 1 and bool((np.diff(seq) < 0).any()):
            order = np.argsort(seq, kind="stable")
            seq, ts, owner = seq[order], ts[order], owner[order]
        cursor = self._cursor(device)
        if cursor is None:
            # A device not seen (or forgotten as idle or least recent): whatever stream it left starts again.
            self.detectors.forget(device, ident.model_version)
        elif cursor.ident != ident:
            if float(ts.max()) < cursor.last_ts:
                # A late re-send under the identity the device has left: judged by windows, not fed.
                n = int(seq.size)
                if self._staged is not None:
                    self._staged_stale += n
                else:
                    self.n_stale += n
                for o in np.unique(owner).tolist():
                    out[o].stale += int((owner == o).sum())
                log.debug("sequential: %d stale records of %s (%s) not fed", n, device, ident)
                return []
            self.detectors.forget(device, cursor.ident.model_version)
            log.info(
                "sequential: %s now %s/%s %s (was %s/%s %s): its streams start again",
                device,
                ident.model_name,
                ident.model_version,
                ident.spool_epoch,
                cursor.ident.model_name,
                cursor.ident.model_version,
                cursor.ident.spool_epoch,
            )
        last_ts = float(ts.max()) if cursor is None or cursor.ident != ident else max(cursor.last_ts, float(ts.max()))
        self._set_cursor(device, _Cursor(ident, last_ts, part.received_at))
        signals: list[tuple[Signal, np.ndarray]] = []
        calibrated = np.concatenate(part.calibrated).astype(np.float64)
        signals.append(("calibrated", calibrated if order is None else calibrated[order]))
        scale = self.coact_scales.get((ident.model_name, ident.model_version))
        if scale is not None:
            # The spec's scale is the detectors' (1 by default): divide here by this version's p99.
            coact = np.concatenate(part.coact).astype(np.float64) / scale
            signals.append(("coact", coact if order is None else coact[order]))
        rows: list[dict[str, Any]] = []
        for signal, values in signals:
            alarms = self.detectors.update_many(
                device, ident.model_version, values, signal=signal, times=ts, now=part.received_at
            )
            for alarm in alarms:
                pos = alarm.position
                out[int(owner[pos])].alarms[signal] += 1
                rows.append(self._row(device, ident, alarm, int(seq[pos]), part.received_at, scale))
        return rows

    def _row(
        self, device: str, ident: StreamId, alarm: Alarm, seq: int, received_at: float, scale: float | None
    ) -> dict[str, Any]:
        spec: DetectorSpec = self.detectors.spec(alarm.signal)
        detail: dict[str, Any] = {
            "direction": alarm.direction,
            "value": alarm.value * (scale if alarm.signal == "coact" and scale is not None else 1.0),
            "index": alarm.index,
            "min_instances": spec.min_instances,
        }
        if spec.method == "adwin":
            detail["adwin_delta"] = spec.adwin_delta
        else:
            detail.update(threshold=spec.threshold, delta=spec.delta)
        if alarm.signal == "coact" and scale is not None:
            detail["scale"] = scale
        return {
            "device_id": device,
            "model_name": ident.model_name,
            "model_version": ident.model_version,
            "signal": alarm.signal,
            "detector": alarm.method,
            "spool_epoch": ident.spool_epoch,
            "seq": seq,
            "ts": alarm.at,
            "detail": detail,
            "received_at": received_at,
        }
