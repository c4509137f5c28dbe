"""Helpers of the system tests: the real collector and agents as subprocesses, talking over real MQTT."""

from __future__ import annotations

import contextlib
import gzip
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import yaml

from shared.features import FEATURE_NAMES
from tests.services import REPO, free_port

BIN = Path(sys.executable).parent
CABIN_CSV = REPO / "collector" / "training" / "data" / "cabin_v1.csv.gz"


def tool(name: str) -> list[str]:
    """A console script of this venv."""
    return [str(BIN / name)]


@dataclass
class Collector:
    """``fleet-collector serve`` in a subprocess; may be killed and started again."""

    folder: Path
    database_url: str
    mqtt_url: str
    protocol: str = "5"
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def api(self) -> str:
        """Base URL of ``/api/v1``."""
        return f"http://127.0.0.1:{self.port}/api/v1"

    def start(self, timeout: float = 60.0) -> Collector:
        """Start and wait for ``/health``."""
        self.folder.mkdir(parents=True, exist_ok=True)
        env = dict(
            os.environ,
            FLEET_DATABASE_URL=self.database_url,
            FLEET_MQTT_URL=self.mqtt_url,
            FLEET_MQTT_PROTOCOL=self.protocol,
            FLEET_DATA_DIR=str(self.folder),
            FLEET_HTTP_PORT=str(self.port),
        )
        log = (self.folder / f"collector-{self.starts}.log").open("wb")
        self.starts += 1
        self.proc = subprocess.Popen([*tool("fleet-collector"), "serve"], env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"collector exited with {self.proc.returncode}: {self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.api}/health", timeout=1).status_code == 200:
                    return self
            time.sleep(0.1)
        raise TimeoutError(f"collector did not answer within {timeout}s: {self.log_tail()}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop (SIGTERM) or crash (SIGKILL) the collector."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log_tail(self, n: int = 3000) -> str:
        """The end of the newest log."""
        logs = sorted(self.folder.glob("collector-*.log"))
        return logs[-1].read_text(errors="replace")[-n:] if logs else ""

    def get(self, path: str, **params: object) -> dict:
        """GET from the API."""
        response = httpx.get(f"{self.api}{path}", params=params, timeout=10)  # type: ignore[arg-type]
        response.raise_for_status()
        return response.json()  # type: ignore[no-any-return]


def agent_config(folder: Path, *, device_id: str, mqtt_url: str, **sections: dict) -> Path:
    """Write an agent YAML for ``edge-agent replay``; ``sections`` override or add to it."""
    folder.mkdir(parents=True, exist_ok=True)
    doc: dict = {
        "device": {"id": device_id},
        "mqtt": {"url": mqtt_url, "reconnect_min_delay_s": 0.2, "reconnect_max_delay_s": 2.0},
        "uplink": {"ack_timeout_s": 5.0, "batch_max_age_s": 0.5},
        "state_dir": str(folder / "state"),
    }
    for key, value in sections.items():
        doc.setdefault(key, {}).update(value)
    path = folder / "agent.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def replay_csv(path: Path, rows: int, *, seed: int = 0) -> Path:
    """A feature CSV of ``rows`` rows drawn from the committed cabin dataset, with labels."""
    with gzip.open(CABIN_CSV, "rt") as fh:
        header = fh.readline().strip().split(",")
        lines = fh.read().splitlines()
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(lines), rows)
    label_at = header.index("label")
    with path.open("w") as out:
        out.write(",".join([*FEATURE_NAMES, "label"]) + "\n")
        cols = [header.index(n) for n in FEATURE_NAMES]
        for i in pick:
            cells = lines[i].split(",")
            out.write(",".join([*(cells[c] for c in cols), cells[label_at]]) + "\n")
    return path
