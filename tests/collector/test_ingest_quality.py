"""Data quality against the hardware profile, and sequential detectors, as ingest runs them.

Real parts: SQLite and PostgreSQL databases, a real Mosquitto for the end-to-end alarm, the signed
reference bundle and the repository's hardware profiles.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as paho
import pytest
import sqlalchemy as sa
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client import REGISTRY
from sqlalchemy.engine import Engine

from collector.config import Settings
from collector.db import make_engine, upgrade
from collector.ingest.service import Ingest, Prepared, prepare, write_group
from collector.monitoring.sequential import DEFAULT_CALIBRATED, DEFAULT_COACT, StreamDetectors
from collector.monitoring.sketches import ReferenceBins, WindowSketch
from collector.monitoring.streams import SequentialWatch
from collector.monitoring.windows import DEFAULT_PROFILE_DIR, WindowWriter, load_profiles, load_reference_bins
from collector.mqtt import InboundMessage
from shared.codec import encode_batch
from tests.services import Mosquitto
from tests.shared.test_codec import make_batch, make_block

REPO = Path(__file__).resolve().parents[2]
CABIN_BUNDLE = REPO / "edge_agent" / "bundles" / "cabin-v1.tar"
DEV_PUB = REPO / "edge_agent" / "keys" / "dev-release.pub"
WINDOW_S = 10.0
T0 = 1_760_000_000.0
EPOCH = "a" * 16
PROFILE_YAML = """
name: rev-t
description: a test revision whose thermometer reads -10..50 C
ranges:
  temperature_c: {min: -10, max: 50}
  humidity_pct: {min: 0, max: 100}
"""


@pytest.fixture(scope="module")
def bins() -> dict[tuple[str, str], ReferenceBins]:
    if not CABIN_BUNDLE.exists():
        pytest.skip("edge_agent/bundles/cabin-v1.tar is not committed")
    return load_reference_bins([CABIN_BUNDLE], [DEV_PUB])


@pytest.fixture
def ref(bins: dict[tuple[str, str], ReferenceBins]) -> ReferenceBins:
    return next(iter(bins.values()))


@pytest.fixture
def profile_file(tmp_path: Path) -> Path:
    path = tmp_path / "rev-t.yaml"
    path.write_text(PROFILE_YAML)
    return path


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest) -> Iterator[Engine]:
    url = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")
    upgrade(url)
    eng = make_engine(url)
    yield eng
    eng.dispose()


def settings(url: str, tmp_path: Path, **kw: Any) -> Settings:
    return Settings(
        database_url=url,
        mqtt_url=kw.pop("mqtt_url", "mqtt://127.0.0.1:1"),
        mqtt_client_id=f"collector-{uuid.uuid4().hex[:8]}",
        data_dir=tmp_path,
        monitoring_bundles=[CABIN_BUNDLE],
        monitoring_trusted_keys=[DEV_PUB],
        monitoring_window_s=WINDOW_S,
        ingest_max_delay_ms=5,
        **kw,
    )


def message(
    ref: ReferenceBins,
    first: int,
    n: int,
    *,
    seed: int = 0,
    calibrated: np.ndarray | None = None,
    features: np.ndarray | None = None,
    seqs: np.ndarray | None = None,
    device: str = "veh-q",
    epoch: str = EPOCH,
    profile: str = "rev-t",
    version: str | None = None,
    t0: float = T0,
) -> bytes:
    """A payload of ``n`` reference-like records, seqs ``first``.. (or ``seqs``), record ``s`` at ``t0 + s / 10``."""
    rng = np.random.default_rng(seed)
    b = make_block(n, first_seq=first, seed=seed, features=ref.n_features, classes=ref.n_classes)
    if features is None:
        mean, std = ref.norm_mean.astype(np.float64), ref.norm_std.astype(np.float64)
        features = (mean + std * rng.normal(size=(n, ref.n_features))).astype(np.float32)
    seq = np.arange(first, first + n, dtype=np.uint64) if seqs is None else seqs.astype(np.uint64)
    ts = t0 + seq.astype(np.float64) * 0.1
    b = dataclasses.replace(
        b,
        seq=seq,
        ts=ts,
        mono=ts - t0,
        features=features,
        model_name=ref.model_name,
        model_version=version or ref.model_version,
        calibrated=(rng.beta(8, 2, n) if calibrated is None else calibrated).astype(np.float16),
        coact=rng.poisson(0.8, n).astype(np.uint16),
    )
    batch = make_batch(
        b,
        device_id=device,
        spool_epoch=epoch,
        profile=profile,
        seq_first=int(seq[0]),
        seq_last=int(seq[-1]),
        gaps=[],
        sent_at=float(ts[-1]) + 1,
    )
    return encode_batch(batch)


def inbound(payload: bytes, device: str = "veh-q", received_at: float = T0 + 1000) -> InboundMessage:
    return InboundMessage(
        mid=1, qos=1, topic=f"fleet/v1/{device}/telemetry", payload=payload, received_at=received_at, session=1
    )


def write(engine: Engine, payloads: list[bytes], **kw: Any) -> list[Prepared]:
    items = [prepare(inbound(p)) for p in payloads]
    assert all(it.reason is None for it in items), [it.detail for it in items]
    with engine.connect().execution_options(sqlite_begin="IMMEDIATE") as conn, conn.begin():
        write_group(conn, items, 1024, **kw)
    return items


def windows(engine: Engine) -> WindowSketch:
    with engine.connect() as conn:
        blobs = conn.execute(sa.text("SELECT sketch FROM monitoring_window")).scalars().all()
    return sum(WindowSketch.from_bytes(bytes(b)) for b in blobs)  # type: ignore[return-value]


def alarms(engine: Engine) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT * FROM sequential_alarm ORDER BY seq")).mappings().all()
    return [dict(r) for r in rows]


def counter(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# ----------------------------------------------------------------------------- data quality


def test_profile_ranges_stuck_sensors_seq_gaps_and_clock_are_counted_at_ingest(
    engine: Engine, bins: dict[tuple[str, str], ReferenceBins], ref: ReferenceBins, profile_file: Path
) -> None:
    writer = WindowWriter(bins, WINDOW_S, load_profiles([profile_file]))
    n = 300
    rng = np.random.default_rng(3)
    x = (ref.norm_mean + ref.norm_std * rng.normal(size=(n, ref.n_features))).astype(np.float32)
    x[:, 0] = 20.0  # temperature_c
    x[[5, 50, 51, 200], 0] = [60.0, 85.0, -30.0, 50.0]  # three outside -10..50; 50.0 is on the bound
    x[7, 0] = np.nan  # missing, not out of range
    x[:, 1] = 140.0  # humidity above 100 on every record
    vary = int(np.flatnonzero(ref.vary & (np.arange(ref.n_features) > 1))[0])
    x[:, vary] = x[0, vary]  # a should-vary sensor frozen for the whole batch
    seqs = np.concatenate([np.arange(100, 250), np.arange(255, 405)])  # 5 seqs missing in one hole
    item = write(engine, [message(ref, 100, n, features=x, seqs=seqs)], windows=writer)[0]
    assert item.unranged == 0 and item.unsketched == 0
    total = windows(engine)
    assert total.n == n
    assert total.feature_out_of_range[0] == 3 and total.feature_nan[0] == 1
    assert total.feature_out_of_range[1] == n
    assert total.feature_out_of_range[2:].sum() == 0  # the profile names no other range
    assert total.feature_stuck[vary] == n - ref.stuck_run + 1  # every record ending a run of stuck_run
    assert (total.seq_missing, total.seq_gaps) == (5, 1)
    rows = item.rows[0]
    # Clock: delivery delay = received_at - ts_corrected; the test device reports a synced clock (offset 0).
    assert total.delay_sum == pytest.approx(float((rows.received_at - rows.ts_corrected).sum()))
    assert total.delay_min == pytest.approx(T0 + 1000 - float(rows.ts_corrected.max()))
    assert (total.offset_min, total.offset_max) == (0.0, 0.0)


def test_unknown_profile_is_counted_and_its_records_stored_unchecked(
    sqlite_url: str, tmp_path: Path, ref: ReferenceBins, profile_file: Path
) -> None:
    upgrade(sqlite_url)
    eng = make_engine(sqlite_url)
    service = Ingest(settings(sqlite_url, tmp_path, monitoring_profiles=[profile_file]), engine=eng)
    assert service.windows is not None and set(service.windows.profiles) == {"rev-t"}
    x = (ref.norm_mean + np.zeros((40, ref.n_features))).astype(np.float32)
    x[:, 0] = 99.0  # out of rev-t's range, but the batch names another profile
    before = counter("fleet_monitoring_unknown_profile_records_total")
    unknown = prepare(inbound(message(ref, 0, 40, features=x, profile="rev-zz")))
    known = prepare(inbound(message(ref, 40, 10, features=x[:10], profile="rev-t")))
    assert service._commit([unknown, known])
    assert counter("fleet_monitoring_unknown_profile_records_total") - before == 40
    assert (unknown.unranged, known.unranged) == (40, 0)
    assert service.stats()["records_unranged"] == 40
    with eng.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM inference")).scalar_one() == 50
    total = windows(eng)
    assert total.n == 50 and total.feature_out_of_range[0] == 10  # only the rev-t records were checked
    eng.dispose()


def test_profiles_default_to_firmware_configs_and_bad_files_are_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, bins: dict[tuple[str, str], ReferenceBins]
) -> None:
    service = Ingest(settings(f"sqlite:///{tmp_path / 'f.db'}", tmp_path))
    assert service.windows is not None and service.streams is not None
    assert DEFAULT_PROFILE_DIR == REPO / "firmware_configs"
    assert {"sim-v1", "pi4-uma8-v1"} <= set(service.windows.profiles)
    limits = service.windows.limits("sim-v1", next(iter(bins.values())))
    assert limits is not None and (float(limits.low[0]), float(limits.high[0])) == (-40.0, 85.0)
    (tmp_path / "typo.yaml").write_text("name: bad\nrangez: {}\n")
    (tmp_path / "ok.yaml").write_text(PROFILE_YAML)
    assert set(load_profiles([tmp_path, tmp_path / "missing.yaml"])) == {"rev-t"}
    assert "hardware profile not loaded" in caplog.text and "does not exist" in caplog.text
    off = Ingest(settings(f"sqlite:///{tmp_path / 'g.db'}", tmp_path, monitoring_sequential_enabled=False))
    assert off.windows is not None and off.streams is None


def test_sequential_settings_default_to_the_detector_defaults(tmp_path: Path) -> None:
    s = Settings(data_dir=tmp_path)
    assert s.monitoring_sequential_method == DEFAULT_CALIBRATED.method
    assert (s.monitoring_sequential_calibrated_threshold, s.monitoring_sequential_calibrated_delta) == (
        DEFAULT_CALIBRATED.threshold,
        DEFAULT_CALIBRATED.delta,
    )
    assert (s.monitoring_sequential_coact_threshold, s.monitoring_sequential_coact_delta) == (
        DEFAULT_COACT.threshold,
        DEFAULT_COACT.delta,
    )
    assert s.monitoring_sequential_min_instances == DEFAULT_CALIBRATED.min_instances == DEFAULT_COACT.min_instances
    assert s.monitoring_sequential_adwin_delta == DEFAULT_CALIBRATED.adwin_delta
    assert s.monitoring_sequential_idle_s == StreamDetectors().idle_timeout


# ----------------------------------------------------------------------------- sequential detectors

BATCH = 250
CHANGE = 2000  # seq of the first record after the step


def confidence(seed: int, n: int, step: bool) -> np.ndarray:
    """Calibrated confidence around 0.8 (beta(8, 2)); with ``step``, around 0.625 from record CHANGE on."""
    rng = np.random.default_rng(seed)
    if not step:
        return rng.beta(8, 2, n)
    return np.concatenate([rng.beta(8, 2, CHANGE), rng.beta(5, 3, n - CHANGE)])


def stream_payloads(ref: ReferenceBins, values: np.ndarray, **kw: Any) -> list[bytes]:
    return [
        message(ref, lo, BATCH, seed=lo, calibrated=values[lo : lo + BATCH], **kw)
        for lo in range(0, values.size, BATCH)
    ]


class Publisher:
    """A device's uplink: QoS 1 telemetry to the real broker."""

    def __init__(self, broker: Mosquitto, device: str) -> None:
        self.topic = f"fleet/v1/{device}/telemetry"
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex[:8]}")
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()

    def send(self, payloads: list[bytes]) -> None:
        for p in payloads:
            self.client.publish(self.topic, p, qos=1).wait_for_publish(10)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def wait_until(cond: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.services
def test_a_confidence_step_raises_one_alarm_near_it_end_to_end(
    broker: Mosquitto, pg_url: str, tmp_path: Path, ref: ReferenceBins
) -> None:
    upgrade(pg_url)
    service = Ingest(settings(pg_url, tmp_path, mqtt_url=broker.url))
    service.start()
    publisher = Publisher(broker, "veh-step")
    before = counter("fleet_monitoring_sequential_alarms_total", signal="calibrated")
    try:
        assert service.wait_connected(15)
        n = 4000
        publisher.send(stream_payloads(ref, confidence(11, n, step=True), device="veh-step"))
        wait_until(lambda: service.stats()["records_inserted"] >= n, "records stored")
    finally:
        publisher.close()
        service.stop(timeout=5)
    eng = make_engine(pg_url)
    found = alarms(eng)
    eng.dispose()
    assert len(found) == 1, found
    alarm = found[0]
    assert (alarm["device_id"], alarm["signal"], alarm["detector"]) == ("veh-step", "calibrated", "page_hinkley")
    assert (alarm["model_name"], alarm["model_version"], alarm["spool_epoch"]) == (
        ref.model_name,
        ref.model_version,
        EPOCH,
    )
    assert CHANGE <= alarm["seq"] <= CHANGE + 200  # detected within 200 records (20 s at 10 Hz)
    assert alarm["ts"] == pytest.approx(T0 + alarm["seq"] * 0.1)
    assert alarm["detail"]["direction"] == "drop" and alarm["detail"]["threshold"] == DEFAULT_CALIBRATED.threshold
    assert counter("fleet_monitoring_sequential_alarms_total", signal="calibrated") - before == 1


def test_a_stationary_stream_of_the_same_length_raises_none(
    engine: Engine, bins: dict[tuple[str, str], ReferenceBins]
) -> None:
    watch = SequentialWatch(StreamDetectors(), {k: b.coact_p99 for k, b in bins.items()})
    ref = next(iter(bins.values()))
    payloads = stream_payloads(ref, confidence(11, 4000, step=False))
    for lo in range(0, len(payloads), 4):  # groups of four batches, as ingest commits them
        items = write(engine, payloads[lo : lo + 4], streams=watch)
        assert all(not it.alarms for it in items)
    assert alarms(engine) == []
    assert len(watch) == 1 and len(watch.detectors) == 2  # one device, both signals watched


def test_restart_and_model_change_reset_the_stream_and_a_failed_group_is_fed_once(
    sqlite_url: str, bins: dict[tuple[str, str], ReferenceBins]
) -> None:
    upgrade(sqlite_url)
    eng = make_engine(sqlite_url)
    ref = next(iter(bins.values()))
    watch = SequentialWatch(StreamDetectors(), {k: b.coact_p99 for k, b in bins.items()})
    high, low = confidence(1, 2000, step=False), np.random.default_rng(2).beta(5, 3, 2000)
    a, b, c, d = ("A" * 16, T0), ("B" * 16, T0 + 1000), ("C" * 16, T0 + 2000), ("D" * 16, T0 + 3000)
    # Epoch A at 0.8, then the device is re-flashed (epoch B, seqs from 0 again) and runs at 0.625:
    # B is judged against its own history, so no alarm.
    write(eng, stream_payloads(ref, high, epoch=a[0], t0=a[1]), streams=watch)
    write(eng, stream_payloads(ref, low, epoch=b[0], t0=b[1]), streams=watch)
    assert alarms(eng) == []
    # A late re-send of epoch A (records older than B's) is stored, not fed: it would restart the stream.
    late = write(eng, [message(ref, 2000, 100, calibrated=low[:100], epoch=a[0], t0=a[1])], streams=watch)[0]
    assert late.stale == 100 and watch.n_stale == 100 and late.outcomes[0].inserted == 100

    # A model update restarts the stream too: the drop that comes with the new version is not an alarm.
    write(eng, stream_payloads(ref, high, epoch=c[0], t0=c[1]), streams=watch)
    update = [
        message(ref, 2000 + lo, BATCH, seed=lo, calibrated=low[lo : lo + BATCH], epoch=c[0], t0=c[1], version="1.1")
        for lo in range(0, 2000, BATCH)
    ]
    write(eng, update, streams=watch)
    assert alarms(eng) == []

    # The same drop on one epoch and model alarms once, even when its group fails and is retried.
    payloads = stream_payloads(ref, confidence(7, 4000, step=True), epoch=d[0], t0=d[1])
    write(eng, payloads[: CHANGE // BATCH], streams=watch)
    failing = [prepare(inbound(p)) for p in payloads[CHANGE // BATCH :]]
    watch.begin()
    with pytest.raises(RuntimeError), eng.connect().execution_options(sqlite_begin="IMMEDIATE") as conn, conn.begin():
        write_group(conn, failing, 1024, streams=watch)
        assert sum(sum(it.alarms.values()) for it in failing) == 1  # raised, then rolled back with its rows
        raise RuntimeError("the database went away before the commit")
    watch.rollback()
    assert alarms(eng) == []
    retried = [prepare(inbound(p)) for p in payloads[CHANGE // BATCH :]]
    watch.begin()
    with eng.connect().execution_options(sqlite_begin="IMMEDIATE") as conn, conn.begin():
        write_group(conn, retried, 1024, streams=watch)
    watch.commit()
    found = alarms(eng)
    assert [(x["spool_epoch"], x["signal"]) for x in found] == [(d[0], "calibrated")]
    assert CHANGE <= found[0]["seq"] <= CHANGE + 200
    eng.dispose()


def test_sketches_import_before_ingest_without_a_cycle() -> None:
    # The app imports the monitoring service (catalog -> sketches) before ingest (-> windows, streams -> sketches).
    code = "import collector.monitoring.sketches, collector.ingest.service"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
