"""What the benchmarks share: the machine's description, services, subprocess probes and the JSON line.

Services follow ``/work/shared/BENCHMARKS.md``: a private Mosquitto from the committed production
configuration (``collector/deploy/mosquitto.conf``, rewritten only for the port, persistence folder
and log file, as ``tests/services.py`` does for the tests) on a free port, and a database created
on (and dropped from) the machine's PostgreSQL at ``FLEET_DATABASE_URL`` (default
``postgresql://postgres@127.0.0.1:5432/``). A missing binary or server raises
:class:`ServiceUnavailable` with a message that says what is missing.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import gzip
import json
import logging
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("benchmarks")

REPO = Path(__file__).resolve().parents[1]
DATASET = REPO / "collector" / "training" / "data" / "cabin_v1.csv.gz"
BROKER_CONF = REPO / "collector" / "deploy" / "mosquitto.conf"
DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1:5432/"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def setup_logging(level: int = logging.INFO) -> None:
    """Log to stderr so that stdout holds only the account and the final JSON line."""
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def machine() -> dict[str, Any]:
    """CPU count and model, RAM and load: printed with every result, since figures only hold for this machine."""
    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
                break
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "ram_gib": round(mem_kb / 1024 / 1024, 1),
        "arch": platform.machine(),
        "python": platform.python_version(),
        "loadavg_1m": round(os.getloadavg()[0], 2),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def emit(result: dict[str, Any]) -> None:
    """Print the one JSON line that ends every benchmark's output."""
    print(json.dumps(result, sort_keys=False, default=_json_default), flush=True)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def venv_bin(name: str) -> str:
    """A console script of the project's environment (next to the running interpreter)."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise ServiceUnavailable(f"{path} not found: install the project (`pip install -e .[edge,collector]`)")
    return str(path)


# ------------------------------------------------------------------------------------ dataset


def load_dataset(path: Path = DATASET) -> tuple[list[str], np.ndarray, list[str]]:
    """The reference cabin dataset: feature names, features ``[n, 40]`` float32 and the label column."""
    with gzip.open(path, "rt", newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        rows = list(reader)
    label_col = header.index("label")
    names = [h for i, h in enumerate(header) if i != label_col]
    features = np.array([[float(v) for i, v in enumerate(r) if i != label_col] for r in rows], dtype=np.float32)
    labels = [r[label_col] for r in rows]
    return names, features, labels


# ------------------------------------------------------------------------------------ /proc


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` so far (``/proc/<pid>/stat`` utime + stime)."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    # The command name may hold spaces and parentheses: split after its closing one.
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def proc_status_mb(pid: int, key: str = "VmHWM") -> float:
    """A memory line of ``/proc/<pid>/status`` in MiB (``VmHWM`` peak RSS, ``VmRSS`` current)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(f"{key} not in /proc/{pid}/status")


def cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs from /proc/stat, to say how loaded the machine was."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields[:8])
    return total - idle, total


def busy_share(before: tuple[int, int], after: tuple[int, int]) -> float:
    """Share of all CPUs busy between two :func:`cpu_jiffies` readings (every process, ours included)."""
    total = after[1] - before[1]
    return (after[0] - before[0]) / total if total else 0.0


# ---------------------------------------------------------------------------------- services


class ServiceUnavailable(RuntimeError):
    """A binary or server the benchmark needs is not available on this machine."""


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 10.0) -> None:
    """Block until something accepts connections on ``port`` of the loopback interface."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def mosquitto_binary() -> str:
    """The Mosquitto binary on PATH or in /usr/sbin."""
    found = shutil.which("mosquitto") or next(iter(sorted(glob.glob("/usr/sbin/mosquitto"))), None)
    if found is None:
        raise ServiceUnavailable("the mosquitto binary is not installed (Debian package 'mosquitto')")
    return found


@dataclass
class Broker:
    """A private Mosquitto started from the production configuration on a free port."""

    folder: Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``mqtt://127.0.0.1:<port>``."""
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self, attempts: int = 3) -> Broker:
        """Write the rewritten configuration and start the broker (on another port if this one was taken)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(attempts):
            self.port = free_port()
            text = BROKER_CONF.read_text()
            text = re.sub(r"(?m)^listener .*$", f"listener {self.port} 127.0.0.1", text)
            text = re.sub(r"(?m)^persistence_location .*$", f"persistence_location {self.folder}/", text)
            text += f"\nlog_dest file {self.folder}/mosquitto.log\n"
            conf = self.folder / "mosquitto.conf"
            conf.write_text(text)
            self.proc = subprocess.Popen(
                [mosquitto_binary(), "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            with contextlib.suppress(TimeoutError):
                wait_port(self.port)
            # Other processes on this machine start brokers too: a port taken between free_port()
            # and the bind makes ours exit while theirs answers, so insist that ours is alive.
            time.sleep(0.3)
            if self.proc.poll() is None:
                return self
            log.warning("mosquitto exited at start on port %d (taken?); trying another port", self.port)
        log_file = self.folder / "mosquitto.log"
        detail = log_file.read_text()[-2000:] if log_file.exists() else ""
        raise ServiceUnavailable(f"mosquitto did not start after {attempts} attempts: {detail}")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (Mosquitto saves its persistence file), SIGKILL if it hangs."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@contextlib.contextmanager
def private_broker(folder: Path) -> Iterator[Broker]:
    """A private Mosquitto with the production configuration, stopped on exit."""
    broker = Broker(folder / "mosquitto").start()
    try:
        yield broker
    finally:
        broker.stop()


def pg_admin_url() -> str:
    """A libpq URL of the machine's PostgreSQL maintenance database (from ``FLEET_DATABASE_URL``)."""
    url = os.environ.get("FLEET_DATABASE_URL", DEFAULT_PG_URL)
    url = url.replace("postgresql+psycopg://", "postgresql://", 1)
    base, _, _db = url.rpartition("/")
    return f"{base}/postgres"


@contextlib.contextmanager
def temporary_database(prefix: str) -> Iterator[str]:
    """Create a uniquely named database on the machine's PostgreSQL, yield its URL, drop it afterwards."""
    import psycopg

    admin = pg_admin_url()
    try:
        with psycopg.connect(admin, connect_timeout=5, autocommit=True) as conn:
            name = f"{prefix}_{uuid.uuid4().hex[:10]}"
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as exc:
        raise ServiceUnavailable(
            f"PostgreSQL at {admin} does not answer ({exc}); set FLEET_DATABASE_URL to a server you may create "
            "databases on"
        ) from None
    try:
        yield f"{admin.rpartition('/')[0]}/{name}"
    finally:
        with contextlib.suppress(Exception), psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dataclass
class Collector:
    """A ``fleet-collector serve`` subprocess (API and MQTT ingest in one process)."""

    database_url: str
    mqtt_url: str
    data_dir: Path
    log_path: Path
    extra_env: dict[str, str] | None = None
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0
    _log: Any = None

    def start(self, timeout: float = 60.0, attempts: int = 3) -> Collector:
        """Start and wait until it has migrated its database and its health endpoint says MQTT is connected."""
        for _ in range(attempts):
            if self._start_once(timeout):
                return self
            log.warning("fleet-collector exited at start (HTTP port %d taken?); trying another port", self.port)
        raise RuntimeError(f"fleet-collector did not start: {self.tail()}")

    def _start_once(self, timeout: float) -> bool:
        self.port = free_port()
        env = dict(os.environ)
        env.update(
            FLEET_DATABASE_URL=self.database_url,
            FLEET_MQTT_URL=self.mqtt_url,
            FLEET_DATA_DIR=str(self.data_dir),
            FLEET_HTTP_PORT=str(self.port),
            FLEET_LOG_LEVEL="WARNING",
            FLEET_MQTT_CLIENT_ID=f"bench-collector-{uuid.uuid4().hex[:8]}",
        )
        env.update(self.extra_env or {})
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self._log is not None:
            self._log.close()
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [venv_bin("fleet-collector"), "--log-level", "WARNING", "serve"],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self.data_dir,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            health = self.health()
            if health is not None and health.get("mqtt") == "connected":
                # Someone else's server may answer on a port we lost: ours must be alive and must
                # have migrated our own database.
                time.sleep(0.5)
                if self.proc.poll() is not None:
                    return False
                if self._migrated():
                    return True
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"fleet-collector not ready after {timeout:.0f} s: {self.tail()}")

    def _migrated(self) -> bool:
        """True once the collector's schema exists in its database."""
        if self.database_url.startswith("sqlite"):
            return True
        import psycopg

        with psycopg.connect(self.database_url) as conn:
            row = conn.execute("SELECT to_regclass('public.inference') IS NOT NULL").fetchone()
        return bool(row and row[0])

    def health(self) -> dict[str, Any] | None:
        """``GET /api/v1/health``, or None while it does not answer."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/api/v1/health", timeout=5) as resp:
                doc: dict[str, Any] = json.loads(resp.read())
                return doc
        except (urllib.error.URLError, OSError, ValueError):
            return None

    def tail(self, chars: int = 3000) -> str:
        """The end of the collector's log."""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM (commit and acknowledge what was received), SIGKILL if it hangs."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table: text columns left-aligned, numeric columns right-aligned."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    text = [all(isinstance(r[i], str) for r in rows) for i in range(len(headers))]
    lines = []
    for k, r in enumerate(cells):
        lines.append("  ".join(c.ljust(widths[i]) if text[i] else c.rjust(widths[i]) for i, c in enumerate(r)).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 1:
            return f"{value:.2f}"
        return f"{value:.4f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)
