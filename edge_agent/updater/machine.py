"""The device updater: ARCHITECTURE §5 driven by the transition table of :mod:`shared.update`.

One method per state, named by its verb (:meth:`Updater.download`, :meth:`Updater.verify`,
:meth:`Updater.stage`, :meth:`Updater.self_test`, :meth:`Updater.shadow`, :meth:`Updater.activate`,
:meth:`Updater.watch`, :meth:`Updater.fail`, :meth:`Updater.roll_back`), each returning the
:class:`~shared.update.Event` that happened or raising :class:`UpdateFailure` with a stable reason.
:meth:`Updater.transition` looks the next state up in ``TRANSITIONS`` (an unknown pair raises),
persists the record (atomic write + fsync) *before* the next state's side effects run, then reports
the transition on ``events`` and the retained ``reported``. After a restart the machine resumes in
the persisted state; ``attempt`` counts unclean restarts in one state and stops loops.

The updater runs in its own thread and never blocks the main loop: the candidate engine is built
(and self-tested) here, and only the swap runs in the main loop, between two inferences, through
:meth:`UpdaterHost.run_in_loop`. Desired states arrive from the uplink's MQTT callback through a
thread-safe queue; their signature and serial are checked here.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import httpx
import numpy as np
from pydantic import ValidationError

from edge_agent.config import AgentConfig
from edge_agent.inference import Engine
from edge_agent.updater.conditions import (
    Blocked,
    Condition,
    DepotNetwork,
    FixedParked,
    FlagFileParked,
    Parked,
    TimeWindow,
    compatibility,
    first_blocked,
)
from edge_agent.updater.download import Downloader, DownloadError, DownloadSettings, Interrupted
from edge_agent.updater.store import ModelSlot, Target, UpdateRecord, UpdateStore, write_atomic
from shared.bundle import Bundle, BundleError, bundle_bytes, load_bundle, run_golden
from shared.messages import Desired, DesiredArtefact, DeviceEvent
from shared.signing import PublicKey, SignatureError, verify_desired
from shared.update import (
    ACTIVE_STATES,
    PROGRESS_STATES,
    TERMINAL_STATES,
    Event,
    ModelTarget,
    Reason,
    State,
    UpdateReport,
    next_state,
    result_of,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

EVENT_KIND = "update"
EVENT_DESIRED_REJECTED = "desired_rejected"
PAUSE_ENV = "FLEET_TEST_UPDATER_PAUSE_AT"  # test hook only, see docs/OPERATIONS.md
LOOP_TIMEOUT_S = 30.0
POLL_S = 0.5
REPORT_INTERVAL_S = 1.0
MIN_LATENCY_RECORDS = 20
MAX_WATCH_INFERENCE_ERRORS = 3
HANDLED_STATES = frozenset(PROGRESS_STATES)
MAX_THREAD_FAILURES = 10
THREAD_RETRY_S = 5.0
BUNDLE_FILE = "bundle.tar"


class UpdateFailure(Exception):
    """An update step failed: ``reason`` is a stable code, ``detail`` says more."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = str(reason)
        self.detail = detail


class Rejected(UpdateFailure):
    """The bundle is fine but not for this device (hardware profile, agent version)."""


class Stopping(Exception):
    """The updater is asked to stop; the persisted state is where the next start resumes."""


class UpdaterHost(Protocol):
    """What the updater needs from the agent (or from `model install` when no agent runs)."""

    live: bool
    engine: Engine | None
    shadow: Engine | None

    def make_engine(self, bundle: Bundle) -> Engine:
        """A new engine for ``bundle`` (loads the interpreter, runs the golden self-test)."""

    def run_in_loop(self, fn: Callable[[], T], timeout: float) -> T:
        """Run ``fn`` in the main loop thread between two inferences and return its result."""

    def emit(self, event: DeviceEvent) -> None:
        """Queue an event for the ``events`` topic (durably)."""

    def publish_reported(self) -> None:
        """Publish the retained ``reported`` state now."""

    def inference_errors(self) -> int:
        """Main loop inference failures so far."""

    def shadow_errors(self) -> int:
        """Shadow inference failures so far."""


@dataclass
class UpdaterCounters:
    """What the updater saw and did since the agent started."""

    desired_received: int = 0
    desired_accepted: int = 0
    desired_rejected: int = 0
    desired_stale: int = 0
    desired_duplicate: int = 0
    local_requests: int = 0
    jobs: int = 0
    committed: int = 0
    rolled_back: int = 0
    failed: int = 0
    incompatible: int = 0
    deferred: int = 0
    download_requests: int = 0
    download_bytes: int = 0


def sha256_file(path: Path) -> str:
    """SHA-256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_artefact(path: Path) -> bytes:
    """A bundle's tar bytes: the file itself, or a folder packed as :func:`shared.bundle.write_bundle` does."""
    if path.is_dir():
        parts = [(path / name).read_bytes() for name in ("model.tflite", "manifest.json", "signature")]
        return bundle_bytes(*parts)
    return path.read_bytes()


def signature_reason(exc: BundleError) -> str:
    """The bundle error's reason, refined by the signature's own reason (``unknown_key``...)."""
    cause = exc.__cause__
    if exc.reason == "bad_signature" and isinstance(cause, SignatureError):
        return Reason.UNKNOWN_KEY if cause.reason == "unknown_key" else Reason.BAD_SIGNATURE
    return exc.reason


def _dump(ref: ModelTarget | None) -> dict[str, Any] | None:
    return ref.model_dump() if ref is not None else None


def prepare_start(store: UpdateStore, max_restarts: int) -> tuple[UpdateRecord, ModelSlot | None]:
    """At agent start: count an unclean restart, mark the run unclean, say which model to load.

    Returns the record and the slot to load (``None``: the configured bundle). A candidate that
    crash-loops during its watch period, or whose update is failing, is not loaded again: the
    previous model is.
    """
    store.ensure()
    record = store.load()
    if not record.clean_shutdown and record.state in HANDLED_STATES:
        record.attempt += 1
        log.warning("unclean restart in update state %s (attempt %d)", record.state.value, record.attempt)
    record.clean_shutdown = False
    store.save(record)
    slot = record.active
    failing = record.state in (State.FAILURE, State.ROLLING_BACK) or (
        record.state is State.WATCHING and record.attempt > max_restarts
    )
    if record.activated and failing:
        slot = record.previous
    if slot is not None and slot.configured:
        slot = None
    return record, slot


class Updater:
    """The per-device update state machine (one thread)."""

    def __init__(
        self,
        config: AgentConfig,
        store: UpdateStore,
        host: UpdaterHost,
        *,
        keys: list[PublicKey],
        agent_version: str,
        record: UpdateRecord | None = None,
        running: ModelSlot | None = None,
        configured: ModelSlot | None = None,
        http: httpx.Client | None = None,
        download_slots: threading.Semaphore | None = None,
        conditions: list[Condition] | None = None,
        environ: dict[str, str] | None = None,
    ) -> None:
        self.config = config
        self.settings = config.updates
        self.store = store
        self.host = host
        self.keys = keys
        self.agent_version = agent_version
        self.record = record if record is not None else store.load()
        self.configured = configured  # the configured bundle as a slot (configured=True)
        self.running = running or configured  # the slot the host's engine came from
        self._own_http = http is None
        self.http = http or httpx.Client(follow_redirects=True)
        self.download_slots = download_slots or threading.Semaphore(1)
        self.conditions = conditions if conditions is not None else self._conditions()
        self.counters = UpdaterCounters()
        self.stop_event = threading.Event()
        self._desired: queue.SimpleQueue[Desired] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._candidate: Engine | None = None
        self._previous_engine: Engine | None = None
        self._previous_p95_ms: float | None = None
        self._verified: bytes | None = None
        self._retry_at = 0.0
        self._last_report = 0.0
        self._shadow_summary: dict[str, Any] | None = None
        self.lock = threading.RLock()
        env = os.environ if environ is None else environ
        self._pause_state, self._pause_bytes = self._parse_pause(env.get(PAUSE_ENV, ""))
        self.handlers: dict[State, Callable[[], Event]] = {
            State.DOWNLOADING: self.download,
            State.VERIFYING: self.verify,
            State.STAGING: self.stage,
            State.SELF_TESTING: self.self_test,
            State.SHADOWING: self.shadow,
            State.ACTIVATING: self.activate,
            State.WATCHING: self.watch,
            State.FAILURE: self.fail,
            State.ROLLING_BACK: self.roll_back,
        }

    # ------------------------------------------------------------------------------ set-up

    def _conditions(self) -> list[Condition]:
        s = self.settings
        signal = FlagFileParked(s.parked_flag_file) if s.parked_flag_file is not None else FixedParked(s.parked)
        broker = (self.config.mqtt.host, self.config.mqtt.port)
        return [Parked(signal), DepotNetwork(list(s.depot_networks), s.depot_flag_file, broker), TimeWindow(s.windows)]

    @staticmethod
    def _parse_pause(value: str) -> tuple[State | None, int | None]:
        if not value:
            return None, None
        name, _, at = value.partition("@")
        try:
            state = State(name)
        except ValueError:
            log.error("%s=%r names no update state; ignored", PAUSE_ENV, value)
            return None, None
        log.warning("TEST HOOK %s=%s: the updater will pause in %s", PAUSE_ENV, value, state.value)
        return state, int(at) if at.isdigit() else None

    def start(self) -> None:
        """Start the updater thread."""
        self._thread = threading.Thread(target=self._run, name=f"updater-{self.config.device.id}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread; the state stays where it is, the next start resumes there. Marks a clean stop."""
        self.stop_event.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("updater thread did not stop within %.0f s", timeout)
        with self.lock:
            self.record.clean_shutdown = True
            try:
                self.store.save(self.record)
            except OSError as exc:
                log.error("cannot persist the update state at stop: %s", exc)
        if self._own_http:
            self.http.close()

    # ----------------------------------------------------------------------------- intake

    def offer(self, desired: Desired) -> None:
        """Hand over a parsed desired state (called from the MQTT thread: only queues it)."""
        self._desired.put(desired)
        self._wake.set()

    def _drain_desired(self) -> bool:
        """Check queued desired states (signature, serial); True when a new one was accepted."""
        accepted = False
        while True:
            try:
                desired = self._desired.get_nowait()
            except queue.Empty:
                return accepted
            self.counters.desired_received += 1
            try:
                key_id = verify_desired(desired, self.keys)
            except SignatureError as exc:
                self.counters.desired_rejected += 1
                log.warning(
                    "desired state serial %d ignored (%s): %s (%d rejected so far)",
                    desired.serial,
                    exc.reason,
                    exc,
                    self.counters.desired_rejected,
                )
                self.host.emit(
                    DeviceEvent(
                        kind=EVENT_DESIRED_REJECTED,
                        ts=time.time(),
                        message=f"desired state ignored: {exc}",
                        data={"reason": exc.reason, "serial": desired.serial},
                    )
                )
                continue
            with self.lock:
                if desired.serial < self.record.serial:
                    self.counters.desired_stale += 1
                    log.warning(
                        "desired state serial %d is older than the accepted %d: ignored",
                        desired.serial,
                        self.record.serial,
                    )
                    continue
                if desired.serial == self.record.serial:
                    self.counters.desired_duplicate += 1  # the retained message again, after a reconnect
                    continue
                self.record.serial = desired.serial
                self.record.desired = desired.model_dump(mode="json")
                self.store.save(self.record)
            self.counters.desired_accepted += 1
            log.info(
                "desired state serial %d accepted (key %s): model %s, shadow %s",
                desired.serial,
                key_id,
                f"{desired.model.name} {desired.model.version}" if desired.model else "unchanged",
                f"{desired.shadow.name} {desired.shadow.version}" if desired.shadow else "none",
            )
            accepted = True
            self._retry_at = 0.0
            self.publish(force=True)

    @property
    def wanted(self) -> Desired | None:
        """The last accepted desired state."""
        doc = self.record.desired
        if doc is None:
            return None
        try:
            return Desired.model_validate(doc)
        except ValidationError:
            return None

    # ------------------------------------------------------------------------------ driver

    def _run(self) -> None:
        failures = 0
        while not self.stop_event.is_set():
            try:
                self._reconcile()
                self._loop()
            except Stopping:
                return
            except Exception:
                # The updater must never take the agent down (the model keeps running); a disk that
                # refuses the record, say, is retried, a while, then updates wait for a restart.
                failures += 1
                if failures >= MAX_THREAD_FAILURES:
                    log.exception("updater failed %d times; updates stop until the agent restarts", failures)
                    return
                log.exception("updater failed (%d in a row); retrying in %.0f s", failures, THREAD_RETRY_S)
                if self.stop_event.wait(THREAD_RETRY_S):
                    return
                self.record = self.store.load()

    def _loop(self) -> None:
        while not self.stop_event.is_set():
            self._drain_desired()
            if self.record.state in self.handlers:
                self.step()
                continue
            job = self._next_job()
            if job is None and self.record.state is State.DEFERRED and self._wanted_job() is None:
                self.transition(Event.RESET)  # what was deferred is no longer wanted
                continue
            if job is None:
                self._wake.wait(POLL_S)
                self._wake.clear()
                continue
            self._start_job(job)

    def run_local(self, bundle: Path, request_id: str | None = None) -> dict[str, Any]:
        """Drive one local install to its end in the calling thread (`model install` with no agent)."""
        self._reconcile()
        if self.record.state in ACTIVE_STATES:
            # An update an agent left half-way (killed): the local install replaces it, rolled back first.
            self._failed(self.record.state, Reason.SUPERSEDED, "replaced by a local install")
        while self.record.state in self.handlers:
            self.step()
        target = Target(origin="local", path=str(Path(bundle).resolve()), request_id=request_id)
        done = self._start_job(target)
        if done is not None:
            return done
        while self.record.state in self.handlers:
            self.step()
        return self.outcome()

    def step(self) -> None:
        """Run the handler of the current state and take the transition it leads to."""
        state = self.record.state
        self._maybe_pause(state)
        limit = self.settings.max_restarts
        if self.record.attempt > limit:
            if state in ACTIVE_STATES:
                reason = Reason.CRASH_LOOP if state is State.WATCHING else Reason.TOO_MANY_ATTEMPTS
                self.transition(
                    Event.ERROR,
                    reason=reason,
                    error=f"{self.record.attempt} unclean restarts in {state.value} (at most {limit})",
                )
                return
            if state is State.ROLLING_BACK:
                self.transition(Event.ROLLBACK_FAILED, reason=Reason.ROLLBACK_FAILED, error="rollback keeps crashing")
                return
        try:
            event = self.handlers[state]()
        except (Stopping, Interrupted):
            raise Stopping() from None
        except Rejected as exc:
            self._discard_artefacts()
            self.transition(Event.REJECT, reason=exc.reason, error=exc.detail)
        except UpdateFailure as exc:
            self._failed(state, exc.reason, exc.detail)
        except Exception as exc:
            log.exception("update step %s failed unexpectedly", state.value)
            self._failed(state, Reason.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}")
        else:
            self.transition(event)

    def _failed(self, state: State, reason: str, detail: str) -> None:
        log.error("update failed in %s: %s: %s", state.value, reason, detail)
        if state in ACTIVE_STATES:
            self.transition(Event.ERROR, reason=reason, error=detail)
        elif state is State.ROLLING_BACK:
            self.transition(Event.ROLLBACK_FAILED, reason=Reason.ROLLBACK_FAILED, error=f"{reason}: {detail}")
        else:
            raise UpdateFailure(reason, detail)

    def transition(self, event: Event, **changes: Any) -> State:
        """Take ``event`` from the current state (raises InvalidTransition), persist, then report it."""
        with self.lock:
            record = self.record
            old = record.state
            new = next_state(old, event)
            record.state = new
            record.last_event = event
            record.attempt = 0
            record.progress = 1.0 if new is State.COMMITTED else 0.0
            for name, value in changes.items():
                setattr(record, name, value)
            if new in TERMINAL_STATES or (new is State.IDLE and old is State.SHADOWING):
                self._close_job(new)
            self.store.save(record)
        self._report_transition(old, new, event)
        if new in TERMINAL_STATES or event is Event.SHADOW_END:
            self._after_job()
        return new

    def _report_transition(self, old: State, new: State, event: Event) -> None:
        r, t = self.record, self.record.target
        data: dict[str, Any] = {
            "from": old.value,
            "to": new.value,
            "event": event.value,
            "result": result_of(new).value,
            "attempt": r.attempt,
        }
        if t is not None:
            data.update(
                name=t.name,
                version=t.version,
                sha256=t.sha256,
                slot=t.slot,
                origin=t.origin,
                serial=t.serial,
                rollout_id=t.rollout_id,
            )
        if r.reason and (new in (State.FAILURE, State.DEFERRED, State.INCOMPATIBLE) or new in TERMINAL_STATES):
            data.update(reason=r.reason, error=r.error)
        if self._shadow_summary and old is State.SHADOWING:
            data["shadow"] = dict(self._shadow_summary)
        log.info(
            "update %s -> %s (%s)%s",
            old.value,
            new.value,
            event.value,
            f" {r.reason}: {r.error}" if "reason" in data else "",
        )
        message = f"{old.value} -> {new.value} ({event.value})"
        self.host.emit(DeviceEvent(kind=EVENT_KIND, ts=time.time(), message=message, data=data))
        self.publish(force=True)

    def publish(self, *, force: bool = False) -> None:
        """Publish ``reported`` (at most once a second unless ``force``)."""
        now = time.monotonic()
        if not force and now - self._last_report < REPORT_INTERVAL_S:
            return
        self._last_report = now
        try:
            self.host.publish_reported()
        except Exception:
            log.exception("publishing the reported state failed")

    def report(self) -> UpdateReport:
        """The ``update`` part of ``reported``."""
        r = self.record
        t = r.target
        return UpdateReport(
            state=r.state,
            progress=min(1.0, max(0.0, r.progress)),
            result=result_of(r.state),
            error=r.error if r.state is not State.DEFERRED else None,
            reason=r.reason,
            serial=t.serial if t is not None else None,
            rollout_id=t.rollout_id if t is not None else None,
            slot=t.slot if t is not None else None,
            origin=t.origin if t is not None else None,
            target=t.ref() if t is not None else None,
            attempt=r.attempt,
            updated_at=r.updated_at or None,
        )

    def outcome(self) -> dict[str, Any]:
        """The result of the job that just ended, as `model install` prints it."""
        r = self.record
        t = r.target
        return {
            "state": r.state.value,
            "result": result_of(r.state).value,
            "reason": r.reason,
            "error": r.error,
            "model": _dump(t.ref() if t is not None else None),
            "active": _dump(r.active.ref() if r.active else None),
        }

    def snapshot(self) -> dict[str, Any]:
        """For the status file."""
        r = self.record
        return {
            **self.report().model_dump(mode="json"),
            "active": r.active.model_dump() if r.active else None,
            "previous": r.previous.model_dump() if r.previous else None,
            "running": self.running.model_dump() if self.running else None,
            "desired_serial": r.serial if r.serial >= 0 else None,
            "counters": asdict(self.counters),
            "history": r.history[-5:],
        }

    # -------------------------------------------------------------------------------- jobs

    def _active_sha(self) -> str | None:
        slot = self.record.active or self.configured
        return slot.sha256 if slot is not None else None

    def _next_job(self) -> Target | None:
        request = self.store.next_request()
        if request is not None:
            self.counters.local_requests += 1
            return Target(origin="local", path=request["bundle"], request_id=request["id"])
        if self.record.state is State.DEFERRED and time.monotonic() < self._retry_at:
            return None
        return self._wanted_job()

    def _wanted_job(self) -> Target | None:
        """The job the accepted desired state asks for and that has not been done for its serial."""
        wanted = self.wanted
        if wanted is None or not self.settings.enabled:
            return None
        handled = self.record.handled
        active_sha = self._active_sha()
        model = wanted.model
        if (
            model is not None
            and model.sha256 != active_sha
            and tuple(handled.get("active", ())) != (wanted.serial, model.sha256)
        ):
            return self._target(model, wanted, "active")
        shadow = wanted.shadow
        if (
            shadow is not None
            and shadow.sha256 != active_sha
            and tuple(handled.get("shadow", ())) != (wanted.serial, shadow.sha256)
        ):
            return self._target(shadow, wanted, "shadow")
        return None

    @staticmethod
    def _target(artefact: DesiredArtefact, desired: Desired, slot: str) -> Target:
        return Target(
            name=artefact.name,
            version=artefact.version,
            sha256=artefact.sha256,
            size=artefact.size,
            url=artefact.url,
            origin="desired",
            slot="shadow" if slot == "shadow" else "active",
            serial=desired.serial,
            rollout_id=desired.rollout_id,
        )

    def _start_job(self, target: Target) -> dict[str, Any] | None:
        """Begin ``target``: RESET out of a finished state, then START, DEFER or INSTALL."""
        if target.origin == "local":
            assert target.path is not None
            if target.request_id is not None:
                self.store.drop_request(target.request_id)
            path = Path(target.path)
            try:
                sha = hashlib.sha256(read_artefact(path)).hexdigest()
            except OSError as exc:
                return self._local_refused(target, Reason.BUNDLE_NOT_FOUND, f"cannot read {path}: {exc}")
            if sha == self._active_sha():
                doc = {**self.outcome(), "state": State.COMMITTED.value, "result": "success"}
                doc.update(reason=None, error=None, detail=f"{path} is the model already running")
                if target.request_id:
                    self.store.write_result(target.request_id, doc)
                log.info("model install: %s is already the active model", path)
                return doc
        if self.record.state in TERMINAL_STATES:
            self.transition(Event.RESET)
        self.counters.jobs += 1
        changes: dict[str, Any] = {"target": target, "reason": None, "error": None}
        if target.origin == "local":
            self.transition(Event.INSTALL, **changes)
            return None
        blocked = first_blocked(self.conditions)
        if blocked is not None:
            self._retry_at = time.monotonic() + self.settings.retry_interval_s
            same = (
                self.record.state is State.DEFERRED
                and self.record.reason == blocked.reason
                and self.record.target is not None
                and self.record.target.sha256 == target.sha256
            )
            if not same:
                self.counters.deferred += 1
                self.transition(Event.DEFER, target=target, reason=blocked.reason, error=blocked.detail)
            return None
        self.transition(Event.START, **changes)
        return None

    def _local_refused(self, target: Target, reason: str, detail: str) -> dict[str, Any]:
        doc = {"state": "refused", "result": "failure", "reason": reason, "error": detail}
        if target.request_id:
            self.store.write_result(target.request_id, doc)
        log.error("model install refused: %s: %s", reason, detail)
        return doc

    def _close_job(self, new: State) -> None:
        """Bookkeeping of a job that ends in ``new`` (inside the persisted transition)."""
        r, t = self.record, self.record.target
        if t is None:
            return
        if t.origin == "desired" and t.serial is not None and t.sha256 is not None:
            r.handled[t.slot] = (t.serial, t.sha256)
        wanted = self.wanted
        if t.origin == "local" and new is State.COMMITTED and wanted is not None and wanted.model is not None:
            # A local install stays until the collector publishes a newer desired state.
            r.handled["active"] = (wanted.serial, wanted.model.sha256)
        if new is State.COMMITTED:
            self.counters.committed += 1
            r.previous = None
            r.activated = False
        elif new is State.ROLLED_BACK:
            self.counters.rolled_back += 1
        elif new is State.FAILED:
            self.counters.failed += 1
        elif new is State.INCOMPATIBLE:
            self.counters.incompatible += 1
        r.history.append(
            {
                "ts": time.time(),
                "state": new.value,
                "model": _dump(t.ref()),
                "slot": t.slot,
                "origin": t.origin,
                "serial": t.serial,
                "reason": r.reason,
            }
        )
        del r.history[: -max(1, 10)]

    def _after_job(self) -> None:
        """Side effects once a finished job is persisted: the local result, freed memory, disk clean-up."""
        t = self.record.target
        if t is not None and t.request_id:
            self.store.write_result(t.request_id, self.outcome())
        self._candidate = None
        self._verified = None
        self._shadow_summary = None
        if self.record.state is State.COMMITTED:
            self._previous_engine = None
        self._collect_garbage()

    def _collect_garbage(self) -> None:
        """Remove staged models and downloads that no slot needs (also finishes an interrupted commit)."""
        r = self.record
        keep = {s.sha256 for s in (r.active, r.previous) if s is not None and s.sha256}
        if r.state in HANDLED_STATES and r.target is not None and r.target.sha256:
            keep.add(r.target.sha256)
        if self.running is not None and self.running.sha256:
            keep.add(self.running.sha256)
        for folder in (self.store.models, self.store.downloads):
            try:
                entries = list(folder.iterdir())
            except OSError:
                continue
            for entry in entries:
                if entry.name.split(".")[0] in keep:
                    continue
                try:
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
                    log.info("removed %s (no longer needed)", entry)
                except OSError as exc:
                    log.warning("cannot remove %s: %s", entry, exc)

    def _reconcile(self) -> None:
        """At start: make the record agree with what the agent loaded, tidy the disk, report."""
        with self.lock:
            r = self.record
            running_sha = self.running.sha256 if self.running else None
            if r.state not in HANDLED_STATES and r.active is not None and r.active.sha256 != running_sha:
                log.error(
                    "the active model %s %s could not be loaded; running the configured bundle",
                    r.active.name,
                    r.active.version,
                )
                r.active = None
                self.store.save(r)
        self._collect_garbage()
        self.publish(force=True)

    # ------------------------------------------------------------------------------ checks

    def _check(self) -> None:
        """Raise when the agent stops or the job is no longer wanted; called often by long steps."""
        if self.stop_event.is_set():
            raise Stopping()
        self._drain_desired()
        t = self.record.target
        wanted = self.wanted
        if t is None or t.origin != "desired" or wanted is None or not self.settings.enabled:
            return
        if t.slot == "active":
            if wanted.model is not None and wanted.model.sha256 != t.sha256:
                raise UpdateFailure(Reason.SUPERSEDED, f"desired serial {wanted.serial} asks for another model")
            if wanted.model is not None and wanted.serial != t.serial:
                t.serial, t.rollout_id = wanted.serial, wanted.rollout_id
        elif self.record.state is not State.SHADOWING:
            if wanted.model is not None and wanted.model.sha256 == t.sha256:
                t.slot, t.serial, t.rollout_id = "active", wanted.serial, wanted.rollout_id  # promoted meanwhile
            elif wanted.shadow is None or wanted.shadow.sha256 != t.sha256:
                raise UpdateFailure(Reason.SUPERSEDED, f"desired serial {wanted.serial} no longer asks for it")

    def _maybe_pause(self, state: State) -> None:
        if self._pause_state is state and self._pause_bytes is None:
            self._pause_state = None
            self._pause()

    def _pause(self) -> None:
        log.warning("TEST HOOK: updater paused in %s until the agent stops", self.record.state.value)
        write_atomic(self.store.folder / "paused", self.record.state.value.encode())
        self.stop_event.wait()
        raise Stopping()

    def _progress(self, fraction: float) -> None:
        self.record.progress = fraction
        self.publish()

    def _staged(self, sha: str) -> Path:
        return self.store.models / sha / BUNDLE_FILE

    def _download_path(self, sha: str) -> Path:
        return self.store.downloads / f"{sha}.tar"

    def _artefact(self) -> Path:
        t = self.record.target
        assert t is not None
        if t.origin == "local":
            assert t.path is not None
            return Path(t.path)
        assert t.sha256 is not None
        return self._download_path(t.sha256)

    def _discard_artefacts(self) -> None:
        t = self.record.target
        if t is None or t.sha256 is None:
            return
        for path in (self._download_path(t.sha256), self.store.downloads / f"{t.sha256}.part"):
            path.unlink(missing_ok=True)

    def _load_staged(self) -> Bundle:
        t = self.record.target
        assert t is not None and t.sha256 is not None
        try:
            return load_bundle(self._staged(t.sha256), self.keys)
        except BundleError as exc:
            raise UpdateFailure(signature_reason(exc), f"staged bundle: {exc.detail}") from None

    def _engine_for_target(self) -> Engine:
        """The candidate engine: built by the self-test, or again after a restart."""
        if self._candidate is None:
            try:
                self._candidate = self.host.make_engine(self._load_staged())
            except BundleError as exc:
                raise UpdateFailure(Reason.SELF_TEST_FAILED, f"{exc.reason}: {exc.detail}") from None
        return self._candidate

    # ------------------------------------------------------------------------------ states

    def download(self) -> Event:
        """downloading: fetch the artefact over HTTP (resumable) into the downloads folder."""
        t = self.record.target
        assert t is not None and t.url is not None and t.sha256 is not None and t.size is not None
        if t.size > self.settings.max_bundle_bytes:
            raise UpdateFailure(
                Reason.OVERSIZED_DOWNLOAD, f"{t.size} bytes > updates.max_bundle_bytes {self.settings.max_bundle_bytes}"
            )
        s = self.settings
        settings = DownloadSettings(
            timeout_s=s.download_timeout_s,
            retries=s.download_retries,
            backoff_s=s.download_backoff_s,
            bandwidth_bytes_per_s=s.bandwidth_bytes_per_s,
        )
        size = t.size
        pause_at = self._pause_bytes if self._pause_state is State.DOWNLOADING else None
        downloader = Downloader(
            self.http,
            settings,
            stop=self.stop_event,
            check=self._check,
            progress=lambda n: self._progress(n / size),
            pause_at=pause_at,
            on_pause=self._pause,
        )
        part = self.store.downloads / f"{t.sha256}.part"
        try:
            with self.download_slots:
                downloader.fetch(t.url, part, self._download_path(t.sha256), size=size)
        except DownloadError as exc:
            part.unlink(missing_ok=True)
            raise UpdateFailure(exc.reason, exc.detail) from None
        finally:
            self.counters.download_requests += downloader.stats.requests
            self.counters.download_bytes += downloader.stats.bytes_received
        log.info(
            "downloaded %s %s: %d bytes in %d requests (resumed from %s)",
            t.name,
            t.version,
            size,
            downloader.stats.requests,
            downloader.stats.resumed_from or "-",
        )
        return Event.DOWNLOADED

    def verify(self) -> Event:
        """verifying: the tar's SHA-256, the bundle's full verification, then compatibility."""
        t = self.record.target
        assert t is not None
        path = self._artefact()
        try:
            data = read_artefact(path)
        except OSError as exc:
            reason = Reason.BUNDLE_NOT_FOUND if t.origin == "local" else Reason.DOWNLOAD_FAILED
            raise UpdateFailure(reason, f"cannot read {path}: {exc}") from None
        digest = hashlib.sha256(data).hexdigest()
        if t.origin == "desired" and digest != t.sha256:
            raise UpdateFailure(Reason.HASH_MISMATCH, f"downloaded bundle has sha256 {digest}, desired says {t.sha256}")
        try:
            bundle = load_bundle(data, self.keys)
        except BundleError as exc:
            raise UpdateFailure(signature_reason(exc), exc.detail) from None
        m = bundle.manifest
        if t.origin == "desired" and (m.name, m.version) != (t.name, t.version):
            raise UpdateFailure(
                Reason.ARTEFACT_MISMATCH, f"bundle is {m.name} {m.version}, desired says {t.name} {t.version}"
            )
        t.name, t.version, t.sha256 = m.name, m.version, digest
        blocked: Blocked | None = compatibility(m, profile=self.config.device.profile, agent_version=self.agent_version)
        if blocked is not None:
            raise Rejected(blocked.reason, blocked.detail)
        self._verified = data
        return Event.VERIFIED

    def stage(self) -> Event:
        """staging: copy the verified bundle to ``models/<sha256>/`` (atomic rename of the folder)."""
        t = self.record.target
        assert t is not None and t.sha256 is not None
        dest = self._staged(t.sha256)
        if dest.is_file() and sha256_file(dest) == t.sha256:
            self._discard_artefacts()
            return Event.STAGED
        data = self._verified
        try:
            if data is None:
                data = read_artefact(self._artefact())
            if hashlib.sha256(data).hexdigest() != t.sha256:
                raise UpdateFailure(Reason.HASH_MISMATCH, f"{self._artefact()} changed since it was verified")
            tmp = dest.parent.with_name(f".{t.sha256}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            with open(tmp / BUNDLE_FILE, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            shutil.rmtree(dest.parent, ignore_errors=True)
            os.replace(tmp, dest.parent)
            fd = os.open(self.store.models, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise UpdateFailure(Reason.STAGING_FAILED, f"cannot stage into {dest.parent}: {exc}") from None
        self._discard_artefacts()
        return Event.STAGED

    def self_test(self) -> Event:
        """self_testing: load the staged bundle into a new engine; its golden inputs must reproduce."""
        self._candidate = None
        engine = self._engine_for_target()
        t = self.record.target
        assert t is not None
        log.info("self-test of %s %s passed (golden deviation %.2g)", t.name, t.version, engine.golden_deviation)
        shadow_phase = self.settings.shadow_s > 0 or self.settings.shadow_min_records > 0
        # Without a main loop (`model install` with no agent) there are no live inputs to shadow.
        if t.slot == "shadow" or (shadow_phase and self.host.live):
            return Event.SHADOW_START
        return Event.SELF_TEST_PASSED

    def shadow(self) -> Event:
        """shadowing: the candidate runs beside the active model on the same inputs (role ``shadow``)."""
        t = self.record.target
        assert t is not None
        engine = self._engine_for_target()
        if self.host.shadow is not engine:
            self._in_loop(lambda: setattr(self.host, "shadow", engine))
            self.publish(force=True)
        start_count, start_bad, start_errors = engine.count, engine.nonfinite, self.host.shadow_errors()
        t0 = time.monotonic()
        s = self.settings
        while True:
            self._check()
            self._check_health(engine, start_count, start_bad, what="shadow")
            if self.host.shadow_errors() - start_errors > MAX_WATCH_INFERENCE_ERRORS:
                raise UpdateFailure(Reason.SHADOW_FAILED, "the shadow model keeps failing on live inputs")
            self._shadow_summary = {"records": engine.count - start_count}
            if t.slot == "active":
                elapsed = time.monotonic() - t0
                self._progress(min(1.0, elapsed / s.shadow_s) if s.shadow_s > 0 else 1.0)
                if elapsed >= s.shadow_s and engine.count - start_count >= s.shadow_min_records:
                    return Event.SHADOW_PASSED
            else:
                wanted = self.wanted
                if wanted is not None and self.settings.enabled:
                    if wanted.model is not None and wanted.model.sha256 == t.sha256:
                        # Promoted: the shadow candidate, staged and tested already, becomes the active model.
                        t.slot, t.serial, t.rollout_id = "active", wanted.serial, wanted.rollout_id
                        return Event.SHADOW_PASSED
                    if wanted.shadow is None or wanted.shadow.sha256 != t.sha256:
                        self._in_loop(lambda: setattr(self.host, "shadow", None))
                        self._candidate = None
                        return Event.SHADOW_END
            if self.stop_event.wait(POLL_S if t.slot == "shadow" else 0.1):
                raise Stopping()

    def activate(self) -> Event:
        """activating: swap the candidate in between two inferences; the previous model stays on disk."""
        t = self.record.target
        assert t is not None and t.sha256 is not None and t.name is not None and t.version is not None
        engine = self._engine_for_target()
        current = self.host.engine
        if self.host.live and current is not None and current.count >= MIN_LATENCY_RECORDS:
            self._previous_p95_ms = float(np.percentile(current.recent_latency_us(200), 95)) / 1000.0

        def swap() -> Engine | None:
            old = self.host.engine
            self.host.engine = engine
            if self.host.shadow is engine:
                self.host.shadow = None
            return old

        old = self._in_loop(swap)
        self._previous_engine = old
        previous = self.record.active or self.configured
        active = ModelSlot(name=t.name, version=t.version, sha256=t.sha256, path=str(self._staged(t.sha256)))
        self.running = active
        log.info("activated %s %s (previous %s kept until commit)", t.name, t.version, previous and previous.version)
        self.record.previous = previous
        self.record.active = active
        self.record.activated = True
        return Event.ACTIVATED

    def watch(self) -> Event:
        """watching: the new model runs; roll back on NaN/Inf, latency, errors or a failed self-test."""
        engine = self.host.engine
        assert engine is not None
        s = self.settings
        if not self.host.live:
            self._watch_offline(engine)
        else:
            start_count, start_bad, start_errors = engine.count, engine.nonfinite, self.host.inference_errors()
            t0 = time.monotonic()
            while True:
                self._check()
                self._check_health(engine, start_count, start_bad, what="active")
                errors = self.host.inference_errors() - start_errors
                if errors > MAX_WATCH_INFERENCE_ERRORS:
                    raise UpdateFailure(Reason.INFERENCE_ERRORS, f"{errors} inference errors during the watch period")
                elapsed = time.monotonic() - t0
                self._progress(min(1.0, elapsed / s.watch_s) if s.watch_s > 0 else 1.0)
                if elapsed >= s.watch_s and engine.count - start_count >= s.watch_min_records:
                    break
                if self.stop_event.wait(0.1):
                    raise Stopping()
        try:
            deviation = self._in_loop(lambda: run_golden(engine.bundle, engine.interpreter))
        except BundleError as exc:
            detail = f"golden self-test on the live interpreter: {exc.detail}"
            raise UpdateFailure(Reason.SELF_TEST_FAILED, detail) from None
        log.info("watch period passed (golden deviation %.2g)", deviation)
        return Event.WATCH_PASSED

    def _check_health(self, engine: Engine, start_count: int, start_bad: int, *, what: str) -> None:
        s = self.settings
        bad = engine.nonfinite - start_bad
        if bad > s.max_nonfinite:
            raise UpdateFailure(
                Reason.NONFINITE_OUTPUT, f"{bad} of {engine.count - start_count} {what} outputs were NaN or Inf"
            )
        n = engine.count - start_count
        if n >= MIN_LATENCY_RECORDS:
            p95 = float(np.percentile(engine.recent_latency_us(n), 95)) / 1000.0
            if p95 > s.max_latency_ms:
                raise UpdateFailure(
                    Reason.LATENCY_OVER_BOUND,
                    f"{what} p95 latency {p95:.4f} ms over {n} records > updates.max_latency_ms {s.max_latency_ms}",
                )
            ratio, before = s.max_latency_ratio, self._previous_p95_ms
            if ratio is not None and before and what == "active" and p95 > ratio * before:
                raise UpdateFailure(
                    Reason.LATENCY_OVER_BOUND,
                    f"p95 latency {p95:.4f} ms > {ratio} x the previous model's {before:.4f} ms",
                )

    def _watch_offline(self, engine: Engine) -> None:
        """No agent runs: exercise the model on inputs drawn from its reference profile instead."""
        s = self.settings
        m = engine.manifest
        rng = np.random.default_rng(0)
        n = s.offline_watch_records
        columns = []
        for feature in m.reference.features:
            counts = np.asarray(feature.histogram.counts, np.float64)
            edges = np.asarray(feature.histogram.edges, np.float64)
            p = counts / counts.sum() if counts.sum() > 0 else np.full(counts.size, 1 / counts.size)
            bins = rng.choice(counts.size, size=n, p=p)
            columns.append(rng.uniform(edges[bins], edges[bins + 1]))
        X = np.stack(columns, axis=1).astype(np.float32)
        start_count, start_bad = engine.count, engine.nonfinite
        engine.infer_many(X)
        self._check_health(engine, start_count, start_bad, what="active")

    def fail(self) -> Event:
        """failure: the reason is recorded; go and roll back."""
        return Event.START

    def roll_back(self) -> Event:
        """rolling_back: return to the previous model if the candidate was activated; discard the candidate."""
        r, t = self.record, self.record.target
        if self.host.shadow is not None:  # only a job runs a shadow: it is this job's candidate
            self._in_loop(lambda: setattr(self.host, "shadow", None))
        if r.activated and r.previous is not None:
            previous = r.previous
            if self.running is None or self.running.sha256 != previous.sha256 or self.host.engine is None:
                engine = self._previous_engine or self._engine_for_slot(previous)
                if engine is None and self.configured is not None and previous.sha256 != self.configured.sha256:
                    log.error("previous model unusable; falling back to the configured bundle")
                    previous = self.configured
                    engine = self._engine_for_slot(previous)
                if engine is None:
                    detail = "neither the previous model nor the configured one loads"
                    raise UpdateFailure(Reason.ROLLBACK_FAILED, detail)
                self._in_loop(lambda: setattr(self.host, "engine", engine))
            self.running = previous
            r.active = None if previous.configured else previous
            r.previous = None
            r.activated = False
            log.warning("rolled back to %s %s", previous.name, previous.version)
        self._candidate = None
        self._previous_engine = None
        self._discard_artefacts()
        if t is not None and t.sha256 and t.sha256 != self._active_sha():
            shutil.rmtree(self.store.models / t.sha256, ignore_errors=True)
        return Event.ROLLBACK_DONE

    def _engine_for_slot(self, slot: ModelSlot) -> Engine | None:
        try:
            return self.host.make_engine(load_bundle(Path(slot.path), self.keys))
        except (BundleError, OSError) as exc:
            log.error("cannot load %s %s from %s: %s", slot.name, slot.version, slot.path, exc)
            return None

    def _in_loop(self, fn: Callable[[], T]) -> T:
        try:
            return self.host.run_in_loop(fn, LOOP_TIMEOUT_S)
        except TimeoutError:
            if self.stop_event.is_set():
                raise Stopping() from None
            raise UpdateFailure(
                Reason.ACTIVATION_FAILED, f"the main loop did not take the change within {LOOP_TIMEOUT_S:.0f} s"
            ) from None
