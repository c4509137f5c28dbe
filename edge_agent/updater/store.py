"""The updater's durable state: one JSON record, written atomically and fsynced before each side effect.

Layout under ``<state_dir>/update/``::

    state.json            the UpdateRecord (state, target, active and previous model, attempt counter)
    downloads/<sha>.part  a download in progress (resumed with an HTTP Range request)
    downloads/<sha>.tar   a complete download waiting for verification
    requests/<id>.json    `edge-agent model install` asking a running agent to install a bundle
    results/<id>.json     the outcome of that request
    paused                test hook only (FLEET_TEST_UPDATER_PAUSE_AT): the state the updater paused in

Staged models live in ``<state_dir>/models/<sha256>/bundle.tar``. ``<state_dir>/agent.lock`` is held
(``flock``) by whichever process drives the machine: the running agent, or `model install` when
no agent runs.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.update import Event, ModelTarget, State

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
HISTORY = 10


class _Stored(BaseModel):
    # A newer agent may add fields; an older one reading the file after a downgrade ignores them.
    model_config = ConfigDict(extra="ignore")


class ModelSlot(_Stored):
    """A model on disk: what it is and where its bundle is."""

    name: str
    version: str
    sha256: str | None = None
    path: str
    configured: bool = Field(False, description="the bundle named by model.bundle in the configuration")

    def ref(self) -> ModelTarget:
        """As the report names it."""
        return ModelTarget(name=self.name, version=self.version, sha256=self.sha256)


class Target(_Stored):
    """What the update in progress installs, and where it came from."""

    name: str | None = None  # None for a local bundle until verification has read its manifest
    version: str | None = None
    sha256: str | None = None
    size: int | None = None
    url: str | None = None
    path: str | None = None  # local bundle (file or folder) for `model install`
    origin: Literal["desired", "local"] = "desired"
    slot: Literal["active", "shadow"] = "active"
    serial: int | None = None
    rollout_id: str | None = None
    request_id: str | None = None

    def ref(self) -> ModelTarget | None:
        """As the report names it."""
        if self.name is None or self.version is None:
            return None
        return ModelTarget(name=self.name, version=self.version, sha256=self.sha256)


class UpdateRecord(_Stored):
    """Everything the updater must remember across a restart."""

    schema_version: int = SCHEMA_VERSION
    state: State = State.IDLE
    last_event: Event | None = None
    target: Target | None = None
    active: ModelSlot | None = Field(None, description="the model to run; None: the configured bundle")
    previous: ModelSlot | None = Field(None, description="the model to return to, until commit")
    activated: bool = Field(False, description="the target is the active model (between activation and the end)")
    attempt: int = Field(0, description="unclean restarts in the current state")
    clean_shutdown: bool = True
    progress: float = 0.0
    reason: str | None = None
    error: str | None = None
    serial: int = Field(-1, description="highest desired serial accepted")
    desired: dict[str, Any] | None = Field(None, description="the last accepted desired state (JSON)")
    handled: dict[str, tuple[int, str]] = Field(
        default_factory=dict, description="per slot: the (serial, sha256) of the last desired job finished"
    )
    updated_at: float = 0.0
    history: list[dict[str, Any]] = Field(default_factory=list)


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old or the new content."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


class UpdateStore:
    """Reads and writes the record and the local-install request and result files."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / "state.json"
        self.downloads = self.folder / "downloads"
        self.requests = self.folder / "requests"
        self.results = self.folder / "results"
        self.models = self.folder.parent / "models"

    def ensure(self) -> None:
        """Create the folders."""
        for folder in (self.folder, self.downloads, self.requests, self.results, self.models):
            folder.mkdir(parents=True, exist_ok=True)

    def load(self, *, repair: bool = True) -> UpdateRecord:
        """The stored record, or a fresh one (a corrupt file is kept aside and logged, never fatal).

        Readers that do not drive the machine (`edge-agent status`) pass ``repair=False``.
        """
        try:
            return UpdateRecord.model_validate_json(self.path.read_bytes())
        except FileNotFoundError:
            return UpdateRecord()
        except (OSError, ValidationError, ValueError) as exc:
            if not repair:
                log.warning("update state %s is unreadable: %s", self.path, exc)
                return UpdateRecord()
            aside = self.path.with_name(f"state.corrupt-{int(time.time())}.json")
            with contextlib.suppress(OSError):
                os.replace(self.path, aside)
            log.error("update state %s is unreadable (%s); kept as %s, starting from idle", self.path, exc, aside)
            return UpdateRecord()

    def save(self, record: UpdateRecord) -> None:
        """Persist ``record`` durably (atomic replace + fsync of file and folder)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        record.updated_at = time.time()
        write_atomic(self.path, record.model_dump_json(indent=1).encode())

    # ------------------------------------------------------------------------ local installs

    def add_request(self, bundle: Path) -> str:
        """Queue a local install for the running agent; return the request id."""
        self.ensure()
        request_id = uuid.uuid4().hex
        doc = {"id": request_id, "bundle": str(Path(bundle).resolve()), "requested_at": time.time()}
        write_atomic(self.requests / f"{request_id}.json", json.dumps(doc).encode())
        return request_id

    def next_request(self) -> dict[str, Any] | None:
        """The oldest pending local install request, if any (an unreadable one is dropped and logged)."""
        try:
            names = sorted(self.requests.glob("*.json"), key=lambda p: p.stat().st_mtime)
        except OSError:
            return None
        for path in names:
            try:
                doc = json.loads(path.read_text())
                if not isinstance(doc, dict) or not isinstance(doc.get("bundle"), str):
                    raise ValueError("not an install request")
                doc["id"] = path.stem
                return doc
            except (OSError, ValueError) as exc:
                log.warning("install request %s ignored: %s", path, exc)
                with contextlib.suppress(OSError):
                    path.unlink()
        return None

    def drop_request(self, request_id: str) -> bool:
        """Remove a request file; True if it was still there (nobody had claimed it)."""
        try:
            (self.requests / f"{request_id}.json").unlink()
            return True
        except FileNotFoundError:
            return False

    def write_result(self, request_id: str, doc: dict[str, Any]) -> None:
        """Record the outcome of a local install request."""
        self.results.mkdir(parents=True, exist_ok=True)
        write_atomic(self.results / f"{request_id}.json", json.dumps(doc, default=str).encode())

    def read_result(self, request_id: str) -> dict[str, Any] | None:
        """The outcome of a request, once written."""
        try:
            doc = json.loads((self.results / f"{request_id}.json").read_text())
        except (FileNotFoundError, ValueError):
            return None
        return doc if isinstance(doc, dict) else None


class StateLock:
    """An exclusive ``flock`` on ``<state_dir>/agent.lock``: one process drives the updater and spool."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / "agent.lock"
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        """Take the lock if free; True when held by this process afterwards."""
        if self._fd is not None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return True

    def acquire(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the lock."""
        deadline = time.monotonic() + timeout
        while not self.try_acquire():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)
        return True

    def holder(self) -> str | None:
        """The pid written by the holder (informational)."""
        try:
            return self.path.read_text().strip() or None
        except OSError:
            return None

    def release(self) -> None:
        """Let go of the lock."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
