"""systemd integration against real datagram sockets, and the agent under a systemd-like harness.

The harness plays systemd's part: it binds an AF_UNIX datagram socket, starts the agent program
with ``NOTIFY_SOCKET`` and ``WATCHDOG_USEC`` set, reads ``READY=1``, ``WATCHDOG=1``, ``STATUS=``,
``RELOADING=1`` and ``STOPPING=1`` off the socket, sends SIGHUP and SIGTERM, and plays the
collector on the real private Mosquitto. The agent program is ``tests/edge_agent/test_hardware.py``
run as a module: ``edge-agent run``'s code path with the real drivers on bus-level fakes.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from edge_agent.service import Notifier, Service, sd_notify, watchdog_interval
from shared.features import FLAG_IMPUTED, FLAG_PM_MISSING
from tests.edge_agent.test_hardware import base_profile
from tests.edge_agent.test_uplink import CollectorPeer, wait_for
from tests.services import Mosquitto

REPO = Path(__file__).resolve().parents[2]


class NotifySocket:
    """What systemd listens on: an AF_UNIX datagram socket, collecting every notification."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="notify-socket", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.messages.append((time.monotonic(), data.decode()))

    def lines(self, key: str) -> list[tuple[float, str]]:
        """``(time, value)`` of every ``KEY=value`` line received."""
        with self._lock:
            return [
                (t, line.split("=", 1)[1])
                for t, msg in self.messages
                for line in msg.split("\n")
                if line.startswith(key + "=")
            ]

    def pings(self) -> list[float]:
        return [t for t, _ in self.lines("WATCHDOG")]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    s = NotifySocket(str(tmp_path / "notify.sock"))
    yield s
    s.close()


# ---------------------------------------------------------------------------------- the protocol


def test_notify_to_a_path_socket(notify_socket: NotifySocket) -> None:
    assert sd_notify("READY=1\nSTATUS=up", {"NOTIFY_SOCKET": notify_socket.address})
    wait_for(lambda: bool(notify_socket.messages), what="datagram")
    assert notify_socket.messages[0][1] == "READY=1\nSTATUS=up"


def test_notify_to_an_abstract_socket() -> None:
    s = NotifySocket(f"@edge-agent-test-{uuid.uuid4().hex}")
    try:
        notifier = Notifier(s.address)
        assert notifier.enabled and notifier.notify("WATCHDOG=1")
        wait_for(lambda: bool(s.messages), what="datagram")
        assert s.messages[0][1] == "WATCHDOG=1" and notifier.sent == 1
        notifier.close()
    finally:
        s.close()


def test_without_notify_socket_everything_is_a_no_op() -> None:
    assert not sd_notify("READY=1", {})
    notifier = Notifier.from_environment({})
    assert not notifier.enabled and not notifier.notify("READY=1")
    assert not Notifier("vsock:2:1234").enabled  # not a socket we speak


def test_a_vanished_socket_is_counted_not_raised(tmp_path: Path) -> None:
    s = NotifySocket(str(tmp_path / "gone.sock"))
    s.close()
    os.unlink(s.address)
    notifier = Notifier(s.address)
    assert not notifier.notify("READY=1")
    assert notifier.errors == 1


def test_watchdog_interval_is_half_of_watchdog_usec() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None  # meant for another pid
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({}) is None


def test_watchdog_pings_only_while_the_loop_kicks(notify_socket: NotifySocket) -> None:
    env = {"NOTIFY_SOCKET": notify_socket.address, "WATCHDOG_USEC": "100000"}  # a ping every 50 ms
    service = Service(environ=env, status=lambda: "model m 1, 10.0 inferences/s", status_interval_s=0.1)
    kicking = threading.Event()
    kicking.set()
    done = threading.Event()

    def loop() -> None:
        while not done.is_set():
            if kicking.is_set():
                service.kick()
            time.sleep(0.005)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        service.ready()
        wait_for(lambda: len(notify_socket.pings()) >= 5, what="watchdog pings")
        assert notify_socket.lines("READY") and notify_socket.lines("READY")[0][1] == "1"
        kicking.clear()  # the loop hangs
        wait_for(lambda: service.withheld >= 1, what="a withheld ping")  # no kick can follow it
        time.sleep(0.05)  # the last ping sent, if any, reaches the socket
        hung_at = len(notify_socket.pings())
        wait_for(lambda: service.withheld >= 7, what="withheld pings")
        assert len(notify_socket.pings()) == hung_at
        kicking.set()  # the loop makes progress again
        wait_for(lambda: len(notify_socket.pings()) >= hung_at + 3, what="pings again")
        statuses = [v for _, v in notify_socket.lines("STATUS")]
        assert statuses.count("model m 1, 10.0 inferences/s") >= 2
        service.stopping()
        wait_for(lambda: bool(notify_socket.lines("STOPPING")), what="STOPPING=1")
        after = len(notify_socket.pings())
        time.sleep(0.2)
        assert len(notify_socket.pings()) == after  # no pings after STOPPING=1
    finally:
        done.set()
        service.close()


def test_reload_notifications(notify_socket: NotifySocket) -> None:
    service = Service(environ={"NOTIFY_SOCKET": notify_socket.address}, status=lambda: "ok")
    service.ready()
    service.reloading()
    service.reloaded("reloaded (2 applied)")
    service.close()
    wait_for(lambda: len(notify_socket.messages) == 3, what="three datagrams")
    reloading = notify_socket.messages[1][1].split("\n")
    assert reloading[0] == "RELOADING=1" and reloading[1].startswith("MONOTONIC_USEC=")
    assert notify_socket.messages[2][1] == "READY=1\nSTATUS=ok; reloaded (2 applied)"


# --------------------------------------------------------------------------------- the harness


class AgentProgram:
    """The agent program on the rig, its stdin for the rig's wiring, and its log."""

    def __init__(self, config: Path, rig: Path, env: dict[str, str], log: Path) -> None:
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.edge_agent.test_hardware", "--config", str(config), "--rig", str(rig)],
            stdin=subprocess.PIPE,
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env=env,
            text=True,
        )

    def say(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        wait_for(lambda: f"done {command}" in self.log.read_text(), what=f"rig: {command}")

    def tail(self) -> str:
        return self.log.read_text()[-3000:]


def write_config(tmp_path: Path, broker: Mosquitto, device: str, **overrides: dict) -> Path:
    profiles = tmp_path / "profiles"
    profiles.mkdir(exist_ok=True)
    profile = base_profile()
    rig_profile = profile.model_copy(
        update={
            "name": "rig-v1",
            "uart": profile.uart.model_copy(update={"device": str(tmp_path / "rig" / "pms5003")}),
        }
    )
    (profiles / "rig-v1.yaml").write_text(yaml.safe_dump(rig_profile.model_dump()))
    doc: dict = {
        "device": {"id": device, "profile": "rig-v1", "profile_dirs": [str(profiles)]},
        "mqtt": {"url": broker.url, "reconnect_min_delay_s": 1, "reconnect_max_delay_s": 2},
        "sensors": {"backend": "hardware", "rate_hz": 10},
        "spool": {"commit_interval_s": 0.2},
        "uplink": {"batch_max_age_s": 0.3, "ack_timeout_s": 5, "status_interval_s": 0.5},
        "state_dir": str(tmp_path / "state"),
    }
    for name, values in overrides.items():
        doc.setdefault(name, {}).update(values)
    path = tmp_path / "agent.yaml"
    path.write_text(json.dumps(doc))
    return path


def records(peer: CollectorPeer, device: str, since: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(seq, sensor_flags, features) of the device's records inferred at or after wall time ``since``."""
    blocks = [blk for b in list(peer.batches) if b.device_id == device for blk in b.blocks]
    seq = np.concatenate([blk.seq for blk in blocks]).astype(np.int64)
    ts = np.concatenate([blk.ts for blk in blocks])
    flags = np.concatenate([blk.sensor_flags for blk in blocks])
    features = np.concatenate([blk.features for blk in blocks]).astype(np.float32)
    keep = ts >= since
    return seq[keep], flags[keep], features[keep]


def count_since(peer: CollectorPeer, device: str, since: float) -> int:
    return len(records(peer, device, since)[0])


def sensor_state(peer: CollectorPeer, device: str, sensor: str) -> str | None:
    statuses = peer.statuses.get(device) or [{}]
    return statuses[-1].get("sensors", {}).get(sensor, {}).get("state")


def test_agent_under_a_systemd_like_harness(broker: Mosquitto, notify_socket: NotifySocket, tmp_path: Path) -> None:
    device = f"hw-{uuid.uuid4().hex[:8]}"
    config = write_config(tmp_path, broker, device)
    (tmp_path / "rig").mkdir()
    env = {
        **os.environ,
        "NOTIFY_SOCKET": notify_socket.address,
        "WATCHDOG_USEC": "600000",  # a ping every 0.3 s while the loop makes progress
        "PYTHONPATH": str(REPO),
    }
    env.pop("WATCHDOG_PID", None)
    peer = CollectorPeer(broker.url)
    agent = AgentProgram(config, tmp_path / "rig", env, tmp_path / "agent.log")
    try:
        # READY=1 once config, profile, model and uplink are up; then progress-gated pings.
        wait_for(lambda: bool(notify_socket.lines("READY")), timeout=30, what=f"READY=1 ({agent.tail()})")
        ready_status = notify_socket.lines("STATUS")[0][1]
        assert ready_status.startswith("model cabin") and "spool" in ready_status
        wait_for(lambda: len(notify_socket.pings()) >= 3, what="watchdog pings")
        wait_for(lambda: len(peer.unique(device)) >= 20, what=f"records ({agent.tail()})")
        wait_for(lambda: peer.statuses.get(device, [{}])[-1].get("profile") == "rig-v1", what="status profile")
        wait_for(lambda: sensor_state(peer, device, "pms5003") == "ok", what="pms5003 ok in status")

        # The particle sensor's port vanishes mid-run: degraded, failed, its inputs NaN and flagged.
        agent.say("unplug pms5003")
        wait_for(lambda: sensor_state(peer, device, "pms5003") == "failed", what=f"pms5003 failed ({agent.tail()})")
        failed_events = [e for e in peer.events if e.kind == "sensor_state" and e.data["sensor"] == "pms5003"]
        assert [e.data["state"] for e in failed_events][:2] == ["degraded", "failed"]
        assert failed_events[0].data["reason"] == "disconnected"
        since = time.time()  # the status said failed: every record from now on lacks the PM inputs
        wait_for(lambda: count_since(peer, device, since) >= 10, what="records while failed")
        _, flags, features = records(peer, device, since)
        assert ((flags & (FLAG_PM_MISSING | FLAG_IMPUTED)) == (FLAG_PM_MISSING | FLAG_IMPUTED)).all()
        assert np.isnan(features[:, 4:13]).all() and np.isfinite(features[:, :4]).all()
        assert agent.proc.poll() is None and len(notify_socket.lines("READY")) == 1  # never restarted
        status_file = tmp_path / "state" / "status.json"
        wait_for(
            lambda: json.loads(status_file.read_text()).get("sensors", {}).get("pms5003", {}).get("state") == "failed",
            what="pms5003 failed in the status file",
        )
        shown = subprocess.run(
            [sys.executable, "-m", "edge_agent", "status", "--config", str(config)],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=60,
        )
        assert "profile:      rig-v1" in shown.stdout and "pms5003 failed (disconnected)" in shown.stdout, shown

        # Plugged back (a new pty behind the alias): recovers without a restart.
        agent.say("plug pms5003")
        wait_for(lambda: sensor_state(peer, device, "pms5003") == "ok", what=f"pms5003 ok again ({agent.tail()})")

        def pms_events() -> list[Any]:
            return [e for e in peer.events if e.kind == "sensor_state" and e.data["sensor"] == "pms5003"]

        # The retained status and the event are separate messages: the event may arrive a moment later.
        wait_for(lambda: pms_events()[-1].data["state"] == "ok", what="the pms5003 ok event")
        since = time.time()
        wait_for(lambda: count_since(peer, device, since) >= 10, what="records after recovery")
        _, flags, features = records(peer, device, since)
        assert not (flags & FLAG_PM_MISSING).any() and np.isfinite(features[:, 4:13]).all()

        # SIGHUP: run-time settings apply, others are logged as needing a restart.
        doc = json.loads(config.read_text())
        doc["sensors"]["rate_hz"] = 5
        doc["uplink"]["batch_max_age_s"] = 0.5
        doc["mqtt"]["keepalive"] = 45
        config.write_text(json.dumps(doc))
        agent.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: len(notify_socket.lines("READY")) == 2, what=f"READY=1 after reload ({agent.tail()})")
        assert notify_socket.lines("RELOADING")
        assert any(v.endswith("; reloaded (2 applied, 1 need a restart)") for _, v in notify_socket.lines("STATUS"))
        log = agent.log.read_text()
        assert "reload applied: sensors.rate_hz, uplink.batch_max_age_s" in log and "mqtt.keepalive" in log

        # A hung main loop: the watchdog pings stop (systemd would kill and restart us), then resume.
        agent.say("hang")
        # Once a ping has been withheld, the loop cannot kick again: count from there.
        wait_for(lambda: "withholding the watchdog ping" in agent.log.read_text(), what="withheld ping")
        hung = len(notify_socket.pings())
        time.sleep(1.2)  # four ping intervals
        assert len(notify_socket.pings()) == hung
        agent.say("unhang")
        wait_for(lambda: len(notify_socket.pings()) >= hung + 2, what="pings after the hang")

        # SIGTERM: STOPPING=1, spool flushed, `stopped` published, exit 0.
        agent.proc.send_signal(signal.SIGTERM)
        assert agent.proc.wait(30) == 0, agent.tail()
        assert notify_socket.lines("STOPPING")
        wait_for(lambda: peer.statuses[device][-1]["state"] == "stopped", what="stopped status")
    finally:
        if agent.proc.poll() is None:
            agent.proc.kill()
            agent.proc.wait(10)
        peer.close()
    assert not peer.bad
    seq, _, _ = records(peer, device)
    assert set(seq.tolist()) == set(range(int(seq.max()) + 1))  # the hang and the reload lost nothing
    rates = [float(v.split(", ")[1].split()[0]) for _, v in notify_socket.lines("STATUS") if "inferences/s" in v]
    assert rates and max(rates) > 0


def test_reload_applies_run_time_settings_and_lists_the_rest(tmp_path: Path) -> None:
    from edge_agent.app import Agent
    from edge_agent.config import config_from_dict

    base = {"device": {"id": "reload-1", "tags": ["a"]}, "state_dir": str(tmp_path), "sensors": {"rate_hz": 10}}
    agent = Agent(config_from_dict(base))
    changed = json.loads(json.dumps(base))
    changed["device"]["tags"] = ["a", "b"]
    changed["sensors"]["rate_hz"] = 4
    changed["uplink"] = {"batch_max_age_s": 2.0, "batch_max_records": 100}
    changed["mqtt"] = {"url": "mqtt://elsewhere:1883"}
    changed["log_level"] = "WARNING"
    root = logging.getLogger()
    level = root.level
    try:
        applied, restart = agent.reload(config_from_dict(changed))
        assert root.level == logging.WARNING
    finally:
        root.setLevel(level)
    assert applied == ["device.tags", "sensors.rate_hz", "uplink.batch_max_age_s", "log_level"]
    assert restart == ["mqtt.url", "uplink.batch_max_records"]
    cfg = agent.config
    assert cfg.sensors.rate_hz == 4 and cfg.uplink.batch_max_age_s == 2.0 and cfg.device.tags == ["a", "b"]
    assert cfg.mqtt.url == "mqtt://127.0.0.1:1883" and cfg.uplink.batch_max_records == 500  # still what runs
    assert agent.reload(agent.config) == ([], [])
