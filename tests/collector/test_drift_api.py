"""``GET /api/v1/drift`` and ``fleetctl drift status`` on windows written by real ingest (SQLite and PostgreSQL)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient

from collector.app import create_app
from collector.db import make_engine, upgrade
from collector.fleetctl import main
from collector.monitoring.service import Scope
from tests.collector.monitoring import test_service
from tests.collector.monitoring.test_service import DRIFT, T0, WINDOW_S, fleet, settings_for
from tests.services import free_port


def seeded(url: str) -> None:
    upgrade(url)
    engine = make_engine(url)
    fleet(engine)
    engine.dispose()


fleet_url = test_service.fleet_url  # the module-scoped fleet database (SQLite and PostgreSQL)


@pytest.fixture(scope="module")
def client(fleet_url: str) -> Iterator[TestClient]:
    with TestClient(create_app(settings_for(fleet_url), start_ingest=False)) as c:
        yield c


def test_scope_status_shows_every_statistic_threshold_and_verdict(client: TestClient) -> None:
    r = client.get("/api/v1/drift", params={"group": "b"})
    assert r.status_code == 200, r.text
    data = r.json()
    # The route adds nothing and drops nothing: it is the service's answer.
    service = client.app.state.monitoring  # type: ignore[attr-defined]
    assert data == service.status(Scope(group="b")).to_dict()
    assert data["verdict"] == "drift" and data["devices"] == ["veh-b1", "veh-b2"]
    model = next(m for m in data["models"] if m["model_version"] == "1.0.0")
    features = {f["name"]: f for f in model["drift"]["features"]}
    assert len(features) == 40
    for name in DRIFT:
        f = features[name]
        assert f["verdict"] == "drift" and f["ks"]["q_value"] <= f["ks"]["threshold"]
        assert {"psi", "hellinger", "kl", "jensen_shannon", "severity", "score"} <= set(f)
    assert model["drift"]["thresholds"]["fdr_q"] == 0.05
    assert model["accuracy"]["expected"]["method"] == "normal" and model["accuracy"]["reliable"] is False
    assert {c["name"] for c in model["data_quality"]["checks"]} >= {"missing_rate", "stuck_records", "clock_skew_s"}
    # OpenAPI documents the shape.
    schema = client.get("/openapi.json").json()
    assert "DriftStatus" in schema["components"]["schemas"] and "FeatureDriftOut" in schema["components"]["schemas"]


def test_per_device_and_per_window_pages(client: TestClient) -> None:
    ids = ["veh-a1", "veh-b1", "veh-b2"]
    r = client.get("/api/v1/drift", params={"device_id": ids, "by": "device", "limit": 2})
    assert r.status_code == 200, r.text
    page = r.json()
    assert page["total"] == 3 and page["next"] == "veh-b2"
    assert [i["scope"]["device_ids"] for i in page["items"]] == [["veh-a1"], ["veh-b1"]]
    assert page["items"][1]["verdict"] == "drift"
    rest = client.get("/api/v1/drift", params={"device_id": ids, "by": "device", "cursor": page["next"]}).json()
    assert [i["devices"] for i in rest["items"]] == [["veh-b2"]] and rest["next"] is None

    since = datetime.fromtimestamp(T0 + WINDOW_S, UTC).isoformat()
    r = client.get("/api/v1/drift", params={"group": "b", "by": "window", "since": since, "until": T0 + 3 * WINDOW_S})
    assert r.status_code == 200, r.text
    windows = r.json()
    assert windows["total"] == 2
    assert [(i["scope"]["since"], i["scope"]["until"]) for i in windows["items"]] == [
        (T0 + WINDOW_S, T0 + 2 * WINDOW_S),
        (T0 + 2 * WINDOW_S, T0 + 3 * WINDOW_S),
    ]


@pytest.mark.parametrize(
    ("params", "detail"),
    [
        ({"by": "everything"}, "by"),
        ({"since": "yesterday"}, "since must be seconds since the epoch or an ISO 8601 time"),
        ({"since": T0 + 10, "until": T0}, "until is before since"),
        ({"since": T0, "until": T0}, "until must be after since"),
        ({"role": "spare"}, "role"),
        ({"group": " "}, "group must not be empty"),
        ({"cursor": "veh-a1"}, "cursor only applies to by=device or by=window"),
        ({"by": "device", "cursor": "veh-zz"}, "cursor 'veh-zz' is not an item of this answer"),
        ({"by": "device", "limit": 0}, "limit"),
    ],
)
def test_bad_parameters_are_422_with_a_specific_detail(client: TestClient, params: dict, detail: str) -> None:
    r = client.get("/api/v1/drift", params=params)
    assert r.status_code == 422, r.text
    assert detail in json.dumps(r.json()["detail"])


# ----------------------------------------------------------------------------------- fleetctl


@pytest.fixture(scope="module")
def api_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("drift-cli")
    url = f"sqlite:///{folder / 'fleet.db'}"
    seeded(url)
    port = free_port()
    app = create_app(settings_for(url), start_ingest=False)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/api/v1/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.05)
    yield base
    server.should_exit = True
    thread.join(10)


def run(api_url: str, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["--api-url", api_url, *args])
    return code, capsys.readouterr().out


def test_fleetctl_drift_status_json_is_the_api_answer(api_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(api_url, capsys, "drift", "status", "--group", "b", "--json")
    assert code == 0
    assert json.loads(out) == httpx.get(f"{api_url}/api/v1/drift", params={"group": "b"}).json()
    params = {"device_id": ["veh-a1", "veh-b1"], "by": "device", "limit": 100}
    code, out = run(
        api_url, capsys, "drift", "status", "--device-id", "veh-a1", "--device-id", "veh-b1", "--by", "device", "--json"
    )
    assert code == 0 and json.loads(out) == httpx.get(f"{api_url}/api/v1/drift", params=params).json()


def test_fleetctl_drift_status_readable(api_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(api_url, capsys, "drift", "status", "--group", "b")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("scope: group b, role active, all time (600 records")
    assert lines[1] == "verdict: DRIFT"
    assert any(line.startswith("  - cabin-events 1.0.0: major PSI") for line in lines)
    assert "cabin-events 1.0.0: DRIFT (600 records, 6 windows, 2 devices)" in lines
    header = next(i for i, line in enumerate(lines) if line.startswith("    FEATURE"))
    top = lines[header + 2 : header + 7]  # the five features with the largest PSI
    assert {row.split()[0] for row in top} >= {"temperature_c", "humidity_pct"}
    assert any("expected accuracy:" in line and "UNRELIABLE" in line for line in lines)
    assert any(line.startswith("  data quality: ok") for line in lines)
    assert "cabin-events 9.9.9: NO_REFERENCE (50 records, 0 windows, 1 devices)" not in lines  # group b has none

    code, out = run(api_url, capsys, "drift", "status", "--by", "device")
    assert code == 0
    rows = out.splitlines()
    assert rows[0].split()[:3] == ["DEVICE", "MODEL", "VERDICT"]
    assert rows[-1] == "5 devices"
    assert any(r.startswith("veh-a1") and "9.9.9" in r and "no_reference" in r for r in rows)


def test_fleetctl_drift_status_bad_time_is_a_clear_error(
    api_url: str, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    code, _ = run(api_url, capsys, "drift", "status", "--since", "yesterday")
    assert code == 1
    assert "422" in caplog.text and "since must be seconds since the epoch" in caplog.text
