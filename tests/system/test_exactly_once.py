"""Exactly once, end to end: real agent, real Mosquitto (production config), real collector, PostgreSQL.

A 100,000-row replay runs while the broker is stopped twice (SIGTERM, then SIGKILL, which loses
what it had not autosaved) and the collector is SIGKILLed once; every row must land exactly once
with ``seq`` contiguous. Then the agent itself is SIGKILLed mid-stream: every record its spool
committed lands once, and the uncommitted tail it lost is declared with its range.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.system.procs import Collector, agent_config, replay_csv, tool

pytestmark = [pytest.mark.services, pytest.mark.slow]


def stored(url: str, device_id: str) -> tuple[list[int], list[tuple[int, int, str]]]:
    """Seqs stored for ``device_id`` and the gaps it declared."""
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        seqs = [r[0] for r in conn.execute(sa.text("SELECT seq FROM inference WHERE device_id=:d ORDER BY seq"),
                                           {"d": device_id})]
        gaps = [(r[0], r[1], r[2]) for r in conn.execute(
            sa.text("SELECT seq_first, seq_last, reason FROM declared_gap WHERE device_id=:d ORDER BY seq_first"),
            {"d": device_id})]
    engine.dispose()
    return seqs, gaps


def wait_count(
    collector: Collector, device_id: str, at_least: int, timeout: float, agent: subprocess.Popen | None = None
) -> int:
    """Poll the API until ``at_least`` records of the device are stored (or the agent has exited)."""
    deadline = time.monotonic() + timeout
    n = 0
    while time.monotonic() < deadline and (agent is None or agent.poll() is None):
        try:
            n = collector.get("/inferences/count", device_id=device_id)["count"]
        except Exception:  # the collector may be down on purpose
            n = -1
        if n >= at_least:
            return n
        time.sleep(0.2)
    return n


def test_replay_survives_broker_and_collector_failures(private_broker, pg_url: str, tmp_path: Path) -> None:
    rows = 100_000
    broker = private_broker()
    collector = Collector(tmp_path / "collector", pg_url, broker.url).start()
    csv = replay_csv(tmp_path / "replay.csv", rows)
    config = agent_config(tmp_path / "agent", device_id="replay-001", mqtt_url=broker.url)
    log = (tmp_path / "agent.log").open("wb")
    agent = subprocess.Popen(
        [*tool("edge-agent"), "replay", "--config", str(config), "--csv", str(csv), "--label-column", "label",
         "--progress-interval", "2"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        # Each fault is injected once some records have flowed, so it hits a stream in progress.
        assert wait_count(collector, "replay-001", 10_000, 120, agent) >= 10_000
        broker.stop(signal.SIGTERM)
        time.sleep(1.0)
        broker.start()
        assert wait_count(collector, "replay-001", 35_000, 120, agent) >= 35_000
        broker.stop(signal.SIGKILL)
        time.sleep(1.0)
        broker.start()
        assert wait_count(collector, "replay-001", 60_000, 120, agent) >= 60_000
        collector.stop(signal.SIGKILL)
        time.sleep(1.0)
        collector.start()
        assert agent.wait(240) == 0, (tmp_path / "agent.log").read_text()[-3000:]
    finally:
        if agent.poll() is None:
            agent.kill()
        collector.stop()
    seqs, gaps = stored(pg_url, "replay-001")
    assert len(seqs) == rows
    assert len(set(seqs)) == rows
    assert seqs[-1] - seqs[0] + 1 == rows, "seq is not contiguous"
    assert gaps == []


def test_agent_killed_mid_stream_loses_nothing_silently(broker, pg_url: str, tmp_path: Path) -> None:
    rows = 30_000
    collector = Collector(tmp_path / "collector", pg_url, broker.url).start()
    csv = replay_csv(tmp_path / "replay.csv", rows, seed=1)
    config = agent_config(tmp_path / "agent", device_id="replay-kill", mqtt_url=broker.url)
    cmd = [*tool("edge-agent"), "replay", "--config", str(config), "--csv", str(csv), "--label-column", "label"]
    try:
        with (tmp_path / "agent-1.log").open("wb") as log:
            first = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
            assert wait_count(collector, "replay-kill", 8_000, 120, first) >= 8_000
            first.send_signal(signal.SIGKILL)
            first.wait()
        killed_at = collector.get("/inferences/count", device_id="replay-kill")["count"]
        assert 0 < killed_at < rows
        with (tmp_path / "agent-2.log").open("wb") as log:
            second = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=240)
        assert second.returncode == 0, (tmp_path / "agent-2.log").read_text()[-3000:]
    finally:
        collector.stop()
    seqs, gaps = stored(pg_url, "replay-kill")
    assert len(seqs) == len(set(seqs)), "a record landed twice"
    # The replay resumes after the last committed row, so every row lands...
    assert len(seqs) == rows
    # ...and the seqs handed out but never committed before the kill are declared, not silently skipped.
    declared = {s for first, last, _ in gaps for s in range(first, last + 1)}
    assert not declared & set(seqs)
    assert set(range(seqs[0], seqs[-1] + 1)) - set(seqs) <= declared
    assert all(reason == "crash" for _, _, reason in gaps)
