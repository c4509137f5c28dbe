"""The monitoring service: drift, label-free accuracy and data quality for any cohort and time range.

Ingest keeps one mergeable sketch per (device, model version, role, window) in
``monitoring_window`` (:mod:`collector.monitoring.windows`). A *scope* picks devices (by id or
group), a model, a role and a time range; the service reads the windows of the scope, merges them
per model version (:func:`~collector.monitoring.sketches.merge_all`: addition, so a group, a model
version or the whole fleet is just a bigger sum) and judges the merged sketch against the version's
reference bundle from the :class:`~collector.monitoring.catalog.ReferenceCatalog`:

* **drift**: :func:`~collector.monitoring.drift.evaluate_windows` (every feature's PSI, Hellinger,
  KL, Jensen-Shannon and binned KS; class mix, confidence shift, PCA error, rare co-activations;
  Benjamini-Hochberg over all of them). Per device, :meth:`MonitoringService.evaluate_devices` puts
  every device's p-values in one BH family (:func:`~collector.monitoring.drift.evaluate_family`), so
  a fleet of 1,000 devices does not raise 50 false alarms at 5 %.
* **label-free accuracy**: expected accuracy from calibrated confidence with its Poisson-binomial
  interval (normal method: merged windows only keep the sums), and whether it can be trusted (the
  share of records above the reference 99th percentile of PCA error and rare co-activations).
  Realized accuracy and its gap to the estimate on the same records from the late and inline
  labels of the scope (:func:`collector.labels.label_stats`, one query); per device and per window
  only the labels that came with the records, which the sketches count.
* **data quality**: missing values, values out of the hardware profile's range, stuck sensors,
  sensor flags, seq gaps, clock skew and delivery delay, each against its threshold.

Every statistic comes with its threshold and verdict, and a test with too few records says
``not_enough_data`` rather than guess. Model versions without a bundle in the catalog have no
sketches (ingest cannot bin them): their records are counted from ``inference`` and reported with
the reason there is no verdict.

Groups: a device belongs to group ``G`` when it was assigned to it (``fleetctl groups assign``) or its
reported tags contain ``group:G`` (:mod:`collector.fleet.groups`); :func:`resolve_devices` is the only
place here that asks.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session

from collector.config import Settings
from collector.db.models import Inference, MonitoringWindow
from collector.fleet.groups import members_of
from collector.labels import label_stats
from collector.monitoring import performance
from collector.monitoring.catalog import CatalogEntry, ReferenceCatalog
from collector.monitoring.dependence import EffectiveSizes, design_effect_of, total_effective
from collector.monitoring.drift import DriftReport, DriftThresholds, evaluate_family
from collector.monitoring.sketches import FLAG_BITS, SketchError, WindowSketch, merge_all, window_counts

log = logging.getLogger(__name__)

WINDOW_TABLE = MonitoringWindow.__table__  # type: ignore[attr-defined]
INFERENCE_TABLE = Inference.__table__  # type: ignore[attr-defined]
IN_CHUNK = 500  # bounded IN lists

Verdict = Literal["drift", "ok", "not_enough_data", "no_reference"]
QualityVerdict = Literal["ok", "bad", "not_enough_data"]


# ------------------------------------------------------------------------------------ scope


def resolve_devices(
    session_or_conn: Session | Connection, *, device_ids: Iterable[str] | None = None, group: str | None = None
) -> list[str] | None:
    """Devices of a scope, sorted: ``None`` means every device (no filter).

    ``group`` selects the group's members (:func:`collector.fleet.groups.members_of`: assigned, or
    tagged ``group:<group>``; retired devices are in no group); with ``device_ids`` too, the devices in
    both. An unknown group gives an empty list (a scope with no device), never the whole fleet.
    """
    ids = None if device_ids is None else sorted(set(device_ids))
    if group is None:
        return ids
    conn = session_or_conn.connection() if isinstance(session_or_conn, Session) else session_or_conn
    members = members_of(conn, group)
    if ids is not None:
        wanted = set(ids)
        members = [d for d in members if d in wanted]
    return members


@dataclass(frozen=True)
class Scope:
    """Which windows a status covers: devices (ids and/or a group), model, role and time range.

    ``since``/``until`` are seconds since the epoch on the collector-corrected clock; a window
    belongs to the scope when its *start* lies in ``[since, until)``. ``None`` leaves a bound (or a
    filter) open; ``role=None`` merges every role.
    """

    device_ids: tuple[str, ...] | None = None
    group: str | None = None
    model_name: str | None = None
    model_version: str | None = None
    role: str | None = "active"
    since: float | None = None
    until: float | None = None

    def __post_init__(self) -> None:
        if self.device_ids is not None and not isinstance(self.device_ids, tuple):
            object.__setattr__(self, "device_ids", tuple(self.device_ids))
        for name in ("since", "until"):
            v = getattr(self, name)
            if v is not None and not math.isfinite(v):
                raise ValueError(f"{name} must be finite")
        if self.since is not None and self.until is not None and self.until <= self.since:
            raise ValueError("until must be after since")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        out = asdict(self)
        out["device_ids"] = None if self.device_ids is None else list(self.device_ids)
        return out


# ------------------------------------------------------------------------------- thresholds


@dataclass(frozen=True)
class QualityThresholds:
    """When data quality is bad (defaults are the settings' defaults)."""

    min_records: int = 100
    """Rates are not judged on fewer records."""
    max_missing_rate: float = 0.05
    max_out_of_range_rate: float = 0.01
    max_stuck_records: int = 0
    """A should-vary feature ending any run of ``stuck_run`` identical values is stuck."""
    max_flagged_rate: float = 0.05
    max_seq_gap_rate: float = 0.01
    max_clock_skew_s: float = 30.0
    max_delivery_delay_s: float = 900.0
    max_invalid_predictions: int = 0


@dataclass(frozen=True)
class StatusThresholds:
    """Every threshold a status applies: drift, accuracy, region and data quality."""

    drift: DriftThresholds = field(default_factory=DriftThresholds)
    accuracy_level: float = 0.95
    accuracy_min_records: int = performance.MIN_N
    region_alpha: float = 0.01
    region_min_rate_ratio: float = 1.5
    quality: QualityThresholds = field(default_factory=QualityThresholds)

    @classmethod
    def from_settings(cls, settings: Settings) -> StatusThresholds:
        """The thresholds configured by the ``monitoring_*`` settings."""
        return cls(
            drift=DriftThresholds(
                fdr_q=settings.monitoring_fdr_q,
                min_current=settings.monitoring_min_records,
                min_reference=min(settings.monitoring_min_records, DriftThresholds().min_reference),
                min_effective=settings.monitoring_min_effective,
            ),
            accuracy_level=settings.monitoring_accuracy_level,
            region_alpha=settings.monitoring_region_alpha,
            quality=QualityThresholds(
                min_records=settings.monitoring_min_records,
                max_missing_rate=settings.monitoring_max_missing_rate,
                max_out_of_range_rate=settings.monitoring_max_out_of_range_rate,
                max_flagged_rate=settings.monitoring_max_flagged_rate,
                max_seq_gap_rate=settings.monitoring_max_seq_gap_rate,
                max_clock_skew_s=settings.monitoring_max_clock_skew_s,
                max_delivery_delay_s=settings.monitoring_max_delivery_delay_s,
            ),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return _clean(asdict(self))


# ---------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class QualityCheck:
    """One data-quality check: its statistic, threshold, verdict and the features that failed it."""

    name: str
    value: float | None
    threshold: float
    verdict: QualityVerdict
    features: list[str] = field(default_factory=list)
    detail: str = ""


@dataclass(frozen=True)
class DataQuality:
    """Data quality of a merged sketch: the checks, an overall verdict and the per-feature counters."""

    verdict: QualityVerdict
    n: int
    problems: list[str]
    checks: list[QualityCheck]
    features: list[dict[str, Any]]
    sensor_flags: dict[str, Any]
    clock: dict[str, Any]
    seq: dict[str, Any]


@dataclass(frozen=True)
class AccuracyStatus:
    """Label-free expected accuracy, whether it is reliable, and realized accuracy where labels exist."""

    expected: performance.AccuracyEstimate
    region: performance.RegionVerdict
    reliable: bool
    realized: performance.AccuracyEstimate | None
    realized_source: str | None
    gap: performance.AccuracyGap | None = None
    unreliable_reasons: list[str] = field(default_factory=list)
    """Why ``reliable`` is false: the region test's reason, or wholesale input drift."""


@dataclass(frozen=True)
class ModelStatus:
    """Everything known about one model version within a scope."""

    model_name: str
    model_version: str
    n_records: int
    n_windows: int
    n_devices: int
    first_window: float | None
    last_window_end: float | None
    has_reference: bool
    verdict: Verdict
    reasons: list[str]
    warnings: list[str]
    drift: DriftReport | None = None
    accuracy: AccuracyStatus | None = None
    data_quality: DataQuality | None = None
    unreadable_windows: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (non-finite numbers become null)."""
        out = asdict(self)
        out["drift"] = None if self.drift is None else self.drift.to_dict()
        return _clean(out)


@dataclass(frozen=True)
class ScopeStatus:
    """The status of a scope: one :class:`ModelStatus` per model version seen, and the overall verdict.

    ``verdict`` is ``drift`` when any version drifts, ``ok`` when something was tested and nothing
    drifts, ``not_enough_data`` when nothing could be tested and ``no_reference`` when the scope only
    holds versions without a reference bundle. ``reasons`` say why it drifts; ``warnings`` carry
    what is wrong besides drift (estimate unreliable, bad data quality, versions without reference).
    """

    scope: Scope
    devices: list[str] | None
    window_s: float
    verdict: Verdict
    reasons: list[str]
    warnings: list[str]
    n_records: int
    n_windows: int
    models: list[ModelStatus]
    thresholds: StatusThresholds

    def model(self, model_name: str, model_version: str) -> ModelStatus | None:
        """The status of one model version, or None when the scope has none of its records."""
        for m in self.models:
            if (m.model_name, m.model_version) == (model_name, model_version):
                return m
        return None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (only floats, ints, strings, booleans, None, lists and dicts)."""
        return {
            "scope": self.scope.to_dict(),
            "devices": self.devices,
            "window_s": self.window_s,
            "verdict": self.verdict,
            "reasons": list(self.reasons),
            "warnings": list(self.warnings),
            "n_records": self.n_records,
            "n_windows": self.n_windows,
            "models": [m.to_dict() for m in self.models],
            "thresholds": self.thresholds.to_dict(),
        }


def _clean(value: Any) -> Any:
    """``value`` with numpy scalars as Python numbers and non-finite floats as None (JSON has neither)."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, np.ndarray):
        return _clean(value.tolist())
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        f = float(value)
        return f if math.isfinite(f) else None
    return value


# ------------------------------------------------------------------------------ evaluation


def accuracy_status(
    entry: CatalogEntry,
    sketch: WindowSketch,
    thr: StatusThresholds,
    labels: performance.GapStats | None = None,
    drift: DriftReport | None = None,
    effective: EffectiveSizes | None = None,
) -> AccuracyStatus:
    """Expected accuracy (normal method on the merged sums), its reliability, and realized accuracy.

    The estimate is reliable when the window lies in the region the calibration was fitted on
    (PCA reconstruction error and rare co-activations, :func:`performance.region_reliability`) and,
    given the window's ``drift`` report, the inputs have not drifted wholesale (the share of drifting
    features below ``drift_share``). The second condition is needed because a sensor that ages can
    move one class's inputs to where another class used to be: every input-space measure of the
    region then stays normal while the calibration no longer holds (measured on the UCI gas sensor
    drift data, docs/MONITORING.md). It costs the estimate its use under broad covariate shift, where
    it would be the only signal; the drift verdict then speaks instead.

    ``labels`` (late and inline labels of the scope, :func:`collector.labels.label_stats`) give the
    realized accuracy and its gap to the estimate on the same records; without them, the labels
    that came with the records (counted in the sketch) give the realized accuracy alone.
    """
    conf = performance.ConfidenceStats(sketch.conf_n, max(sketch.conf_sum, 0.0), max(sketch.conf_var_sum, 0.0))
    expected = performance.expected_accuracy(conf, thr.accuracy_level, min_n=thr.accuracy_min_records)
    eff = EffectiveSizes.of(sketch, entry.bins.decorrelation_s) if effective is None else effective
    region = performance.region_reliability_from_histograms(
        entry.manifest.reference,
        sketch.pca_hist,
        sketch.coact_hist,
        alpha=thr.region_alpha,
        min_rate_ratio=thr.region_min_rate_ratio,
        min_n=thr.accuracy_min_records,
        design_effects=(design_effect_of(sketch.n, eff.pca), design_effect_of(sketch.n, eff.coact)),
    )
    realized = None
    source = None
    gap = None
    if labels is not None and labels.n:
        realized = performance.realized_accuracy(
            performance.RealizedStats(labels.n, labels.n_correct), thr.accuracy_level, min_n=thr.accuracy_min_records
        )
        source = "labels"
        tracker = performance.GapTracker(thr.accuracy_level, max(thr.accuracy_min_records, 2))
        tracker.add_stats(entry.manifest.version, labels)
        gap = tracker.gap(entry.manifest.version)
    elif sketch.labelled:
        realized = performance.realized_accuracy(
            performance.RealizedStats(sketch.labelled, min(sketch.correct, sketch.labelled)),
            thr.accuracy_level,
            min_n=thr.accuracy_min_records,
        )
        source = "inline_labels"
    reasons = [region.reason] if region.verdict == "unreliable" and region.reason else []
    if region.verdict == "not_enough_data":
        reasons.append(region.reason or "not enough data for the region test")
    if drift is not None and drift.n_tested and drift.drift_share >= drift.thresholds.drift_share:
        reasons.append(
            f"inputs drifted wholesale: {drift.n_drifting} of {drift.n_tested} features drift "
            f"(share {drift.drift_share:.2f} >= {drift.thresholds.drift_share})"
        )
    return AccuracyStatus(expected, region, region.reliable and not reasons, realized, source, gap, reasons)


def _rate(count: float, n: float) -> float | None:
    return count / n if n > 0 else None


def data_quality(entry: CatalogEntry, sketch: WindowSketch, thr: QualityThresholds) -> DataQuality:
    """Every data-quality check of a merged sketch with its threshold and verdict."""
    n = sketch.n
    names = list(entry.bins.feature_names)
    enough = n >= thr.min_records
    checks: list[QualityCheck] = []

    def rate_check(name: str, counts: np.ndarray, threshold: float, what: str) -> None:
        if not enough:
            checks.append(QualityCheck(name, None, threshold, "not_enough_data", [], f"fewer than {thr.min_records}"))
            return
        rates = counts / n
        bad = [names[i] for i in np.flatnonzero(rates > threshold)]
        checks.append(
            QualityCheck(
                name,
                float(rates.max(initial=0.0)),
                threshold,
                "bad" if bad else "ok",
                bad,
                f"{what} of the worst feature" if not bad else f"{what} above {threshold:g} on {len(bad)} feature(s)",
            )
        )

    rate_check("missing_rate", sketch.feature_nan, thr.max_missing_rate, "share of missing values")
    rate_check("out_of_range_rate", sketch.feature_out_of_range, thr.max_out_of_range_rate, "share out of range")

    if n == 0:
        checks.append(QualityCheck("stuck_records", None, thr.max_stuck_records, "not_enough_data"))
    else:
        stuck = [names[i] for i in np.flatnonzero(sketch.feature_stuck > thr.max_stuck_records)]
        checks.append(
            QualityCheck(
                "stuck_records",
                float(sketch.feature_stuck.max(initial=0)),
                thr.max_stuck_records,
                "bad" if stuck else "ok",
                stuck,
                f"records ending a run of >= {entry.bins.stuck_run} identical values of a should-vary feature",
            )
        )

    def scalar_check(name: str, value: float | None, threshold: float, ok_enough: bool, detail: str) -> None:
        if not ok_enough or value is None:
            checks.append(QualityCheck(name, value, threshold, "not_enough_data", [], detail))
        else:
            checks.append(QualityCheck(name, value, threshold, "bad" if value > threshold else "ok", [], detail))

    scalar_check(
        "flagged_rate",
        _rate(sketch.flagged_records, n),
        thr.max_flagged_rate,
        enough,
        "share of records with a sensor flag set",
    )
    seq_total = n + sketch.seq_missing
    scalar_check(
        "seq_gap_rate",
        _rate(sketch.seq_missing, seq_total),
        thr.max_seq_gap_rate,
        enough,
        "share of seqs missing between received records",
    )
    skew = max(abs(sketch.offset_min), abs(sketch.offset_max)) if n else None
    scalar_check("clock_skew_s", skew, thr.max_clock_skew_s, n > 0, "largest |device clock - collector estimate| (s)")
    delay_mean = sketch.delay_sum / n if n else None
    scalar_check(
        "delivery_delay_s", delay_mean, thr.max_delivery_delay_s, n > 0, "mean delay from record time to arrival (s)"
    )
    scalar_check(
        "invalid_predictions",
        float(sketch.pred_invalid) if n else None,
        thr.max_invalid_predictions,
        n > 0,
        "records whose predicted class is not one of the model's",
    )

    problems = [
        f"{c.name} {c.value:.4g} > {c.threshold:g}" + (f" ({', '.join(c.features)})" if c.features else "")
        for c in checks
        if c.verdict == "bad" and c.value is not None
    ]
    if problems:
        verdict: QualityVerdict = "bad"
    elif any(c.verdict == "ok" for c in checks):
        verdict = "ok"
    else:
        verdict = "not_enough_data"

    finite = n - sketch.feature_nan
    mean = np.divide(sketch.feature_sum, finite, out=np.full(finite.shape, np.nan), where=finite > 0)
    var = np.divide(sketch.feature_sumsq, finite, out=np.full(finite.shape, np.nan), where=finite > 0) - mean**2
    features = [
        {
            "name": name,
            "missing": int(sketch.feature_nan[i]),
            "missing_rate": _rate(int(sketch.feature_nan[i]), n),
            "out_of_range": int(sketch.feature_out_of_range[i]),
            "stuck": int(sketch.feature_stuck[i]),
            "repeat_rate": _rate(int(sketch.feature_repeat[i]), n),
            "should_vary": bool(entry.bins.vary[i]),
            "mean": float(mean[i]),
            "std": float(math.sqrt(max(float(var[i]), 0.0))) if math.isfinite(float(var[i])) else None,
        }
        for i, name in enumerate(names)
    ]
    bits = {str(b): int(sketch.flag_bits[b]) for b in range(FLAG_BITS) if sketch.flag_bits[b]}
    delay_var = sketch.delay_sumsq / n - (sketch.delay_sum / n) ** 2 if n else math.nan
    return DataQuality(
        verdict=verdict,
        n=n,
        problems=problems,
        checks=checks,
        features=features,
        sensor_flags={
            "flagged_records": sketch.flagged_records,
            "rate": _rate(sketch.flagged_records, n),
            "bits": bits,
        },
        clock={
            "offset_mean_s": sketch.offset_sum / n if n else None,
            "offset_min_s": sketch.offset_min,
            "offset_max_s": sketch.offset_max,
            "delay_mean_s": delay_mean,
            "delay_std_s": math.sqrt(max(delay_var, 0.0)) if n else None,
            "delay_min_s": sketch.delay_min,
            "delay_max_s": sketch.delay_max,
        },
        seq={"missing": sketch.seq_missing, "gaps": sketch.seq_gaps, "rate": _rate(sketch.seq_missing, seq_total)},
    )


def _model_status(
    entry: CatalogEntry,
    group: _Group,
    report: DriftReport,
    thr: StatusThresholds,
    labels: performance.GapStats | None = None,
) -> ModelStatus:
    sketch = group.sketch(entry)
    accuracy = accuracy_status(entry, sketch, thr, labels, report, group.effective(entry))
    quality = data_quality(entry, sketch, thr.quality)
    warnings: list[str] = []
    if accuracy.region.verdict != "not_enough_data" and not accuracy.reliable:
        warnings.append(f"expected accuracy unreliable: {'; '.join(accuracy.unreliable_reasons)}")
    warnings.extend(f"data quality: {p}" for p in quality.problems)
    if group.unreadable:
        warnings.append(f"{group.unreadable} stored window(s) could not be read and were left out")
    return ModelStatus(
        model_name=entry.manifest.name,
        model_version=entry.manifest.version,
        n_records=sketch.n,
        n_windows=group.n_windows,
        n_devices=len(group.devices),
        first_window=min(group.starts) if group.starts else None,
        last_window_end=max(group.starts) + group.last_span if group.starts else None,
        has_reference=True,
        verdict=report.verdict,
        reasons=list(report.reasons),
        warnings=warnings,
        drift=report,
        accuracy=accuracy,
        data_quality=quality,
        unreadable_windows=group.unreadable,
    )


def _no_reference_status(model_name: str, version: str, n_records: int, n_windows: int, n_devices: int) -> ModelStatus:
    why = (
        f"no verified reference bundle for {model_name} {version} in the catalog (monitoring_bundles): "
        "its records are stored and counted but cannot be binned, so there is no drift, accuracy or "
        "data-quality verdict"
    )
    return ModelStatus(
        model_name=model_name,
        model_version=version,
        n_records=n_records,
        n_windows=n_windows,
        n_devices=n_devices,
        first_window=None,
        last_window_end=None,
        has_reference=False,
        verdict="no_reference",
        reasons=[],
        warnings=[why],
    )


@dataclass
class _Group:
    """The windows of one model version (and one subject: device, window, or the whole scope) being merged."""

    sketches: list[WindowSketch] = field(default_factory=list)
    devices: set[str] = field(default_factory=set)
    starts: set[float] = field(default_factory=set)
    n_windows: int = 0
    unreadable: int = 0
    last_span: float = 0.0

    def sketch(self, entry: CatalogEntry) -> WindowSketch:
        return merge_all(self.sketches, entry.bins)

    def effective(self, entry: CatalogEntry) -> EffectiveSizes:
        """Effective sample sizes of the merged windows: each stored (device, window) sketch's own, added."""
        return total_effective(self.sketches, entry.bins.n_features, entry.bins.decorrelation_s)


def _overall(models: list[ModelStatus]) -> tuple[Verdict, list[str], list[str]]:
    reasons: list[str] = []
    warnings: list[str] = []
    for m in models:
        label = f"{m.model_name} {m.model_version}"
        reasons.extend(f"{label}: {r}" for r in m.reasons)
        warnings.extend(f"{label}: {w}" for w in m.warnings)
    verdicts = {m.verdict for m in models}
    if "drift" in verdicts:
        verdict: Verdict = "drift"
    elif "ok" in verdicts:
        verdict = "ok"
    elif "not_enough_data" in verdicts or not models:
        verdict = "not_enough_data"
    else:
        verdict = "no_reference"
    return verdict, reasons, warnings


# --------------------------------------------------------------------------------- service


ModelKey = tuple[str, str]
SubjectKey = tuple[str, str, Any]  # (model name, version, subject)


class MonitoringService:
    """Reads the windows of a scope and answers drift, accuracy and data-quality questions about it.

    Thread-safe: it keeps no per-call state (the engine pools connections; the catalog is read-only).
    """

    def __init__(self, engine: Engine, catalog: ReferenceCatalog, settings: Settings) -> None:
        self.engine = engine
        self.catalog = catalog
        self.settings = settings
        self.window_s = float(settings.monitoring_window_s)
        self.thresholds = StatusThresholds.from_settings(settings)

    # ---------------------------------------------------------------------------- public API

    def status(self, scope: Scope, thresholds: StatusThresholds | DriftThresholds | None = None) -> ScopeStatus:
        """The status of ``scope``: its windows merged per model version and judged against the reference."""
        thr = self._thresholds(thresholds)
        with self.engine.connect() as conn:
            devices = resolve_devices(conn, device_ids=scope.device_ids, group=scope.group)
            groups = self._collect(conn, scope, devices, lambda device, start: None)
            unreferenced = self._unreferenced(conn, scope, devices)
            labels = self._labels(conn, scope, devices) if groups else {}
        models = self._judge({k[:2]: g for k, g in groups.items()}, thr, labels)
        models.extend(_unreferenced_statuses(unreferenced))
        return self._scope_status(scope, devices, models, thr)

    def evaluate_devices(
        self, scope: Scope, thresholds: StatusThresholds | DriftThresholds | None = None
    ) -> dict[str, ScopeStatus]:
        """One status per device of ``scope``, drift decided with Benjamini-Hochberg across the devices jointly.

        Devices of the scope without any window in the range are left out. Each device's status
        has ``scope.device_ids == (device,)``.
        """
        thr = self._thresholds(thresholds)
        with self.engine.connect() as conn:
            devices = resolve_devices(conn, device_ids=scope.device_ids, group=scope.group)
            groups = self._collect(conn, scope, devices, lambda device, start: device)
            unreferenced = self._unreferenced(conn, scope, devices)
        per_device: dict[str, list[ModelStatus]] = {}
        by_model: dict[ModelKey, dict[str, _Group]] = {}
        for (name, version, device), g in groups.items():
            by_model.setdefault((name, version), {})[device] = g
        for key, subjects in by_model.items():
            for device, status in self._judge_family(key, subjects, thr).items():
                per_device.setdefault(device, []).append(status)
        for (name, version, device), n in sorted(unreferenced.items()):
            per_device.setdefault(device, []).append(_no_reference_status(name, version, n, 0, 1))
        out: dict[str, ScopeStatus] = {}
        for device in sorted(per_device):
            sub = Scope(
                device_ids=(device,),
                group=scope.group,
                model_name=scope.model_name,
                model_version=scope.model_version,
                role=scope.role,
                since=scope.since,
                until=scope.until,
            )
            out[device] = self._scope_status(sub, [device], per_device[device], thr)
        return out

    def evaluate_windows(
        self, scope: Scope, thresholds: StatusThresholds | DriftThresholds | None = None
    ) -> dict[float, ScopeStatus]:
        """One status per window start of ``scope`` (each window judged on its own, scope-wide)."""
        thr = self._thresholds(thresholds)
        with self.engine.connect() as conn:
            devices = resolve_devices(conn, device_ids=scope.device_ids, group=scope.group)
            groups = self._collect(conn, scope, devices, lambda device, start: start)
        per_window: dict[float, dict[ModelKey, _Group]] = {}
        for (name, version, start), g in groups.items():
            per_window.setdefault(float(start), {})[(name, version)] = g
        out: dict[float, ScopeStatus] = {}
        for start in sorted(per_window):
            sub = Scope(
                device_ids=scope.device_ids,
                group=scope.group,
                model_name=scope.model_name,
                model_version=scope.model_version,
                role=scope.role,
                since=start,
                until=start + self.window_s,
            )
            out[start] = self._scope_status(sub, devices, self._judge(per_window[start], thr), thr)
        return out

    def window_starts(self, scope: Scope) -> list[float]:
        """Starts of the windows (of the configured length) holding records of ``scope``, ascending."""
        c = WINDOW_TABLE.c
        with self.engine.connect() as conn:
            devices = resolve_devices(conn, device_ids=scope.device_ids, group=scope.group)
            if devices is not None and not devices:
                return []
            starts: set[float] = set()
            for chunk in _chunks(devices):
                stmt = sa.select(c.window_start).distinct().where(*self._filters(scope, chunk))
                starts.update(float(r[0]) for r in conn.execute(stmt))
        return sorted(starts)

    # ----------------------------------------------------------------------------- internals

    def _thresholds(self, thresholds: StatusThresholds | DriftThresholds | None) -> StatusThresholds:
        if thresholds is None:
            return self.thresholds
        if isinstance(thresholds, DriftThresholds):
            return StatusThresholds(
                drift=thresholds,
                accuracy_level=self.thresholds.accuracy_level,
                accuracy_min_records=self.thresholds.accuracy_min_records,
                region_alpha=self.thresholds.region_alpha,
                region_min_rate_ratio=self.thresholds.region_min_rate_ratio,
                quality=self.thresholds.quality,
            )
        return thresholds

    def _filters(self, scope: Scope, devices: Sequence[str] | None) -> list[Any]:
        c = WINDOW_TABLE.c
        where: list[Any] = [c.window_s == self.window_s, c.n > 0]
        if devices is not None:
            where.append(c.device_id.in_(list(devices)))
        if scope.model_name is not None:
            where.append(c.model_name == scope.model_name)
        if scope.model_version is not None:
            where.append(c.model_version == scope.model_version)
        if scope.role is not None:
            where.append(c.role == scope.role)
        if scope.since is not None:
            where.append(c.window_start >= scope.since)
        if scope.until is not None:
            where.append(c.window_start < scope.until)
        return where

    def _collect(
        self,
        conn: Connection,
        scope: Scope,
        devices: list[str] | None,
        subject: Callable[[str, float], Any],
    ) -> dict[SubjectKey, _Group]:
        """The readable windows of ``scope`` with a reference, grouped by (model name, version, subject)."""
        groups: dict[SubjectKey, _Group] = {}
        if devices is not None and not devices:
            return groups
        c = WINDOW_TABLE.c
        for chunk in _chunks(devices):
            stmt = sa.select(c.device_id, c.model_name, c.model_version, c.window_start, c.window_s, c.sketch).where(
                *self._filters(scope, chunk)
            )
            for device, name, version, start, span, blob in conn.execute(stmt):
                entry = self.catalog.get(name, version)
                if entry is None:
                    continue  # counted by _unreferenced
                key = (str(name), str(version), subject(str(device), float(start)))
                g = groups.setdefault(key, _Group())
                g.n_windows += 1
                g.devices.add(str(device))
                g.starts.add(float(start))
                g.last_span = float(span)
                try:
                    s = WindowSketch.from_bytes(bytes(blob))
                    if s.feature_hist.shape != (entry.bins.n_features, entry.bins.n_bins) or (
                        s.class_counts.shape != (entry.bins.n_classes,)
                    ):
                        raise SketchError("shape_mismatch", "sketch made with other reference bins")
                except SketchError as exc:
                    log.warning("monitoring: window %s %s %s %s unreadable: %s", device, name, version, start, exc)
                    g.unreadable += 1
                    continue
                g.sketches.append(s)
        return groups

    def _judge(
        self,
        groups: dict[ModelKey, _Group],
        thr: StatusThresholds,
        labels: dict[ModelKey, performance.GapStats] | None = None,
    ) -> list[ModelStatus]:
        out: list[ModelStatus] = []
        for key in sorted(groups):
            scope_labels = None if labels is None else {"scope": labels.get(key)}
            out.extend(self._judge_family(key, {"scope": groups[key]}, thr, scope_labels).values())
        return out

    def _judge_family(
        self,
        key: ModelKey,
        subjects: dict[Any, _Group],
        thr: StatusThresholds,
        labels: dict[Any, performance.GapStats | None] | None = None,
    ) -> dict[Any, ModelStatus]:
        entry = self.catalog.get(*key)
        assert entry is not None  # _collect keeps referenced versions only
        counts = {s: window_counts(entry.bins, g.sketch(entry), g.effective(entry)) for s, g in subjects.items()}
        reports = evaluate_family(entry.reference, counts, thr.drift)
        return {
            s: _model_status(entry, g, reports[s], thr, None if labels is None else labels.get(s))
            for s, g in subjects.items()
        }

    def _labels(
        self, conn: Connection, scope: Scope, devices: list[str] | None
    ) -> dict[ModelKey, performance.GapStats]:
        """Late and inline labels of the records of the scope's windows, per model version."""
        return label_stats(
            conn,
            device_ids=devices,
            model_name=scope.model_name,
            model_version=scope.model_version,
            role=scope.role,
            since=None if scope.since is None else _boundary(scope.since, self.window_s),
            until=None if scope.until is None else _boundary(scope.until, self.window_s),
        )

    def _unreferenced(
        self, conn: Connection, scope: Scope, devices: list[str] | None
    ) -> dict[tuple[str, str, str], int]:
        """Records of versions without a reference in the scope per (model name, version, device), from ``inference``.

        Ingest cannot sketch them, so they are counted from the records: those whose
        ``ts_corrected`` falls in the windows starting in ``[since, until)``.
        """
        counts: dict[tuple[str, str, str], int] = {}
        if devices is not None and not devices:
            return counts
        c = INFERENCE_TABLE.c
        known = self.catalog.keys()
        where: list[Any] = []
        if known:
            where.append(sa.not_(sa.tuple_(c.model_name, c.model_version).in_(known)))
        if scope.model_name is not None:
            where.append(c.model_name == scope.model_name)
        if scope.model_version is not None:
            where.append(c.model_version == scope.model_version)
        if scope.role is not None:
            where.append(c.role == scope.role)
        if scope.since is not None:
            where.append(c.ts_corrected >= _boundary(scope.since, self.window_s))
        if scope.until is not None:
            where.append(c.ts_corrected < _boundary(scope.until, self.window_s))
        for chunk in _chunks(devices):
            w = list(where)
            if chunk is not None:
                w.append(c.device_id.in_(chunk))
            stmt = (
                sa.select(c.model_name, c.model_version, c.device_id, sa.func.count())
                .where(*w)
                .group_by(c.model_name, c.model_version, c.device_id)
            )
            for name, version, device, n in conn.execute(stmt):
                counts[(str(name), str(version), str(device))] = int(n)
        return counts

    def _scope_status(
        self, scope: Scope, devices: list[str] | None, models: list[ModelStatus], thr: StatusThresholds
    ) -> ScopeStatus:
        verdict, reasons, warnings = _overall(models)
        return ScopeStatus(
            scope=scope,
            devices=devices,
            window_s=self.window_s,
            verdict=verdict,
            reasons=reasons,
            warnings=warnings,
            n_records=sum(m.n_records for m in models),
            n_windows=sum(m.n_windows for m in models),
            models=models,
            thresholds=thr,
        )


def _boundary(t: float, window_s: float) -> float:
    """The first window start at or after ``t``.

    Windows starting in ``[a, b)`` hold the records of ``[_boundary(a), _boundary(b))``.
    """
    return math.ceil(t / window_s) * window_s


def _unreferenced_statuses(counts: dict[tuple[str, str, str], int]) -> list[ModelStatus]:
    merged: dict[ModelKey, list[int]] = {}
    for (name, version, _device), n in counts.items():
        acc = merged.setdefault((name, version), [0, 0])
        acc[0] += n
        acc[1] += 1
    return [_no_reference_status(k[0], k[1], v[0], 0, v[1]) for k, v in sorted(merged.items())]


def _chunks(devices: list[str] | None) -> Iterable[list[str] | None]:
    if devices is None:
        yield None
        return
    for lo in range(0, len(devices), IN_CHUNK):
        yield devices[lo : lo + IN_CHUNK]
