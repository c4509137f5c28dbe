"""The updater as users run it: `edge-agent run` SIGKILLed in every update state and restarted,
`edge-agent model install` with and without a running agent, `edge-agent status`, and
`edge-agent simulate` updating several vehicles. Real Mosquitto, HTTP, Ed25519 and TFLite.

Pausing in a given state uses the test-only hook ``FLEET_TEST_UPDATER_PAUSE_AT=<state>[@bytes]``
(docs/OPERATIONS.md): the updater persists the state, writes ``update/paused`` and waits, so the
test can kill -9 the process exactly there.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_agent.app import Agent
from edge_agent.config import DEFAULT_BUNDLE
from tests.edge_agent.update_rig import (
    ArtefactServer,
    UpdatePeer,
    agent_config,
    artefact,
    config_of,
    dev_key,
    make_bundle,
    reference_bundle,
    release_key,
    signed_desired,
    tar_sha,
    wait_for,
)
from tests.services import Mosquitto

REPO = Path(__file__).resolve().parents[2]
BASE = reference_bundle().manifest
PAUSE = "FLEET_TEST_UPDATER_PAUSE_AT"


def edge_agent(*args: str) -> list[str]:
    return [sys.executable, "-m", "edge_agent", "--log-level", "INFO", *args]


@pytest.fixture
def server() -> Iterator[ArtefactServer]:
    s = ArtefactServer()
    yield s
    s.close()


@pytest.fixture
def peer(broker: Mosquitto) -> Iterator[UpdatePeer]:
    p = UpdatePeer(broker.url)
    yield p
    p.close()


class AgentProcess:
    """`edge-agent run` as a subprocess that the test kills and restarts."""

    def __init__(self, config: Path, state_dir: Path, log: Path) -> None:
        self.config, self.state_dir, self.log = config, state_dir, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, pause: str | None = None) -> None:
        env = {k: v for k, v in os.environ.items() if k != PAUSE}
        if pause:
            env[PAUSE] = pause
        (self.state_dir / "update" / "paused").unlink(missing_ok=True)
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                edge_agent("run", "--config", str(self.config)), stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env
            )

    def paused_in(self, timeout: float = 30.0) -> str:
        marker = self.state_dir / "update" / "paused"
        wait_for(lambda: marker.exists() or self.exited(), timeout, f"a pause ({self.tail()})")
        assert not self.exited(), self.tail()
        return marker.read_text()

    def kill(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(20)

    def exited(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def tail(self) -> str:
        return self.log.read_text()[-3000:] if self.log.exists() else ""

    def status(self) -> dict[str, Any]:
        done = subprocess.run(
            edge_agent("status", "--config", str(self.config), "--json"), capture_output=True, text=True, cwd=REPO
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout)


def write_config(tmp_path: Path, doc: dict[str, Any]) -> Path:
    path = tmp_path / f"{doc['device']['id']}.yaml"
    path.write_text(json.dumps(doc))
    return path


def test_sigkill_in_every_update_state_resumes_to_a_committed_update(
    broker: Mosquitto, server: ArtefactServer, peer: UpdatePeer, tmp_path: Path
) -> None:
    dev = f"kill-{uuid.uuid4().hex[:8]}"
    doc = agent_config(tmp_path, broker.url, dev, updates={"shadow_s": 0.3, "shadow_min_records": 3, "watch_s": 1})
    config = write_config(tmp_path, doc)
    state_dir = Path(doc["state_dir"])
    bundle = make_bundle(tmp_path / "v2.tar", dev_key(), version="1.2.0")
    data = bundle.read_bytes()
    url = server.add("v2.tar", data)
    peer.publish(dev, signed_desired(1, dev_key(), model=artefact(bundle, url)))
    agent = AgentProcess(config, state_dir, tmp_path / "agent.log")
    part = state_dir / "update" / "downloads" / f"{tar_sha(bundle)}.part"
    try:
        agent.start(pause="downloading@20000")
        assert agent.paused_in() == "downloading"
        partial = part.stat().st_size
        assert 20_000 <= partial < len(data)
        agent.kill()
        for state in ("verifying", "staging", "self_testing", "shadowing", "activating", "watching"):
            agent.start(pause=state)
            assert agent.paused_in() == state, agent.tail()
            agent.kill()
        agent.start()
        report = peer.wait_state(dev, {"committed", "rolled_back", "failed"}, timeout=30)
        assert report["update"]["state"] == "committed", report
        wait_for(lambda: agent.status().get("model", {}).get("version") == "1.2.0", what="status file")
        status = agent.status()
        assert agent.stop() == 0
    finally:
        if agent.proc is not None and agent.proc.poll() is None:
            agent.proc.kill()
    # The model running is the one reported and the one the persisted state names.
    assert report["model"] == status["model"] == {"name": BASE.name, "version": "1.2.0"}
    assert report["model_sha256"] == tar_sha(bundle) == status["update"]["current"]["sha256"]
    assert status["update"]["state"] == "committed" and status["update"]["previous"] is None
    # The download resumed after the kill from where the .part file stopped. (What the killed process
    # had not read yet was in its socket buffer: the bytes the server wrote for the first request are
    # not all bytes received; the resumed request asks exactly for the rest.)
    requests = server.requests_for("v2.tar")
    assert [r["range"] for r in requests] == [None, f"bytes={partial}-"]
    assert requests[1]["sent"] == len(data) - partial
    assert [p.name for p in (state_dir / "models").iterdir()] == [tar_sha(bundle)]
    assert not list((state_dir / "update" / "downloads").iterdir())


def test_a_crash_loop_in_watching_rolls_back_and_recovers_through_failure_and_rolling_back(
    broker: Mosquitto, server: ArtefactServer, peer: UpdatePeer, tmp_path: Path
) -> None:
    dev = f"loop-{uuid.uuid4().hex[:8]}"
    doc = agent_config(tmp_path, broker.url, dev, updates={"watch_s": 60, "max_restarts": 2})
    config = write_config(tmp_path, doc)
    state_dir = Path(doc["state_dir"])
    bundle = make_bundle(tmp_path / "v3.tar", dev_key(), version="3.0.0")
    peer.publish(dev, signed_desired(1, dev_key(), model=artefact(bundle, server.add("v3.tar", bundle.read_bytes()))))
    agent = AgentProcess(config, state_dir, tmp_path / "agent.log")
    try:
        for _ in range(3):  # killed three times while the new model is being watched
            agent.start(pause="watching")
            assert agent.paused_in() == "watching"
            agent.kill()
        agent.start(pause="failure")  # the fourth start is one too many: crash_loop
        assert agent.paused_in() == "failure"
        agent.kill()
        agent.start(pause="rolling_back")
        assert agent.paused_in() == "rolling_back"
        agent.kill()
        agent.start()
        report = peer.wait_state(dev, {"rolled_back", "failed", "committed"}, timeout=30)
        wait_for(lambda: agent.status().get("state") == "running", what="status file")
        status = agent.status()
        assert agent.stop() == 0
    finally:
        if agent.proc is not None and agent.proc.poll() is None:
            agent.proc.kill()
    update = report["update"]
    assert (update["state"], update["result"], update["reason"]) == ("rolled_back", "failure", "crash_loop"), update
    base = {"name": BASE.name, "version": BASE.version}
    assert report["model"] == status["model"] == base
    assert report["model_sha256"] == tar_sha(DEFAULT_BUNDLE)
    assert status["update"]["current"] is None  # back on the configured bundle
    assert not list((state_dir / "models").iterdir())


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(edge_agent(*args), capture_output=True, text=True, cwd=REPO, timeout=timeout)


def test_model_install_without_an_agent_then_through_a_running_agent(
    broker: Mosquitto, peer: UpdatePeer, tmp_path: Path
) -> None:
    dev = f"inst-{uuid.uuid4().hex[:8]}"
    doc = agent_config(tmp_path, broker.url, dev)
    config = write_config(tmp_path, doc)
    good = make_bundle(tmp_path / "v5.tar", dev_key(), version="5.0.0")
    # 1. No agent runs: the command drives the machine itself (offline watch) and commits.
    done = run_cli("model", "install", str(good), "--config", str(config), "--json")
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    outcome = json.loads(done.stdout)
    assert outcome["state"] == "committed" and outcome["model"]["version"] == "5.0.0"
    shown = run_cli("status", "--config", str(config))
    assert shown.returncode == 0 and "update:       committed (result success" in shown.stdout, shown.stdout
    assert "current:    cabin" in shown.stdout.replace(BASE.name, "cabin") and "5.0.0" in shown.stdout
    # 2. A bundle signed by an unknown key is refused with its reason and a non-zero exit.
    stranger = make_bundle(tmp_path / "x.tar", release_key(tmp_path / "keys"), version="5.1.0")
    done = run_cli("model", "install", str(stranger), "--config", str(config))
    assert done.returncode == 1 and "unknown_key" in done.stdout, done.stdout + done.stderr[-2000:]
    missing = run_cli("model", "install", str(tmp_path / "nope.tar"), "--config", str(config))
    assert missing.returncode == 2 and "no such file" in missing.stderr
    # 3. An agent starts on the installed model and publishes the offline install's events.
    agent = Agent(config_of(doc))
    agent.start()
    try:
        assert agent.engine is not None and agent.engine.model_version == "5.0.0"
        wait_for(lambda: ("watching", "committed", "watch_passed") in peer.transitions(dev), what="offline events")
        # 4. With the agent running the command hands the bundle over and waits for the outcome.
        newer = make_bundle(tmp_path / "v6.tar", dev_key(), version="6.0.0")
        done = run_cli("model", "install", str(newer), "--config", str(config))
        assert done.returncode == 0, done.stdout + done.stderr[-3000:]
        assert "installed" in done.stdout and "6.0.0" in done.stdout
        assert agent.engine.model_version == "6.0.0"
        report = peer.wait_state(dev, {"committed"})
        wait_for(lambda: (peer.last(dev) or {}).get("model", {}).get("version") == "6.0.0", what="reported 6.0.0")
        assert report["update"]["origin"] == "local"
        # Installing what already runs is a success with nothing to do.
        again = run_cli("model", "install", str(newer), "--config", str(config), "--json")
        assert again.returncode == 0 and "already running" in json.loads(again.stdout)["detail"]
    finally:
        agent.stop()
    assert (tmp_path / dev / "models" / tar_sha(newer)).is_dir()
    assert not (tmp_path / dev / "models" / tar_sha(good)).exists()  # the previous model went at commit


def test_simulate_runs_the_real_updater_in_every_vehicle(
    broker: Mosquitto, server: ArtefactServer, peer: UpdatePeer, tmp_path: Path
) -> None:
    prefix = f"su{uuid.uuid4().hex[:5]}-"
    bundle = make_bundle(tmp_path / "v7.tar", dev_key(), version="7.0.0")
    url = server.add("v7.tar", bundle.read_bytes())
    devices = [f"{prefix}{i:03d}" for i in (1, 2, 3)]
    for serial, dev in enumerate(devices, start=1):
        peer.publish(dev, signed_desired(serial, dev_key(), model=artefact(bundle, url)))
    proc = subprocess.Popen(
        edge_agent(
            "simulate",
            "--devices",
            "3",
            "--collector",
            broker.url,
            "--duration",
            "60",
            "--state-dir",
            str(tmp_path / "fleet"),
            "--id-prefix",
            prefix,
            "--late-label-fraction",
            "0",
            "--updates",
            "{watch_s: 1, watch_min_records: 3}",
        ),
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "sim.log").open("wb"),
        cwd=REPO,
    )
    try:
        for dev in devices:
            report = peer.wait_state(dev, {"committed", "rolled_back", "failed"}, timeout=60)
            assert report["update"]["state"] == "committed", report
            assert report["model"]["version"] == "7.0.0"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, (tmp_path / "sim.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert len(server.requests_for("v7.tar")) == 3  # one download each, through the shared client
    for dev in devices:
        assert (tmp_path / "fleet" / dev / "models" / tar_sha(bundle)).is_dir()
