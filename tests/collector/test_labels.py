"""Late labels through the API on SQLite and PostgreSQL: records stored by real ingest, labels pushed before
and after they arrive, replaced, resolved from class names, rejected one by one; realized accuracy and the
gap against a hand computation; ``fleetctl labels`` on files written by the agent's late-label writer."""

from __future__ import annotations

import dataclasses
import gzip
import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from sqlalchemy.engine import Engine

from collector.app import create_app
from collector.config import Settings
from collector.db import make_engine, upgrade
from collector.fleetctl import main
from collector.ingest.service import prepare, write_group
from collector.labels import ClassNames, label_stats, push_labels
from collector.mqtt import InboundMessage
from edge_agent.labels import LateLabels
from shared.codec import RecordBlock, encode_batch
from tests.collector.test_monitoring_windows import CABIN_BUNDLE, DEV_PUB
from tests.services import serve_app
from tests.shared.test_codec import make_batch, make_block

CLASSES = ["impact", "normal", "smoking", "vaping", "window_open"]  # the label list of cabin-v1.tar
T0 = 1_760_000_000.0
EPOCH = "e" * 16
Z95 = 1.959963984540054


def block(n: int, *, seed: int, version: str = "1.0.0", inline: dict[int, int] | None = None) -> RecordBlock:
    """``n`` records with seqs 0..n-1, one second apart from T0; ``inline`` labels by seq."""
    b = make_block(n, first_seq=0, seed=seed, classes=len(CLASSES))
    label = np.full(n, -1, np.int16)
    for seq, value in (inline or {}).items():
        label[seq] = value
    return dataclasses.replace(b, model_version=version, ts=T0 + np.arange(n, dtype=np.float64), label=label)


def ingest(engine: Engine, device: str, b: RecordBlock) -> None:
    batch = make_batch(b, device_id=device, spool_epoch=EPOCH, seq_first=0, seq_last=len(b) - 1, gaps=[])
    msg = InboundMessage(
        mid=1, qos=1, topic=f"fleet/v1/{device}/telemetry", payload=encode_batch(batch), received_at=T0 + 500, session=1
    )
    item = prepare(msg)
    assert item.reason is None, item.detail
    with engine.connect().execution_options(sqlite_begin="IMMEDIATE") as conn, conn.begin():
        write_group(conn, [item], 1024)


def tag(engine: Engine, device: str, *tags: str) -> None:
    status = json.dumps({"state": "online", "tags": list(tags)})
    msg = InboundMessage(
        mid=1, qos=1, topic=f"fleet/v1/{device}/status", payload=status.encode(), received_at=T0, session=1
    )
    with engine.connect().execution_options(sqlite_begin="IMMEDIATE") as conn, conn.begin():
        write_group(conn, [prepare(msg)], 1024)


def item(device: str, seq: int, label: Any) -> dict[str, Any]:
    return {"device_id": device, "spool_epoch": EPOCH, "seq": seq, "label": label}


def counter(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def by_hand(b: RecordBlock, truth: dict[int, int]) -> dict[str, float]:
    """Realized accuracy, its Wilson interval, the expected accuracy and the gap, from the block itself."""
    seqs = np.array(sorted(truth))
    p = b.calibrated[seqs].astype(np.float32).astype(np.float64)  # float16 on the wire, REAL in the table
    c = (b.pred[seqs] == np.array([truth[s] for s in seqs])).astype(np.float64)
    n, k = len(seqs), c.sum()
    centre = (k + Z95**2 / 2) / (n + Z95**2)
    half = Z95 / (n + Z95**2) * math.sqrt(k * (n - k) / n + Z95**2 / 4)
    d = c - p
    stderr = d.std(ddof=1) / math.sqrt(n)
    gap = c.mean() - p.mean()
    return {
        "n": n,
        "k": k,
        "realized": k / n,
        "low": centre - half,
        "high": centre + half,
        "expected": p.mean(),
        "gap": gap,
        "stderr": stderr,
        "gap_low": gap - Z95 * stderr,
        "gap_high": gap + Z95 * stderr,
    }


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.services)])
def api(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[TestClient, Engine]]:
    url = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")
    settings = Settings(
        database_url=url,
        data_dir=tmp_path,
        monitoring_bundles=[CABIN_BUNDLE],
        monitoring_trusted_keys=[DEV_PUB],
    )
    with TestClient(create_app(settings, start_ingest=False)) as client:
        engine = make_engine(url)
        yield client, engine
        engine.dispose()


def test_labels_before_and_after_their_records_replace_reject_and_realized_accuracy(
    api: tuple[TestClient, Engine],
) -> None:
    client, engine = api
    rng = np.random.default_rng(7)
    v1 = block(200, seed=1)
    v2 = block(100, seed=2, version="2.0.0", inline={s: int(rng.integers(5)) for s in range(60)})
    truth1: dict[int, int] = {}
    truth2 = {int(s): int(v) for s, v in enumerate(v2.label) if v >= 0}

    # Before the records arrive: class names resolve against the one known label list.
    names = {s: int(rng.integers(5)) for s in range(50)}
    r = client.post("/api/v1/labels", json={"items": [item("veh-001", s, CLASSES[v]) for s, v in names.items()]})
    assert r.status_code == 200, r.text
    assert r.json() == {"accepted": 50, "inserted": 50, "replaced": 0, "matched": 0, "rejected": []}
    truth1.update(names)
    early = {s: int(rng.integers(5)) for s in range(10)}
    r = client.post("/api/v1/labels", json={"items": [item("veh-002", s, v) for s, v in early.items()]})
    assert r.json()["inserted"] == 10
    truth2.update(early)  # late labels win over the inline ones

    ingest(engine, "veh-001", v1)
    ingest(engine, "veh-002", v2)
    tag(engine, "veh-002", "group:depot-b")

    # After: half names, half indices, all matched.
    after = {s: int(rng.integers(5)) for s in range(50, 150)}
    items = [item("veh-001", s, CLASSES[v] if s % 2 else v) for s, v in after.items()]
    r = client.post("/api/v1/labels", json={"items": items, "source": "workshop"})
    assert r.json() == {"accepted": 100, "inserted": 100, "replaced": 0, "matched": 100, "rejected": []}
    truth1.update(after)

    # Pushed again: replaced.
    again = {s: (truth1[s] + 1) % 5 for s in range(20)}
    r = client.post("/api/v1/labels", json={"items": [item("veh-001", s, v) for s, v in again.items()]})
    assert r.json() == {"accepted": 20, "inserted": 0, "replaced": 20, "matched": 20, "rejected": []}
    truth1.update(again)

    # Bad items are rejected one by one; the good ones land.
    before = {code: counter("fleet_labels_rejected_total", reason=code) for code in ("unknown_class", "bad_seq")}
    mixed: list[Any] = [
        item("veh-001", 150, "smoking"),
        item("bad id!", 1, 0),
        item("veh-001", -1, 0),
        item("veh-001", "12", 0),
        item("veh-001", 151, "smokin"),
        item("veh-001", 152, 5),
        item("veh-002", 20, "smoking"),
        {"device_id": "veh-001", "spool_epoch": EPOCH, "seq": 3},
        "not an object",
        item("veh-001", 154, True),
        {**item("veh-001", 155, 1), "spool_epoch": ""},
        item("veh-001", 153, 2),
        item("veh-001", 153, "vaping"),  # the same record again in one push: the later label wins
        item("veh-003", 5, "normal"),  # a record that has not arrived
    ]
    r = client.post("/api/v1/labels", json={"items": mixed})
    body = r.json()
    assert r.status_code == 200
    assert {k: body[k] for k in ("accepted", "inserted", "replaced", "matched")} == {
        "accepted": 4,
        "inserted": 3,
        "replaced": 1,
        "matched": 3,
    }
    assert [(x["index"], x["code"]) for x in body["rejected"]] == [
        (1, "bad_device_id"),
        (2, "bad_seq"),
        (3, "bad_seq"),
        (4, "unknown_class"),
        (5, "class_out_of_range"),
        (6, "unknown_model"),
        (7, "bad_item"),
        (8, "bad_item"),
        (9, "bad_label"),
        (10, "bad_spool_epoch"),
    ]
    reasons = {x["index"]: x["reason"] for x in body["rejected"]}
    assert "'smokin' is not a class of cabin-events 1.0.0" in reasons[4]
    assert "5 classes" in reasons[5] and "cabin-events 2.0.0" in reasons[6] and "label" in reasons[7]
    assert counter("fleet_labels_rejected_total", reason="unknown_class") == before["unknown_class"] + 1
    assert counter("fleet_labels_rejected_total", reason="bad_seq") == before["bad_seq"] + 2
    truth1.update({150: CLASSES.index("smoking"), 153: CLASSES.index("vaping")})

    listed = client.get("/api/v1/labels", params={"device_id": "veh-001", "limit": 100}).json()
    assert listed["total"] == len(truth1) and len(listed["items"]) == 100 and listed["next"]
    rest = client.get("/api/v1/labels", params={"device_id": "veh-001", "cursor": listed["next"]}).json()
    got = {x["seq"]: x["label"] for x in listed["items"] + rest["items"]}
    assert got == truth1 and rest["next"] is None
    assert {x["source"] for x in listed["items"] if 50 <= x["seq"] < 100} == {"workshop"}
    pending = client.get("/api/v1/labels", params={"device_id": "veh-003"}).json()["items"]
    assert [(x["seq"], x["label"], x["matched"], x["pred"]) for x in pending] == [(5, 1, False, None)]

    # Realized accuracy and the gap, per model version, equal the hand computation.
    acc = client.get("/api/v1/labels/accuracy").json()
    assert acc["total"] == 2 and acc["next"] is None
    for row, (b, truth) in zip(acc["items"], ((v1, truth1), (v2, truth2)), strict=True):
        want = by_hand(b, truth)
        assert (row["model_name"], row["model_version"]) == ("cabin-events", b.model_version)
        assert (row["n_labelled"], row["n_correct"]) == (want["n"], want["k"])
        assert row["realized"]["method"] == "wilson" and row["expected"]["method"] == "normal"
        assert row["realized"]["estimate"] == pytest.approx(want["realized"], rel=1e-12)
        assert row["realized"]["low"] == pytest.approx(want["low"], rel=1e-9)
        assert row["realized"]["high"] == pytest.approx(want["high"], rel=1e-9)
        assert row["expected"]["estimate"] == pytest.approx(want["expected"], rel=1e-9)
        assert row["expected"]["low"] <= row["expected"]["estimate"] <= row["expected"]["high"]
        assert row["gap"]["gap"] == pytest.approx(want["gap"], rel=1e-9, abs=1e-12)
        assert row["gap"]["stderr"] == pytest.approx(want["stderr"], rel=1e-6)
        assert row["gap"]["low"] == pytest.approx(want["gap_low"], rel=1e-6)
        assert row["gap"]["high"] == pytest.approx(want["gap_high"], rel=1e-6)

    # Scopes: device, model version, record time, role.
    only2 = client.get("/api/v1/labels/accuracy", params={"device_id": "veh-002"}).json()["items"]
    assert [x["model_version"] for x in only2] == ["2.0.0"]
    depot = client.get("/api/v1/labels/accuracy", params={"group": "depot-b"}).json()["items"]
    assert [x["model_version"] for x in depot] == ["2.0.0"]
    assert client.get("/api/v1/labels/accuracy", params={"group": "nowhere"}).json()["total"] == 0
    only1 = client.get("/api/v1/labels/accuracy", params={"model_version": "1.0.0"}).json()["items"]
    assert [x["n_labelled"] for x in only1] == [len(truth1)]
    window = {"since": T0 + 100, "until": T0 + 150, "model_version": "1.0.0"}
    in_window = client.get("/api/v1/labels/accuracy", params=window).json()["items"]
    want = by_hand(v1, {s: truth1[s] for s in range(100, 150)})
    assert (in_window[0]["n_labelled"], in_window[0]["n_correct"]) == (want["n"], want["k"])
    assert client.get("/api/v1/labels/accuracy", params={"role": "shadow"}).json() == {
        "items": [],
        "total": 0,
        "next": None,
    }
    with engine.connect() as conn:
        assert label_stats(conn, device_ids=[]) == {}


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.services)])
def engine(request: pytest.FixtureRequest) -> Iterator[Engine]:
    url = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")
    upgrade(url)
    eng = make_engine(url)
    yield eng
    eng.dispose()


def test_class_names_of_records_not_stored_resolve_only_when_every_bundle_agrees(engine: Engine) -> None:
    def push(classes: ClassNames, *items: dict[str, Any]) -> list[tuple[str, ...]]:
        with engine.connect() as conn, conn.begin():
            result = push_labels(conn, items, classes)
        return [(r.code,) for r in result.rejected]

    agree = ClassNames({("m", "1"): ["cat", "dog"], ("m", "2"): ["cat", "dog"]})
    differ = ClassNames({("m", "1"): ["cat", "dog"], ("m", "2"): ["dog", "cat"]})
    assert push(agree, item("veh-009", 1, "dog")) == []
    assert push(agree, item("veh-009", 2, "cow")) == [("unknown_class",)]
    assert push(differ, item("veh-009", 3, "dog")) == [("ambiguous_class_name",)]
    assert push(ClassNames({}), item("veh-009", 4, "dog")) == [("no_class_names",)]
    assert push(differ, item("veh-009", 5, 1), item("veh-009", 6, 0)) == []  # indices need no names
    with engine.connect() as conn:
        stored = conn.exec_driver_sql("SELECT seq, label FROM label ORDER BY seq").all()
    assert [tuple(r) for r in stored] == [(1, 1), (5, 1), (6, 0)]


def test_a_push_over_the_limits_or_not_json_is_refused_whole(sqlite_url: str, tmp_path: Path) -> None:
    with TestClient(create_app(Settings(database_url=sqlite_url, data_dir=tmp_path), start_ingest=False)) as client:
        too_many = {"items": [item("veh-001", s, 0) for s in range(10_001)]}
        before = counter("fleet_labels_pushes_rejected_total", reason="too_many_items")
        r = client.post("/api/v1/labels", json=too_many)
        assert r.status_code == 413 and "at most 10000" in r.json()["detail"]
        assert counter("fleet_labels_pushes_rejected_total", reason="too_many_items") == before + 1
        r = client.post("/api/v1/labels", content=b"[" * 9_000_000, headers={"content-type": "application/json"})
        assert r.status_code == 413 and "byte limit" in r.json()["detail"]
        for body, detail in (
            (b"{not json", "not JSON"),
            (b'{"labels": []}', '"items"'),
            (b'{"items": [], "source": ""}', "source"),
        ):
            r = client.post("/api/v1/labels", content=body, headers={"content-type": "application/json"})
            assert r.status_code == 422 and detail in r.json()["detail"], r.text
        # Lone surrogates cannot be stored as text: the item is rejected, the push goes on.
        surrogates = (
            b'{"items": [{"device_id": "veh-001", "spool_epoch": "\\ud800", "seq": 1, "label": 0},'
            b' {"device_id": "veh-001", "spool_epoch": "e", "seq": 1, "label": "x\\udfff"},'
            b' {"device_id": "veh-001", "spool_epoch": "e", "seq": 2, "label": 0}]}'
        )
        r = client.post("/api/v1/labels", content=surrogates, headers={"content-type": "application/json"})
        assert [(x["index"], x["code"]) for x in r.json()["rejected"]] == [(0, "bad_spool_epoch"), (1, "bad_label")]
        assert "surrogate" in r.json()["rejected"][0]["reason"] and r.json()["inserted"] == 1
        r = client.post("/api/v1/labels", content=b'{"items": [], "source": "\\ud800"}')
        assert r.status_code == 422 and "surrogate" in r.json()["detail"]
        assert client.get("/api/v1/labels").json()["total"] == 1


# ------------------------------------------------------------------------------------------- fleetctl


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, Engine]]:
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    settings = Settings(
        database_url=url, data_dir=tmp_path, monitoring_bundles=[CABIN_BUNDLE], monitoring_trusted_keys=[DEV_PUB]
    )
    upgrade(url)
    engine = make_engine(url)
    with serve_app(create_app(settings, start_ingest=False)) as base:
        yield base, engine
    engine.dispose()


def fleetctl(base: str, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    try:
        code = main(["--api-url", base, *args])
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, capsys.readouterr().out


def test_fleetctl_pushes_the_agents_label_file_in_chunks_and_shows_accuracy(
    served: tuple[str, Engine], tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    base, engine = served
    b = block(120, seed=3)
    ingest(engine, "veh-001", b)
    rng = np.random.default_rng(11)
    truth = rng.integers(5, size=120)
    path = tmp_path / "labels.csv"
    writer = LateLabels(path, 1.0)
    assert writer.offer("veh-001", EPOCH, np.arange(100), [CLASSES[t] for t in truth[:100]]) == 100
    with path.open("a") as fh:  # a wrong class name and a bad device id, on lines 102 and 103
        fh.write(f"veh-001,{EPOCH},100,smokin\nbad id!,{EPOCH},101,1\n")

    code, out = fleetctl(base, capsys, "labels", "push", str(path), "--chunk-size", "40", "--json")
    assert code == 0
    data = json.loads(out)
    assert {k: data[k] for k in ("accepted", "inserted", "replaced", "matched")} == {
        "accepted": 100,
        "inserted": 100,
        "replaced": 0,
        "matched": 100,
    }
    assert [(r["index"], r["line"], r["code"]) for r in data["rejected"]] == [
        (100, 102, "unknown_class"),
        (101, 103, "bad_device_id"),
    ]

    # The same labels gzip-compressed, with an extra column, and the last 20 as indices: all replaced or new.
    zipped = tmp_path / "labels.csv.gz"
    rows = [f"{EPOCH},veh-001,{s},{CLASSES[truth[s]] if s < 100 else truth[s]},x" for s in range(120)]
    zipped.write_bytes(gzip.compress(("spool_epoch,device_id,seq,label,note\n" + "\n".join(rows)).encode()))
    code, out = fleetctl(base, capsys, "labels", "push", str(zipped), "--source", "audit")
    assert code == 0
    assert out.splitlines()[0].startswith("120 labels stored from labels.csv.gz (20 new, 100 replaced); 120 match")

    code, out = fleetctl(base, capsys, "labels", "accuracy", "--json")
    assert code == 0
    (row,) = json.loads(out)["items"]
    want = by_hand(b, {s: int(truth[s]) for s in range(120)})
    assert (row["n_labelled"], row["n_correct"]) == (want["n"], want["k"])
    code, out = fleetctl(base, capsys, "labels", "accuracy")
    assert code == 0 and out.splitlines()[2].split()[:3] == ["cabin-events", "1.0.0", "120"]

    # A malformed file stops before anything is sent, naming the problem.
    bad_seq = tmp_path / "bad_seq.csv"
    bad_seq.write_text(f"device_id,spool_epoch,seq,label\nveh-001,{EPOCH},7,normal\nveh-001,{EPOCH},x8,normal\n")
    missing = tmp_path / "missing.csv"
    missing.write_text(f"device_id,seq,label\nveh-001,{EPOCH},7\n")
    with caplog.at_level(logging.ERROR, logger="fleetctl"):
        assert fleetctl(base, capsys, "labels", "push", str(bad_seq)) == (2, "")
        assert fleetctl(base, capsys, "labels", "push", str(missing)) == (2, "")
    assert "line 3: seq 'x8' is not a whole number" in caplog.text
    assert "missing column(s) spool_epoch" in caplog.text
    code, out = fleetctl(base, capsys, "labels", "list", "--json")
    assert json.loads(out)["total"] == 120
