"""Simulated cabin: scenario validation, physics of each event, ageing, determinism, cost-free shape checks."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent.sensors.base import Observation
from edge_agent.sensors.simulated import (
    SCENARIO_DIR,
    TRAINING_LABELS,
    UNKNOWN_LABEL,
    AgeingSegment,
    Scenario,
    ScenarioError,
    SimulatedCabin,
    load_scenario,
    parse_scenario,
)
from shared.features import FeaturePipeline


def scenario(timeline: list[dict[str, Any]], **extra: Any) -> Scenario:
    return parse_scenario({"name": "test", "timeline": timeline, **extra})


def run(cabin: SimulatedCabin, seconds: float) -> list[Observation]:
    return [cabin.read() for _ in range(round(seconds * cabin.rate_hz))]


def dbfs(x: np.ndarray) -> float:
    return 20.0 * math.log10(float(np.sqrt(np.mean(x.astype(np.float64) ** 2))))


# ---------------------------------------------------------------------------- validation


def test_unknown_key_is_rejected_with_its_field(tmp_path: Path) -> None:
    path = tmp_path / "typo.yaml"
    path.write_text("name: t\ntimeline:\n  - {at: 0, duration: 5, event: vaping, peak_pm25: 300}\n")
    with pytest.raises(ScenarioError) as err:
        load_scenario(path)
    assert err.value.path == str(path)
    assert err.value.field == "timeline.0.peak_pm25"
    assert "typo.yaml" in str(err.value) and "Extra inputs are not permitted" in str(err.value)


def test_unknown_top_level_key() -> None:
    with pytest.raises(ScenarioError) as err:
        parse_scenario({"name": "t", "repeats": True})
    assert err.value.field == "repeats"


def test_bad_event_kind() -> None:
    with pytest.raises(ScenarioError) as err:
        scenario([{"at": 0, "duration": 5, "event": "normal"}, {"at": 5, "duration": 5, "event": "explosion"}])
    assert err.value.field == "timeline.1"
    assert "explosion" in err.value.message


def test_negative_duration() -> None:
    with pytest.raises(ScenarioError) as err:
        scenario([{"at": 3, "duration": -1, "event": "impact"}])
    assert err.value.field == "timeline.0.duration"
    assert "greater than 0" in err.value.message


def test_other_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match="a segment ends at 30 s, after length_s 20 s"):
        scenario([{"at": 10, "duration": 20, "event": "normal"}], length_s=20)
    with pytest.raises(ScenarioError, match="repeat needs a timeline"):
        parse_scenario({"name": "t", "repeat": True})
    with pytest.raises(ScenarioError) as err:
        scenario([{"at": 0, "duration": 5, "event": "ageing", "label": "aged"}])
    assert err.value.field == "timeline.0.label"  # ageing never changes the label
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("name: [unclosed\n")
    with pytest.raises(ScenarioError, match="invalid YAML"):
        load_scenario(bad_yaml)
    with pytest.raises(ScenarioError, match="cannot read"):
        load_scenario(tmp_path / "missing.yaml")
    not_mapping = tmp_path / "list.yaml"
    not_mapping.write_text("- 1\n- 2\n")
    with pytest.raises(ScenarioError, match="must be a mapping"):
        load_scenario(not_mapping)


def test_builtin_scenarios_load_and_training_covers_every_label() -> None:
    for name in ("training", "default", "drift"):
        assert (SCENARIO_DIR / f"{name}.yaml").exists()
        assert load_scenario(name).name == name
    training = load_scenario("training")
    assert not any(isinstance(s, AgeingSegment) for s in training.timeline)
    cabin = SimulatedCabin(training, rate_hz=1.0)
    labels = [cabin.label_at(t + 0.05) for t in np.arange(0.0, training.period, 0.1)]
    share = {label: labels.count(label) / len(labels) for label in set(labels)}
    assert set(share) == set(TRAINING_LABELS)
    assert share["normal"] == max(share.values())
    assert min(share.values()) >= 0.10
    drift = load_scenario("drift")
    assert drift.repeat and any(isinstance(s, AgeingSegment) for s in drift.timeline)
    assert UNKNOWN_LABEL in drift.labels()


# ---------------------------------------------------------------------------- the Source


def test_observation_shape_timing_and_health() -> None:
    cabin = SimulatedCabin(scenario([]), seed=1, rate_hz=10.0, start_ts=1_000.0)
    obs = run(cabin, 2.5)
    assert [o.mono for o in obs[:3]] == pytest.approx([0.1, 0.2, 0.3])
    assert all(o.ts == pytest.approx(1_000.0 + o.mono) for o in obs)
    for o in obs:
        assert o.audio is not None and o.audio.dtype == np.float32 and o.audio.shape == (1600,)
        assert float(np.max(np.abs(o.audio))) <= 1.0
        assert o.truth == "normal"
    # The environment refreshes at 1 Hz and is held in between.
    assert all(obs[i].env is obs[0].env for i in range(10))
    assert obs[10].env is not obs[9].env
    assert set(cabin.health()) == {"bme680", "pms5003", "microphone"}
    assert all(h.state == "ok" for h in cabin.health().values())
    cabin.advance(100.0)
    assert cabin.read().mono == pytest.approx(102.6)
    with pytest.raises(ValueError):
        cabin.advance(-1.0)


def test_same_seed_same_output_other_seed_differs() -> None:
    sc = load_scenario("drift")
    a = run(SimulatedCabin(sc, seed=5, start_ts=0.0), 3.0)
    b = run(SimulatedCabin(sc, seed=5, start_ts=0.0), 3.0)
    c = run(SimulatedCabin(sc, seed=6, start_ts=0.0), 3.0)
    for x, y in zip(a, b, strict=True):
        assert x.env == y.env and x.truth == y.truth and x.mono == y.mono
        assert np.array_equal(x.audio, y.audio)  # type: ignore[arg-type]
    assert not np.array_equal(a[-1].audio, c[-1].audio)  # type: ignore[arg-type]


def test_pms_counts_are_consistent_with_masses() -> None:
    cabin = SimulatedCabin(scenario([{"at": 2, "duration": 30, "event": "smoking"}]), seed=2, rate_hz=1.0)
    for o in run(cabin, 30):
        env = o.env
        assert env is not None
        assert env.pm1_ug_m3 <= env.pm25_ug_m3 <= env.pm10_ug_m3
        counts = env.particles_per_dl
        assert all(counts[i] >= counts[i + 1] for i in range(5))  # cumulative: above each size
        assert counts[0] > 100 * env.pm25_ug_m3 or counts[0] == 65_535  # mostly fine particles


# ---------------------------------------------------------------------------- events


def aerosol_run(kind: str) -> list[Observation]:
    sc = scenario(
        [{"at": 20, "duration": 60, "event": kind, "peak_pm25_ug_m3": 300, "variation": 0.0}],
    )
    return run(SimulatedCabin(sc, seed=3, rate_hz=1.0), 100)


def test_vaping_raises_pm_into_the_hundreds_and_lowers_gas_resistance() -> None:
    obs = aerosol_run("vaping")
    before = [o.env for o in obs[5:20]]
    plateau = [o.env for o in obs[50:80]]
    after = [o.env for o in obs[95:100]]
    assert all(e is not None for e in before + plateau + after)
    assert max(e.pm25_ug_m3 for e in before) < 20  # type: ignore[union-attr]
    assert 200 <= np.median([e.pm25_ug_m3 for e in plateau]) <= 450  # type: ignore[union-attr]
    gas_before = np.median([e.gas_resistance_ohm for e in before])  # type: ignore[union-attr]
    gas_plateau = np.median([e.gas_resistance_ohm for e in plateau])  # type: ignore[union-attr]
    assert gas_plateau < gas_before / 1.8  # the default gas_drop_factor is 2.2
    rh_rise = np.median([e.humidity_pct for e in plateau]) - np.median([e.humidity_pct for e in before])  # type: ignore[union-attr]
    assert 4.0 < rh_rise < 8.0  # vaping adds water (6 % at the peak)
    # First-order decay: 15 s after the end the plume is mostly gone.
    assert max(e.pm25_ug_m3 for e in after) < 40  # type: ignore[union-attr]
    assert [o.truth for o in obs[19:22]] == ["normal", "vaping", "vaping"]
    assert obs[80].truth == "normal"


def test_smoking_has_more_large_particles_and_less_humidity_than_vaping() -> None:
    def plateau(kind: str) -> tuple[float, float, float]:
        envs = [o.env for o in aerosol_run(kind)[50:80]]
        coarse = np.median([e.particles_per_dl[3] / e.pm25_ug_m3 for e in envs])  # type: ignore[union-attr]
        rh = np.median([e.humidity_pct for e in envs])  # type: ignore[union-attr]
        gas = np.median([e.gas_resistance_ohm for e in envs])  # type: ignore[union-attr]
        return float(coarse), float(rh), float(gas)

    smoke, vape = plateau("smoking"), plateau("vaping")
    assert smoke[0] > 4 * vape[0]  # particles above 2.5 µm per µg/m³
    assert smoke[1] < vape[1] - 3
    assert smoke[2] < vape[2] / 1.5  # combustion VOCs lower the gas resistance more


def test_impact_is_a_short_transient_in_one_window_only() -> None:
    sc = scenario([{"at": 10.0, "duration": 0.1, "event": "impact", "peak_dbfs": -10, "peak_spread_db": 0}])
    obs = run(SimulatedCabin(sc, seed=4, rate_hz=10.0), 15.0)
    peaks = np.array([20 * math.log10(float(np.max(np.abs(o.audio)))) for o in obs])  # type: ignore[arg-type]
    assert peaks[100] == pytest.approx(-10.0, abs=1.5)
    others = np.delete(peaks[50:150], 50)
    assert peaks[100] > others.max() + 8.0
    assert [o.truth for o in obs[99:102]] == ["normal", "impact", "normal"]
    # It is short: most of its energy sits within ~30 ms of the loudest sample.
    x = obs[100].audio.astype(np.float64)  # type: ignore[union-attr]
    top = int(np.argmax(np.abs(x)))
    burst = float(np.sum(x[max(0, top - 80) : top + 480] ** 2))
    assert burst > 0.8 * float(np.sum(x**2))


def test_window_open_moves_temperature_and_humidity_toward_outside_and_brings_wind() -> None:
    sc = scenario(
        [{"at": 30, "duration": 120, "event": "window_open"}],
        baseline={"temperature_c": 22.0, "humidity_pct": 35.0},
        outside={"temperature_c": 5.0, "humidity_pct": 85.0},
    )
    obs = run(SimulatedCabin(sc, seed=5, rate_hz=2.0), 150)
    t_before = obs[58].env.temperature_c  # type: ignore[union-attr]
    t_open = obs[298].env.temperature_c  # type: ignore[union-attr]
    rh_before = obs[58].env.humidity_pct  # type: ignore[union-attr]
    rh_open = obs[298].env.humidity_pct  # type: ignore[union-attr]
    assert 5.0 < t_open < t_before - 8.0  # 2 minutes at tau 90 s: about 3/4 of the way
    assert rh_open > rh_before + 25.0
    quiet = np.mean([dbfs(o.audio) for o in obs[20:58]])  # type: ignore[arg-type]
    windy = np.mean([dbfs(o.audio) for o in obs[80:298]])  # type: ignore[arg-type]
    assert windy > quiet + 5.0
    assert obs[60].truth == "window_open" and obs[59].truth == "normal"


def test_ageing_drifts_the_gas_baseline_temperature_and_microphone_at_the_configured_rates() -> None:
    ageing = {
        "at": 0,
        "event": "ageing",
        "gas_drift_pct_per_hour": -10.0,
        "temperature_offset_c_per_hour": 0.2,
        "mic_sensitivity_db_per_hour": -0.5,
        "acceleration": 3600.0,  # one hour per simulated second
    }
    plain = run(SimulatedCabin(scenario([]), seed=6, rate_hz=1.0), 12)
    aged = run(SimulatedCabin(scenario([ageing]), seed=6, rate_hz=1.0), 12)
    for hours in (0, 5, 11):
        p, a = plain[hours].env, aged[hours].env
        assert p is not None and a is not None
        # Same seed, same noise: the difference is the drift alone (to the sensors' resolution).
        assert a.gas_resistance_ohm / p.gas_resistance_ohm == pytest.approx(0.9**hours, rel=1e-4)
        assert a.temperature_c - p.temperature_c == pytest.approx(0.2 * hours, abs=0.011)
        assert dbfs(aged[hours].audio) - dbfs(plain[hours].audio) == pytest.approx(-0.5 * hours, abs=0.05)  # type: ignore[arg-type]
    assert all(o.truth == "normal" for o in aged)


def test_ageing_holds_after_its_duration_and_ignores_timeline_repeats() -> None:
    sc = scenario(
        [
            {"at": 0, "duration": 4, "event": "ageing", "gas_drift_pct_per_hour": -20.0, "acceleration": 3600.0},
            {"at": 0, "duration": 2, "event": "normal"},
        ],
        repeat=True,
    )
    plain = run(
        SimulatedCabin(scenario([{"at": 0, "duration": 2, "event": "normal"}], repeat=True), seed=7, rate_hz=1), 9
    )
    aged = run(SimulatedCabin(sc, seed=7, rate_hz=1), 9)
    ratios = [a.env.gas_resistance_ohm / p.env.gas_resistance_ohm for a, p in zip(aged, plain, strict=True)]  # type: ignore[union-attr]
    assert ratios[3] == pytest.approx(0.8**3, rel=1e-4)  # keeps growing through the repeat at t=2
    assert ratios[8] == pytest.approx(0.8**4, rel=1e-4)  # held after 4 s


def test_unknown_event_label_override_and_repeat() -> None:
    sc = scenario(
        [
            {"at": 0, "duration": 10, "event": "music"},
            {"at": 10, "duration": 10, "event": "dog_bark"},
            {"at": 20, "duration": 5, "event": "vaping", "label": "e_cigarette"},
            {"at": 25, "duration": 5, "event": "normal"},
        ],
        repeat=True,
    )
    cabin = SimulatedCabin(sc, seed=8, rate_hz=10.0)
    assert [cabin.label_at(t) for t in (1, 11, 21, 26, 31, 61)] == [
        UNKNOWN_LABEL,
        UNKNOWN_LABEL,
        "e_cigarette",
        "normal",
        UNKNOWN_LABEL,
        UNKNOWN_LABEL,
    ]
    obs = run(cabin, 20.0)
    music = np.mean([dbfs(o.audio) for o in obs[:100]])  # type: ignore[arg-type]
    assert music > -31.0  # music at -30 dBFS on top of -38 dBFS road noise
    barks = [20 * math.log10(float(np.max(np.abs(o.audio)))) for o in obs[100:200]]  # type: ignore[arg-type]
    assert sum(p > -25.0 for p in barks) >= 5  # several barks in 10 s
    once = SimulatedCabin(scenario([{"at": 0, "duration": 5, "event": "music"}]), rate_hz=1.0)
    assert once.label_at(2) == UNKNOWN_LABEL and once.label_at(50) == "normal"  # no repeat: normal after


def test_later_segment_wins_where_segments_overlap() -> None:
    sc = scenario(
        [
            {"at": 0, "duration": 60, "event": "window_open"},
            {"at": 10, "duration": 0.5, "event": "impact"},
        ]
    )
    cabin = SimulatedCabin(sc, rate_hz=10.0)
    assert [cabin.label_at(t) for t in (5.0, 10.2, 10.6, 30.0)] == [
        "window_open",
        "impact",
        "window_open",
        "window_open",
    ]


def test_features_separate_the_classes() -> None:
    """A linear softmax on standardised features, trained on one seed, classifies another well."""
    pipeline = FeaturePipeline()
    sc = load_scenario("training")

    def data(seed: int, start: float) -> tuple[np.ndarray, np.ndarray]:
        cabin = SimulatedCabin(sc, seed=seed, rate_hz=2.0)
        cabin.advance(start)
        rows, labels = [], []
        for _ in range(round(900 * cabin.rate_hz)):
            o = cabin.read()
            rows.append(pipeline(o.env, o.audio)[0])
            labels.append(TRAINING_LABELS.index(o.truth or "normal"))
        return np.array(rows), np.array(labels)

    x_train, y_train = data(11, 0.0)
    x_test, y_test = data(12, 900.0)
    mean, std = x_train.mean(axis=0), x_train.std(axis=0) + 1e-6
    a, b = (x_train - mean) / std, (x_test - mean) / std
    w = np.zeros((a.shape[1], len(TRAINING_LABELS)))
    onehot = np.eye(len(TRAINING_LABELS))[y_train]
    for _ in range(300):
        logits = a @ w
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        w -= 0.5 * a.T @ (p - onehot) / len(a)
    accuracy = float(np.mean(np.argmax(b @ w, axis=1) == y_test))
    assert set(y_test.tolist()) == set(range(len(TRAINING_LABELS)))
    assert accuracy > 0.8
