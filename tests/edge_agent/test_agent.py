"""The whole agent as users run it (`edge-agent run | replay | status | simulate` subprocesses), against
the real Mosquitto with the test playing the collector."""

from __future__ import annotations

import csv
import json
import os
import resource
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from edge_agent.app import Agent
from edge_agent.config import DEFAULT_BUNDLE, DEFAULT_KEY, load_config
from edge_agent.sensors.base import Observation, Source
from edge_agent.sensors.simulated import TRAINING_LABELS, UNKNOWN_LABEL
from edge_agent.spool import EVENT_SPOOL_LOSS, Spool, inspect, merge_ranges
from shared.bundle import Bundle, load_bundle
from shared.features import FLAG_GAS_MISSING, FLAG_IMPUTED, FLAG_PM_MISSING
from shared.messages import SensorHealth
from shared.signing import load_public_keys
from tests.edge_agent.test_uplink import CollectorPeer, wait_for
from tests.services import Mosquitto

REPO = Path(__file__).resolve().parents[2]


def agent_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "edge_agent", "--log-level", "INFO", *args]


def write_config(tmp_path: Path, broker_url: str, device: str, **sections: dict) -> Path:
    doc: dict = {
        "device": {"id": device, "profile": "sim-v1", "tags": ["test"]},
        "mqtt": {"url": broker_url, "reconnect_min_delay_s": 1, "reconnect_max_delay_s": 2},
        "sensors": {"backend": "simulated", "rate_hz": 20, "seed": 3},
        "spool": {"commit_interval_s": 0.2},
        "uplink": {"batch_max_age_s": 0.3, "ack_timeout_s": 5, "status_interval_s": 1},
        "state_dir": str(tmp_path / "state"),
    }
    for name, values in sections.items():
        doc.setdefault(name, {}).update(values)
    path = tmp_path / "agent.yaml"
    path.write_text(json.dumps(doc))  # JSON is YAML
    return path


def run_agent(config: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        agent_cmd("run", "--config", str(config)), stdout=log.open("ab"), stderr=subprocess.STDOUT, cwd=REPO
    )


def test_run_kill_restart_declares_exactly_what_was_lost(broker: Mosquitto, tmp_path: Path) -> None:
    device = f"run-{uuid.uuid4().hex[:8]}"
    config = write_config(tmp_path, broker.url, device)
    log = tmp_path / "agent.log"
    peer = CollectorPeer(broker.url)
    proc = run_agent(config, log)
    try:
        wait_for(lambda: len(peer.unique(device)) >= 30, timeout=30, what=f"records ({log.read_text()[-2000:]})")
        wait_for(lambda: (tmp_path / "state" / "status.json").exists(), what="status file")
        status = subprocess.run(
            agent_cmd("status", "--config", str(config), "--json"), capture_output=True, text=True, cwd=REPO, check=True
        )
        doc = json.loads(status.stdout)
        assert doc["device_id"] == device and doc["state"] == "running"
        assert doc["model"]["name"] and doc["spool_epoch"] == doc["spool"]["epoch"]
        assert isinstance(doc["spool_depth"], int) and doc["last_ack_at"] is not None
        human = subprocess.run(
            agent_cmd("status", "--config", str(config)), capture_output=True, text=True, cwd=REPO, check=True
        )
        assert device in human.stdout and "spool depth" in human.stdout

        os.kill(proc.pid, signal.SIGKILL)  # power cut: no clean stop, no final commit
        proc.wait(10)
        wait_for(lambda: peer.statuses[device][-1] == {"state": "offline"}, timeout=15, what="last will")

        proc = run_agent(config, log)  # restart: finds the lost tail and declares it
        wait_for(lambda: any(e.kind == EVENT_SPOOL_LOSS for e in peer.events), timeout=30, what="spool_loss event")
        before = max(peer.unique(device))
        wait_for(lambda: max(peer.unique(device)) > before + 20, timeout=30, what="records after restart")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        wait_for(lambda: peer.statuses[device][-1]["state"] == "stopped", what="stopped status")
    finally:
        if proc.poll() is None:
            proc.kill()
        peer.close()
    # Every seq up to the last one received is either a record or inside a declared gap: nothing silent.
    received = peer.unique(device)
    declared = [(g.first, g.last) for b in peer.batches if b.device_id == device for g in b.gaps]
    assert declared, "the SIGKILL lost an uncommitted group, which must be declared"
    covered = merge_ranges([(s, s) for s in received] + declared)
    assert covered[0][0] == 0 and covered[0][1] >= max(received)
    assert not set().union(*(range(a, b + 1) for a, b in declared)) & received
    loss = next(e for e in peer.events if e.kind == EVENT_SPOOL_LOSS)
    assert (loss.data["first"], loss.data["last"]) in declared
    batches = [b for b in peer.batches if b.device_id == device]
    assert len({b.boot_id for b in batches}) == 2 and len({b.spool_epoch for b in batches}) == 1


def test_simulate_many_vehicles_with_late_labels(broker: Mosquitto, tmp_path: Path) -> None:
    prefix = f"sim{uuid.uuid4().hex[:6]}-"
    labels = tmp_path / "late.csv"
    peer = CollectorPeer(broker.url)
    try:
        done = subprocess.run(
            agent_cmd(
                "simulate",
                "--devices",
                "3",
                "--collector",
                broker.url,
                "--duration",
                "4",
                "--rate",
                "10",
                "--state-dir",
                str(tmp_path / "fleet"),
                "--id-prefix",
                prefix,
                "--late-labels",
                str(labels),
                "--late-label-fraction",
                "0.5",
            ),
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        devices = [f"{prefix}{i:03d}" for i in (1, 2, 3)]

        def stopped(device: str) -> bool:
            return peer.statuses.get(device, [{}])[-1].get("state") == "stopped"

        for device in devices:
            wait_for(lambda: stopped(device), what=f"{device} stopped")  # noqa: B023 - called at once
            assert len(peer.unique(device)) >= 10
        epochs = {b.device_id: b.spool_epoch for b in peer.batches if b.device_id in devices}
        assert len(set(epochs.values())) == 3
    finally:
        peer.close()
    with labels.open() as fh:
        rows = list(csv.DictReader(fh))
    assert rows and {r["device_id"] for r in rows} <= set(devices)
    for r in rows:
        assert r["spool_epoch"] == epochs[r["device_id"]]
        assert r["label"] in {*TRAINING_LABELS, UNKNOWN_LABEL}
        assert int(r["seq"]) >= 0
    # Late labels refer to records that exist (sent now, or still in that vehicle's spool).
    stored = {d: inspect(tmp_path / "fleet" / d / "spool.db") for d in devices}
    for r in rows:
        d, seq = r["device_id"], int(r["seq"])
        assert seq in peer.unique(d) or seq < stored[d]["next_seq"]


@pytest.fixture(scope="module")
def bundle() -> Bundle:
    return load_bundle(DEFAULT_BUNDLE, load_public_keys([DEFAULT_KEY]))


def write_feature_csv(path: Path, bundle: Bundle, n: int) -> np.ndarray:
    m = bundle.manifest
    rng = np.random.default_rng(5)
    mean, std = np.asarray(m.normalisation.mean), np.asarray(m.normalisation.std)
    X = (mean + rng.normal(size=(n, len(mean))) * std).astype(np.float32)
    labels = rng.integers(0, len(m.labels), n)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow([*m.features, "label"])
        for x, y in zip(X, labels, strict=True):
            w.writerow([f"{v:.6g}" for v in x] + [m.labels[y]])
    return labels


def test_replay_cli_exits_once_everything_is_acknowledged(broker: Mosquitto, bundle: Bundle, tmp_path: Path) -> None:
    pytest.importorskip("edge_agent.sensors.replay")
    device = f"replay-{uuid.uuid4().hex[:8]}"
    n = 3000
    data = tmp_path / "session.csv"
    labels = write_feature_csv(data, bundle, n)
    with data.open("a") as fh:  # a broken row is counted and skipped, not fatal
        fh.write("not-a-number," + ",".join(["1"] * (len(bundle.manifest.features) - 1)) + ",normal\n")
    config = write_config(
        tmp_path,
        broker.url,
        device,
        sensors={"backend": "replay", "replay_csv": str(data)},
        uplink={"batch_max_records": 500},
    )
    peer = CollectorPeer(broker.url)
    try:
        done = subprocess.run(
            agent_cmd(
                "replay",
                "--config",
                str(config),
                "--csv",
                str(data),
                "--label-column",
                "label",
                "--progress-interval",
                "1",
            ),
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert "all acknowledged, 1 bad rows skipped" in done.stdout
    finally:
        peer.close()
    assert peer.unique(device) == set(range(n))
    got: dict[int, int] = {}
    for b in peer.batches:
        if b.device_id == device:
            for block in b.blocks:
                got.update(zip(block.seq.tolist(), block.label.tolist(), strict=True))
    assert [got[i] for i in range(n)] == labels.tolist()
    assert inspect(tmp_path / "state" / "spool.db")["depth"] == 0


def test_replay_resumes_after_a_kill_without_losing_or_repeating_rows(
    broker: Mosquitto, bundle: Bundle, tmp_path: Path
) -> None:
    device = f"resume-{uuid.uuid4().hex[:8]}"
    n = 4000
    data = tmp_path / "session.csv"
    labels = write_feature_csv(data, bundle, n)
    config = write_config(tmp_path, broker.url, device, uplink={"batch_max_records": 200})
    spool_path = tmp_path / "state" / "spool.db"
    peer = CollectorPeer(broker.url, mode="silent")  # no acks: the first run can never finish
    cmd = agent_cmd("replay", "--config", str(config), "--csv", str(data), "--label-column", "label", "--rate", "2000")

    def cursor_row() -> int:
        try:
            cursor = inspect(spool_path)["cursor"]
        except Exception:
            return 0
        return int(cursor["row"]) if cursor else 0

    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    try:
        wait_for(lambda: cursor_row() >= 1500, timeout=30, what="replay progress")
        os.kill(first.pid, signal.SIGKILL)
        first.wait(10)
        assert cursor_row() < n
        peer.mode = "ack"
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)
        assert done.returncode == 0, done.stderr[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
        peer.close()
    got: dict[int, int] = {}
    for b in peer.batches:
        if b.device_id == device:
            for block in b.blocks:
                got.update(zip(block.seq.tolist(), block.label.tolist(), strict=True))
    declared = [(g.first, g.last) for b in peer.batches if b.device_id == device for g in b.gaps]
    lost = set().union(*(range(a, c + 1) for a, c in declared))
    assert not lost & set(got)
    # In seq order, the records are the CSV rows exactly once each: nothing skipped, nothing repeated.
    assert [got[s] for s in sorted(got)] == labels.tolist()
    assert merge_ranges([(s, s) for s in got] + declared) == [(0, max(got))]


class FailedEnvSensors(Source):
    """Hardware stand-in: the BME680 and PMS5003 are dead, the microphone works."""

    name = "failed-env"

    def __init__(self) -> None:
        self.rng = np.random.default_rng(0)

    def read(self) -> Observation:
        audio = (self.rng.normal(size=1600) * 0.05).astype(np.float32)
        return Observation(mono=time.monotonic(), ts=time.time(), env=None, audio=audio, truth="normal")

    def health(self) -> dict[str, SensorHealth]:
        return {"bme680": SensorHealth(state="failed", reason="no I2C ack"), "microphone": SensorHealth()}


def test_failed_sensors_travel_as_flagged_nan_not_quarantine(broker: Mosquitto, bundle: Bundle, tmp_path: Path) -> None:
    device = f"nan-{uuid.uuid4().hex[:8]}"
    config = load_config(write_config(tmp_path, broker.url, device), environ={})
    peer = CollectorPeer(broker.url)
    agent = Agent(config, bundle=bundle, source=FailedEnvSensors())
    agent.start()
    try:
        wait_for(lambda: len(peer.unique(device)) >= 10, what="records")
        wait_for(lambda: bool(peer.statuses.get(device)), what="status")
    finally:
        agent.stop()
        peer.close()
    assert not peer.bad
    blocks = [blk for b in peer.batches if b.device_id == device for blk in b.blocks]
    flags = np.concatenate([blk.sensor_flags for blk in blocks])
    expected = FLAG_GAS_MISSING | FLAG_PM_MISSING | FLAG_IMPUTED
    assert ((flags & expected) == expected).all()
    features = np.concatenate([blk.features for blk in blocks])
    assert np.isnan(features[:, :13]).all() and np.isfinite(features[:, 13:]).all()
    assert peer.statuses[device][0]["sensors"]["bme680"]["state"] == "failed"


def test_a_spool_that_cannot_commit_ends_the_agent_and_loses_nothing_silently(
    broker: Mosquitto, tmp_path: Path
) -> None:
    device = f"full-{uuid.uuid4().hex[:8]}"
    config = write_config(tmp_path, broker.url, device, spool={"commit_interval_s": 0.05})
    limit = 256 * 1024

    def disk_full_soon() -> None:
        # A stand-in for a full SD card: no file of this process may grow past 256 KiB. The
        # spool's write-ahead log reaches that within a second; logs go to a pipe, not a file.
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.Popen(
        agent_cmd("run", "--config", str(config)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=REPO,
        preexec_fn=disk_full_soon,
    )
    try:
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    log = out.decode(errors="replace")
    # Not a silent zombie that still says "online": the process fails, so systemd restarts it.
    assert proc.returncode == 1, log[-3000:]
    assert "consecutive spool commit failures" in log
    # The restarted agent declares what was handed out and never committed.
    info = inspect(tmp_path / "state" / "spool.db")
    spool = Spool(tmp_path / "state" / "spool.db", max_bytes=1 << 26)
    try:
        assert info["depth"] > 0
        gaps = [(g.first, g.last, g.reason) for g in spool.gaps()]
        assert len(gaps) == 1 and gaps[0][0] == info["next_seq"] and gaps[0][2] == "crash"
        assert spool.next_seq == gaps[0][1] + 1
    finally:
        spool.close()
