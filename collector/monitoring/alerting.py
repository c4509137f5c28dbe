"""The life of an alert: one verdict per condition and closed window, hysteresis, de-duplication, states.

Pure functions and frozen dataclasses: no I/O, no clock, no database. :mod:`collector.alerts` reads the
statistics of each closed window, turns them into :class:`Observation` objects with the ``observe_*``
functions here, and applies :func:`advance` to each condition's persisted :class:`Streaks`.

A *condition* is one kind of trouble (``input_drift``, ``estimated_accuracy``, ``stuck_sensor`` ...) on one
subject (a device and model version, or a model version fleet-wide); its :func:`condition_key` identifies it.
Once per closed window each condition is observed as

* ``bad``: the trouble is there (a drift verdict, an accuracy below its floor, a sequential alarm...);
* ``good``: it was tested and is not there;
* ``unknown``: it could not be tested ("not enough data", a device that sent nothing). An unknown window is
  neither: it leaves both streaks as they were, so a device that is quiet for a while neither fires nor
  resolves on silence, and "consecutive" means consecutive among the windows that could be judged.

Hysteresis: a condition fires after ``fire_windows`` consecutive bad windows (default 2: one unlucky window
never pages anyone) and its alert resolves after ``resolve_windows`` consecutive good ones (default 3: a
condition hovering at its threshold does not flap). At most one alert per key is open (firing or
acknowledged): that is the de-duplication, a persisting condition refreshes its open alert instead of
opening another. A resolved alert stays resolved; if the key goes bad again, a new alert opens.

The alert's states form a small transition table (:data:`TRANSITIONS`)::

    (none) --fire--> firing --acknowledge--> acknowledged
                       |                          |
                       +--------resolve-----------+--> resolved

An operator acknowledges ("I am on it"); only the condition resolves. Severity (``warning`` <
``critical``) may rise while an alert is open (:data:`Action` ``escalate``, which notifies again) and never
falls: an alert keeps the worst severity it reached.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal, Protocol

from collector.monitoring.drift import DriftReport, TestResult
from collector.monitoring.performance import AccuracyEstimate, RegionVerdict

Verdict = Literal["bad", "good", "unknown"]
Severity = Literal["warning", "critical"]
AlertState = Literal["firing", "acknowledged", "resolved"]
OpenState = Literal["firing", "acknowledged"]
Event = Literal["fire", "acknowledge", "resolve"]
Action = Literal["skip", "none", "fire", "hold", "escalate", "resolve"]
"""What :func:`advance` asks the caller to do with the key's alert.

``skip``: the window was already evaluated for this key (a restart, or a second replica): change nothing.
``none``: no alert to open, refresh or close (the streaks may still have moved).
``fire``: open a new alert. ``hold``: the open alert's condition still holds (refresh its statistics).
``escalate``: as ``hold``, and its severity rose (notify). ``resolve``: close the open alert.
"""

SEVERITY_RANK: Final[Mapping[str, int]] = {"warning": 0, "critical": 1}

TRANSITIONS: Final[Mapping[tuple[AlertState | None, Event], AlertState]] = {
    (None, "fire"): "firing",
    ("firing", "acknowledge"): "acknowledged",
    ("firing", "resolve"): "resolved",
    ("acknowledged", "resolve"): "resolved",
}
"""Every allowed state change of an alert; anything else is an :class:`InvalidTransition`."""

KINDS: Final = (
    "input_drift",
    "class_mix",
    "confidence_shift",
    "pca_error",
    "coactivation",
    "estimated_accuracy",
    "estimate_unreliable",
    "missing_values",
    "out_of_range",
    "stuck_sensor",
    "clock_skew",
    "seq_gap",
    "sensor_flags",
    "invalid_predictions",
)
"""Condition kinds evaluated from window statistics; sequential alarms add ``sequential_<signal>``."""

DRIFT_SIGNALS: Final[Mapping[str, str]] = {
    "class_mix": "class_mix",
    "confidence_shift": "confidence",
    "pca_error": "pca_error",
    "coactivation": "coactivation",
}
"""Alert kind -> attribute of :class:`~collector.monitoring.drift.DriftReport` holding its test."""


class InvalidTransition(ValueError):
    """An alert state change the lifecycle does not allow (e.g. acknowledging a resolved alert)."""


def transition(state: AlertState | None, event: Event) -> AlertState:
    """The state after ``event`` happens to an alert in ``state`` (``None``: no alert yet)."""
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise InvalidTransition(f"cannot {event} an alert that is {state or 'not open'}") from None


def worse(a: Severity, b: Severity) -> Severity:
    """The more severe of two severities."""
    return a if SEVERITY_RANK[a] >= SEVERITY_RANK[b] else b


def condition_key(kind: str, scope: str, subject: str, model_name: str, model_version: str) -> str:
    """The identity of one condition: ``kind/scope/subject/model_name/model_version``.

    Device ids, model names and versions cannot contain ``/`` (shared.topics, shared.bundle), so the key is
    unambiguous and readable in logs and the API.
    """
    return "/".join((kind, scope, subject, model_name, model_version))


# ------------------------------------------------------------------------------------ hysteresis


@dataclass(frozen=True)
class Hysteresis:
    """How many consecutive bad windows fire an alert and how many good ones resolve it."""

    fire_windows: int = 2
    resolve_windows: int = 3

    def __post_init__(self) -> None:
        if self.fire_windows < 1 or self.resolve_windows < 1:
            raise ValueError("fire_windows and resolve_windows must be >= 1")


@dataclass(frozen=True)
class Streaks:
    """Persisted hysteresis state of one condition key (the ``alert_condition`` row)."""

    bad: int = 0
    good: int = 0
    last_window: float | None = None
    """Start of the last window evaluated for this key; a window at or before it is skipped."""


@dataclass(frozen=True)
class Observation:
    """What one condition showed in one closed window, with what made it so."""

    verdict: Verdict
    severity: Severity = "warning"
    message: str = ""
    details: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Details are stored in a JSON column and served by the API: make them JSON-ready once, here.
        object.__setattr__(self, "details", jsonable(self.details))


@dataclass(frozen=True)
class OpenAlert:
    """The key's open alert, as far as the lifecycle needs it."""

    state: OpenState
    severity: Severity


@dataclass(frozen=True)
class Step:
    """Outcome of :func:`advance`: the new streaks, the action for the alert and the severity it should carry."""

    streaks: Streaks
    action: Action
    severity: Severity | None = None
    """Severity of the alert after the step (``fire``, ``hold``, ``escalate``); ``None`` otherwise."""


def advance(
    streaks: Streaks,
    alert: OpenAlert | None,
    window_start: float,
    observation: Observation,
    hysteresis: Hysteresis = Hysteresis(),
) -> Step:
    """Apply one window's observation of a condition to its streaks and its open alert (if any).

    Windows must come in order: one at or before ``streaks.last_window`` is ``skip`` (already counted),
    which is what makes re-evaluation after a restart harmless.

    Examples
    --------
    >>> bad = Observation("bad")
    >>> s1 = advance(Streaks(), None, 0.0, bad)
    >>> s1.action, s1.streaks.bad
    ('none', 1)
    >>> s2 = advance(s1.streaks, None, 10.0, bad)
    >>> s2.action, s2.severity
    ('fire', 'warning')
    >>> advance(s2.streaks, OpenAlert("firing", "warning"), 10.0, bad).action
    'skip'
    """
    if not math.isfinite(window_start):
        raise ValueError(f"window start must be finite, got {window_start!r}")
    if streaks.last_window is not None and window_start <= streaks.last_window:
        return Step(streaks, "skip")
    verdict = observation.verdict
    if verdict == "unknown":
        return Step(Streaks(streaks.bad, streaks.good, window_start), "none")
    if verdict == "good":
        after = Streaks(0, streaks.good + 1, window_start)
        if alert is not None and after.good >= hysteresis.resolve_windows:
            transition(alert.state, "resolve")
            return Step(after, "resolve")
        return Step(after, "none")
    if verdict != "bad":
        raise ValueError(f"verdict must be bad, good or unknown, got {verdict!r}")
    after = Streaks(streaks.bad + 1, 0, window_start)
    if alert is None:
        if after.bad >= hysteresis.fire_windows:
            transition(None, "fire")
            return Step(after, "fire", observation.severity)
        return Step(after, "none")
    severity = worse(alert.severity, observation.severity)
    return Step(after, "escalate" if severity != alert.severity else "hold", severity)


# ----------------------------------------------------------------------------- what is "bad"


@dataclass(frozen=True)
class AlertPolicy:
    """Thresholds the alert engine adds to the monitoring status (from the ``alert_*`` settings).

    Drift, region and data-quality verdicts come decided from the monitoring service, with its own
    ``monitoring_*`` thresholds; only what turns an accuracy *estimate* into a verdict, and how severe an
    input drift is, belong to the alerts.
    """

    min_expected_accuracy: float = 0.6
    """Expected (label-free) accuracy below this is bad; critical when the whole interval lies below it."""
    accuracy_margin: float = 0.05
    """Also bad: the interval's upper bound below the reference accuracy minus this margin."""
    critical_drift_share: float = 0.5
    """Input drift is critical when at least this share of the tested features drift."""

    def __post_init__(self) -> None:
        for name in ("min_expected_accuracy", "accuracy_margin", "critical_drift_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1]")


def reference_accuracy(metrics: Mapping[str, float]) -> float | None:
    """The accuracy a model had on its held-out data, from its bundle's training metrics (None if absent).

    The test set's accuracy is preferred (never used for fitting or calibration), then the validation set's.
    """
    for name in ("test_accuracy", "validation_accuracy"):
        value = metrics.get(name)
        if value is not None and math.isfinite(value) and 0.0 <= value <= 1.0:
            return float(value)
    return None


def jsonable(value: Any) -> Any:
    """``value`` with tuples as lists, numpy scalars as Python numbers and non-finite floats as None.

    Alert details go into a JSON column (PostgreSQL's JSONB refuses NaN) and out through the API.
    """
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return jsonable(value.tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return value


def observe_drift(report: DriftReport, policy: AlertPolicy = AlertPolicy()) -> dict[str, Observation]:
    """``input_drift`` and the four model-signal kinds of one window's drift report.

    ``input_drift`` looks at the features only: bad when the share of drifting features reaches the
    report's ``drift_share`` or a drifting feature has a major PSI (the report's own feature reasons);
    unknown when no feature could be tested. Each model signal is bad exactly when its test's verdict,
    decided with Benjamini-Hochberg over the report's family, is ``drift``.
    """
    out: dict[str, Observation] = {}
    thr = report.thresholds
    tested = [f for f in report.features if f.verdict != "not_enough_data"]
    drifting = [f for f in tested if f.verdict == "drift"]
    majors = [f.name for f in drifting if f.severity == "major"]
    top = sorted(drifting, key=lambda f: -f.psi)[:5]
    details: dict[str, Any] = {
        "n_tested": report.n_tested,
        "n_drifting": report.n_drifting,
        "drift_share": report.drift_share,
        "max_psi": report.max_psi,
        "thresholds": {
            "fdr_q": thr.fdr_q,
            "psi_minor": thr.psi_minor,
            "psi_major": thr.psi_major,
            "drift_share": thr.drift_share,
            "critical_drift_share": policy.critical_drift_share,
        },
        "drifting_features": [
            {"name": f.name, "psi": f.psi, "ks_d": f.ks.statistic, "q_value": f.ks.q_value, "severity": f.severity}
            for f in top
        ],
    }
    if not tested:
        out["input_drift"] = Observation("unknown", details=details, message="no feature had enough data")
    elif report.drift_share >= thr.drift_share or majors:
        severity: Severity = "critical" if report.drift_share >= policy.critical_drift_share else "warning"
        names = ", ".join(f"{f.name} (PSI {f.psi:.2f})" for f in top)
        message = f"{len(drifting)} of {len(tested)} input features drift: {names}"
        out["input_drift"] = Observation("bad", severity, message, {**details, "verdict": "drift"})
    else:
        out["input_drift"] = Observation(
            "good", message=f"{len(drifting)} of {len(tested)} features drift", details={**details, "verdict": "ok"}
        )
    for kind, attr in DRIFT_SIGNALS.items():
        test: TestResult = getattr(report, attr)
        d = test.to_dict()
        if test.verdict == "not_enough_data":
            out[kind] = Observation("unknown", message=f"{test.name}: not enough data", details=d)
        elif test.verdict == "drift":
            q = "-" if test.q_value is None else f"{test.q_value:.3g}"
            message = f"{test.name} shifted: statistic {test.statistic:.4g}, q = {q} <= {test.threshold}"
            out[kind] = Observation("bad", "warning", message, d)
        else:
            out[kind] = Observation("good", message=f"{test.name}: no shift", details=d)
    return out


def observe_accuracy(
    estimate: AccuracyEstimate, reference_accuracy: float | None, policy: AlertPolicy = AlertPolicy()
) -> Observation:
    """``estimated_accuracy``: is the label-free expected accuracy too low?

    Bad when the expected accuracy is below ``policy.min_expected_accuracy`` (an absolute floor), or when
    the upper bound of its interval is below ``reference_accuracy - policy.accuracy_margin`` (the model is
    confidently worse than it was on its held-out test set). Critical when the whole interval lies below the
    floor. Unknown without an interval (fewer records than the estimator's minimum).
    """
    details: dict[str, Any] = {
        "n": estimate.n,
        "expected_accuracy": estimate.estimate,
        "low": estimate.low,
        "high": estimate.high,
        "method": estimate.method,
        "level": estimate.level,
        "reference_accuracy": reference_accuracy,
        "thresholds": {
            "min_expected_accuracy": policy.min_expected_accuracy,
            "accuracy_margin": policy.accuracy_margin,
        },
    }
    if estimate.estimate is None or estimate.low is None or estimate.high is None:
        return Observation(
            "unknown", message=f"expected accuracy: not enough data ({estimate.n} records)", details=details
        )
    reasons: list[str] = []
    if estimate.estimate < policy.min_expected_accuracy:
        reasons.append(f"expected accuracy {estimate.estimate:.3f} < floor {policy.min_expected_accuracy:.3f}")
    if reference_accuracy is not None and estimate.high < reference_accuracy - policy.accuracy_margin:
        reasons.append(
            f"upper bound {estimate.high:.3f} < reference {reference_accuracy:.3f}"
            f" - margin {policy.accuracy_margin:.3f}"
        )
    interval = f"[{estimate.low:.3f}, {estimate.high:.3f}]"
    if not reasons:
        return Observation(
            "good",
            message=f"expected accuracy {estimate.estimate:.3f} {interval}",
            details={**details, "verdict": "ok"},
        )
    severity: Severity = "critical" if estimate.high < policy.min_expected_accuracy else "warning"
    message = f"expected accuracy {estimate.estimate:.3f} {interval}: " + "; ".join(reasons)
    return Observation("bad", severity, message, {**details, "verdict": "low", "reasons": reasons})


def observe_region(region: RegionVerdict) -> Observation:
    """``estimate_unreliable``: have the inputs left the region the calibration was fitted on?"""
    details: dict[str, Any] = {
        "verdict": region.verdict,
        "reason": region.reason,
        "pca_rate": region.pca_rate,
        "pca_pvalue": region.pca_pvalue,
        "coact_rate": region.coact_rate,
        "coact_pvalue": region.coact_pvalue,
    }
    if region.verdict == "not_enough_data":
        return Observation("unknown", message="reference region: not enough data", details=details)
    if region.verdict == "unreliable":
        return Observation("bad", "warning", f"accuracy estimate unreliable: {region.reason}", details)
    return Observation("good", message="inputs inside the reference region", details=details)


QUALITY_KINDS: Final[Mapping[str, str]] = {
    "missing_rate": "missing_values",
    "out_of_range_rate": "out_of_range",
    "stuck_records": "stuck_sensor",
    "clock_skew_s": "clock_skew",
    "seq_gap_rate": "seq_gap",
    "flagged_rate": "sensor_flags",
    "invalid_predictions": "invalid_predictions",
}
"""Data-quality check of the monitoring status -> alert kind. The mean delivery delay is not alerted on: a
window is evaluated ``alert_grace_s`` after it closes, so the records it holds then are on time by
construction (a device catching up after an outage delivers into windows already evaluated)."""


class QualityCheckLike(Protocol):
    """One decided data-quality check (:class:`collector.monitoring.service.QualityCheck`)."""

    @property
    def name(self) -> str: ...
    @property
    def value(self) -> float | None: ...
    @property
    def threshold(self) -> float: ...
    @property
    def verdict(self) -> str: ...
    @property
    def features(self) -> list[str]: ...
    @property
    def detail(self) -> str: ...


def observe_quality(checks: Sequence[QualityCheckLike]) -> dict[str, Observation]:
    """The data-quality kinds of one device window, from the monitoring status's decided checks.

    A check's ``bad`` is bad, ``ok`` good and ``not_enough_data`` unknown; checks without an alert kind in
    :data:`QUALITY_KINDS` are left out.
    """
    out: dict[str, Observation] = {}
    for check in checks:
        kind = QUALITY_KINDS.get(check.name)
        if kind is None:
            continue
        details = jsonable(
            {
                "check": check.name,
                "value": check.value,
                "threshold": check.threshold,
                "verdict": check.verdict,
                "features": list(check.features),
                "detail": check.detail,
            }
        )
        if check.verdict == "bad":
            where = f" on {', '.join(check.features[:5])}" if check.features else ""
            value = "-" if check.value is None else f"{check.value:.4g}"
            message = f"{check.name} {value} > {check.threshold:g}{where} ({check.detail})"
            out[kind] = Observation("bad", "warning", message, details)
        elif check.verdict == "ok":
            out[kind] = Observation("good", message=f"{check.name} within {check.threshold:g}", details=details)
        else:
            out[kind] = Observation("unknown", message=f"{check.name}: not enough data", details=details)
    return out


def observe_sequential(alarms: Sequence[Mapping[str, Any]], has_data: bool) -> Observation:
    """``sequential_<signal>``: bad for a window holding one of the signal's alarms, good for one with data and none."""
    if alarms:
        first = alarms[0]
        message = f"{first.get('detector', 'sequential')} alarm on {first.get('signal', '?')} ({len(alarms)} in window)"
        return Observation("bad", "warning", message, {"alarms": list(alarms)[:20], "count": len(alarms)})
    if has_data:
        return Observation("good", message="no sequential alarm", details={"count": 0})
    return Observation("unknown", message="no records in window")
