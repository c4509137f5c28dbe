"""``fleet-collector demo``: embedded amqtt broker, SQLite, five simulated vehicles, the API, exit 0."""

from __future__ import annotations

import contextlib
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.services import free_port
from tests.system.procs import tool

pytestmark = pytest.mark.slow

DEVICES = 5
RATE = 10.0


def test_demo_streams_five_vehicles_and_exits_zero(tmp_path: Path) -> None:
    port = free_port()
    api = f"http://127.0.0.1:{port}/api/v1"
    log = (tmp_path / "demo.log").open("wb")
    demo = subprocess.Popen(
        [*tool("fleet-collector"), "demo", "--devices", str(DEVICES), "--duration", "45", "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT,
    )
    samples: list[tuple[float, int, int]] = []
    try:
        deadline = time.monotonic() + 120
        while demo.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError, KeyError, ValueError):
                devices = httpx.get(f"{api}/devices", timeout=2).json()["total"]
                count = httpx.get(f"{api}/inferences/count", timeout=2).json()["count"]
                samples.append((time.monotonic(), devices, count))
            time.sleep(1.0)
        assert demo.wait(120) == 0, (tmp_path / "demo.log").read_text()[-4000:]
    finally:
        if demo.poll() is None:
            demo.kill()
    output = (tmp_path / "demo.log").read_text()
    assert max(s[1] for s in samples) == DEVICES, output[-3000:]
    # Growth while all vehicles stream (after the first records arrived, before the demo stops them).
    streaming = [s for s in samples if s[1] == DEVICES and s[2] > 0]
    assert len(streaming) >= 10, samples
    (t0, _, c0), (t1, _, c1) = streaming[0], streaming[-1]
    expected = DEVICES * RATE * (t1 - t0)
    assert c1 - c0 >= 0.8 * expected, f"{c1 - c0} records in {t1 - t0:.1f}s, expected about {expected:.0f}"
    assert "http://127.0.0.1" in output  # it says where to look
