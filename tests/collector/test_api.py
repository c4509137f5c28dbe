"""The HTTP API's shapes (ARCHITECTURE §7) on the embedded SQLite default and on PostgreSQL."""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session

from collector.app import create_app
from collector.config import Settings
from collector.db.engine import make_engine, upgrade
from collector.db.models import Device, Inference, Quarantine

NOW = 1_760_000_000.0


def seed(url: str) -> None:
    upgrade(url)
    engine = make_engine(url)
    with Session(engine) as s:
        for i in range(3):
            s.add(Device(id=f"veh-{i:03d}", first_seen=NOW, last_seen=NOW + i, status="online" if i else "offline"))
        for dev in ("veh-000", "veh-001"):
            for seq in range(150):
                feats = np.full(40, 20.0, np.float16)
                feats[3] = np.nan
                s.add(
                    Inference(
                        device_id=dev,
                        spool_epoch="epoch-a",
                        seq=seq,
                        role="active",
                        model_name="cabin-events",
                        model_version="1.0.0" if seq < 100 else "1.1.0",
                        ts=NOW + seq,
                        ts_corrected=NOW + seq,
                        received_at=NOW + seq + 1,
                        pred=seq % 5,
                        label=None,
                        confidence=0.9,
                        calibrated=0.85,
                        probs=np.array([0.9, 0.1], np.float16).tobytes(),
                        features=feats.tobytes(),
                        features_dtype="<f2",
                        act_bits=bytes([0b10100000]),
                        act_sample=None,
                        coact=1,
                        latency_us=40.0,
                        sensor_flags=0,
                        digest=seq,
                    )
                )
        for i in range(7):
            s.add(
                Quarantine(
                    received_at=NOW + i,
                    topic="fleet/v1/veh-000/telemetry",
                    device_id="veh-000",
                    reason="bad_magic" if i % 2 else "bad_msgpack",
                    detail=f"entry {i}",
                    payload=b"\x00garbage",
                    payload_bytes=8,
                    payload_sha256="0" * 64,
                )
            )
        s.commit()
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def client(request: pytest.FixtureRequest, tmp_path) -> Iterator[TestClient]:
    url = f"sqlite:///{tmp_path / 'api.db'}" if request.param == "sqlite" else request.getfixturevalue("pg_url")
    seed(url)
    settings = Settings(database_url=url, data_dir=tmp_path, auto_migrate=True)
    with TestClient(create_app(settings, start_ingest=False)) as c:
        yield c


def test_health(client: TestClient) -> None:
    body = client.get("/api/v1/health").json()
    assert body["status"] == "ok"
    assert body["database"] == "ok"
    assert body["mqtt"] == "disabled"


def test_devices_list_pages_and_filters(client: TestClient) -> None:
    first = client.get("/api/v1/devices", params={"limit": 2}).json()
    assert first["total"] == 3
    assert [d["id"] for d in first["items"]] == ["veh-000", "veh-001"]
    second = client.get("/api/v1/devices", params={"limit": 2, "cursor": first["next"]}).json()
    assert [d["id"] for d in second["items"]] == ["veh-002"]
    assert second["next"] is None
    online = client.get("/api/v1/devices", params={"status": "online"}).json()
    assert online["total"] == 2
    assert client.get("/api/v1/devices/veh-001").json()["last_seen"] == NOW + 1
    missing = client.get("/api/v1/devices/nope")
    assert missing.status_code == 404
    assert "nope" in missing.json()["detail"]


def test_inference_count_filters(client: TestClient) -> None:
    count = lambda **p: client.get("/api/v1/inferences/count", params=p).json()["count"]  # noqa: E731
    assert count() == 300
    assert count(device_id="veh-001") == 150
    assert count(model_version="1.1.0") == 100
    assert count(since=NOW + 10, until=NOW + 20) == 20
    iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(NOW + 140))
    assert count(since=iso, device_id="veh-000") == 10
    bad = client.get("/api/v1/inferences/count", params={"since": "yesterday"})
    assert bad.status_code == 422
    assert "since" in bad.json()["detail"]


def test_inference_list_decodes_arrays_and_pages(client: TestClient) -> None:
    seen: list[tuple[str, int]] = []
    cursor = None
    while True:
        params = {"device_id": "veh-000", "limit": 64, **({"cursor": cursor} if cursor else {})}
        page = client.get("/api/v1/inferences", params=params).json()
        assert page["total"] == 150
        seen += [(x["device_id"], x["seq"]) for x in page["items"]]
        cursor = page["next"]
        if cursor is None:
            break
    assert seen == [("veh-000", s) for s in range(150)]
    item = client.get("/api/v1/inferences", params={"limit": 1}).json()["items"][0]
    assert item["features"][3] is None and item["features"][0] == 20.0
    assert item["probs"] == pytest.approx([0.9, 0.1], abs=1e-3)
    assert item["act_bits"] == "a0"
    assert client.get("/api/v1/inferences", params={"cursor": "!!"}).status_code == 422


def test_quarantine_list_and_show(client: TestClient) -> None:
    page = client.get("/api/v1/quarantine", params={"limit": 5}).json()
    assert page["total"] == 7 and len(page["items"]) == 5 and page["next"]
    ids = [x["id"] for x in page["items"]]
    assert ids == sorted(ids, reverse=True)
    rest = client.get("/api/v1/quarantine", params={"limit": 5, "cursor": page["next"]}).json()
    assert len(rest["items"]) == 2
    assert client.get("/api/v1/quarantine", params={"reason": "bad_magic"}).json()["total"] == 3
    one = client.get(f"/api/v1/quarantine/{ids[0]}").json()
    assert one["payload_b64"] == "AGdhcmJhZ2U="
    assert client.get("/api/v1/quarantine/999999").status_code == 404


def test_token_required_when_configured(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'tok.db'}"
    seed(url)
    settings = Settings(database_url=url, data_dir=tmp_path, api_token="s3cret")
    with TestClient(create_app(settings, start_ingest=False)) as c:
        assert c.get("/api/v1/health").status_code == 200
        assert c.get("/api/v1/devices").status_code == 401
        ok = c.get("/api/v1/devices", headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and ok.json()["total"] == 3


def test_openapi_and_metrics(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/api/v1/health", "/api/v1/devices", "/api/v1/inferences/count", "/api/v1/quarantine/{entry_id}"):
        assert path in paths
    assert "fleet_ingest" in client.get("/metrics").text
