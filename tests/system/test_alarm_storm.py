"""The alarm-storm experiment at small scale: simulated vehicles through ingest and the alert engine, in simulated time.

``benchmarks/alarm_storm.py`` runs 100 stationary vehicles plus an ageing group for 24 simulated
hours; this runs the same code on 3 stationary vehicles and 2 ageing ones for 90 simulated minutes
with 5-minute windows (0.4 inferences/s: 120 records per device window, above the drift tests'
minimum of 100), ageing from minute 45. At this scale the issue's targets read: no false alert at
all (0.19 stationary device-days allow 0.019), and an alert on the ageing group by the end of the
second window after the onset.

Both targets are missed at HEAD, for reasons measured and documented in docs/MONITORING.md
("Experiment: no alarm storm, and ageing drift caught"); they are strict xfails so that the fix
turns them into failures to be unmarked, not into silent passes.
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
    group_size=2,
    hours=1.5,
    rate_hz=0.4,
    window_s=300.0,
    # 90 hours of sensor life per hour: after one 5-minute window the same ageing as the
    # benchmark's 15-minute window at 30 (gas -10.7 %, temperature +0.3 °C, microphone -1.1 dB).
    ageing=Ageing(onset_s=2700.0, acceleration=90.0),
    batch_s=60.0,
)
STORM = (
    "alarm storm at HEAD: the committed reference (one 40-minute drive with its start-up transient, quantile edges "
    "on tied values, model-signal references from the training realisation, label priors against predicted classes) "
    "and iid tests on autocorrelated per-device windows flag stationary traffic; see docs/MONITORING.md"
)


@pytest.fixture(scope="module")
def storm(tmp_path_factory: pytest.TempPathFactory) -> tuple[Outcome, dict[str, Any], str]:
    url = f"sqlite:///{tmp_path_factory.mktemp('alarm-storm') / 'fleet.db'}"
    outcome = run(PLAN, url, workers=1)
    return outcome, summarise(outcome), url


def test_every_record_is_stored_and_every_window_evaluated(storm: tuple[Outcome, dict[str, Any], str]) -> None:
    outcome, result, url = storm
    vehicles = PLAN.devices + PLAN.group_size
    assert outcome.records == vehicles * PLAN.records_per_device == 5 * 2160
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
        GROUP: ["age-000", "age-001"],
        "stationary-0": ["sim-002", "sim-003"],
        "stationary-1": ["sim-004"],
    }
    assert outcome.windows_evaluated == round(PLAN.duration_s / PLAN.window_s) == 18
    # The stationary traffic is the reference's own scenario, in the reference's class proportions.
    assert result["truth_mix"]["normal"] == pytest.approx(0.5, abs=0.03)
    for label in ("vaping", "smoking", "impact", "window_open"):
        assert result["truth_mix"][label] == pytest.approx(0.125, abs=0.03)
    # The vehicles did age from the onset on, by the amount the plan says.
    assert result["drift"]["aged_after_one_window"]["temperature_offset_c"] == pytest.approx(0.3)


@pytest.mark.xfail(strict=True, reason=STORM)
def test_stationary_traffic_raises_no_alert(storm: tuple[Outcome, dict[str, Any], str]) -> None:
    _, result, _ = storm
    assert result["false_alerts_per_10_device_days"] <= 1.0, result["false_alerts_by_kind"]


@pytest.mark.xfail(strict=True, reason=STORM)
def test_ageing_group_is_alerted_within_two_windows_of_onset(storm: tuple[Outcome, dict[str, Any], str]) -> None:
    _, result, _ = storm
    drift = result["drift"]
    # An alert that was already open before the onset does not count as catching the drift.
    assert not drift["group_scope_kinds_open_at_onset"]
    assert all(not d["kinds_open_at_onset"] for d in drift["per_device"].values())
    assert result["drift_target_met"], drift
