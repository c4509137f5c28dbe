"""Alerts end to end on SQLite and PostgreSQL: windows written by real ingest, evaluated at explicit times.

The monitoring window is 5 s and every device sends 50 records (10 Hz) per window: real held-out rows
of the cabin dataset run through the reference model (``tests.collector.monitoring.test_service``), a
drifted device's sensors shifted. ``AlertEngine.evaluate(now)`` is called with ``now`` one grace period
after each window end, as the scheduled job would, so the tests are exact and take no wall-clock time.
Webhooks go to a real HTTP server on localhost that fails its first requests.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from collector.alerts import (
    CURSOR_KEY,
    AlertEngine,
    AlertNotFound,
    AlertResolved,
    acknowledge,
    backoff_s,
    deliver_webhooks,
)
from collector.app import create_app
from collector.config import Settings
from collector.db import make_engine, upgrade
from collector.db.models import Alert, AlertCondition, MonitoringWindow, SequentialAlarm, WebhookDelivery
from collector.fleetctl import main as fleetctl
from collector.jobs import EVALUATE_JOB, ROLLUP_JOB, WEBHOOK_JOB, evaluation_step, first_evaluation, start_jobs
from collector.monitoring.service import MonitoringService
from collector.monitoring.windows import WindowWriter
from tests.collector.bundles import independent_cabin_bundle
from tests.collector.monitoring.test_service import (
    DEV_PUB,
    DRIFT,
    catalog,
    ingest,
    records_message,
    tag_devices,
)
from tests.services import free_port, serve_app

WINDOW_S = 5.0
GRACE_S = 1.0
T0 = 1_760_000_000.0  # a multiple of WINDOW_S
PER_WINDOW = 50  # records per device and window (10 Hz)
DRIFTED = "pca_error/device/veh-b1/cabin-events/1.0.0"
"""The condition followed: the drifted device's PCA reconstruction error (a multivariate input shift)."""


# ------------------------------------------------------------------------------------ helpers


class Hook:
    """A real HTTP server on localhost that answers 503 to its first ``fail_first`` requests, then 204."""

    def __init__(self, fail_first: int = 0) -> None:
        self.fail_first = fail_first
        self.requests: list[tuple[dict[str, str], Any]] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                hook.requests.append((dict(self.headers), body))
                self.send_response(503 if len(hook.requests) <= hook.fail_first else 204)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hook() -> Iterator[Hook]:
    h = Hook()
    yield h
    h.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> str:
    url: str = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")
    upgrade(url)
    return url


def settings_for(url: str, **over: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": url,
        "mqtt_url": "mqtt://127.0.0.1:1",
        "monitoring_bundles": [independent_cabin_bundle()],
        "monitoring_trusted_keys": [DEV_PUB],
        "monitoring_window_s": WINDOW_S,
        "monitoring_min_records": PER_WINDOW,
        "alert_grace_s": GRACE_S,
        "alert_webhook_backoff_s": 1.0,
    }
    values.update(over)
    return Settings(**values)


def new_engine(engine: Engine, settings: Settings) -> AlertEngine:
    """A fresh alert engine, as after a restart: everything it knows comes from the database."""
    return AlertEngine(engine, MonitoringService(engine, catalog(), settings), settings)


def send_window(engine: Engine, k: int, plan: dict[str, str]) -> None:
    """Window ``k``: each device's 50 records, drifted where its plan has ``D`` at position ``k``."""
    writer = WindowWriter(catalog().bins(), WINDOW_S)
    msgs = [
        records_message(
            device,
            PER_WINDOW,
            first_seq=k * PER_WINDOW,
            t0=T0 + k * WINDOW_S,
            seed=1000 * k + i,
            shift=DRIFT if p[k] == "D" else None,
        )
        for i, (device, p) in enumerate(plan.items())
    ]
    ingest(engine, writer, msgs)


def alarm(engine: Engine, device: str, k: int, seq: int) -> None:
    """A Page-Hinkley alarm on calibrated confidence at a record of window ``k`` (as ingest writes them)."""
    with Session(engine) as s:
        s.add(
            SequentialAlarm(
                id=None,
                device_id=device,
                model_name="cabin-events",
                model_version="1.0.0",
                signal="calibrated",
                detector="page_hinkley",
                spool_epoch="e" * 16,
                seq=seq,
                ts=T0 + k * WINDOW_S + 2.5,
                detail={"direction": "drop"},
                received_at=T0 + k * WINDOW_S + 3.0,
            )
        )
        s.commit()


def closed(k: int) -> float:
    """The evaluation time at which window ``k`` has just closed (its end plus the grace)."""
    return T0 + (k + 1) * WINDOW_S + GRACE_S


def alerts_of(engine: Engine, key: str) -> list[Alert]:
    with Session(engine) as s:
        return list(s.exec(select(Alert).where(Alert.key == key).order_by(col(Alert.id))).all())


def sample(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


# ---------------------------------------------------------------------------------- lifecycle


def test_lifecycle_hysteresis_dedup_ack_restart(db_url: str, hook: Hook) -> None:
    settings = settings_for(db_url, alert_webhooks=[hook.url], alert_groups=["b"])
    engine = make_engine(db_url)
    plan = {"veh-a1": "........", "veh-b1": "DDD...DD"}
    alert_engine = new_engine(engine, settings)
    fired_before = sample("fleet_alerts_fired_total", {"kind": "pca_error", "severity": "warning"})

    # Window 0 drifted: one bad window is not enough. Sequential alarms on veh-a1 (which sends records) and on
    # veh-z (which sends none: the alarm alone makes the window bad) in windows 0 and 1.
    send_window(engine, 0, plan)
    tag_devices(engine, {"veh-a1": ["group:a"], "veh-b1": ["group:b"]})
    alarm(engine, "veh-a1", 0, 25)
    alarm(engine, "veh-z", 0, 7)
    summary = alert_engine.evaluate(closed(0))
    assert summary.windows == [T0] and alerts_of(engine, DRIFTED) == []
    # Evaluating again at the same time changes nothing.
    assert alert_engine.evaluate(closed(0)).windows == []

    # Window 1 drifted too: fires, at the end of window 1.
    send_window(engine, 1, plan)
    alarm(engine, "veh-a1", 1, 75)
    alarm(engine, "veh-z", 1, 8)
    summary = alert_engine.evaluate(closed(1))
    (alert,) = alerts_of(engine, DRIFTED)
    assert alert.id in summary.fired
    assert (alert.state, alert.scope, alert.subject, alert.model_version) == ("firing", "device", "veh-b1", "1.0.0")
    assert alert.fired_at == alert.last_bad_at == T0 + 2 * WINDOW_S
    details = alert.details
    assert details["verdict"] == "bad" and details["window"] == {"start": T0 + WINDOW_S, "end": T0 + 2 * WINDOW_S}
    assert details["hysteresis"] == {"bad_windows": 2, "fire_windows": 2, "resolve_windows": 3}
    stats = details["statistics"]
    assert (stats["name"], stats["verdict"], stats["threshold"]) == ("pca_error", "drift", 0.05)
    assert stats["statistic"] > 0.9 and stats["q_value"] < 1e-6 and stats["n_current"] == PER_WINDOW
    assert alert.message == f"pca_error shifted: statistic {stats['statistic']:.4g}, q = {stats['q_value']:.3g} <= 0.05"
    # The same windows raise the device's input drift, with the shifted sensors among its drifting features.
    (inputs,) = alerts_of(engine, "input_drift/device/veh-b1/cabin-events/1.0.0")
    assert set(DRIFT) <= {f["name"] for f in inputs.details["statistics"]["drifting_features"]}
    assert inputs.details["statistics"]["thresholds"]["psi_major"] == 0.25
    # pca_error fired for veh-b1, for group b and for the model version fleet-wide.
    assert sample("fleet_alerts_fired_total", {"kind": "pca_error", "severity": "warning"}) == fired_before + 3

    # Group b (veh-b1 alone) alerts as a whole too, on its merged window.
    (group_alert,) = alerts_of(engine, "pca_error/group/b/cabin-events/1.0.0")
    assert (group_alert.scope, group_alert.subject, group_alert.fired_at) == ("group", "b", T0 + 2 * WINDOW_S)
    for device in ("veh-a1", "veh-z"):
        (seq_alert,) = alerts_of(engine, f"sequential_calibrated/device/{device}/cabin-events/1.0.0")
        assert seq_alert.state == "firing" and seq_alert.message == "page_hinkley alarm on calibrated (1 in window)"
    assert [a["seq"] for a in seq_alert.details["statistics"]["alarms"]] == [8]

    # Window 2 still drifted: the same alert is refreshed, no second one (de-duplication).
    send_window(engine, 2, plan)
    alert_engine.evaluate(closed(2))
    (alert,) = alerts_of(engine, DRIFTED)
    assert alert.state == "firing" and alert.last_bad_at == T0 + 3 * WINDOW_S
    assert alert.details["latest"]["window"]["start"] == T0 + 2 * WINDOW_S

    # An operator acknowledges it; again is harmless.
    assert alert.id is not None
    acked = acknowledge(engine, alert_id=alert.id, by="ops", note="looking", now=T0 + 16, webhooks=[hook.url])
    assert (acked.state, acked.acked_by, acked.ack_note, acked.acked_at) == ("acknowledged", "ops", "looking", T0 + 16)
    again = acknowledge(engine, alert_id=alert.id, by="someone else", note=None, now=T0 + 17, webhooks=[hook.url])
    assert (again.state, again.acked_by) == ("acknowledged", "ops")

    # Windows 3 and 4 are clean: two good windows do not resolve it.
    for k in (3, 4):
        send_window(engine, k, plan)
        alert_engine.evaluate(closed(k))
    (alert,) = alerts_of(engine, DRIFTED)
    assert alert.state == "acknowledged" and alert.resolved_at is None
    # veh-a1's windows 2-4 had records and no alarm: its sequential alert resolved; veh-z's has no data to clear it.
    (seq_a1,) = alerts_of(engine, "sequential_calibrated/device/veh-a1/cabin-events/1.0.0")
    assert seq_a1.state == "resolved" and seq_a1.resolved_at == T0 + 5 * WINDOW_S
    assert [a.state for a in alerts_of(engine, "sequential_calibrated/device/veh-z/cabin-events/1.0.0")] == ["firing"]
    with Session(engine) as s:
        row = s.get(AlertCondition, DRIFTED)
        assert row is not None and (row.bad_streak, row.good_streak, row.last_window) == (0, 2, T0 + 4 * WINDOW_S)

    # A restart: a new engine object re-evaluating the same time counts nothing twice.
    alert_engine = new_engine(engine, settings)
    assert alert_engine.evaluate(closed(4)).windows == []
    with Session(engine) as s:
        row = s.get(AlertCondition, DRIFTED)
        assert row is not None and row.good_streak == 2

    # The third good window resolves it.
    send_window(engine, 5, plan)
    summary = alert_engine.evaluate(closed(5))
    (alert,) = alerts_of(engine, DRIFTED)
    assert alert.id in summary.resolved
    assert alert.state == "resolved" and alert.resolved_at == T0 + 6 * WINDOW_S
    assert alert.details["resolution"]["good_windows"] == 3
    with pytest.raises(AlertResolved):
        acknowledge(engine, alert_id=alert.id, by="ops", note=None, now=T0 + 40, webhooks=[])
    with pytest.raises(AlertNotFound):
        acknowledge(engine, alert_id=10**9, by="ops", note=None, now=T0 + 40, webhooks=[])

    # Drift returns in windows 6 and 7, evaluated together after a stop: the key opens a NEW alert.
    send_window(engine, 6, plan)
    send_window(engine, 7, plan)
    alert_engine = new_engine(engine, settings)
    summary = alert_engine.evaluate(closed(7))
    assert summary.windows == [T0 + 6 * WINDOW_S, T0 + 7 * WINDOW_S]
    first, second = alerts_of(engine, DRIFTED)
    assert first.state == "resolved" and second.state == "firing" and second.id in summary.fired
    assert second.fired_at == T0 + 8 * WINDOW_S
    with Session(engine) as s:
        cursor = s.get(AlertCondition, CURSOR_KEY)
        assert cursor is not None and cursor.last_window == T0 + 7 * WINDOW_S
        open_keys = [a.key for a in s.exec(select(Alert).where(col(Alert.state) != "resolved")).all()]
    assert len(open_keys) == len(set(open_keys)), "at most one open alert per key"

    # Every change was queued for the webhook in its transaction; one delivery run sends them all.
    with Session(engine) as s:
        queued = s.exec(select(WebhookDelivery).where(WebhookDelivery.url == hook.url)).all()
    events = sorted((d.alert_id, d.event) for d in queued)
    assert (first.id, "fired") in events and (first.id, "acknowledged") in events and (first.id, "resolved") in events
    assert (second.id, "fired") in events
    outcome = deliver_webhooks(engine, settings, now=T0 + 100)
    assert len(outcome.delivered) == len(queued) and not outcome.retry
    received = {(body["alert"]["id"], body["event"]) for _, body in hook.requests}
    assert received == set(events)
    fired_body = next(b for _, b in hook.requests if b["alert"]["id"] == first.id and b["event"] == "fired")
    assert fired_body["alert"]["key"] == DRIFTED and fired_body["alert"]["details"]["statistics"]["verdict"] == "drift"
    headers, _ = hook.requests[0]
    assert headers["X-Fleet-Event"] in ("fired", "acknowledged", "resolved") and int(headers["X-Fleet-Delivery"]) > 0
    engine.dispose()


# ----------------------------------------------------------------------------------- webhooks


def seed_alert(engine: Engine, **over: Any) -> int:
    """An alert row written directly (the API and delivery tests need no monitoring data)."""
    values: dict[str, Any] = {
        "id": None,
        "key": "input_drift/device/veh-1/cabin-events/1.0.0",
        "kind": "input_drift",
        "scope": "device",
        "subject": "veh-1",
        "model_name": "cabin-events",
        "model_version": "1.0.0",
        "state": "firing",
        "severity": "warning",
        "message": "3 of 40 input features drift",
        "details": {"verdict": "bad", "statistics": {"n_drifting": 3}},
        "fired_at": T0,
        "last_bad_at": T0,
        "resolved_at": None,
        "acked_at": None,
        "acked_by": None,
        "ack_note": None,
    }
    values.update(over)
    with Session(engine) as s:
        alert = Alert(**values)
        s.add(alert)
        s.commit()
        assert alert.id is not None
        return alert.id


def delivery(engine: Engine, delivery_id: int) -> WebhookDelivery:
    with Session(engine) as s:
        row = s.get(WebhookDelivery, delivery_id)
        assert row is not None
        return row


def test_backoff_doubles_up_to_its_ceiling() -> None:
    assert [backoff_s(k, 5.0, 3600.0) for k in (1, 2, 3, 4)] == [5.0, 10.0, 20.0, 40.0]
    assert backoff_s(20, 5.0, 3600.0) == 3600.0


def test_webhook_retried_with_backoff_until_delivered_or_given_up(db_url: str) -> None:
    hook = Hook(fail_first=2)
    settings = settings_for(db_url, alert_webhooks=[hook.url], alert_webhook_max_attempts=5)
    engine = make_engine(db_url)
    alert_id = seed_alert(engine)
    acknowledge(engine, alert_id=alert_id, by="ops", note="on it", now=T0, webhooks=settings.alert_webhooks)
    outcome = {k: sample("fleet_alert_webhook_deliveries_total", {"outcome": k}) for k in ("retry", "delivered")}

    first = deliver_webhooks(engine, settings, now=T0)
    (delivery_id,) = first.retry
    assert delivery(engine, delivery_id).next_attempt_at == T0 + 1.0  # backoff 1 s after the first failure
    # A restarted collector (new engine) finds the pending delivery in the database, due only at its time.
    engine.dispose()
    engine = make_engine(db_url)
    assert deliver_webhooks(engine, settings, now=T0 + 0.5) == type(first)()
    assert deliver_webhooks(engine, settings, now=T0 + 1.0).retry == [delivery_id]
    assert delivery(engine, delivery_id).next_attempt_at == T0 + 3.0  # then 2 s
    assert deliver_webhooks(engine, settings, now=T0 + 2.9).delivered == []
    assert deliver_webhooks(engine, settings, now=T0 + 3.0).delivered == [delivery_id]
    assert deliver_webhooks(engine, settings, now=T0 + 100.0) == type(first)()

    row = delivery(engine, delivery_id)
    assert (row.state, row.attempts, row.delivered_at, row.last_error) == ("delivered", 3, T0 + 3.0, None)
    assert len(hook.requests) == 3
    assert {h["X-Fleet-Delivery"] for h, _ in hook.requests} == {str(delivery_id)}
    body = hook.requests[-1][1]
    assert body["event"] == "acknowledged" and body["alert"]["id"] == alert_id and body["alert"]["acked_by"] == "ops"
    assert sample("fleet_alert_webhook_deliveries_total", {"outcome": "retry"}) == outcome["retry"] + 2
    assert sample("fleet_alert_webhook_deliveries_total", {"outcome": "delivered"}) == outcome["delivered"] + 1
    hook.close()

    # A receiver that always fails, and one that does not even listen: given up after the last attempt.
    hook = Hook(fail_first=10**6)
    dead = f"http://127.0.0.1:{free_port()}/nobody-listens"
    settings = settings_for(db_url, alert_webhooks=[hook.url, dead], alert_webhook_max_attempts=3)
    alert_id = seed_alert(engine, key="seq_gap/device/veh-9/cabin-events/1.0.0", kind="seq_gap", subject="veh-9")
    acknowledge(engine, alert_id=alert_id, by="ops", note=None, now=T0, webhooks=settings.alert_webhooks)
    failed_before = sample("fleet_alert_webhook_deliveries_total", {"outcome": "failed"})

    assert len(deliver_webhooks(engine, settings, now=T0).retry) == 2
    assert len(deliver_webhooks(engine, settings, now=T0 + 1.0).retry) == 2
    last = deliver_webhooks(engine, settings, now=T0 + 3.0)
    assert len(last.failed) == 2 and not last.retry and not last.delivered
    assert deliver_webhooks(engine, settings, now=T0 + 10_000.0) == type(last)()

    rows = {delivery(engine, i).url: delivery(engine, i) for i in last.failed}
    assert {r.state for r in rows.values()} == {"failed"} and {r.attempts for r in rows.values()} == {3}
    assert rows[hook.url].last_error == "HTTP 503: "
    assert (rows[dead].last_error or "").startswith("ConnectError")
    assert len(hook.requests) == 3
    assert sample("fleet_alert_webhook_deliveries_total", {"outcome": "failed"}) == failed_before + 2
    hook.close()
    engine.dispose()


# ------------------------------------------------------------------------------------ the API


def seed_three(engine: Engine) -> tuple[int, int, int]:
    """A firing device alert, a resolved device alert and an acknowledged fleet-wide model alert."""
    a = seed_alert(engine)
    b = seed_alert(
        engine,
        key="stuck_sensor/device/veh-2/cabin-events/1.0.0",
        kind="stuck_sensor",
        subject="veh-2",
        state="resolved",
        fired_at=T0 + 10,
        last_bad_at=T0 + 10,
        resolved_at=T0 + 30,
    )
    c = seed_alert(
        engine,
        key="estimated_accuracy/model/1.1.0/cabin-events/1.1.0",
        kind="estimated_accuracy",
        scope="model",
        subject="1.1.0",
        model_version="1.1.0",
        state="acknowledged",
        severity="critical",
        fired_at=T0 + 20,
        last_bad_at=T0 + 20,
        acked_at=T0 + 21,
        acked_by="ops",
    )
    return a, b, c


@pytest.fixture
def api(db_url: str, tmp_path: Any) -> Iterator[tuple[TestClient, tuple[int, int, int]]]:
    engine = make_engine(db_url)
    ids = seed_three(engine)
    engine.dispose()
    settings = Settings(database_url=db_url, data_dir=tmp_path)
    with TestClient(create_app(settings, start_ingest=False)) as client:
        assert client.app.state.jobs is None  # type: ignore[attr-defined]  (an API-only app runs no jobs)
        yield client, ids


def ids_of(client: TestClient, **params: Any) -> list[int]:
    r = client.get("/api/v1/alerts", params=params)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"items", "total", "next"}
    return [x["id"] for x in body["items"]]


def test_api_lists_filters_pages_and_acks(api: tuple[TestClient, tuple[int, int, int]]) -> None:
    client, (a, b, c) = api
    assert ids_of(client) == [c, b, a]
    assert ids_of(client, state="open") == [c, a]
    assert ids_of(client, state="resolved") == [b]
    assert ids_of(client, kind="stuck_sensor") == [b]
    assert ids_of(client, scope="model") == [c]
    assert ids_of(client, device_id="veh-1") == [a]
    assert ids_of(client, subject="veh-2", scope="device") == [b]
    assert ids_of(client, model_version="1.1.0") == [c]
    assert ids_of(client, since=T0 + 5) == [c, b]
    assert ids_of(client, since="2025-10-09T08:53:25Z") == [c, b]  # T0 + 5 s in ISO 8601
    page = client.get("/api/v1/alerts", params={"limit": 2}).json()
    assert [x["id"] for x in page["items"]] == [c, b] and page["total"] == 3 and page["next"]
    rest = client.get("/api/v1/alerts", params={"limit": 2, "cursor": page["next"]}).json()
    assert [x["id"] for x in rest["items"]] == [a] and rest["next"] is None
    one = client.get(f"/api/v1/alerts/{c}").json()
    assert one == next(x for x in page["items"] if x["id"] == c)
    assert (one["severity"], one["acked_by"], one["details"]["statistics"]) == ("critical", "ops", {"n_drifting": 3})
    for params in ({"cursor": "garbage"}, {"state": "sleeping"}, {"device_id": "veh-1", "scope": "model"}):
        r = client.get("/api/v1/alerts", params=params)
        assert r.status_code == 422 and "detail" in r.json()
    r = client.get("/api/v1/alerts/999999")
    assert r.status_code == 404 and r.json() == {"detail": "no alert 999999"}

    r = client.post(f"/api/v1/alerts/{a}/ack", json={"by": "ops", "note": "replacing the sensor"})
    assert r.status_code == 200
    body = r.json()
    assert (body["state"], body["acked_by"], body["ack_note"]) == ("acknowledged", "ops", "replacing the sensor")
    assert client.post(f"/api/v1/alerts/{a}/ack", json={"by": "other"}).json()["acked_by"] == "ops"
    r = client.post(f"/api/v1/alerts/{b}/ack", json={"by": "ops"})
    assert r.status_code == 409 and "resolved" in r.json()["detail"]
    assert client.post("/api/v1/alerts/999999/ack", json={"by": "ops"}).status_code == 404
    for bad in ({}, {"by": ""}, {"by": "ops", "extra": 1}):
        assert client.post(f"/api/v1/alerts/{a}/ack", json=bad).status_code == 422


# ------------------------------------------------------------------------------------ the CLI


@pytest.fixture
def api_url(sqlite_url: str, tmp_path: Any) -> Iterator[tuple[str, tuple[int, int, int]]]:
    upgrade(sqlite_url)
    engine = make_engine(sqlite_url)
    ids = seed_three(engine)
    engine.dispose()
    app = create_app(Settings(database_url=sqlite_url, data_dir=tmp_path), start_ingest=False)
    with serve_app(app) as base:
        yield base, ids


def test_fleetctl_alerts_list_and_ack(
    api_url: tuple[str, tuple[int, int, int]], capsys: pytest.CaptureFixture[str]
) -> None:
    base, (a, b, c) = api_url

    def run(*args: str) -> tuple[int, str]:
        code = fleetctl(["--api-url", base, "alerts", *args])
        return code, capsys.readouterr().out

    code, out = run("list", "--json")
    assert code == 0 and json.loads(out) == httpx.get(f"{base}/api/v1/alerts", params={"limit": 100}).json()
    code, out = run("list", "--state", "open")
    lines = out.strip().splitlines()
    assert code == 0 and lines[0].split()[:4] == ["ID", "STATE", "SEVERITY", "KIND"]
    assert [line.split()[0] for line in lines[2:-1]] == [str(c), str(a)] and lines[-1] == "2 alerts"
    assert "model 1.1.0" in lines[2] and "veh-1" in lines[3]

    code, out = run("ack", str(a), "--by", "ops", "--note", "on it", "--json")
    assert code == 0
    acked = json.loads(out)
    assert acked == httpx.get(f"{base}/api/v1/alerts/{a}").json()
    assert (acked["state"], acked["acked_by"], acked["ack_note"]) == ("acknowledged", "ops", "on it")
    code, out = run("ack", str(c))
    assert code == 0 and out.startswith(f"alert {c} acknowledged by ops at ")
    assert run("ack", str(b))[0] == 1  # resolved: the API's 409 is an error
    code, out = run("show", str(b))
    assert code == 0 and "stuck_sensor" in out and '"n_drifting": 3' in out


# ----------------------------------------------------------------------------------- the jobs


def test_evaluation_schedule_hits_every_window_close() -> None:
    assert evaluation_step(900.0) == 60.0 and evaluation_step(5.0) == 5.0 and evaluation_step(100.0) == 50.0
    step = evaluation_step(900.0)
    nxt = first_evaluation(1000.0, 900.0, 30.0, step)
    assert nxt == 1050.0
    assert 1830.0 in {nxt + k * step for k in range(20)}  # the close of window [900, 1800) plus grace


def test_jobs_run_in_the_app_lifespan(sqlite_url: str, tmp_path: Any) -> None:
    upgrade(sqlite_url)
    engine = make_engine(sqlite_url)
    send_window(engine, 0, {"veh-a1": "."})  # a window of a day long finished: the roll-up merges it
    engine.dispose()
    settings = settings_for(sqlite_url, data_dir=tmp_path)
    with TestClient(create_app(settings, start_ingest=False, start_jobs=True)) as client:
        scheduler = client.app.state.jobs  # type: ignore[attr-defined]
        assert scheduler.running
        assert {job.id for job in scheduler.get_jobs()} == {EVALUATE_JOB, WEBHOOK_JOB, ROLLUP_JOB}
        engine = client.app.state.engine  # type: ignore[attr-defined]
        deadline = time.monotonic() + 10
        cursor, days = None, []
        while (cursor is None or not days) and time.monotonic() < deadline:
            with Session(engine) as s:
                cursor = s.get(AlertCondition, CURSOR_KEY)
                days = s.exec(select(MonitoringWindow).where(MonitoringWindow.window_s == 86_400.0)).all()
            time.sleep(0.05)
        # Both ran at start: the evaluation recorded its progress, the roll-up wrote the day row.
        assert cursor is not None and cursor.last_window % WINDOW_S == 0.0
        assert [(d.device_id, d.window_start, d.n) for d in days] == [("veh-a1", T0 - T0 % 86_400, PER_WINDOW)]
    assert not scheduler.running
    off = settings_for(sqlite_url, data_dir=tmp_path, alert_jobs_enabled=False)
    with TestClient(create_app(off, start_ingest=False, start_jobs=True)) as client:
        assert client.app.state.jobs is None  # type: ignore[attr-defined]


def test_start_jobs_directly(sqlite_url: str) -> None:
    upgrade(sqlite_url)
    engine = make_engine(sqlite_url)
    scheduler = start_jobs(engine, settings_for(sqlite_url))
    try:
        assert scheduler.get_job(EVALUATE_JOB).trigger.interval.total_seconds() == WINDOW_S
    finally:
        scheduler.shutdown()
        engine.dispose()
