"""``fleet-collector demo``: the whole product on one machine, with nothing installed but Python.

It starts, in order: an MQTT broker (embedded amqtt unless ``FLEET_MQTT_URL`` names one), the
collector (``fleet-collector serve`` on SQLite in a temporary folder), and simulated vehicles as
``edge-agent simulate`` subprocesses (real MQTT clients, real spools; a fifth of them on a
scenario with strong sensor ageing and an event the model never saw). It reports progress from the
collector's own API, and after ``--duration`` stops everything in reverse order and exits 0.

The collector never imports the agent: the vehicles are separate processes, as in production.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from collector.broker import EmbeddedBroker

log = logging.getLogger("fleet.demo")

DRIFT_SHARE = 0.2


def register(subparsers: Any) -> None:
    """Add the ``demo`` command to ``fleet-collector``."""
    p = subparsers.add_parser("demo", help="run broker, collector and a simulated fleet on this machine")
    p.add_argument("--devices", type=int, default=5, help="simulated vehicles (default 5)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds to run before stopping (default 60)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port of the API and dashboard (default 8000)")
    p.add_argument("--rate", type=float, default=10.0, help="inferences per second per vehicle (default 10)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (database, spools, logs)")
    p.set_defaults(func=run)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _scenario(name: str) -> Path | None:
    """A scenario shipped with the agent, found without importing it (collector never imports edge_agent)."""
    import importlib.util

    spec = importlib.util.find_spec("edge_agent")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "scenarios" / name
    return path if path.is_file() else None


def _agent_command() -> list[str]:
    exe = shutil.which("edge-agent", path=str(Path(sys.executable).parent)) or shutil.which("edge-agent")
    return [exe] if exe else [sys.executable, "-m", "edge_agent"]


def _collector_command() -> list[str]:
    exe = shutil.which("fleet-collector", path=str(Path(sys.executable).parent)) or shutil.which("fleet-collector")
    return [exe] if exe else [sys.executable, "-m", "collector"]


def _wait_http(url: str, timeout: float, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the collector exited with code {proc.returncode} while starting")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"the collector did not answer {url} within {timeout:.0f}s")


def _stop(proc: subprocess.Popen[bytes], name: str, timeout: float = 15.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        log.warning("%s did not stop within %.0fs; killing it", name, timeout)
        proc.kill()
        proc.wait()


def _progress(api: str) -> tuple[int, int, int]:
    devices = httpx.get(f"{api}/devices", params={"limit": 1000}, timeout=5.0).json()
    online = sum(1 for d in devices["items"] if d.get("status") == "online")
    count = httpx.get(f"{api}/inferences/count", timeout=5.0).json()["count"]
    return int(devices["total"]), online, int(count)


def run(args: argparse.Namespace) -> int:
    """Run the demo; exit code 0 when the fleet's records reached the collector."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per progress poll is noise
    if args.devices < 1 or args.duration <= 0:
        log.error("--devices must be >= 1 and --duration > 0")
        return 2
    if not _port_free(args.port):
        log.error("port %d is in use; choose another with --port", args.port)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="fleet-demo-"))
    broker: EmbeddedBroker | None = None
    procs: list[tuple[str, subprocess.Popen[bytes]]] = []
    try:
        mqtt_url = os.environ.get("FLEET_MQTT_URL")
        if mqtt_url:
            log.info("using the MQTT broker at %s (FLEET_MQTT_URL)", mqtt_url)
        else:
            broker = EmbeddedBroker(port=_free_port()).start()
            mqtt_url = broker.url
        env = dict(os.environ)
        env.update(
            FLEET_DATABASE_URL=f"sqlite:///{workdir / 'fleet.db'}",
            FLEET_MQTT_URL=mqtt_url,
            FLEET_MQTT_PROTOCOL="5" if os.environ.get("FLEET_MQTT_URL") else "3.1.1",
            FLEET_DATA_DIR=str(workdir),
            # The demo's bundles are signed with the development key; it also signs desired states here.
            FLEET_REGISTRY_DEV_KEY="true",
        )
        collector_log = (workdir / "collector.log").open("wb")
        collector = subprocess.Popen(
            [*_collector_command(), "serve", "--host", "127.0.0.1", "--port", str(args.port)],
            env=env,
            stdout=collector_log,
            stderr=subprocess.STDOUT,
        )
        procs.append(("collector", collector))
        api = f"http://127.0.0.1:{args.port}/api/v1"
        _wait_http(f"{api}/health", 60.0, collector)
        log.info("collector up: API %s, OpenAPI http://127.0.0.1:%d/docs (SQLite in %s)", api, args.port, workdir)

        n_drift = int(args.devices * DRIFT_SHARE) if args.devices >= 5 else 0
        fleets = [
            ("veh", args.devices - n_drift, _scenario("default.yaml")),
            ("aged", n_drift, _scenario("drift.yaml")),
        ]
        for prefix, count, scenario in fleets:
            if count == 0:
                continue
            cmd = [
                *_agent_command(),
                "simulate",
                "--devices",
                str(count),
                "--collector",
                mqtt_url,
                "--rate",
                str(args.rate),
                "--state-dir",
                str(workdir / f"agents-{prefix}"),
                "--id-prefix",
                f"{prefix}-",
                "--late-labels",
                str(workdir / f"late-labels-{prefix}.csv"),
            ]
            if scenario is not None:
                cmd += ["--scenario", str(scenario)]
            agent_log = (workdir / f"agents-{prefix}.log").open("wb")
            agents = subprocess.Popen(cmd, env=env, stdout=agent_log, stderr=subprocess.STDOUT)
            procs.append((f"agents-{prefix}", agents))
            log.info(
                "started %d simulated vehicles '%s*' (%s)", count, prefix, scenario.name if scenario else "default"
            )

        log.info("watch: curl %s/devices | curl %s/inferences/count | fleetctl devices list", api, api)
        start = time.monotonic()
        last: tuple[float, int] | None = None
        next_report = 0.0
        while (elapsed := time.monotonic() - start) < args.duration:
            for name, proc in procs:
                if proc.poll() is not None:
                    log.error("%s exited early with code %s; logs in %s", name, proc.returncode, workdir)
                    return 1
            if elapsed >= next_report:
                with contextlib.suppress(httpx.HTTPError, KeyError, ValueError):
                    total, online, count = _progress(api)
                    rate = (count - last[1]) / (elapsed - last[0]) if last and elapsed > last[0] else 0.0
                    log.info(
                        "t=%3.0fs devices=%d online=%d inferences stored=%d (%.0f/s)",
                        elapsed,
                        total,
                        online,
                        count,
                        rate,
                    )
                    last = (elapsed, count)
                next_report += 10.0
            time.sleep(0.5)
        total, online, count = _progress(api)
        expected = args.devices * args.rate * args.duration
        log.info(
            "done after %.0fs: %d devices, %d inferences stored (%.0f%% of %d devices x %.0f/s x %.0fs)",
            args.duration,
            total,
            count,
            100.0 * count / expected,
            args.devices,
            args.rate,
            args.duration,
        )
        return 0 if count > 0 and total == args.devices else 1
    except (RuntimeError, OSError) as exc:
        log.error("demo failed: %s (logs in %s)", exc, workdir)
        return 1
    finally:
        for name, proc in reversed(procs):
            _stop(proc, name)
        if broker is not None:
            broker.stop()
        if args.keep:
            log.info("kept %s", workdir)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
