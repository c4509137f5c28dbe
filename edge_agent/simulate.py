"""Many simulated vehicles in one process, each with its own MQTT connection, spool and main loop.

Used by the demo, the tests and load runs. Every vehicle is a full :class:`edge_agent.app.Agent`
(engine, spool, uplink, updater) fed by its own :class:`~edge_agent.sensors.simulated.SimulatedCabin`
with a distinct seed, in its own state directory; they share the verified bundle (loaded once),
one stop event, one HTTP client (connection pool) for artefact downloads and a limit on how many
download at once. Each vehicle runs the real updater (desired state over MQTT, HTTP Range
download, sha256, Ed25519, TFLite self-test, activation, watch). For thousands of devices run
several processes (paho's threads cost about three per vehicle here, the updater one more).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from edge_agent.app import Agent
from edge_agent.config import DEFAULT_BUNDLE, DEFAULT_KEY, AgentConfig, config_from_dict
from shared.bundle import load_bundle
from shared.signing import load_public_keys

log = logging.getLogger(__name__)


@dataclass
class FleetSettings:
    """What `edge-agent simulate` was asked for."""

    devices: int
    collector: str
    state_dir: Path
    scenario: Path | None = None
    rate_hz: float = 10.0
    id_prefix: str = "sim-"
    late_labels: Path | None = None
    late_label_fraction: float = 0.2
    duration: float | None = None
    bundle: Path = DEFAULT_BUNDLE
    trusted_keys: list[Path] = field(default_factory=lambda: [DEFAULT_KEY])
    seed: int = 0
    protocol: str = "3.1.1"
    batch_max_age_s: float = 2.0
    updates: dict[str, Any] = field(default_factory=dict)  # each vehicle's `updates` section
    parallel_downloads: int = 8


def device_config(settings: FleetSettings, number: int) -> AgentConfig:
    """The configuration of simulated vehicle ``number`` (``ConfigError`` names a bad setting)."""
    device_id = f"{settings.id_prefix}{number:03d}"
    doc = {
        "device": {"id": device_id, "profile": "sim-v1", "tags": ["simulated"]},
        "mqtt": {"url": settings.collector, "protocol": settings.protocol},
        "model": {"bundle": settings.bundle, "trusted_keys": list(settings.trusted_keys)},
        "sensors": {
            "backend": "simulated",
            "scenario": settings.scenario,
            "seed": settings.seed + number,
            "rate_hz": settings.rate_hz,
        },
        "uplink": {"batch_max_age_s": settings.batch_max_age_s},
        "labels": {
            "late_label_fraction": settings.late_label_fraction if settings.late_labels else 0.0,
            "late_labels_path": settings.late_labels,
        },
        "updates": dict(settings.updates),
        "state_dir": settings.state_dir / device_id,
    }
    return config_from_dict(doc, source="edge-agent simulate")


class Fleet:
    """N simulated vehicles sharing one stop event."""

    def __init__(self, settings: FleetSettings, stop_event: threading.Event | None = None) -> None:
        if settings.devices < 1:
            raise ValueError("--devices must be at least 1")
        self.settings = settings
        self.stop_event = stop_event or threading.Event()
        self.agents: list[Agent] = []
        self.http = httpx.Client(
            follow_redirects=True,
            limits=httpx.Limits(max_connections=settings.parallel_downloads, max_keepalive_connections=4),
        )
        self.download_slots = threading.Semaphore(settings.parallel_downloads)

    def start(self) -> None:
        """Verify the bundle once, then start every vehicle."""
        s = self.settings
        bundle = load_bundle(Path(s.bundle), load_public_keys(list(s.trusted_keys)))
        configs = [device_config(s, i + 1) for i in range(s.devices)]
        try:
            for config in configs:
                agent = Agent(
                    config,
                    bundle=bundle,
                    stop_event=self.stop_event,
                    http=self.http,
                    download_slots=self.download_slots,
                )
                agent.start()
                self.agents.append(agent)
        except BaseException:
            self.stop()
            raise
        log.info("%d simulated vehicles started (%s...) -> %s", len(self.agents), configs[0].device.id, s.collector)

    def stop(self) -> None:
        """Stop every vehicle (each drains its spool and publishes ``stopped``)."""
        self.stop_event.set()
        for agent in reversed(self.agents):
            try:
                agent.stop()
            except Exception:
                log.exception("stopping %s failed", agent.device_id)
        self.http.close()

    def run(self) -> int:
        """Run until the stop event (signal) or the duration; return an exit code."""
        self.start()
        deadline = time.monotonic() + self.settings.duration if self.settings.duration else None
        try:
            while not self.stop_event.wait(0.5):
                if deadline is not None and time.monotonic() >= deadline:
                    log.info("duration of %.0f s reached", self.settings.duration)
                    break
        finally:
            self.stop()
        failed = [a.device_id for a in self.agents if a.failed]
        if failed:
            log.error("vehicles failed: %s", failed)
            return 1
        return 0
