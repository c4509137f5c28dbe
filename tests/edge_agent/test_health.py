"""Sensor health state machine: exact transitions window by window, with an injected clock."""

from __future__ import annotations

import math

import pytest

from edge_agent.sensors.health import EVENT_SENSOR_STATE, Backoff, HealthPolicy, SensorMonitor
from shared.messages import SensorHealth
from shared.profile import ValueRange


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


POLICY = HealthPolicy(
    degrade_after=2,
    fail_after=4,
    recover_after=3,
    no_data_after=3,
    stuck_after=5,
    soft_error_window=10,
    max_soft_error_rate=0.2,
    reopen_after=4,
    backoff_initial_s=1.0,
    backoff_factor=2.0,
    backoff_max_s=10.0,
)


def monitor(**kw: object) -> tuple[SensorMonitor, Clock]:
    clock = Clock()
    m = SensorMonitor("bme680", POLICY, clock=clock, wall_clock=lambda: 5.0, **kw)  # type: ignore[arg-type]
    return m, clock


def values(i: int) -> dict[str, float]:
    return {"temperature_c": 20.0 + i * 0.01, "humidity_pct": 40.0}


def test_one_bad_read_does_not_flap() -> None:
    m, _ = monitor()
    for i in range(10):
        m.reading(values(i))
        if i % 3 == 0:
            m.error("timeout", "no new data bit")
    assert m.state == "ok" and m.take_events() == []
    assert m.reasons["timeout"] == 4


def test_degrade_fail_and_recover_with_hysteresis() -> None:
    m, _ = monitor()
    states = []
    for _ in range(4):
        m.error("timeout", "x")
        states.append(m.state)
    assert states == ["ok", "degraded", "degraded", "failed"]
    assert m.health() == SensorHealth(state="failed", reason="timeout")
    states = []
    for i in range(3):
        m.reading(values(i))
        states.append(m.state)
    assert states == ["failed", "failed", "ok"]  # failed straight back to ok after recover_after good windows
    events = m.take_events()
    assert [(e.kind, e.data["previous"], e.data["state"], e.data["reason"]) for e in events] == [
        (EVENT_SENSOR_STATE, "ok", "degraded", "timeout"),
        (EVENT_SENSOR_STATE, "degraded", "failed", "timeout"),
        (EVENT_SENSOR_STATE, "failed", "ok", None),
    ]
    assert all(e.ts == 5.0 and e.data["sensor"] == "bme680" for e in events)
    assert m.take_events() == []


def test_a_good_window_between_bad_ones_resets_the_run() -> None:
    m, _ = monitor()
    for i in range(6):
        m.error("timeout")
        m.reading(values(i))
    assert m.state == "ok"
    m.error("timeout")
    m.error("disconnected", "gone")
    assert m.health() == SensorHealth(state="degraded", reason="disconnected")
    m.error("timeout")  # the reason follows the latest cause while unhealthy, without an event
    assert m.health().reason == "timeout" and len(m.take_events()) == 1


def test_stuck_values_are_rejected_and_degrade() -> None:
    m, _ = monitor()
    same = {"temperature_c": 21.5, "humidity_pct": 40.0}
    outs = [m.reading(same) for _ in range(6)]
    # windows 1-4 pass; the 5th identical reading is the first stuck window (bad, values NaN).
    assert all(not math.isnan(o["temperature_c"]) for o in outs[:4])
    assert all(math.isnan(v) for o in outs[4:] for v in o.values())
    assert m.health() == SensorHealth(state="degraded", reason="stuck")
    m.reading(values(1))
    m.reading(values(2))
    assert m.state == "degraded"
    m.reading(values(3))
    assert m.state == "ok"


def test_stuck_on_nan_counts_as_stuck() -> None:
    m, _ = monitor()
    for _ in range(6):
        m.reading({"temperature_c": math.nan})
    assert m.health().reason == "stuck"


def test_out_of_range_rejects_only_that_value() -> None:
    m, _ = monitor(ranges={"temperature_c": ValueRange(min=-40, max=85)})
    out = m.reading({"temperature_c": 120.0, "humidity_pct": 40.0})
    assert math.isnan(out["temperature_c"]) and out["humidity_pct"] == 40.0
    out = m.reading({"temperature_c": 130.0, "humidity_pct": 41.0})
    assert m.health() == SensorHealth(state="degraded", reason="out_of_range")
    assert "temperature_c=130 outside [-40, 85]" in m.detail
    out = m.reading({"temperature_c": 85.0, "humidity_pct": 41.0})  # inclusive bounds
    assert out["temperature_c"] == 85.0


def test_checksum_rate_over_the_window() -> None:
    m, _ = monitor()
    for i in range(10):
        m.reading(values(i))
    # 2 skipped frames in the last 10 attempts is exactly the allowed 20%: still a good window.
    m.reading(values(10), soft_errors={"checksum": 2})
    assert m.bad_run == 0
    # a third error inside the last 10 attempts is over the rate: bad windows, degraded after two.
    m.reading(values(11), soft_errors={"checksum": 1})
    assert m.state == "ok" and m.bad_run == 1
    m.reading(values(12))
    assert m.health() == SensorHealth(state="degraded", reason="checksum")
    assert m.detail == "3 of the last 10 attempts"
    # clean frames push the first error out of the window (5 reads), then recover_after good windows.
    states = []
    for i in range(13, 21):
        m.reading(values(i))
        states.append(m.state)
    assert states == ["degraded"] * 6 + ["ok", "ok"]


def test_a_single_early_soft_error_is_not_a_full_rate() -> None:
    m, _ = monitor()
    m.reading(values(0), soft_errors={"overrun": 1})
    m.reading(values(1))
    assert m.bad_run == 0 and m.state == "ok"


def test_no_data_is_neutral_until_it_lasts() -> None:
    m, _ = monitor()
    m.reading(values(0))
    m.no_data()
    m.no_data()
    assert m.bad_run == 0 and m.good_run == 1
    m.no_data()  # the third in a row is bad
    m.no_data()
    assert m.health() == SensorHealth(state="degraded", reason="no_data")
    m.reading(values(1))
    m.no_data()
    assert m.bad_run == 0  # a reading restarts the count


def test_reopen_backoff_is_exponential_capped_and_reset_by_a_good_read() -> None:
    m, clock = monitor()
    assert m.open_due()  # the first open at once
    delays = [m.open_failed("not_found", "no /dev/i2c-1") for _ in range(6)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert not m.open_due()
    clock.t += 9.9
    assert not m.open_due()
    clock.t += 0.1
    assert m.open_due()
    m.closed_window()
    assert m.reasons["not_found"] == 1
    m.opened()
    assert not m.open_due() and m.opens == 1
    m.reading(values(0))
    assert m.closed("disconnected", "EIO") == 1.0  # the good read reset the backoff


def test_reopen_after_a_run_of_failures_while_open() -> None:
    m, _ = monitor()
    m.opened()
    for _ in range(3):
        m.error("timeout")
    assert not m.should_reopen()
    m.error("timeout")
    assert m.should_reopen()
    m.closed("timeout", "reinitialise")
    assert not m.should_reopen()
    m.opened()
    m.error("timeout")
    assert not m.should_reopen()  # the run before the reopen does not count against the new device


def test_windows_before_the_first_open_attempt_are_only_no_data() -> None:
    m, _ = monitor()
    for _ in range(2):
        m.closed_window()
    assert m.bad_run == 0 and m.reasons == {}
    m.open_failed("not_found", "no UMA-8")
    m.closed_window()
    assert m.bad_run == 1 and m.reasons["not_found"] == 1


def test_closed_windows_carry_the_reason_the_device_was_lost() -> None:
    m, _ = monitor()
    m.opened()
    m.closed("disconnected", "port vanished")
    m.closed_window()
    m.closed_window()
    assert m.health() == SensorHealth(state="degraded", reason="disconnected")
    assert m.detail == "port vanished"


def test_policy_validation() -> None:
    with pytest.raises(ValueError):
        HealthPolicy(degrade_after=5, fail_after=2)
    with pytest.raises(ValueError):
        HealthPolicy(max_soft_error_rate=1.0)
    with pytest.raises(ValueError):
        HealthPolicy(backoff_initial_s=0)


def test_backoff() -> None:
    b = Backoff(0.5, 3.0, 5.0)
    assert [b.next() for _ in range(4)] == [0.5, 1.5, 4.5, 5.0]
    b.reset()
    assert b.next() == 0.5


def test_partial_problems_degrade_but_never_fail() -> None:
    m, _ = monitor(ranges={"temperature_c": ValueRange(min=-40, max=85)})
    for i in range(20):
        m.reading({"temperature_c": 200.0 + i, "humidity_pct": 40.0 + i})
    assert m.health() == SensorHealth(state="degraded", reason="out_of_range")
    for i in range(20):
        m.reading(values(i), problem="gas_invalid", detail="heater not stable")
    assert m.health() == SensorHealth(state="degraded", reason="gas_invalid")
    m.error("timeout")
    m.error("timeout")
    m.error("timeout")
    assert m.state == "degraded"  # the hard run starts at the first failed read
    m.error("timeout")
    assert m.state == "failed"
