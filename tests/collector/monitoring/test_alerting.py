"""The alert lifecycle: hysteresis, de-duplication, states and the bad/good/unknown verdicts, exactly."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pytest

from collector.monitoring.alerting import (
    TRANSITIONS,
    AlertPolicy,
    Hysteresis,
    InvalidTransition,
    Observation,
    OpenAlert,
    Step,
    Streaks,
    advance,
    condition_key,
    jsonable,
    observe_accuracy,
    observe_drift,
    observe_quality,
    observe_region,
    observe_sequential,
    reference_accuracy,
    transition,
    worse,
)
from collector.monitoring.drift import DriftThresholds, ReferenceCounts, ScoreHistogram, WindowCounts, evaluate_windows
from collector.monitoring.performance import AccuracyEstimate, RegionVerdict

BAD = Observation("bad")
GOOD = Observation("good")
UNKNOWN = Observation("unknown")
CRITICAL = Observation("bad", "critical")


def run(verdicts: Sequence[Observation], hysteresis: Hysteresis | None = None) -> list[tuple[str, int, int]]:
    """Feed one observation per 10 s window, keeping the open alert as a caller would: (action, bad, good) per step."""
    streaks = Streaks()
    alert: OpenAlert | None = None
    out = []
    for i, obs in enumerate(verdicts):
        step = advance(streaks, alert, i * 10.0, obs, hysteresis or Hysteresis())
        if step.action == "fire":
            assert step.severity is not None
            alert = OpenAlert("firing", step.severity)
        elif step.action in ("hold", "escalate"):
            assert alert is not None and step.severity is not None
            alert = OpenAlert(alert.state, step.severity)
        elif step.action == "resolve":
            alert = None
        streaks = step.streaks
        assert streaks.last_window == i * 10.0
        out.append((step.action, streaks.bad, streaks.good))
    return out


def test_fires_after_exactly_two_bad_windows_not_one() -> None:
    assert run([BAD]) == [("none", 1, 0)]
    assert run([BAD, BAD]) == [("none", 1, 0), ("fire", 2, 0)]
    # A good window in between restarts the count.
    assert [a for a, _, _ in run([BAD, GOOD, BAD, GOOD])] == ["none"] * 4


def test_resolves_after_exactly_three_good_windows() -> None:
    steps = run([BAD, BAD, GOOD, GOOD, GOOD])
    assert steps == [("none", 1, 0), ("fire", 2, 0), ("none", 0, 1), ("none", 0, 2), ("resolve", 0, 3)]
    # Bad in the middle of the good run: the alert stays open and the good count restarts.
    steps = run([BAD, BAD, GOOD, GOOD, BAD, GOOD, GOOD, GOOD])
    assert [a for a, _, _ in steps] == ["none", "fire", "none", "none", "hold", "none", "none", "resolve"]


def test_one_open_alert_while_the_condition_persists() -> None:
    actions = [a for a, _, _ in run([BAD] * 10)]
    assert actions == ["none", "fire"] + ["hold"] * 8


def test_bad_again_after_resolution_opens_a_new_alert() -> None:
    actions = [a for a, _, _ in run([BAD, BAD, GOOD, GOOD, GOOD, BAD, BAD])]
    assert actions == ["none", "fire", "none", "none", "resolve", "none", "fire"]


def test_unknown_windows_neither_advance_nor_reset_streaks() -> None:
    steps = run([BAD, UNKNOWN, UNKNOWN, BAD])
    assert steps == [("none", 1, 0), ("none", 1, 0), ("none", 1, 0), ("fire", 2, 0)]
    steps = run([BAD, BAD, GOOD, UNKNOWN, GOOD, UNKNOWN, GOOD])
    assert [a for a, _, _ in steps] == ["none", "fire", "none", "none", "none", "none", "resolve"]
    # Silence never resolves.
    assert [a for a, _, _ in run([BAD, BAD] + [UNKNOWN] * 20)][-1] == "none"


def test_custom_hysteresis() -> None:
    assert [a for a, _, _ in run([BAD, GOOD], Hysteresis(1, 1))] == ["fire", "resolve"]
    assert [a for a, _, _ in run([BAD] * 3, Hysteresis(4, 1))] == ["none"] * 3
    with pytest.raises(ValueError):
        Hysteresis(0, 3)


def test_severity_escalates_while_open_and_never_falls() -> None:
    actions = [a for a, _, _ in run([BAD, BAD, CRITICAL, BAD, CRITICAL])]
    assert actions == ["none", "fire", "escalate", "hold", "hold"]
    step = advance(Streaks(1, 0, 0.0), OpenAlert("acknowledged", "critical"), 10.0, BAD)
    assert step == Step(Streaks(2, 0, 10.0), "hold", "critical")
    step = advance(Streaks(1, 0, 0.0), None, 10.0, CRITICAL)
    assert (step.action, step.severity) == ("fire", "critical")
    assert worse("warning", "critical") == worse("critical", "warning") == "critical"


def test_acknowledged_alert_resolves_like_a_firing_one() -> None:
    streaks = Streaks(0, 2, 20.0)
    step = advance(streaks, OpenAlert("acknowledged", "warning"), 30.0, GOOD)
    assert step == Step(Streaks(0, 3, 30.0), "resolve")


def test_a_window_already_evaluated_is_skipped() -> None:
    streaks = Streaks(1, 0, 50.0)
    for start in (50.0, 40.0):
        assert advance(streaks, None, start, BAD) == Step(streaks, "skip")
    with pytest.raises(ValueError):
        advance(streaks, None, math.nan, BAD)
    with pytest.raises(ValueError):
        advance(Streaks(), None, 0.0, Observation("maybe"))  # type: ignore[arg-type]


def test_transition_table() -> None:
    assert transition(None, "fire") == "firing"
    assert transition("firing", "acknowledge") == "acknowledged"
    assert transition("firing", "resolve") == transition("acknowledged", "resolve") == "resolved"
    for state, event in [("resolved", "acknowledge"), ("resolved", "resolve"), ("acknowledged", "acknowledge")]:
        with pytest.raises(InvalidTransition, match=f"cannot {event}"):
            transition(state, event)  # type: ignore[arg-type]
    assert len(TRANSITIONS) == 4


def test_condition_key() -> None:
    assert condition_key("input_drift", "device", "veh-1", "cabin", "1.0.0") == "input_drift/device/veh-1/cabin/1.0.0"


# --------------------------------------------------------------------------------- observations


def reference(n_features: int = 3) -> ReferenceCounts:
    edges = np.linspace(0.0, 1.0, 11)
    flat = np.full(10, 100, dtype=np.int64)
    return ReferenceCounts(
        feature_names=[f"f{i}" for i in range(n_features)],
        feature_edges=[edges] * n_features,
        feature_counts=[flat] * n_features,
        class_priors=np.array([0.5, 0.5]),
        confidence=ScoreHistogram(edges, flat),
        pca_error=ScoreHistogram(edges, flat),
        coactivation=ScoreHistogram(edges, flat),
    )


def test_observe_drift_verdicts() -> None:
    ref = reference()
    same = np.full(10, 50, dtype=np.int64)
    shifted = np.array([0, 0, 0, 0, 0, 0, 0, 0, 250, 250], dtype=np.int64)
    report = evaluate_windows(
        ref,
        WindowCounts(
            feature_counts=[shifted, shifted, same],
            class_counts=[250, 250],
            confidence_counts=same,
            pca_error_counts=shifted,
            coactivation_counts=None,
        ),
    )
    obs = observe_drift(report)
    drift = obs["input_drift"]
    # Two of three features drift with a major PSI: share 2/3 >= 0.5, so critical.
    assert (drift.verdict, drift.severity) == ("bad", "critical")
    assert drift.details["n_drifting"] == 2 and [f["name"] for f in drift.details["drifting_features"]] == ["f0", "f1"]
    assert drift.message.startswith("2 of 3 input features drift: f0 (PSI ")
    assert obs["class_mix"].verdict == "good" and obs["confidence_shift"].verdict == "good"
    assert obs["pca_error"].verdict == "bad" and obs["pca_error"].details["q_value"] < 0.05
    assert obs["coactivation"].verdict == "unknown"

    # One drifting feature out of three (share 0.33 >= 0.25): bad but only a warning.
    report = evaluate_windows(ref, WindowCounts(feature_counts=[shifted, same, same]))
    assert (observe_drift(report)["input_drift"].verdict, observe_drift(report)["input_drift"].severity) == (
        "bad",
        "warning",
    )
    # Nothing shifted: good; too few records: unknown.
    assert observe_drift(evaluate_windows(ref, WindowCounts([same] * 3)))["input_drift"].verdict == "good"
    small = np.full(10, 5, dtype=np.int64)
    assert observe_drift(evaluate_windows(ref, WindowCounts([small] * 3)))["input_drift"].verdict == "unknown"
    # A stricter report threshold is honoured: one feature in five is below drift_share 0.25 with a minor PSI.
    ref5 = reference(5)
    # PSI 0.135, 0.117 beyond the 0.018 that sampling alone gives: minor.
    mild = np.array([40, 40, 40, 40, 40, 40, 40, 40, 60, 110], dtype=np.int64) * 2
    rep = evaluate_windows(ref5, WindowCounts([mild] + [same * 2] * 4), DriftThresholds(psi_major=10.0))
    assert rep.n_drifting == 1 and observe_drift(rep)["input_drift"].verdict == "good"


def estimate(value: float | None, low: float | None, high: float | None, n: int = 1000) -> AccuracyEstimate:
    return AccuracyEstimate(n, value, low, high, "normal" if low is not None else "not_enough_data", 0.95)


def test_observe_accuracy() -> None:
    policy = AlertPolicy(min_expected_accuracy=0.6, accuracy_margin=0.05)
    assert observe_accuracy(estimate(0.95, 0.93, 0.97), 0.96, policy).verdict == "good"
    # Upper bound 0.90 < 0.96 - 0.05: confidently worse than the reference.
    low = observe_accuracy(estimate(0.88, 0.86, 0.90), 0.96, policy)
    assert (low.verdict, low.severity) == ("bad", "warning")
    assert low.details["reasons"] == ["upper bound 0.900 < reference 0.960 - margin 0.050"]
    # The same without a reference accuracy: fine (above the floor).
    assert observe_accuracy(estimate(0.88, 0.86, 0.90), None, policy).verdict == "good"
    # Below the floor, the interval straddling it: warning; the whole interval below: critical.
    assert observe_accuracy(estimate(0.58, 0.55, 0.62), None, policy).severity == "warning"
    crit = observe_accuracy(estimate(0.50, 0.47, 0.53), 0.96, policy)
    assert (crit.verdict, crit.severity, len(crit.details["reasons"])) == ("bad", "critical", 2)
    assert observe_accuracy(estimate(0.5, None, None, n=10), 0.96, policy).verdict == "unknown"


def test_observe_region() -> None:
    ok = RegionVerdict("reliable", True, None, 0.01, 0.5, 0.01, 0.6)
    bad = RegionVerdict(
        "unreliable", False, "PCA reconstruction error above reference p99 for 6.0%", 0.06, 1e-9, 0.01, 0.6
    )
    none = RegionVerdict("not_enough_data", False, "fewer than 30 records", None, None, None, None)
    assert [observe_region(r).verdict for r in (ok, bad, none)] == ["good", "bad", "unknown"]
    assert (
        observe_region(bad).message
        == "accuracy estimate unreliable: PCA reconstruction error above reference p99 for 6.0%"
    )


@dataclass(frozen=True)
class Check:
    """Shaped like the monitoring service's decided data-quality check."""

    name: str
    value: float | None
    threshold: float
    verdict: str
    features: list[str] = field(default_factory=list)
    detail: str = ""


def test_observe_quality() -> None:
    checks = [
        Check("missing_rate", 0.2, 0.05, "bad", ["temp", "co2"], "share of missing values above 0.05"),
        Check("out_of_range_rate", 0.0, 0.01, "ok"),
        Check("stuck_records", None, 0, "not_enough_data"),
        Check("clock_skew_s", math.inf, 30.0, "bad", [], "largest |device clock - collector estimate| (s)"),
        Check("seq_gap_rate", 0.001, 0.01, "ok"),
        Check("delivery_delay_s", 5000.0, 900.0, "bad"),
    ]
    obs = observe_quality(checks)
    assert {k: o.verdict for k, o in obs.items()} == {
        "missing_values": "bad",
        "out_of_range": "good",
        "stuck_sensor": "unknown",
        "clock_skew": "bad",
        "seq_gap": "good",
    }
    assert obs["missing_values"].message == "missing_rate 0.2 > 0.05 on temp, co2 (share of missing values above 0.05)"
    assert obs["missing_values"].details["features"] == ["temp", "co2"]
    # Non-finite values become null: the details go into a JSON column.
    assert obs["clock_skew"].details["value"] is None


def test_reference_accuracy_and_jsonable() -> None:
    assert reference_accuracy({"test_accuracy": 0.96, "validation_accuracy": 0.9}) == 0.96
    assert reference_accuracy({"validation_accuracy": 0.9}) == 0.9
    assert reference_accuracy({"test_accuracy": math.nan}) is None
    assert reference_accuracy({}) is None
    assert jsonable({"a": (1, np.float32(0.5), math.inf), 2: np.arange(2)}) == {"a": [1, 0.5, None], "2": [0, 1]}
    assert Observation("bad", details={"x": math.nan}).details == {"x": None}


def test_observe_sequential() -> None:
    alarm = {"signal": "calibrated", "detector": "page_hinkley", "seq": 17}
    obs = observe_sequential([alarm, alarm], has_data=True)
    assert (obs.verdict, obs.details["count"]) == ("bad", 2)
    assert obs.message == "page_hinkley alarm on calibrated (2 in window)"
    assert observe_sequential([], has_data=True).verdict == "good"
    assert observe_sequential([], has_data=False).verdict == "unknown"


def test_policy_validation() -> None:
    for bad in ({"min_expected_accuracy": 1.5}, {"accuracy_margin": -0.1}, {"critical_drift_share": 2.0}):
        with pytest.raises(ValueError):
            AlertPolicy(**bad)
