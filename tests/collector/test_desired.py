"""Groups and desired state: the precedence (pure), groups assigned and tagged as one notion, serials that grow
only on change, rollout assignments through the service, retiring; then over a real Mosquitto: desired states
published retained and signed, re-published at start, emptied on retire, and a release-key rotation."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as paho
import pytest
from fastapi.testclient import TestClient
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from sqlalchemy.engine import Engine

from collector.app import create_app
from collector.config import Settings
from collector.db import make_engine
from collector.fleet.desired import DesiredStates, GroupPin, RolloutTarget, Target, resolve
from collector.fleetctl import main as fleetctl
from collector.ingest.service import prepare, write_group
from collector.monitoring.service import resolve_devices
from collector.mqtt import InboundMessage
from shared.bundle import load_bundle
from shared.messages import Desired
from shared.signing import PublicKey, SignatureError, generate_private_key, verify_desired
from tests.collector.test_registry import CABIN, DEV_PUB, NAME, push, variant
from tests.services import Mosquitto, serve_app

V1, V11, V12 = Target(NAME, "1.0.0"), Target(NAME, "1.1.0"), Target(NAME, "1.2.0")


# ----------------------------------------------------------------------------------- precedence


def test_precedence_device_pin_rollout_group_pin_production() -> None:
    groups = [GroupPin("b-low", 0, V11), GroupPin("a-high", 5, V12), GroupPin("c-high", 5, V1)]
    rollout = RolloutTarget("r1", V12, V11)

    r = resolve(device_pin=V1, rollout=rollout, group_pins=groups, production=V11, model_line=NAME)
    assert (r.source, r.model, r.shadow, r.rollout_id) == ("device_pin", V1, None, None)
    assert [s["outcome"] for s in r.explanation] == [
        "chosen",
        "ignored: the device is pinned",
        "overridden by the device pin",
        "overridden by the device pin",
        "overridden by the device pin",
    ]

    r = resolve(device_pin=None, rollout=rollout, group_pins=groups, production=V11, model_line=NAME)
    assert (r.source, r.model, r.shadow, r.rollout_id) == ("rollout", V12, V11, "r1")

    # A shadow-only rollout adds its shadow to what the layers below choose.
    shadow_only = RolloutTarget("r2", None, V12)
    r = resolve(device_pin=None, rollout=shadow_only, group_pins=groups, production=V11, model_line=NAME)
    assert (r.source, r.model, r.shadow, r.rollout_id) == ("group_pin", V12, V12, "r2")
    # Highest priority first, then the group name: a-high beats c-high (same priority) and b-low.
    chosen = [s for s in r.explanation if s["layer"] == "group_pin"]
    assert [(s["group"], s["outcome"]) for s in chosen] == [
        ("a-high", "chosen"),
        ("c-high", "overridden by group a-high"),
        ("b-low", "overridden by group a-high"),
    ]

    r = resolve(device_pin=None, rollout=None, group_pins=[], production=V11, model_line=NAME)
    assert (r.source, r.model) == ("production", V11)
    r = resolve(device_pin=None, rollout=None, group_pins=[], production=None, model_line=None)
    assert (r.source, r.model) == ("none", None)
    assert r.explanation[-1]["outcome"] == "unknown model line"


# ------------------------------------------------------------------------ groups and serials (db)


def status(engine: Engine, device: str, *, tags: list[str], model: str | None = NAME) -> None:
    """A device's status as ingest stores it (the agent reports its tags and model there)."""
    doc: dict[str, Any] = {"state": "online", "tags": tags}
    if model is not None:
        doc["model"] = {"name": model, "version": "1.0.0"}
    msg = InboundMessage(
        mid=1,
        qos=1,
        topic=f"fleet/v1/{device}/status",
        payload=json.dumps(doc).encode(),
        received_at=time.time(),
        session=1,
    )
    with engine.connect().execution_options(sqlite_begin="IMMEDIATE") as conn, conn.begin():
        write_group(conn, [prepare(msg)], 1024)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.services)])
def db_url(request: pytest.FixtureRequest) -> str:
    url: str = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")
    return url


@pytest.fixture
def release(tmp_path: Path) -> tuple[Path, PublicKey]:
    key = tmp_path / "release.pem"
    return key, generate_private_key(key)


def settings_for(url: str, folder: Path, key: Path, **over: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": url,
        "data_dir": folder,
        "mqtt_url": "mqtt://127.0.0.1:1",
        "release_key": key,
        "registry_upload_keys": [DEV_PUB],
        "public_url": "http://fleet.example:8000",
    }
    values.update(over)
    return Settings(**values)


def explain(api: TestClient, device: str) -> dict[str, Any]:
    r = api.get(f"/api/v1/devices/{device}/desired")
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def desired_of(api: TestClient, device: str) -> tuple[str, str | None, int | None]:
    """(source, active version, serial) of a device."""
    d = explain(api, device)
    return d["source"], None if d["model"] is None else d["model"]["version"], d["serial"]


def test_groups_tags_pins_rollouts_and_serials(db_url: str, tmp_path: Path, release: tuple[Path, PublicKey]) -> None:
    with TestClient(create_app(settings_for(db_url, tmp_path, release[0]), start_ingest=False)) as api:
        engine = make_engine(db_url)
        states: DesiredStates = api.app.state.desired  # type: ignore[attr-defined]
        for version in ("1.1.0", "1.2.0"):
            assert push(api, variant(tmp_path, version, parent="1.0.0")).status_code == 201
        assert push(api, CABIN).status_code == 201
        status(engine, "veh-1", tags=["group:depot-a", "site:x"])
        status(engine, "veh-2", tags=[])
        status(engine, "veh-3", tags=["group:depot-b"])

        # Nothing in production, nothing pinned: no desired state at all (none was ever given).
        assert states.reconcile() == []
        assert desired_of(api, "veh-1") == ("none", None, None)

        r = api.post(f"/api/v1/models/{NAME}/1.0.0/stage", json={"stage": "production"})
        assert r.status_code == 200
        assert [desired_of(api, d) for d in ("veh-1", "veh-2", "veh-3")] == [("production", "1.0.0", 1)] * 3
        doc = explain(api, "veh-1")["document"]
        assert doc["model"]["url"] == f"http://fleet.example:8000/api/v1/models/{NAME}/1.0.0/bundle"
        assert doc["model"]["sha256"] == api.get(f"/api/v1/models/{NAME}/1.0.0").json()["sha256"]

        # Groups: created ones and tag-only ones are one list; tags make members without rows.
        assert (
            api.post("/api/v1/groups", json={"name": "depot-b", "priority": 5, "description": "north"}).status_code
            == 201
        )
        assert api.post("/api/v1/groups", json={"name": "depot-b"}).json()["detail"]["reason"] == "group_exists"
        listed = {g["name"]: g for g in api.get("/api/v1/groups").json()["items"]}
        assert listed["depot-a"]["created"] is False and listed["depot-a"]["n_tagged"] == 1
        assert listed["depot-b"]["created"] is True and listed["depot-b"]["n_members"] == 1
        r = api.post("/api/v1/groups/depot-b/members", json={"add": ["veh-2"], "by": "ops"})
        assert r.status_code == 200 and (r.json()["added"], r.json()["n_members"]) == (1, 2)
        assert api.post("/api/v1/groups/depot-a/members", json={"add": ["veh-2"]}).status_code == 404  # tags only
        assert api.post("/api/v1/groups/depot-b/members", json={"add": ["not a device"]}).status_code == 422
        assert resolve_devices(engine.connect(), group="depot-b") == ["veh-2", "veh-3"]

        # Group pins; a pin to what production says already changes nothing a device sees: no new serial.
        assert (
            api.put("/api/v1/groups/depot-a/pin", json={"model_name": NAME, "model_version": "1.1.0"}).status_code
            == 200
        )
        assert (
            api.put("/api/v1/groups/depot-b/pin", json={"model_name": NAME, "model_version": "1.0.0"}).status_code
            == 200
        )
        assert [desired_of(api, d) for d in ("veh-1", "veh-2", "veh-3")] == [
            ("group_pin", "1.1.0", 2),
            ("group_pin", "1.0.0", 1),
            ("group_pin", "1.0.0", 1),
        ]
        assert (
            api.put("/api/v1/groups/nowhere/pin", json={"model_name": NAME, "model_version": "1.0.0"}).status_code
            == 404
        )

        # veh-1 also joins depot-b (priority 5 > 0): depot-b's pin wins, depot-a's is reported as overridden.
        api.post("/api/v1/groups/depot-b/members", json={"add": ["veh-1"]})
        d = explain(api, "veh-1")
        assert (d["source"], d["model"]["version"], d["serial"], d["groups"]) == (
            "group_pin",
            "1.0.0",
            3,
            ["depot-a", "depot-b"],
        )
        assert {s.get("group"): s["outcome"] for s in d["explanation"] if s["layer"] == "group_pin"} == {
            "depot-b": "chosen",
            "depot-a": "overridden by group depot-b",
        }

        # The rollout controller's service API: a cohort gets a version, another a shadow only.
        assert sorted(states.assign_rollout(rollout_id="r1", device_ids=["veh-1", "veh-2"], model=V12)) == [
            "veh-1",
            "veh-2",
        ]
        assert states.assign_rollout(rollout_id="r2", device_ids=["veh-3"], model=None, shadow=V11) == ["veh-3"]
        d3 = explain(api, "veh-3")
        assert (d3["source"], d3["model"]["version"], d3["shadow"]["version"], d3["rollout_id"]) == (
            "group_pin",
            "1.0.0",
            "1.1.0",
            "r2",
        )
        assert explain(api, "veh-1")["document"]["rollout_id"] == "r1"
        assert api.get(f"/api/v1/models/{NAME}/1.2.0").json()["rollouts"] == {"r1": 2}
        r = api.post(f"/api/v1/models/{NAME}/1.2.0/stage", json={"stage": "archived"})
        assert r.status_code == 409 and "rollout r1 (2 devices)" in r.json()["detail"]["message"]

        # A device pin beats everything, rollout and its shadow included.
        assert (
            api.put("/api/v1/devices/veh-1/pin", json={"model_name": NAME, "model_version": "1.1.0"}).status_code == 200
        )
        d = explain(api, "veh-1")
        assert (d["source"], d["model"]["version"], d["rollout_id"], d["serial"]) == ("device_pin", "1.1.0", None, 5)
        assert states.clear_rollout(rollout_id="r1") == ["veh-2"]
        assert desired_of(api, "veh-2") == ("group_pin", "1.0.0", 3)  # 1 -> 2 (rollout) -> 3 (back)
        assert api.delete("/api/v1/devices/veh-1/pin").status_code == 204
        assert api.delete("/api/v1/devices/veh-1/pin").json()["detail"]["reason"] == "not_pinned"
        assert desired_of(api, "veh-1") == ("group_pin", "1.0.0", 6)

        # Nothing changed: recomputing is idempotent. A tag change is picked up by the next reconcile.
        assert states.reconcile() == []
        status(engine, "veh-3", tags=["group:depot-a"])
        assert states.reconcile() == ["veh-3"]
        d3 = explain(api, "veh-3")
        assert (d3["source"], d3["model"]["version"], d3["shadow"]["version"]) == ("group_pin", "1.1.0", "1.1.0")

        # Retiring: no desired state any more, out of every group, a clear pending for the publisher.
        r = api.post("/api/v1/devices/veh-2/retire", json={"by": "ops"})
        assert r.status_code == 200 and r.json()["retired"] is True and r.json()["pending"] is True
        assert r.json()["serial"] == 4 and r.json()["document"] is None
        assert api.post("/api/v1/devices/veh-2/retire").json()["serial"] == 4  # again: no change
        assert resolve_devices(engine.connect(), group="depot-b") == ["veh-1"]
        assert api.get("/api/v1/devices/veh-2").json()["retired_by"] == "ops"
        assert [x["id"] for x in api.get("/api/v1/devices", params={"retired": "true"}).json()["items"]] == ["veh-2"]
        assert states.reconcile() == []
        assert api.post("/api/v1/devices/veh-9/retire").status_code == 404
        engine.dispose()


def test_fleetctl_groups_and_devices(
    sqlite_url: str,
    tmp_path: Path,
    release: tuple[Path, PublicKey],
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = create_app(settings_for(sqlite_url, tmp_path, release[0]), start_ingest=False)
    with serve_app(app) as base:
        engine = make_engine(sqlite_url)
        for device, tags in (("veh-1", ["group:yard"]), ("veh-2", [])):
            status(engine, device, tags=tags)

        def run(*args: str) -> tuple[int, str]:
            caplog.clear()
            code = fleetctl(["--api-url", base, *args])
            return code, capsys.readouterr().out + "".join(r.getMessage() for r in caplog.records)

        assert run("models", "push", str(CABIN), "--no-progress")[0] == 0
        code, out = run("groups", "create", "depot", "--description", "south depot", "--priority", "3")
        assert code == 0 and "group depot" in out and "priority     3" in out
        code, out = run("groups", "assign", "depot", "veh-2", "veh-7")
        assert code == 0 and "2 added, 0 removed" in out and "veh-7" in out  # veh-7 joins when it appears
        code, out = run("groups", "assign", "depot", "--remove", "veh-7", "--json")
        assert code == 0 and json.loads(out)["removed"] == 1
        code, out = run("groups", "list")
        lines = out.strip().splitlines()
        assert lines[0].split()[:3] == ["GROUP", "CREATED", "PRIORITY"]
        assert [line.split()[:2] for line in lines[2:-1]] == [["depot", "yes"], ["yard", "tags"]]
        code, out = run("groups", "list", "--json")
        assert json.loads(out) == httpx.get(f"{base}/api/v1/groups", params={"limit": 500}).json()
        code, out = run("models", "pin", NAME, "1.0.0", "--group", "yard")
        assert code == 0 and out.strip() == f"group yard pinned to {NAME} 1.0.0"
        code, out = run("groups", "show", "yard")
        assert (
            code == 0 and "named by device tags only" in out and f"pinned to    {NAME} 1.0.0" in out and "veh-1" in out
        )
        code, out = run("devices", "desired", "veh-1")
        assert code == 0 and f"desired      {NAME} 1.0.0  (from group_pin)" in out and "group_pin   chosen" in out
        code, out = run("devices", "retire", "veh-1", "--by", "ops")
        assert code == 0 and "(retired)" in out
        code, out = run("devices", "list", "--retired", "retired")
        assert code == 0 and "veh-1" in out and "retired" in out and "veh-2" not in out
        code, out = run("groups", "assign", "nowhere", "veh-2")
        assert code == 1 and "not_found" in out
        engine.dispose()


# -------------------------------------------------------------------------- over a real Mosquitto


def _client(url: str, name: str) -> paho.Client:
    host, port = url.removeprefix("mqtt://").split(":")
    client = paho.Client(
        CallbackAPIVersion.VERSION2, client_id=f"{name}-{uuid.uuid4().hex[:8]}", protocol=MQTTProtocolVersion.MQTTv311
    )
    client.connect(host, int(port))
    client.loop_start()
    return client


def retained(url: str, topics: list[str], timeout: float = 5.0) -> dict[str, bytes]:
    """What the broker retains on ``topics``: subscribe afresh, then a probe published after the SUBACK
    arrives after every retained message (Mosquitto sends them in order), so absence is certain."""
    probe = f"test/probe/{uuid.uuid4().hex}"
    got: dict[str, bytes] = {}
    subscribed, done = threading.Event(), threading.Event()
    client = paho.Client(
        CallbackAPIVersion.VERSION2, client_id=f"probe-{uuid.uuid4().hex[:8]}", protocol=MQTTProtocolVersion.MQTTv311
    )

    def on_message(_c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        if msg.topic == probe:
            done.set()
        elif msg.retain:
            got[msg.topic] = bytes(msg.payload)

    client.on_message = on_message
    client.on_subscribe = lambda *_a: subscribed.set()
    host, port = url.removeprefix("mqtt://").split(":")
    client.connect(host, int(port))
    client.loop_start()
    try:
        client.subscribe([(t, 1) for t in [*topics, probe]])
        assert subscribed.wait(timeout)
        client.publish(probe, b"x", qos=1)
        assert done.wait(timeout), "the probe never came back"
    finally:
        client.disconnect()
        client.loop_stop()
    return got


def wait_for(check: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def desired_on_broker(url: str, device: str) -> Desired | None:
    payload = retained(url, [f"fleet/v1/{device}/desired"]).get(f"fleet/v1/{device}/desired")
    return None if not payload else Desired.model_validate_json(payload)


class Live:
    """Collectors with ingest and the publisher on the shared test broker (one session id across restarts).

    Every device announced through :meth:`announce` has its retained topics emptied at teardown, after
    the collectors stopped, so later tests on the session's broker do not receive them.
    """

    def __init__(self, db_url: str, folder: Path, broker: Mosquitto, release_key: Path) -> None:
        self.db_url, self.folder, self.broker, self.release_key = db_url, folder, broker, release_key
        self.client_id = f"collector-{uuid.uuid4().hex[:8]}"
        self.opened: list[TestClient] = []
        self.devices: list[str] = []
        self.device = _client(broker.url, "devices")

    def start(self, **over: Any) -> TestClient:
        """A running collector (waits until ingest is connected)."""
        values = {
            "mqtt_url": self.broker.url,
            "mqtt_client_id": self.client_id,
            "desired_reconcile_s": 0.3,
            "alert_jobs_enabled": False,
        }
        values.update(over)
        client = TestClient(create_app(settings_for(self.db_url, self.folder, self.release_key, **values)))
        client.__enter__()
        self.opened.append(client)
        assert client.app.state.ingest.wait_connected(10)  # type: ignore[attr-defined]
        return client

    def stop(self, client: TestClient) -> None:
        """Stop one collector."""
        self.opened.remove(client)
        client.__exit__(None, None, None)

    def announce(self, device: str, tags: list[str]) -> None:
        """What an agent publishes on connect: its retained status (tags, model) and reported state."""
        self.devices.append(device)
        doc = {"state": "online", "agent_version": "0.1.0", "model": {"name": NAME, "version": "1.0.0"}, "tags": tags}
        self.device.publish(f"fleet/v1/{device}/status", json.dumps(doc), qos=1, retain=True).wait_for_publish(5)
        reported = {"model": {"name": NAME, "version": "1.0.0"}}
        self.device.publish(f"fleet/v1/{device}/reported", json.dumps(reported), qos=1, retain=True).wait_for_publish(5)

    def close(self) -> None:
        """Stop the collectors, then empty the retained topics of every announced device."""
        for client in list(self.opened):
            self.stop(client)
        for device in self.devices:
            for kind in ("desired", "status", "reported"):
                self.device.publish(f"fleet/v1/{device}/{kind}", b"", qos=1, retain=True).wait_for_publish(5)
        self.device.disconnect()
        self.device.loop_stop()


@pytest.fixture
def live(db_url: str, tmp_path: Path, broker: Mosquitto, release: tuple[Path, PublicKey]) -> Iterator[Live]:
    """A :class:`Live` for this test."""
    harness = Live(db_url, tmp_path, broker, release[0])
    yield harness
    harness.close()


def test_desired_states_published_retained_signed_republished_and_cleared(
    live: Live, broker: Mosquitto, tmp_path: Path, release: tuple[Path, PublicKey]
) -> None:
    _key, release_pub = release
    a, b = f"veh-{uuid.uuid4().hex[:6]}", f"veh-{uuid.uuid4().hex[:6]}"
    api = live.start()
    live.announce(a, ["group:north"])
    live.announce(b, [])
    assert push(api, CABIN).status_code == 201
    assert push(api, variant(tmp_path, "1.1.0", parent="1.0.0")).status_code == 201
    assert api.post(f"/api/v1/models/{NAME}/1.0.0/stage", json={"stage": "production"}).status_code == 200

    # Every device with a model line gets the production version, signed by the release key.
    msg = wait_for(lambda: desired_on_broker(broker.url, a), what="a's desired state")
    assert msg.serial == 1 and msg.model is not None and msg.model.version == "1.0.0"
    assert verify_desired(msg, [release_pub]) == release_pub.key_id
    assert msg.model.url == f"http://fleet.example:8000/api/v1/models/{NAME}/1.0.0/bundle"
    bundle = api.get(msg.model.url.removeprefix("http://fleet.example:8000"))
    assert len(bundle.content) == msg.model.size
    assert load_bundle(bundle.content, [release_pub]).manifest.version == "1.0.0"
    assert wait_for(lambda: desired_on_broker(broker.url, b), what="b's desired state").serial == 1
    wait_for(lambda: not explain(api, a)["pending"], what="a's state marked published")

    # A group pin reaches the group's member (the group is known from its tag) with the next serial.
    r = api.put("/api/v1/groups/north/pin", json={"model_name": NAME, "model_version": "1.1.0"})
    assert r.status_code == 200
    msg2 = wait_for(
        lambda: (m := desired_on_broker(broker.url, a)) is not None and m.serial == 2 and m, what="serial 2"
    )
    assert msg2.model is not None and msg2.model.version == "1.1.0" and verify_desired(msg2, [release_pub])
    assert desired_on_broker(broker.url, b).serial == 1  # type: ignore[union-attr]

    # A restart re-publishes what is current: the retained message comes back, byte for byte.
    live.stop(api)
    live.device.publish(f"fleet/v1/{a}/desired", b"", qos=1, retain=True).wait_for_publish(5)
    assert desired_on_broker(broker.url, a) is None
    api = live.start()
    back = wait_for(lambda: desired_on_broker(broker.url, a), what="re-published state")
    assert back == msg2 and back.serial == 2

    # Retiring b empties its retained desired, status and reported topics; a keeps its own.
    b_topics = [f"fleet/v1/{b}/{k}" for k in ("desired", "status", "reported")]
    assert set(retained(broker.url, b_topics)) == set(b_topics)
    assert api.post(f"/api/v1/devices/{b}/retire", json={"by": "ops"}).status_code == 200
    wait_for(lambda: retained(broker.url, b_topics) == {}, what="b's retained topics cleared")
    wait_for(lambda: not explain(api, b)["pending"], what="the clear marked published")
    a_topics = [f"fleet/v1/{a}/{k}" for k in ("desired", "status", "reported")]
    assert set(retained(broker.url, a_topics)) == set(a_topics)
    assert api.get(f"/api/v1/devices/{b}").json()["retired_at"] is not None


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_release_key_rotation(live: Live, broker: Mosquitto, tmp_path: Path, release: tuple[Path, PublicKey]) -> None:
    old_key, old_pub = release
    new_key = tmp_path / "release-2.pem"
    new_pub = generate_private_key(new_key)
    a, c = f"veh-{uuid.uuid4().hex[:6]}", f"veh-{uuid.uuid4().hex[:6]}"
    api = live.start()
    live.announce(a, [])
    live.announce(c, [])
    assert push(api, CABIN).status_code == 201
    api.post(f"/api/v1/models/{NAME}/1.0.0/stage", json={"stage": "production"})
    first = wait_for(lambda: desired_on_broker(broker.url, a), what="a's first state")
    first_c = wait_for(lambda: desired_on_broker(broker.url, c), what="c's first state")
    assert verify_desired(first, [old_pub]) == verify_desired(first_c, [old_pub]) == old_pub.key_id
    old_bundle = api.get(f"/api/v1/models/{NAME}/1.0.0/bundle").content
    live.stop(api)

    # Rotate: the new key signs, the old one stays published (devices pin both meanwhile).
    api = live.start(release_key=new_key, release_public_keys=[Path(f"{old_key}.pub")])
    keys = api.get("/api/v1/models/keys").json()
    assert keys["release_key_id"] == new_pub.key_id
    assert [k["key_id"] for k in keys["published"]] == [new_pub.key_id, old_pub.key_id]
    pushed = push(api, variant(tmp_path, "1.1.0", parent="1.0.0")).json()
    assert pushed["lineage"]["release_key_id"] == new_pub.key_id
    r = api.put(f"/api/v1/devices/{a}/pin", json={"model_name": NAME, "model_version": "1.1.0"})
    assert r.status_code == 200
    new = wait_for(
        lambda: (m := desired_on_broker(broker.url, a)) is not None and m.serial == 2 and m, what="new state"
    )
    both = [old_pub, new_pub]
    assert verify_desired(new, both) == new_pub.key_id
    with pytest.raises(SignatureError, match="not among"):
        verify_desired(new, [old_pub])  # a device that pinned only the old key refuses it
    new_bundle = api.get(f"/api/v1/models/{NAME}/1.1.0/bundle").content
    assert load_bundle(new_bundle, both).key_id == new_pub.key_id
    assert load_bundle(old_bundle, both).key_id == old_pub.key_id  # bundles keep the key they were stored with

    # An unchanged state is re-published at start signed by the new key: same serial, same content.
    resigned = wait_for(
        lambda: (m := desired_on_broker(broker.url, c)) is not None and m.signature != first_c.signature and m,
        what="c's state re-signed",
    )
    assert verify_desired(resigned, both) == new_pub.key_id
    assert resigned.serial == 1 and resigned.signed_bytes() == first_c.signed_bytes()
