"""The alarm-storm experiment at small scale: simulated vehicles through ingest and the alert engine, in simulated time.

``benchmarks/alarm_storm.py`` runs 100 stationary vehicles plus an ageing group of 10 for 24
simulated hours; this runs the same code with the benchmark's rate (0.125 inferences/s) and window
(15 minutes) on 3 stationary vehicles and an ageing group of 5 for 3 simulated hours, ageing from
hour 1.5. What a window can show is bounded by the vehicle-seconds it holds (the drift tests cap
effective sample sizes by each vehicle's time span and the reference's decorrelation times), so the
group is half the benchmark's, not a handful of vehicles in short windows. At this scale the
issue's targets read: no false alert at all (0.69 stationary device-days allow 0.069), and an alert
on the ageing group by the end of the second window after the onset.
"""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa

from benchmarks.alarm_storm import GROUP, Ageing, Outcome, Plan, run, summarise
from collector.db.engine import make_engine
from collector.db.models import Inference
from collector.monitoring.service import resolve_devices

pytestmark = pytest.mark.slow

PLAN = Plan(
    devices=3,
    group_size=5,
    hours=3.0,
    rate_hz=0.125,
    window_s=900.0,
    # The benchmark's ageing: after one window gas -10.7 %, temperature +0.3 °C, microphone -1.1 dB.
    ageing=Ageing(onset_s=5400.0, acceleration=30.0),
    batch_s=300.0,
)


@pytest.fixture(scope="module")
def storm(tmp_path_factory: pytest.TempPathFactory) -> tuple[Outcome, dict[str, Any], str]:
    url = f"sqlite:///{tmp_path_factory.mktemp('alarm-storm') / 'fleet.db'}"
    outcome = run(PLAN, url, workers=1, diagnosis=True)
    return outcome, summarise(outcome), url


def test_every_record_is_stored_and_every_window_evaluated(storm: tuple[Outcome, dict[str, Any], str]) -> None:
    outcome, result, url = storm
    vehicles = PLAN.devices + PLAN.group_size
    assert outcome.records == vehicles * PLAN.records_per_device == 8 * 1350
    db = make_engine(url)
    try:
        with db.connect() as conn:
            stored = conn.execute(sa.select(sa.func.count()).select_from(Inference.__table__)).scalar_one()  # type: ignore[attr-defined]
            members = {g: resolve_devices(conn, group=g) for g in (GROUP, "stationary-0", "stationary-1")}
    finally:
        db.dispose()
    assert stored == outcome.records
    # Groups come from the tags each vehicle reports in its status, as in the field.
    assert members == {
        GROUP: ["age-000", "age-001", "age-002", "age-003", "age-004"],
        "stationary-0": ["sim-005", "sim-006", "sim-007"],
        "stationary-1": [],
    }
    assert outcome.windows_evaluated == round(PLAN.duration_s / PLAN.window_s) == 12
    # The stationary traffic is the reference's own scenario, in the reference's class proportions.
    assert result["truth_mix"]["normal"] == pytest.approx(0.5, abs=0.04)
    for label in ("vaping", "smoking", "impact", "window_open"):
        assert result["truth_mix"][label] == pytest.approx(0.125, abs=0.04)
    # The vehicles did age from the onset on, by the amount the plan says.
    assert result["drift"]["aged_after_one_window"]["temperature_offset_c"] == pytest.approx(0.3)


def test_stationary_traffic_raises_no_alert(storm: tuple[Outcome, dict[str, Any], str]) -> None:
    _, result, _ = storm
    assert result["false_alerts_per_10_device_days"] <= 1.0, result["false_alerts_by_kind"]


def test_ageing_group_is_alerted_within_two_windows_of_onset(storm: tuple[Outcome, dict[str, Any], str]) -> None:
    _, result, _ = storm
    drift = result["drift"]
    # An alert that was already open before the onset does not count as catching the drift.
    assert not drift["group_scope_kinds_open_at_onset"]
    assert all(not d["kinds_open_at_onset"] for d in drift["per_device"].values())
    assert result["drift_target_met"], drift


def test_effective_sample_sizes_are_what_keeps_stationary_windows_quiet(
    storm: tuple[Outcome, dict[str, Any], str],
) -> None:
    _, result, _ = storm
    g = result["diagnosis"]
    shipped, independent = g["committed/effective"], g["committed/independent"]
    # Counted as independent, one vehicle's records make many stationary windows "drift"; with their
    # effective sizes (each vehicle window's own, capped by its time span) none does.
    assert shipped["device_windows"] == independent["device_windows"] > 0
    assert shipped["device_windows_drift"] == 0 < independent["device_windows_drift"]
    assert shipped["group_drift_before_onset"] == 0
    assert shipped["group_first_drift_delay_windows"] is not None and shipped["group_first_drift_delay_windows"] <= 2.0
