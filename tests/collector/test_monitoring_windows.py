"""Monitoring windows written by ingest: exactly the newly stored records, merged per window, on both databases."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from prometheus_client import REGISTRY
from sqlalchemy.engine import Engine

from collector.config import Settings
from collector.db import make_engine, upgrade
from collector.db.engine import alembic_config
from collector.ingest.bulk import InferenceRows
from collector.ingest.service import Ingest, Prepared, prepare, write_group
from collector.monitoring.sketches import ReferenceBins, WindowSketch, sketch_block, split_by_window
from collector.monitoring.windows import WindowWriter, load_reference_bins
from collector.mqtt import InboundMessage
from shared.codec import encode_batch
from tests.shared.test_codec import make_batch, make_block

REPO = Path(__file__).resolve().parents[2]
CABIN_BUNDLE = REPO / "edge_agent" / "bundles" / "cabin-v1.tar"
DEV_PUB = REPO / "edge_agent" / "keys" / "dev-release.pub"
WINDOW_S = 10.0
T0 = 1_760_000_000.0  # a multiple of WINDOW_S: the first record opens a window


@pytest.fixture(scope="module")
def bins() -> dict[tuple[str, str], ReferenceBins]:
    if not CABIN_BUNDLE.exists():
        pytest.skip("edge_agent/bundles/cabin-v1.tar is not committed")
    loaded = load_reference_bins([CABIN_BUNDLE], [DEV_PUB])
    assert len(loaded) == 1
    return loaded


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest) -> Iterator[Engine]:
    url = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")
    upgrade(url)
    eng = make_engine(url)
    yield eng
    eng.dispose()


def cabin_message(
    ref: ReferenceBins, n: int, first: int, *, seed: int = 0, t0: float = T0, version: str | None = None
) -> InboundMessage:
    """A telemetry message of ``n`` records of the reference model (0.1 s apart from ``t0``), seqs from ``first``."""
    rng = np.random.default_rng(seed)
    mean, std = ref.norm_mean.astype(np.float64), ref.norm_std.astype(np.float64)
    b = make_block(n, first_seq=first, seed=seed, features=ref.n_features, classes=ref.n_classes)
    x = (mean + std * rng.normal(size=(n, ref.n_features))).astype(np.float32)
    x[rng.random(x.shape) < 0.01] = np.nan
    b = dataclasses.replace(
        b,
        features=x,
        model_name=ref.model_name,
        model_version=version or ref.model_version,
        ts=t0 + np.arange(n) * 0.1,
    )
    batch = make_batch(b, seq_first=first, seq_last=first + n - 1, gaps=[], sent_at=t0 + n * 0.1 + 1)
    payload = encode_batch(batch)
    return InboundMessage(
        mid=1, qos=1, topic="fleet/v1/veh-001/telemetry", payload=payload, received_at=t0 + 60, session=1
    )


def ingest(engine: Engine, writer: WindowWriter, message: InboundMessage) -> Prepared:
    item = prepare(message)
    assert item.reason is None, item.detail
    with engine.connect().execution_options(sqlite_begin="IMMEDIATE") as conn, conn.begin():
        write_group(conn, [item], 1024, writer)
    return item


def stored(engine: Engine) -> dict[float, tuple[int, bytes]]:
    with engine.connect() as conn:
        result = conn.execute(
            sa.text("SELECT device_id, model_name, role, window_s, window_start, n, sketch FROM monitoring_window")
        ).all()
    assert all(r[0] == "veh-001" and r[2] == "active" and r[3] == WINDOW_S for r in result)
    return {float(r[4]): (int(r[5]), bytes(r[6])) for r in result}


def only(rows: list[InferenceRows]) -> InferenceRows:
    assert len(rows) == 1
    return rows[0]


def test_ingest_writes_each_new_record_once_per_window(
    engine: Engine, bins: dict[tuple[str, str], ReferenceBins]
) -> None:
    ref = next(iter(bins.values()))
    writer = WindowWriter(bins, WINDOW_S)
    # 150 records 0.1 s apart from a window start: 100 in the first window, 50 in the next.
    first = ingest(engine, writer, cabin_message(ref, 150, 10))
    rows = only(first.rows)
    windows = stored(engine)
    assert sorted(windows) == [T0, T0 + WINDOW_S]
    assert [windows[T0][0], windows[T0 + WINDOW_S][0]] == [100, 50]
    expected = split_by_window(ref, rows, WINDOW_S)
    for start, (n, blob) in windows.items():
        assert n == expected[start].n and WindowSketch.from_bytes(blob).same_as(expected[start])
    total = sum((WindowSketch.from_bytes(blob) for _, blob in windows.values()), WindowSketch.empty(ref))
    assert total.same_as(sketch_block(ref, rows)) and total.n == 150

    # The same batch again: all duplicates, nothing changes.
    again = ingest(engine, writer, cabin_message(ref, 150, 10))
    assert again.outcomes[0].duplicates == 150
    assert stored(engine) == windows

    # A conflicting batch: seqs 10..159 are stored with other content, only 160..209 are new.
    clash = ingest(engine, writer, cabin_message(ref, 200, 10, seed=5, t0=T0 + 2.0))
    outcome = clash.outcomes[0]
    assert outcome.inserted == 50 and outcome.conflicts.size == 150 and outcome.new is not None
    fresh = only(clash.rows).take(outcome.new)
    assert fresh.seq.tolist() == list(range(160, 210))
    windows2 = stored(engine)
    added = split_by_window(ref, fresh, WINDOW_S)
    assert sorted(windows2) == sorted(set(windows) | set(added))
    assert sum(n for n, _ in windows2.values()) == 200
    for start, (n, blob) in windows2.items():
        want = sum((s[start] for s in (expected, added) if start in s), WindowSketch.empty(ref))
        assert n == want.n and WindowSketch.from_bytes(blob).same_as(want)


def test_unknown_model_version_is_counted_not_sketched(sqlite_url: str) -> None:
    upgrade(sqlite_url)
    eng = make_engine(sqlite_url)
    settings = Settings(
        database_url=sqlite_url,
        mqtt_url="mqtt://127.0.0.1:1",
        monitoring_bundles=[CABIN_BUNDLE],
        monitoring_trusted_keys=[DEV_PUB],
        monitoring_window_s=WINDOW_S,
    )
    service = Ingest(settings, engine=eng)
    assert service.windows is not None and len(service.windows.bins) == 1
    ref = next(iter(service.windows.bins.values()))
    before = REGISTRY.get_sample_value("fleet_monitoring_unsketched_records_total") or 0.0
    unknown, known = prepare(cabin_message(ref, 30, 0, version="9.9.9")), prepare(cabin_message(ref, 20, 1000))
    assert service._commit([unknown, known])
    after = REGISTRY.get_sample_value("fleet_monitoring_unsketched_records_total") or 0.0
    assert after - before == 30 and unknown.unsketched == 30 and known.unsketched == 0
    assert stored(eng) == {T0: (20, stored(eng)[T0][1])}
    with eng.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM inference")).scalar_one() == 50
    eng.dispose()


def test_bundles_without_trusted_keys_are_refused(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    assert load_reference_bins([CABIN_BUNDLE], []) == {}
    assert "no usable trusted key" in caplog.text
    bad = tmp_path / "not-a-bundle.tar"
    bad.write_bytes(b"nonsense")
    assert load_reference_bins([bad], [DEV_PUB]) == {}
    assert "not loaded" in caplog.text
    service = Ingest(Settings(mqtt_url="mqtt://127.0.0.1:1", data_dir=tmp_path, monitoring_enabled=False))
    assert service.windows is None


@pytest.mark.parametrize("db", ["sqlite", "postgresql"])
def test_migration_upgrade_and_downgrade(db: str, request: pytest.FixtureRequest) -> None:
    from alembic import command

    url = request.getfixturevalue("sqlite_url" if db == "sqlite" else "pg_url")
    upgrade(url)
    eng = make_engine(url)
    try:
        assert "monitoring_window" in sa.inspect(eng).get_table_names()
        with eng.begin() as conn:
            cfg = alembic_config(url)
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, "0001")
        assert "monitoring_window" not in sa.inspect(eng).get_table_names()
        assert "inference" in sa.inspect(eng).get_table_names()
    finally:
        eng.dispose()
    upgrade(url)
    eng = make_engine(url)
    try:
        assert "monitoring_window" in sa.inspect(eng).get_table_names()
    finally:
        eng.dispose()
