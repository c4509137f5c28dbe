"""Real Mosquitto and PostgreSQL instances for tests and benchmarks.

Every test run starts its *own* Mosquitto from the installed binary with the production
configuration (``collector/deploy/mosquitto.conf``), on a free port, in a temporary folder, so a
test may stop, kill and restart it without touching the machine's broker. PostgreSQL: a fresh
database on the machine's server when one answers (``FLEET_TEST_PG_URL``, default
``postgresql://postgres@127.0.0.1:5432/postgres``), else a private cluster made with
``initdb``/``pg_ctl``; a test that kills the database always gets a private cluster.

When a binary is missing the caller skips with a loud reason, or fails when
``FLEET_REQUIRE_SERVICES=1`` (CI).
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BROKER_CONF = REPO / "collector" / "deploy" / "mosquitto.conf"


class ServiceUnavailable(RuntimeError):
    """A service binary or server is not available on this machine."""


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 10.0, host: str = "127.0.0.1") -> None:
    """Block until something accepts connections on ``port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")


def find_binary(name: str, extra: list[str] | None = None) -> str | None:
    """``name`` on PATH or in the usual Debian folders."""
    found = shutil.which(name)
    if found:
        return found
    for pattern in [f"/usr/sbin/{name}", f"/usr/lib/postgresql/*/bin/{name}", *(extra or [])]:
        hits = sorted(glob.glob(pattern))
        if hits:
            return hits[-1]
    return None


@dataclass
class Mosquitto:
    """A private Mosquitto with the production configuration."""

    folder: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0

    @property
    def url(self) -> str:
        """``mqtt://127.0.0.1:<port>``."""
        return f"mqtt://127.0.0.1:{self.port}"

    def _config(self) -> Path:
        text = BROKER_CONF.read_text()
        text = re.sub(r"(?m)^listener .*$", f"listener {self.port} 127.0.0.1", text)
        text = re.sub(r"(?m)^persistence_location .*$", f"persistence_location {self.folder}/", text)
        text += f"\nlog_dest file {self.folder}/mosquitto.log\n"
        path = self.folder / "mosquitto.conf"
        path.write_text(text)
        return path

    def start(self) -> Mosquitto:
        """Start (or restart after a stop) on the same port and persistence folder."""
        binary = find_binary("mosquitto")
        if binary is None:
            raise ServiceUnavailable("mosquitto binary not found (Debian package 'mosquitto')")
        self.folder.mkdir(parents=True, exist_ok=True)
        for _attempt in range(5):
            self.proc = subprocess.Popen(
                [binary, "-c", str(self._config())], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            try:
                wait_port(self.port)
            except TimeoutError:
                log = (self.folder / "mosquitto.log").read_text() if (self.folder / "mosquitto.log").exists() else ""
                self.stop(signal.SIGKILL)
                raise ServiceUnavailable(f"mosquitto did not start: {log[-2000:]}") from None
            # Something else may have taken the free port between free_port() and our bind: then
            # the port answers but our broker has exited. Only a first start may move to a new port
            # (a restart must keep the port the clients know).
            time.sleep(0.1)
            if self.proc.poll() is None:
                return self
            if self.restarts:
                break
            self.port = free_port()
        raise ServiceUnavailable(f"mosquitto exited right after starting (port {self.port} taken?)")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        """Stop with ``sig`` (SIGTERM saves persistence; SIGKILL loses what was not autosaved)."""
        self.restarts += 1  # the next start() is a restart: it must keep its port
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@dataclass
class Postgres:
    """A PostgreSQL database: on the machine's server, or in a private cluster."""

    admin_url: str
    database: str
    cluster: Path | None = None
    port: int | None = None

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the test database (psycopg 3 driver)."""
        base = self.admin_url.rsplit("/", 1)[0]
        return base.replace("postgresql://", "postgresql+psycopg://", 1) + f"/{self.database}"

    def stop(self, mode: str = "fast") -> None:
        """Stop a private cluster (``immediate`` is a crash)."""
        if self.cluster is not None:
            subprocess.run(
                [find_binary("pg_ctl") or "pg_ctl", "-D", str(self.cluster), "-m", mode, "-w", "stop"],
                check=False,
                capture_output=True,
                cwd="/",
                **_as_postgres_user(),
            )

    def start(self) -> None:
        """(Re)start a private cluster."""
        if self.cluster is not None:
            subprocess.run(
                [
                    find_binary("pg_ctl") or "pg_ctl",
                    "-D",
                    str(self.cluster),
                    "-o",
                    f"-p {self.port} -k {self.cluster} -c listen_addresses=127.0.0.1 -c fsync=off",
                    "-l",
                    str(self.cluster / "server.log"),
                    "-w",
                    "start",
                ],
                check=True,
                capture_output=True,
                cwd="/",
                **_as_postgres_user(),
            )


def _as_postgres_user() -> dict[str, object]:
    # initdb refuses to run as root; run the cluster as the 'postgres' user when we are root.
    if os.geteuid() != 0:
        return {}
    import pwd

    try:
        pw = pwd.getpwnam("postgres")
    except KeyError:
        return {}
    return {"user": pw.pw_uid, "group": pw.pw_gid}


def machine_postgres_admin_url() -> str | None:
    """The admin URL of a PostgreSQL server that answers, or None."""
    url = os.environ.get("FLEET_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    try:
        import psycopg

        with psycopg.connect(url, connect_timeout=3):
            return url
    except Exception:
        return None


def create_database(admin_url: str, prefix: str = "fleet_test") -> str:
    """Create a fresh, uniquely named database; return its name."""
    import psycopg

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return name


def drop_database(admin_url: str, name: str) -> None:
    """Drop a test database, disconnecting stragglers."""
    import psycopg

    with contextlib.suppress(Exception), psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def private_postgres(folder: Path) -> Postgres:
    """Start a private cluster in ``folder`` (initdb + pg_ctl) with one fresh database."""
    initdb = find_binary("initdb")
    if initdb is None or find_binary("pg_ctl") is None:
        raise ServiceUnavailable("initdb/pg_ctl not found (Debian package 'postgresql')")
    owner = _as_postgres_user()
    if owner:
        # pytest's temporary folders are private to root; the cluster must be reachable by 'postgres'.
        folder = Path(tempfile.mkdtemp(prefix="fleet-pg-"))
        folder.chmod(0o755)
        os.chown(folder, int(owner["user"]), int(owner["group"]))  # type: ignore[call-overload]
    folder.mkdir(parents=True, exist_ok=True)
    cluster = folder / "pgdata"
    done = subprocess.run(
        [initdb, "-D", str(cluster), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
        capture_output=True,
        cwd="/",
        **owner,
    )
    if done.returncode != 0:
        raise ServiceUnavailable(f"initdb failed: {done.stderr.decode(errors='replace')[-1000:]}")
    port = free_port()
    pg = Postgres(f"postgresql://postgres@127.0.0.1:{port}/postgres", "fleet", cluster=cluster, port=port)
    pg.start()
    import psycopg

    with psycopg.connect(pg.admin_url, autocommit=True) as conn:
        conn.execute('CREATE DATABASE "fleet"')
    return pg


@contextlib.contextmanager
def serve_app(app: Any, timeout: float = 20.0) -> Iterator[str]:
    """Serve an ASGI app with uvicorn on a free port in a thread; yield its base URL once it answers /api/v1/health.

    For tests of clients that talk real HTTP (``fleetctl``); stopped on exit.
    """
    import threading

    import httpx
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.config.port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/api/v1/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.05)
    try:
        yield base
    finally:
        server.should_exit = True
        thread.join(10)
