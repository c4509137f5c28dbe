"""``fleetctl`` against a real collector API served over HTTP (uvicorn on a free port)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn

from collector.app import create_app
from collector.config import Settings
from collector.fleetctl import main
from tests.collector.test_api import NOW, seed
from tests.services import free_port


@pytest.fixture(scope="module")
def api_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder: Path = tmp_path_factory.mktemp("fleetctl")
    url = f"sqlite:///{folder / 'fleet.db'}"
    seed(url)
    port = free_port()
    app = create_app(Settings(database_url=url, data_dir=folder), start_ingest=False)
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


def test_devices_list_json_and_table(api_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(api_url, capsys, "devices", "list", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["total"] == 3 and [d["id"] for d in data["items"]] == ["veh-000", "veh-001", "veh-002"]
    code, out = run(api_url, capsys, "devices", "list", "--status", "online")
    assert code == 0
    lines = out.strip().splitlines()
    assert lines[0].split()[:2] == ["DEVICE", "STATUS"]
    assert [line.split()[0] for line in lines[2:-1]] == ["veh-001", "veh-002"]
    assert lines[-1] == "2 devices"


def test_devices_list_follows_cursors(api_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(api_url, capsys, "devices", "list", "--limit", "2", "--json")
    assert code == 0
    assert [d["id"] for d in json.loads(out)["items"]] == ["veh-000", "veh-001"]


def test_device_show_and_missing(api_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(api_url, capsys, "devices", "show", "veh-002", "--json")
    assert code == 0 and json.loads(out)["last_seen"] == NOW + 2
    code, out = run(api_url, capsys, "devices", "show", "nope")
    assert code == 1 and out == ""


def test_inferences_count(api_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(api_url, capsys, "inferences", "count") == (0, "300\n")
    code, out = run(api_url, capsys, "inferences", "count", "--device-id", "veh-000", "--model-version", "1.1.0",
                    "--json")
    assert code == 0 and json.loads(out) == {"count": 50}
    assert run(api_url, capsys, "inferences", "count", "--since", str(NOW + 140)) == (0, "20\n")


def test_quarantine_list_and_show(api_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(api_url, capsys, "quarantine", "list", "--reason", "bad_magic", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["total"] == 3 and {e["reason"] for e in data["items"]} == {"bad_magic"}
    code, out = run(api_url, capsys, "quarantine", "show", str(data["items"][0]["id"]))
    assert code == 0 and "bad_magic" in out and "payload_b64" in out


def test_unreachable_api_is_a_clear_error(capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    code = main(["--api-url", f"http://127.0.0.1:{free_port()}", "devices", "list"])
    assert code == 1
    assert "cannot reach the collector" in caplog.text
