"""Per-device sequential detectors on seeded streams: exact detection points, silence, bounded memory."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from river import drift

from collector.monitoring.sequential import (
    DEFAULT_CALIBRATED,
    DEFAULT_COACT,
    Alarm,
    BlockPageHinkley,
    DetectorMethod,
    DetectorSpec,
    Signal,
    StreamDetectors,
)

COACT_SCALE = 3.0  # the reference p99 of Poisson(0.8) counts


def step_streams(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Calibrated confidence dropping from 0.8 to 0.625 and rare co-activations rising from 0.8 to 3, at 1000."""
    rng = np.random.default_rng(seed)
    calibrated = np.concatenate([rng.beta(8, 2, 1000), rng.beta(5, 3, 1000)])
    coact = np.concatenate([rng.poisson(0.8, 1000), rng.poisson(3.0, 1000)]).astype(np.float64)
    return calibrated, coact


def stationary_streams(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The pre-change distributions for the same length."""
    rng = np.random.default_rng(seed)
    return rng.beta(8, 2, 2000), rng.poisson(0.8, 2000).astype(np.float64)


def detectors(method: DetectorMethod, **kwargs: object) -> StreamDetectors:
    return StreamDetectors(
        dataclasses.replace(DEFAULT_CALIBRATED, method=method),
        dataclasses.replace(DEFAULT_COACT, method=method, scale=COACT_SCALE),
        **kwargs,  # type: ignore[arg-type]
    )


def feed_in_blocks(d: StreamDetectors, device: str, values: np.ndarray, signal: Signal, seed: int) -> list[Alarm]:
    """Feed a stream in blocks of random sizes, as ingest does, with one timestamp per value."""
    rng = np.random.default_rng(seed)
    alarms: list[Alarm] = []
    start = 0
    while start < values.size:
        stop = min(values.size, start + int(rng.integers(1, 300)))
        times = 1_000.0 + np.arange(start, stop, dtype=np.float64)
        alarms += d.update_many(device, "m1", values[start:stop], signal=signal, times=times)
        start = stop
    return alarms


@pytest.mark.parametrize(
    ("method", "calibrated_at", "coact_at"),
    [
        # Page-Hinkley re-detects once on co-activations: after its reset the running mean restarts from a
        # few high-variance values of the new regime (the same change, which the alert layer de-duplicates).
        ("page_hinkley", [1095], [1028, 1192]),
        ("adwin", [1119], [1023]),
    ],
)
def test_step_change_fires_at_the_exact_index_river_reports(
    method: DetectorMethod, calibrated_at: list[int], coact_at: list[int]
) -> None:
    calibrated, coact = step_streams(42)
    d = detectors(method)
    cal_alarms = feed_in_blocks(d, "dev-7", calibrated, "calibrated", seed=1)
    coact_alarms = feed_in_blocks(d, "dev-7", coact, "coact", seed=2)
    assert [a.index for a in cal_alarms] == calibrated_at
    assert [a.index for a in coact_alarms] == coact_at
    first = cal_alarms[0]
    assert first == Alarm(
        device_id="dev-7",
        model_version="m1",
        signal="calibrated",
        direction="drop",
        method=method,
        at=1_000.0 + calibrated_at[0],
        index=calibrated_at[0],
        value=float(calibrated[calibrated_at[0]]),
    )
    assert {(a.signal, a.direction) for a in coact_alarms} == {("coact", "increase")}
    assert d.n_alarms == len(calibrated_at) + len(coact_at)


def test_blocks_match_a_plain_river_loop() -> None:
    calibrated, coact = step_streams(42)
    page_hinkley = drift.PageHinkley(min_instances=30, delta=0.02, threshold=10.0, alpha=1.0, mode="down")
    adwin = drift.ADWIN()
    by_river_ph, by_river_adwin = [], []
    for i, (c, k) in enumerate(zip(calibrated, coact / COACT_SCALE, strict=True)):
        page_hinkley.update(c)
        adwin.update(k)
        if page_hinkley.drift_detected:
            by_river_ph.append(i)
        if adwin.drift_detected:
            by_river_adwin.append(i)
    assert [a.index for a in feed_in_blocks(detectors("page_hinkley"), "d", calibrated, "calibrated", 3)] == by_river_ph
    assert [a.index for a in feed_in_blocks(detectors("adwin"), "d", coact, "coact", 4)] == by_river_adwin


@pytest.mark.parametrize("method", ["page_hinkley", "adwin"])
@pytest.mark.parametrize("seed", [43, 44, 45])
def test_stationary_streams_never_alarm(method: DetectorMethod, seed: int) -> None:
    calibrated, coact = stationary_streams(seed)
    d = detectors(method)
    assert feed_in_blocks(d, "dev-1", calibrated, "calibrated", seed) == []
    assert feed_in_blocks(d, "dev-1", coact, "coact", seed) == []
    assert d.n_alarms == 0


@pytest.mark.parametrize("method", ["page_hinkley", "adwin"])
def test_only_the_watched_direction_alarms(method: DetectorMethod) -> None:
    calibrated, coact = step_streams(42)
    d = detectors(method)
    # Reversed in time: confidence rises, co-activations fall; neither is an incident.
    assert d.update_many("dev", "m1", calibrated[::-1], signal="calibrated", now=0.0) == []
    assert d.update_many("dev", "m1", coact[::-1], signal="coact", now=0.0) == []
    if method == "adwin":
        assert d.n_ignored >= 2  # ADWIN saw both changes and discarded them as the wrong direction


def test_streams_are_keyed_by_device_model_version_and_signal() -> None:
    calibrated, _ = step_streams(42)
    d = detectors("page_hinkley")
    d.update_many("dev", "m1", calibrated[:1000], signal="calibrated", now=0.0)
    # A new model version starts its own stream: the drop is judged against its own history only.
    assert d.update_many("dev", "m2", calibrated[1000:], signal="calibrated", now=0.0) == []
    alarms = d.update_many("dev", "m1", calibrated[1000:], signal="calibrated", now=0.0)
    assert [(a.model_version, a.index) for a in alarms] == [("m1", 1095)]
    assert len(d) == 2


def test_non_finite_values_are_skipped_and_counted() -> None:
    calibrated, _ = step_streams(42)
    noisy = np.insert(calibrated, [10, 500, 1500], [np.nan, np.inf, np.nan])
    d = detectors("page_hinkley")
    alarms = d.update_many("dev", "m1", noisy, signal="calibrated", now=5.0)
    assert d.n_skipped == 3
    assert [(a.index, a.at) for a in alarms] == [(1095, 5.0)]


def test_lru_eviction_keeps_memory_bounded_with_ten_thousand_devices() -> None:
    rng = np.random.default_rng(0)
    d = StreamDetectors(max_streams=2_000)
    block = rng.beta(8, 2, 8)
    for device in range(10_000):
        d.update_many(f"dev-{device}", "m1", block, signal="calibrated", now=float(device))
        d.update_many(f"dev-{device}", "m1", block, signal="coact", now=float(device))
        assert len(d) <= 2_000
    assert len(d) == 2_000
    assert d.n_evicted == 20_000 - 2_000
    # The survivors are the most recently updated devices.
    d.update_many("dev-9999", "m1", block, signal="calibrated", now=10_000.0)
    assert d.n_evicted == 18_000


def test_idle_streams_are_evicted() -> None:
    now = [0.0]
    d = StreamDetectors(idle_timeout=600.0, clock=lambda: now[0])
    for device in range(50):
        d.update_many(f"dev-{device}", "m1", [0.9, 0.8], signal="calibrated")
    now[0] = 300.0
    d.update_many("dev-0", "m1", [0.9], signal="calibrated")
    now[0] = 700.0
    # Evicts the 49 streams idle since t=0, dev-1's own included: it restarts from scratch.
    d.update_many("dev-1", "m1", [0.9], signal="calibrated")
    assert len(d) == 2
    assert d.n_evicted == 49
    assert d.evict_idle(now=2_000.0) == 2
    assert len(d) == 0
    d.reset()
    assert (len(d), d.n_evicted, d.n_alarms, d.n_skipped) == (0, 0, 0, 0)


def test_parameters_are_validated() -> None:
    with pytest.raises(ValueError, match="threshold"):
        DetectorSpec(threshold=0.0)
    with pytest.raises(ValueError, match="method"):
        DetectorSpec(method="cusum")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="scale"):
        DetectorSpec(scale=float("nan"))
    with pytest.raises(ValueError, match=r"alpha.*adwin_delta"):
        DetectorSpec(alpha=0.0, adwin_delta=1.0)
    with pytest.raises(ValueError, match="clock"):
        DetectorSpec(clock=0)
    with pytest.raises(ValueError, match="max_streams"):
        StreamDetectors(max_streams=0)
    with pytest.raises(ValueError, match="idle_timeout"):
        StreamDetectors(idle_timeout=0.0)
    d = StreamDetectors()
    with pytest.raises(ValueError, match="unknown signal"):
        d.update_many("dev", "m1", [0.5], signal="loss")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timestamps"):
        d.update_many("dev", "m1", [0.5, 0.6], signal="calibrated", times=[1.0])
    with pytest.raises(ValueError, match="finite time"):
        d.update_many("dev", "m1", [0.5], signal="calibrated", now=float("nan"))
    assert d.update_many("dev", "m1", np.array([]), signal="calibrated", now=1.0) == []


def test_missing_timestamps_do_not_evict_everything() -> None:
    calibrated, _ = step_streams(42)
    d = detectors("page_hinkley", clock=lambda: 50.0)
    d.update_many("other", "m1", [0.9], signal="calibrated", now=40.0)
    times = np.full(calibrated.size, np.nan)
    alarms = d.update_many("dev", "m1", calibrated, signal="calibrated", times=times)
    assert [(a.index, a.at) for a in alarms] == [(1095, 50.0)]
    assert len(d) == 2 and d.n_evicted == 0


@pytest.mark.parametrize(("up", "alpha"), [(False, 1.0), (True, 1.0), (False, 1 - 1e-3), (True, 1 - 1e-3)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_block_page_hinkley_decides_exactly_as_river(up: bool, alpha: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    # Three regimes, so both directions change and the detector resets after each detection.
    values = np.concatenate([rng.beta(8, 2, 700), rng.beta(5, 3, 700), rng.beta(9, 1, 700)])
    values = values if not up else 1.0 - values
    river_ph = drift.PageHinkley(min_instances=30, delta=0.02, threshold=5.0, alpha=alpha, mode="up" if up else "down")
    expected = []
    for i, x in enumerate(values):
        river_ph.update(x)
        if river_ph.drift_detected:
            expected.append(i)
    ours = BlockPageHinkley(min_instances=30, delta=0.02, threshold=5.0, alpha=alpha, up=up)
    got: list[int] = []
    start = 0
    while start < values.size:
        stop = min(values.size, start + int(rng.integers(1, 400)))
        got += [start + i for i in ours.update_many(values[start:stop])]
        start = stop
    assert expected and got == expected
    if not river_ph.drift_detected:
        assert ours.n == river_ph._x_mean.n and ours.mean == pytest.approx(river_ph._x_mean.get(), abs=1e-12)


def test_a_rolled_back_transaction_leaves_the_streams_as_they_were() -> None:
    calibrated, coact = step_streams(42)
    d = detectors("page_hinkley")
    d.update_many("dev", "m1", calibrated[:1000], signal="calibrated", now=0.0)
    d.begin()
    staged = d.update_many("dev", "m1", calibrated[1000:], signal="calibrated", now=1.0)
    d.update_many("dev-new", "m1", coact, signal="coact", now=1.0)
    assert [a.index for a in staged] == [1095] and len(d) == 1 and d.n_alarms == 0  # nothing live yet
    d.rollback()
    assert len(d) == 1 and d.n_alarms == 0
    # The same values again: the same alarm, once, as if the failed attempt had never happened.
    d.begin()
    again = d.update_many("dev", "m1", calibrated[1000:], signal="calibrated", now=1.0)
    d.commit()
    assert again == staged and again[0].position == 95 and d.n_alarms == 1 and len(d) == 1


def test_forget_restarts_a_stream_and_is_transactional() -> None:
    calibrated, _ = step_streams(42)
    d = detectors("page_hinkley")
    d.update_many("dev", "m1", calibrated[:1000], signal="calibrated", now=0.0)
    d.begin()
    d.forget("dev", "m1")
    d.rollback()
    assert [a.index for a in d.update_many("dev", "m1", calibrated[1000:1200], signal="calibrated", now=0.0)] == [1095]
    d.begin()
    d.forget("dev", "m1")
    # Judged against its own history only, the lower level is no change.
    assert d.update_many("dev", "m1", calibrated[1000:], signal="calibrated", now=0.0) == []
    d.commit()
    assert len(d) == 1
