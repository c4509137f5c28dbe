"""The monitoring service on windows written by real ingest of encoded batches, on SQLite and PostgreSQL.

Records are realistic: rows of the committed cabin dataset that the reference bundle held out from
training (exactly where its score distributions come from), run through the bundle's own TFLite
model with its calibration and rare-pair mask, so a stationary scope is stationary for every test
(features, class mix, confidence, PCA error, co-activations) and a drift is a real input shift
that the model's outputs follow.
"""

from __future__ import annotations

import dataclasses
import functools
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlmodel import Session

from collector.config import Settings
from collector.db import make_engine, upgrade
from collector.db.models import Device, Label
from collector.ingest.service import prepare, write_group
from collector.monitoring.catalog import ReferenceCatalog
from collector.monitoring.drift import benjamini_hochberg
from collector.monitoring.service import MonitoringService, Scope, resolve_devices
from collector.monitoring.windows import WindowWriter
from collector.mqtt import InboundMessage
from collector.training.labelled import load_labelled_csv
from collector.training.reference import bin_index
from edge_agent.dataset import generate_drives, write_drive_rows
from edge_agent.sensors.simulated import load_scenario
from shared.bundle import Manifest, calibrate, load_bundle, rare_pair_indices
from shared.codec import encode_batch
from shared.interpreter import load_interpreter
from shared.signing import load_public_keys
from tests.collector.bundles import independent_cabin_bundle
from tests.services import create_database, drop_database
from tests.shared.test_codec import make_batch, make_block

REPO = Path(__file__).resolve().parents[3]
CABIN_BUNDLE = REPO / "edge_agent" / "bundles" / "cabin-v1.tar"
POOL_SEED = 77
"""Seed of the simulated drives the test traffic is drawn from: vehicles of their own, none of the reference's."""
DEV_PUB = REPO / "edge_agent" / "keys" / "dev-release.pub"
WINDOW_S = 10.0
T0 = 1_760_000_000.0  # a multiple of WINDOW_S
RATE_HZ = 10.0


@dataclasses.dataclass(frozen=True, eq=False)
class Cabin:
    """The reference model and a pool of stationary rows, ready to be turned into records."""

    manifest: Manifest
    model: bytes
    x: np.ndarray  # float32 [n, F] rows of independent drives, as the trainer reads a CSV
    y: np.ndarray  # int label index
    x64: np.ndarray  # the same rows in float64

    @functools.cached_property
    def wire_unresolved(self) -> frozenset[str]:
        """Features of which more than 1 % of the rows change reference bin when rounded to float16.

        The agent sends features as float16 (``feature_precision="auto"``); the trainer places the
        reference edges at midpoints of the float16 grid (``reference.wire_edges``) so that no row
        changes bin. Measured here, not listed by hand: it must stay empty.
        """
        out = set()
        for f, ref in enumerate(self.manifest.reference.features):
            edges = np.asarray(ref.histogram.edges)
            exact = bin_index(self.x64[:, f], edges)
            wire = bin_index(self.x64[:, f].astype(np.float16).astype(np.float64), edges)
            if (exact != wire).mean() > 0.01:
                out.add(ref.name)
        return frozenset(out)

    def outputs(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """What the agent computes for inputs ``x``: probabilities, calibrated probabilities, coact, hidden."""
        m = self.manifest
        interp = load_interpreter(self.model)
        z = (x - np.asarray(m.normalisation.mean, np.float32)) / np.asarray(m.normalisation.std, np.float32)
        inp = interp.get_input_details()[m.input.index]["index"]
        outs = interp.get_output_details()
        po, ho = outs[m.probabilities.index]["index"], outs[m.hidden.index]["index"]
        probs = np.empty((len(z), len(m.labels)), np.float32)
        hidden = np.empty((len(z), m.n_hidden), np.float32)
        for k in range(len(z)):
            interp.set_tensor(inp, np.ascontiguousarray(z[k : k + 1]))
            interp.invoke()
            probs[k] = interp.get_tensor(po)[0]
            hidden[k] = interp.get_tensor(ho)[0]
        cal = calibrate(probs, m.calibration.temperature)
        i, j = rare_pair_indices(m.reference.coactivation, m.n_hidden)
        active = hidden > 0
        coact = (active[:, i] & active[:, j]).sum(axis=1)
        return probs, cal, coact, hidden


@functools.cache
def cabin() -> Cabin:
    """The committed model and 9,000 rows of 20 simulated vehicles (once per session, about 3 s).

    The bundle's monitoring reference describes independent drives of the training scenario
    (``collector/training/regenerate.py``), so stationary traffic is more such drives: 20 vehicles of
    their own (seed :data:`POOL_SEED`) for two hours, a window every 8 s, written to CSV and read back
    as the trainer reads one.
    """
    if not CABIN_BUNDLE.exists():
        pytest.skip("the cabin bundle is not committed")
    bundle = load_bundle(CABIN_BUNDLE, load_public_keys([DEV_PUB]), check_tensors=False)
    m = bundle.manifest
    drives = generate_drives(load_scenario("training"), vehicles=20, seconds=7200.0, every_s=8.0, seed=POOL_SEED)
    with tempfile.TemporaryDirectory(prefix="cabin-pool-") as tmp:
        path = Path(tmp) / "drives.csv"
        with path.open("w", encoding="utf-8", newline="") as out:
            write_drive_rows(out, drives)
        table = load_labelled_csv(path, label_column="label", feature_columns=list(m.features))
    x64 = np.asarray(table.x, dtype=np.float64)
    # The table's label indexes follow its own sorted labels; the model's follow the manifest.
    y = np.array([m.labels.index(table.labels[i]) for i in table.y])
    return Cabin(m, bundle.model, x64.astype(np.float32), y, x64)


def chosen_rows(n: int, seed: int) -> np.ndarray:
    """The held-out rows :func:`records_message` sends for ``n`` and ``seed``."""
    return np.random.default_rng(seed).choice(len(cabin().x), size=n, replace=False)


def records_message(
    device: str,
    n: int,
    *,
    first_seq: int = 0,
    t0: float = T0,
    seed: int = 0,
    shift: dict[str, float] | None = None,
    version: str | None = None,
    labelled: bool = False,
) -> InboundMessage:
    """One encoded telemetry batch of ``n`` records of ``device`` (0.1 s apart from ``t0``).

    ``shift`` adds a constant to named features before the model sees them (a drifted sensor).
    """
    c = cabin()
    m = c.manifest
    rows = chosen_rows(n, seed)
    x = c.x[rows].copy()
    for name, delta in (shift or {}).items():
        x[:, m.features.index(name)] += np.float32(delta)
    probs, cal, coact, hidden = c.outputs(x)
    base = make_block(n, first_seq=first_seq, seed=seed, features=len(m.features), classes=len(m.labels))
    ts = t0 + np.arange(n) / RATE_HZ
    block = dataclasses.replace(
        base,
        model_name=m.name,
        model_version=version or m.version,
        ts=ts,
        mono=500.0 + np.arange(n) / RATE_HZ,
        pred=probs.argmax(axis=1).astype(np.int16),
        probs=probs.astype(np.float16),
        confidence=probs.max(axis=1).astype(np.float16),
        calibrated=cal.max(axis=1).astype(np.float16),
        features=x,
        act_bits=np.packbits(hidden > 0, axis=1),
        hidden_units=m.n_hidden,
        act_sample_idx=np.zeros(0, np.uint32),
        act_sample=np.zeros((0, m.n_hidden), np.float16),
        coact=coact.astype(np.uint16),
        label=(c.y[rows] if labelled else np.full(n, -1)).astype(np.int16),
    )
    batch = make_batch(
        block,
        device_id=device,
        seq_first=first_seq,
        seq_last=first_seq + n - 1,
        gaps=[],
        sent_at=float(ts[-1]) + 1.0,
    )
    return InboundMessage(
        mid=1,
        qos=1,
        topic=f"fleet/v1/{device}/telemetry",
        payload=encode_batch(batch),
        received_at=float(ts[-1]) + 2.0,
        session=1,
    )


def ingest(engine: Engine, writer: WindowWriter | None, messages: Sequence[InboundMessage]) -> None:
    """Write ``messages`` as ingest does (one transaction), sketching into ``writer``'s windows."""
    items = [prepare(m) for m in messages]
    for item in items:
        assert item.reason is None, item.detail
    with engine.connect().execution_options(sqlite_begin="IMMEDIATE") as conn, conn.begin():
        write_group(conn, items, 1 << 20, writer)


def tag_devices(engine: Engine, tags: dict[str, list[str]]) -> None:
    """Set the reported tags of devices (ingest registered them)."""
    with Session(engine) as s:
        for device, t in tags.items():
            row = s.get(Device, device)
            assert row is not None
            row.tags = t
            s.add(row)
        s.commit()


def settings_for(url: str) -> Settings:
    return Settings(
        database_url=url,
        mqtt_url="mqtt://127.0.0.1:1",
        monitoring_bundles=[independent_cabin_bundle()],
        monitoring_trusted_keys=[DEV_PUB],
        monitoring_window_s=WINDOW_S,
    )


@functools.cache
def catalog() -> ReferenceCatalog:
    cat = ReferenceCatalog.from_paths([independent_cabin_bundle()], [DEV_PUB])
    assert len(cat) == 1
    return cat


EPOCH = "e" * 16  # make_batch's spool epoch
LATE_LABELS = 100
DRIFT = {"temperature_c": 8.0, "humidity_pct": 25.0, "audio_rms_dbfs": 12.0}


def fleet(engine: Engine) -> None:
    """Four devices, 300 records each over three 10-s windows: group a stationary, group b drifted.

    Plus veh-c1 with 20 records (too few for anything) and 50 records of a version without a bundle.
    veh-a2's records carry their labels inline; veh-a1's first 100 get late labels.
    """
    writer = WindowWriter(catalog().bins(), WINDOW_S)
    msgs = []
    for k, device in enumerate(["veh-a1", "veh-a2", "veh-b1", "veh-b2"]):
        shift = DRIFT if device.startswith("veh-b") else None
        msgs.append(records_message(device, 300, seed=k, shift=shift, labelled=device == "veh-a2"))
    msgs.append(records_message("veh-c1", 20, seed=7))
    # A version without a reference: stored and counted, never sketched.
    msgs.append(records_message("veh-a1", 50, first_seq=1000, seed=9, version="9.9.9"))
    ingest(engine, writer, msgs)
    tag_devices(
        engine,
        {
            "veh-a1": ["group:a", "site:x"],
            "veh-a2": ["group:a"],
            "veh-b1": ["group:b"],
            "veh-b2": ["group:b", "group:a-not"],
        },
    )
    # Late labels (the true classes) for veh-a1's first 100 records; veh-a2's came inline.
    truth = cabin().y[chosen_rows(300, 0)][:LATE_LABELS]
    with Session(engine) as s:
        for seq, label in enumerate(truth):
            s.add(Label(device_id="veh-a1", spool_epoch=EPOCH, seq=seq, label=int(label), received_at=T0 + 3600))
        s.commit()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def fleet_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A database holding :func:`fleet`, built once per module (the tests only read it)."""
    admin, name = None, None
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('fleet') / 'fleet.db'}"
    else:
        admin = request.getfixturevalue("pg_admin_url")
        name = create_database(admin)
        url = f"{admin.rsplit('/', 1)[0].replace('postgresql://', 'postgresql+psycopg://', 1)}/{name}"
    upgrade(url)
    engine = make_engine(url)
    fleet(engine)
    engine.dispose()
    yield url
    if admin is not None and name is not None:
        drop_database(admin, name)


@pytest.fixture(scope="module")
def service(fleet_url: str) -> Iterator[MonitoringService]:
    engine = make_engine(fleet_url)
    yield MonitoringService(engine, catalog(), settings_for(fleet_url))
    engine.dispose()


def test_groups_resolve_through_tags(service: MonitoringService) -> None:
    with service.engine.connect() as conn:
        assert resolve_devices(conn) is None
        assert resolve_devices(conn, group="a") == ["veh-a1", "veh-a2"]
        assert resolve_devices(conn, group="b") == ["veh-b1", "veh-b2"]
        assert resolve_devices(conn, group="nope") == []
        assert resolve_devices(conn, device_ids=["veh-b2", "veh-a1"], group="a") == ["veh-a1"]
        assert resolve_devices(conn, device_ids=["veh-b2", "veh-a1"]) == ["veh-a1", "veh-b2"]
    empty = service.status(Scope(group="nope"))
    assert empty.devices == [] and empty.models == [] and empty.verdict == "not_enough_data"


def test_stationary_group_has_no_drift_and_a_reliable_estimate(service: MonitoringService) -> None:
    status = service.status(Scope(group="a"))
    assert status.devices == ["veh-a1", "veh-a2"]
    m = status.model("cabin-events", "1.0.0")
    assert m is not None and m.has_reference
    assert (m.n_records, m.n_windows, m.n_devices) == (600, 6, 2)
    assert (m.first_window, m.last_window_end) == (T0, T0 + 3 * WINDOW_S)
    assert m.drift is not None and m.drift.n_tested == 40
    drifting = {f.name for f in m.drift.features if f.verdict == "drift"}
    # No feature drifts on stationary traffic, and none changes bin through the float16 wire.
    assert cabin().wire_unresolved == frozenset()
    assert drifting == set()
    for signal in (m.drift.class_mix, m.drift.confidence, m.drift.pca_error, m.drift.coactivation):
        assert signal.verdict == "ok" and signal.q_value is not None and signal.q_value > signal.threshold
    acc = m.accuracy
    assert acc is not None and acc.reliable and acc.region.verdict == "reliable"
    assert acc.expected.method == "normal" and acc.expected.estimate is not None
    assert acc.expected.low is not None and acc.expected.high is not None
    assert acc.expected.low < acc.expected.estimate < acc.expected.high
    assert m.data_quality is not None and m.data_quality.verdict == "ok"
    assert all(c.verdict == "ok" for c in m.data_quality.checks)
    # The version without a bundle: counted from the stored records, with the reason for no verdict.
    unknown = status.model("cabin-events", "9.9.9")
    assert unknown is not None and not unknown.has_reference and unknown.verdict == "no_reference"
    assert unknown.n_records == 50 and unknown.n_devices == 1 and "no verified reference bundle" in unknown.warnings[0]
    assert any("9.9.9" in w for w in status.warnings)


def test_stationary_group_overall_verdict_is_ok(service: MonitoringService) -> None:
    assert service.status(Scope(group="a")).verdict == "ok"


def test_drifted_group_names_the_shifted_features(service: MonitoringService) -> None:
    status = service.status(Scope(group="b"))
    m = status.model("cabin-events", "1.0.0")
    assert m is not None and m.drift is not None
    assert status.verdict == "drift" and m.verdict == "drift" and status.reasons
    drifting = {f.name for f in m.drift.features if f.verdict == "drift"}
    assert set(DRIFT) <= drifting
    for f in m.drift.features:
        if f.name in DRIFT:
            assert f.ks.q_value is not None and f.ks.q_value <= f.ks.threshold and f.psi >= 0.1
    assert any("major PSI" in r and "temperature_c" in r for r in status.reasons)
    # The model follows its inputs out of the training region: the estimate is flagged, not trusted.
    assert m.drift.pca_error.verdict == "drift"
    assert m.accuracy is not None and not m.accuracy.reliable and m.accuracy.region.verdict == "unreliable"
    assert any("expected accuracy unreliable" in w for w in status.warnings)


def test_per_device_statuses_share_one_fdr_family(service: MonitoringService) -> None:
    per_device = service.evaluate_devices(Scope(device_ids=["veh-a1", "veh-a2", "veh-b1", "veh-b2"]))
    assert sorted(per_device) == ["veh-a1", "veh-a2", "veh-b1", "veh-b2"]
    for device, status in per_device.items():
        assert status.devices == [device] and status.scope.device_ids == (device,)
        m = status.model("cabin-events", "1.0.0")
        assert m is not None and m.n_records == 300 and m.n_devices == 1
    verdicts = {d: s.verdict for d, s in per_device.items()}
    assert verdicts["veh-b1"] == verdicts["veh-b2"] == "drift"
    for device in ("veh-b1", "veh-b2"):
        m = per_device[device].model("cabin-events", "1.0.0")
        assert m is not None and m.drift is not None
        assert set(DRIFT) <= {f.name for f in m.drift.features if f.verdict == "drift"}
    # veh-a1's unreferenced records show up on veh-a1 only.
    assert per_device["veh-a1"].model("cabin-events", "9.9.9") is not None
    assert per_device["veh-a2"].model("cabin-events", "9.9.9") is None
    # One BH family over every device's tests: the q-values are BH over all their p-values together.
    tests = []
    for status in per_device.values():
        m = status.model("cabin-events", "1.0.0")
        assert m is not None and m.drift is not None
        tests.extend(f.ks for f in m.drift.features)
        tests.extend([m.drift.class_mix, m.drift.confidence, m.drift.pca_error, m.drift.coactivation])
    p = np.array([np.nan if t.p_value is None else t.p_value for t in tests])
    _, q = benjamini_hochberg(p, 0.05)
    assert np.isfinite(p).sum() == 4 * 44
    assert np.allclose([t.q_value for t in tests], q, rtol=1e-12)
    # ... which is not what a device gets alone (a family of its own 44 tests).
    alone = service.status(Scope(device_ids=["veh-a2"])).model("cabin-events", "1.0.0")
    joint = per_device["veh-a2"].model("cabin-events", "1.0.0")
    assert alone is not None and joint is not None and alone.drift is not None and joint.drift is not None
    assert [f.ks.p_value for f in alone.drift.features] == [f.ks.p_value for f in joint.drift.features]
    assert [f.ks.q_value for f in alone.drift.features] != [f.ks.q_value for f in joint.drift.features]


def test_window_starts_and_per_window_statuses(service: MonitoringService) -> None:
    scope = Scope(group="b", since=T0 + WINDOW_S)
    assert service.window_starts(scope) == [T0 + WINDOW_S, T0 + 2 * WINDOW_S]
    assert service.window_starts(Scope(group="b")) == [T0, T0 + WINDOW_S, T0 + 2 * WINDOW_S]
    assert service.window_starts(Scope(group="nope")) == []
    per_window = service.evaluate_windows(scope)
    assert sorted(per_window) == [T0 + WINDOW_S, T0 + 2 * WINDOW_S]
    for start, status in per_window.items():
        assert (status.scope.since, status.scope.until) == (start, start + WINDOW_S)
        m = status.model("cabin-events", "1.0.0")
        assert m is not None and m.n_records == 200 and m.n_windows == 2 and status.verdict == "drift"
    with pytest.raises(ValueError, match="until must be after since"):
        Scope(since=T0, until=T0)


def test_tiny_windows_say_not_enough_data(service: MonitoringService) -> None:
    status = service.status(Scope(device_ids=["veh-c1"]))
    m = status.model("cabin-events", "1.0.0")
    assert m is not None and m.n_records == 20 and m.drift is not None
    assert m.verdict == "not_enough_data" and status.verdict == "not_enough_data" and status.reasons == []
    assert all(f.verdict == "not_enough_data" for f in m.drift.features)
    assert m.drift.class_mix.verdict == "not_enough_data" and m.drift.coactivation.verdict == "not_enough_data"
    assert m.accuracy is not None and m.accuracy.expected.method == "not_enough_data"
    assert m.accuracy.expected.low is None and m.accuracy.region.verdict == "not_enough_data"
    assert m.data_quality is not None
    rates = {c.name: c.verdict for c in m.data_quality.checks}
    assert rates["missing_rate"] == rates["seq_gap_rate"] == "not_enough_data"
    assert rates["clock_skew_s"] == "ok"  # an extreme needs no sample size


def test_realized_accuracy_and_gap_from_late_and_inline_labels(service: MonitoringService) -> None:
    # Expected from the stored records themselves: veh-a2's inline labels and veh-a1's late ones.
    with service.engine.connect() as conn:
        stored = conn.execute(
            sa.text(
                "SELECT i.pred, COALESCE(l.label, i.label), i.calibrated FROM inference i "
                "LEFT JOIN label l ON l.device_id = i.device_id AND l.spool_epoch = i.spool_epoch AND l.seq = i.seq "
                "WHERE i.device_id IN ('veh-a1', 'veh-a2') AND i.model_version = '1.0.0' "
                "AND COALESCE(l.label, i.label) IS NOT NULL"
            )
        ).all()
    assert len(stored) == 300 + LATE_LABELS
    correct = sum(int(p == t) for p, t, _ in stored)
    m = service.status(Scope(group="a")).model("cabin-events", "1.0.0")
    assert m is not None and m.accuracy is not None
    acc = m.accuracy
    assert acc.realized_source == "labels" and acc.realized is not None and acc.realized.n == len(stored)
    assert acc.realized.estimate == pytest.approx(correct / len(stored))
    assert acc.realized.method == "wilson" and acc.realized.low is not None
    gap = acc.gap
    assert gap is not None and gap.n == len(stored) and gap.low is not None and gap.high is not None
    assert gap.estimated == pytest.approx(sum(float(c) for _, _, c in stored) / len(stored), rel=1e-6)
    assert gap.gap == pytest.approx(correct / len(stored) - gap.estimated)
    # Per device, only the labels that came with the records (kept in the sketches) are used.
    per_device = service.evaluate_devices(Scope(group="a"))
    a2 = per_device["veh-a2"].model("cabin-events", "1.0.0")
    a1 = per_device["veh-a1"].model("cabin-events", "1.0.0")
    assert a2 is not None and a2.accuracy is not None and a2.accuracy.realized_source == "inline_labels"
    assert a2.accuracy.realized is not None and a2.accuracy.realized.n == 300
    assert a1 is not None and a1.accuracy is not None and a1.accuracy.realized is None


def test_wholesale_input_drift_makes_an_in_region_estimate_unreliable(service: MonitoringService) -> None:
    # A sensor that ages can move one class's inputs to where another class was: the region test passes
    # while most features drift (the gas-sensor experiment). The estimate is then not to be trusted.
    from collector.db.models import MonitoringWindow
    from collector.monitoring.service import StatusThresholds, accuracy_status
    from collector.monitoring.sketches import WindowSketch, merge_all

    status = service.status(Scope(group="a"))
    m = status.model("cabin-events", "1.0.0")
    assert m is not None and m.drift is not None and m.accuracy is not None and m.accuracy.reliable
    entry = service.catalog.get("cabin-events", "1.0.0")
    assert entry is not None
    with Session(service.engine) as s:
        rows = s.exec(
            sa.select(MonitoringWindow.sketch).where(MonitoringWindow.device_id.in_(status.devices))  # type: ignore[attr-defined]
        ).all()
    sketch = merge_all([WindowSketch.from_bytes(r[0]) for r in rows])
    thr = StatusThresholds()
    same = accuracy_status(entry, sketch, thr, drift=m.drift)
    assert same.reliable and same.unreliable_reasons == []
    wholesale = dataclasses.replace(m.drift, n_drifting=30, drift_share=0.75)
    moved = accuracy_status(entry, sketch, thr, drift=wholesale)
    assert moved.region.verdict == "reliable" and not moved.reliable
    assert moved.unreliable_reasons == ["inputs drifted wholesale: 30 of 40 features drift (share 0.75 >= 0.25)"]
