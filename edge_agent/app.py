"""The agent's wiring: start in order, run the main loop, stop in reverse, draining.

Start order: configuration (given), the state-directory lock, the update record (which model to
load: the configured bundle, or the one the updater installed), bundle and engine (verified,
golden self-test), spool (crash recovery), sensor source, updater (not yet running), uplink, then
the main loop, the status writer and the updater threads. Stop runs the other way: the updater
stops (its state persisted where it is), the main loop ends, the spool is flushed, the uplink
publishes ``stopped``, the source is released and the spool closed (lowering its seq reservation,
so a clean restart declares no crash gap), then the lock is released. All threads are named and
share one stop event; SIGTERM and SIGINT set it.

The main loop is the only thread that touches the active and shadow interpreters: the updater
hands it changes (swap the engine, start or stop a shadow, run the golden self-test on the live
interpreter) through :meth:`Agent.run_in_loop`, executed between two inferences.

Two loops feed the same inference, spool and uplink path:

* *live*: one observation per tick on an absolute schedule at ``sensors.rate_hz`` (no drift; a
  late tick is caught up, a long stall is skipped and counted), features from
  :class:`shared.features.FeaturePipeline`;
* *replay*: feature rows from a CSV in chunks through :meth:`Engine.infer_many`, paced at a rate
  or as fast as possible, with the replay cursor committed in the same transaction as the
  records, back-pressure when the spool runs ahead of the collector, and completion once every
  record is acknowledged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np
from pydantic import BaseModel

from edge_agent.config import AgentConfig, ConfigError, load_device_profile
from edge_agent.inference import Engine
from edge_agent.labels import LateLabels
from edge_agent.sensors.base import Observation, Source, SourceExhausted
from edge_agent.spool import ReplayCursor, Spool
from edge_agent.updater.machine import Updater, prepare_start, read_artefact
from edge_agent.updater.store import ModelSlot, StateLock, UpdateStore
from edge_agent.uplink import Uplink
from shared.bundle import Bundle, BundleError, load_bundle
from shared.codec import NO_LABEL
from shared.features import FeaturePipeline
from shared.messages import DeviceEvent, ModelRef, Reported, Status
from shared.profile import HardwareProfile
from shared.signing import PublicKey, load_public_keys

log = logging.getLogger(__name__)
T = TypeVar("T")

HardwareFactory = Callable[[AgentConfig, HardwareProfile], Source]

STATUS_FILE_INTERVAL_S = 2.0
# What a reload (SIGHUP) applies to the running agent; any other change needs a restart.
RELOADABLE: dict[str, frozenset[str]] = {
    "sensors": frozenset({"rate_hz"}),
    # batch_max_records also sizes the spool's chunks, fixed when the spool opens.
    "uplink": frozenset({"batch_max_age_s", "ack_timeout_s", "max_inflight_batches", "status_interval_s"}),
    "spool": frozenset({"max_bytes", "commit_interval_s", "commit_max_records"}),
    "activations": frozenset({"sample_fraction"}),
    "device": frozenset({"tags"}),
    "log_level": frozenset(),
}
MAX_CONSECUTIVE_ERRORS = 50
REPLAY_CHUNK_ROWS = 500
LOCK_WAIT_S = 120.0  # `model install` may hold the state directory for a few seconds


class StateDirBusy(RuntimeError):
    """Another process (an agent, or `model install`) holds the state directory."""


def agent_version() -> str:
    """The installed package version (``0.0.0`` when running from an uninstalled tree)."""
    try:
        return metadata.version("fleet-model-health")
    except metadata.PackageNotFoundError:
        return "0.0.0"


def load_configured_bundle(config: AgentConfig) -> Bundle:
    """Load and verify the configured bundle against the pinned keys (raises ``BundleError``)."""
    keys = load_public_keys(list(config.model.trusted_keys))
    return load_bundle(Path(config.model.bundle), keys)


def configured_slot(config: AgentConfig, keys: list[PublicKey], bundle: Bundle | None = None) -> ModelSlot | None:
    """The configured bundle as the updater's fallback slot (None when it cannot be read)."""
    path = Path(config.model.bundle)
    try:
        data = read_artefact(path)
        manifest = bundle.manifest if bundle is not None else load_bundle(data, keys, check_tensors=False).manifest
    except (OSError, BundleError) as exc:
        log.warning("configured bundle %s is unusable as a fallback: %s", path, exc)
        return None
    return ModelSlot(
        name=manifest.name,
        version=manifest.version,
        sha256=hashlib.sha256(data).hexdigest(),
        path=str(path),
        configured=True,
    )


def file_identity(path: Path) -> str:
    """A replay file's identity for the cursor: its size and the hash of its first MiB."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        h.update(fh.read(1 << 20))
    return f"{path.name}:{path.stat().st_size}:{h.hexdigest()[:16]}"


@dataclass
class ReplaySettings:
    """What `edge-agent replay` asks of the agent."""

    csv: Path
    label_column: str | None = None
    rate: float = 0.0  # records per second; 0 = as fast as possible
    from_start: bool = False


@dataclass
class LoopCounters:
    """What the main loop did."""

    ticks: int = 0
    records: int = 0
    read_errors: int = 0
    inference_errors: int = 0
    skipped_ticks: int = 0
    late_labels: int = 0
    replay_rows: int = 0
    replay_bad_rows: int = 0
    shadow_records: int = 0
    shadow_agree: int = 0
    shadow_errors: int = 0


class Agent:
    """One device: engine, spool, source and uplink, run by a main loop thread."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        bundle: Bundle | None = None,
        source: Source | None = None,
        replay: ReplaySettings | None = None,
        stop_event: threading.Event | None = None,
        progress: Callable[[], None] | None = None,
        make_hardware: HardwareFactory | None = None,
        http: httpx.Client | None = None,
        download_slots: threading.Semaphore | None = None,
    ) -> None:
        self.config = config
        self.device_id = config.device.id
        self.boot_id = uuid.uuid4().hex
        self.version = agent_version()
        self.stop_event = stop_event or threading.Event()
        self.finished = threading.Event()
        self.failed: str | None = None
        self.counters = LoopCounters()
        self._bundle = bundle
        self._source = source
        self._progress = progress or (lambda: None)
        self._make_hardware = make_hardware
        self.profile: HardwareProfile | None = None
        if replay is None and source is None and config.sensors.backend == "replay":
            assert config.sensors.replay_csv is not None  # the config validator guarantees it
            replay = ReplaySettings(config.sensors.replay_csv, config.sensors.label_column, rate=config.sensors.rate_hz)
        self._replay = replay
        self._threads: list[threading.Thread] = []
        self._started = False
        self._stopped = False
        self._rate = 0.0
        self._rate_mark = (time.monotonic(), 0)
        self.engine: Engine | None = None
        self.spool: Spool | None = None
        self.source: Source | None = None
        self.uplink: Uplink | None = None
        self.labels: LateLabels | None = None
        self._replay_source: Any = None
        self.live = True  # a main loop runs inferences (the updater's host protocol)
        self.shadow: Engine | None = None
        self.updater: Updater | None = None
        self._http = http
        self._download_slots = download_slots
        self._loop_tasks: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = queue.SimpleQueue()
        self._loop_thread: threading.Thread | None = None
        self._lock = StateLock(config.state_dir)

    # -------------------------------------------------------------------------------- start

    def start(self) -> None:
        """Start every part in order; on failure, stop what was started and re-raise."""
        cfg = self.config
        try:
            cfg.state_dir.mkdir(parents=True, exist_ok=True)
            if not self._lock.acquire(LOCK_WAIT_S):
                raise StateDirBusy(f"{self._lock.path} is held by pid {self._lock.holder()}: another agent runs here")
            self.profile = self._load_profile()
            keys = load_public_keys(list(cfg.model.trusted_keys))
            store = UpdateStore(cfg.state_dir / "update")
            record, slot = prepare_start(store, cfg.updates.max_restarts)
            bundle = None
            if slot is not None:
                try:
                    bundle = load_bundle(Path(slot.path), keys)
                    log.info("running %s %s installed by the updater (%s)", slot.name, slot.version, slot.path)
                except (BundleError, OSError) as exc:
                    log.error("the installed model %s is unusable (%s); using the configured bundle", slot.path, exc)
                    slot = None
            if bundle is None:
                bundle = self._bundle or load_configured_bundle(cfg)
                configured = configured_slot(cfg, keys, bundle)
            else:
                configured = configured_slot(cfg, keys)
            self.engine = self.make_engine(bundle)
            self.spool = Spool(
                cfg.spool_path,
                max_bytes=cfg.spool.max_bytes,
                commit_interval_s=cfg.spool.commit_interval_s,
                commit_max_records=cfg.spool.commit_max_records,
                chunk_max_records=cfg.uplink.batch_max_records,
            )
            if cfg.labels.late_label_fraction > 0:
                self.labels = LateLabels(cfg.late_labels_path, cfg.labels.late_label_fraction, seed=cfg.sensors.seed)
            if self._replay is not None:
                self._open_replay(self._replay)
            else:
                self.source = self._source or self._make_source()
                self.source.start()
            self.updater = Updater(
                cfg,
                store,
                self,
                keys=keys,
                agent_version=self.version,
                record=record,
                running=slot or configured,
                configured=configured,
                http=self._http,
                download_slots=self._download_slots,
            )
            self.uplink = Uplink(
                device_id=self.device_id,
                spool=self.spool,
                mqtt_settings=cfg.mqtt,
                settings=cfg.uplink,
                boot_id=self.boot_id,
                profile=cfg.device.profile,
                agent_version=self.version,
                client_id=cfg.client_id,
                status=self.status_message,
                reported=self.reported_message,
                on_desired=self.updater.offer,
            )
            self.uplink.start()
        except BaseException:
            self._close_parts()
            self._lock.release()
            raise
        target = self._replay_loop if self._replay is not None else self._live_loop
        self._loop_thread = self._spawn(target, f"agent-loop-{self.device_id}")
        self._spawn(self._status_loop, f"agent-status-{self.device_id}")
        self.updater.start()
        self._started = True
        log.info(
            "agent %s started: model %s %s, spool epoch %s, boot %s",
            self.device_id,
            self.engine.model_name,
            self.engine.model_version,
            self.spool.epoch,
            self.boot_id,
        )

    def _spawn(self, target: Any, name: str) -> threading.Thread:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)
        return thread

    # ------------------------------------------------------------- the updater's host protocol

    def make_engine(self, bundle: Bundle) -> Engine:
        """An engine for ``bundle`` with this agent's settings (runs the golden self-test)."""
        cfg = self.config
        return Engine(
            bundle,
            num_threads=cfg.model.threads,
            backend=cfg.model.backend,
            act_sample_fraction=cfg.activations.sample_fraction,
            seed=cfg.sensors.seed,
        )

    def run_in_loop(self, fn: Callable[[], T], timeout: float) -> T:
        """Run ``fn`` in the main loop thread between two inferences (directly if no loop runs)."""
        loop = self._loop_thread
        if loop is None or not loop.is_alive() or threading.current_thread() is loop:
            return fn()
        future: Future[T] = Future()
        self._loop_tasks.put((fn, future))
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise

    def _run_loop_tasks(self) -> None:
        while True:
            try:
                fn, future = self._loop_tasks.get_nowait()
            except queue.Empty:
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)

    def emit(self, event: DeviceEvent) -> None:
        """Queue an event in the spool's durable outbox and wake the uplink."""
        if self.spool is None:
            return
        self.spool.queue_event(event)
        if self.uplink is not None:
            self.uplink.notify()

    def publish_reported(self) -> None:
        """Publish the retained ``reported`` state now (queued by paho while offline)."""
        if self.uplink is not None:
            self.uplink.publish_reported(self.reported_message())

    def inference_errors(self) -> int:
        """Main loop inference failures so far."""
        return self.counters.inference_errors

    def shadow_errors(self) -> int:
        """Shadow inference failures so far."""
        return self.counters.shadow_errors

    def _load_profile(self) -> HardwareProfile | None:
        try:
            return load_device_profile(self.config)
        except ConfigError as exc:
            if self.config.sensors.backend == "hardware" and self._source is None:
                raise
            # Simulated and replayed data only carry the profile's name; the file is optional there.
            log.warning("%s (continuing: the %s backend does not need it)", exc, self.config.sensors.backend)
            return None

    def _make_source(self) -> Source:
        cfg = self.config.sensors
        if cfg.backend == "hardware":
            assert self.profile is not None  # _load_profile raised otherwise
            if self._make_hardware is not None:
                return self._make_hardware(self.config, self.profile)
            from edge_agent.sensors.hardware import HardwareCabin

            return HardwareCabin(self.profile, rate_hz=cfg.rate_hz)
        if cfg.backend == "simulated":
            from edge_agent.sensors.simulated import SimulatedCabin, load_scenario

            scenario = load_scenario(cfg.scenario if cfg.scenario is not None else "training")
            return SimulatedCabin(scenario, seed=cfg.seed, rate_hz=cfg.rate_hz, sample_rate=cfg.sample_rate)
        raise ValueError(f"sensor backend {cfg.backend!r} has no live source; use `edge-agent replay`")

    def _open_replay(self, replay: ReplaySettings) -> None:
        from edge_agent.sensors.replay import ReplaySource

        assert self.engine is not None and self.spool is not None
        identity = file_identity(replay.csv)
        cursor = self.spool.cursor()
        start_row = 0
        if cursor is not None and not replay.from_start:
            if cursor.file == identity:
                start_row = cursor.row
                log.info("resuming replay of %s at row %d", replay.csv, start_row)
            else:
                log.info("spool cursor is for another file (%s); replaying %s from the start", cursor.file, identity)
        self._replay_identity = identity
        self._replay_source = ReplaySource(
            replay.csv,
            list(self.engine.manifest.features),
            label_column=replay.label_column,
            labels=list(self.engine.manifest.labels),
            start_row=start_row,
            on_bad_row="skip",  # a bad row is counted and skipped; it must not end a 100k-row replay
        )

    # --------------------------------------------------------------------------------- stop

    def stop(self, *, timeout: float = 10.0) -> None:
        """Stop in reverse order, draining: loop, spool flush, uplink (``stopped``), source, spool close."""
        if self._stopped:
            return
        self._stopped = True
        if self.updater is not None:
            self.updater.stop(timeout)
        self.stop_event.set()
        for thread in self._threads:
            thread.join(timeout)
        self._close_parts()
        self._write_status_file(state="stopped")
        self._lock.release()
        log.info("agent %s stopped", self.device_id)

    def _close_parts(self) -> None:
        if self.spool is not None:
            try:
                self.spool.flush()
            except Exception:
                log.exception("final spool flush failed")
        if self.uplink is not None:
            self.uplink.stop(clean=True)
        if self.source is not None:
            try:
                self.source.stop()
            except Exception:
                log.exception("stopping the source failed")
            self._queue_source_events()  # kept in the spool's outbox, published on the next start
        if self._replay_source is not None and hasattr(self._replay_source, "close"):
            self._replay_source.close()
        if self.spool is not None:
            self.spool.close()

    def run(self) -> int:
        """Start, wait for the stop event (signal, replay done or failure), stop; return an exit code."""
        self.start()
        try:
            while not self.stop_event.wait(0.5):
                pass
        finally:
            self.stop()
        return 1 if self.failed else 0

    # ---------------------------------------------------------------------------- live loop

    def _live_loop(self) -> None:
        assert self.engine is not None and self.spool is not None and self.source is not None
        pipeline = FeaturePipeline(sample_rate=self.config.sensors.sample_rate)
        rate = self.config.sensors.rate_hz
        period = 1.0 / rate
        start = time.monotonic()
        k = 0
        errors = 0
        while not self.stop_event.is_set():
            self._progress()
            self._run_loop_tasks()
            if self.config.sensors.rate_hz != rate:
                # A reload changed the rate: re-anchor the schedule at the next tick.
                rate = self.config.sensors.rate_hz
                period = 1.0 / rate
                start, k = time.monotonic(), 0
            due = start + k * period
            now = time.monotonic()
            if now < due:
                self.stop_event.wait(due - now)
                continue
            if now - due > max(1.0, 5 * period):
                # A long stall (suspend, overload): skip the missed ticks instead of bursting them.
                missed = int((now - due) / period)
                self.counters.skipped_ticks += missed
                k += missed
                log.warning("main loop %.1f s late: skipped %d ticks", now - due, missed)
            k += 1
            try:
                self._tick(pipeline)
                errors = 0
            except SourceExhausted:
                log.info("source exhausted")
                self.finished.set()
                self.stop_event.set()
                break
            except Exception:
                errors += 1
                log.exception("main loop tick failed (%d in a row)", errors)
                if errors >= MAX_CONSECUTIVE_ERRORS:
                    self.failed = f"{errors} consecutive main loop failures"
                    log.error("giving up: %s", self.failed)
                    self.stop_event.set()
                    break
            self._queue_source_events()
            try:
                self._commit()
            except Exception:
                # Disk full, I/O error: records stay buffered (bounded) and the spool retries each
                # commit interval. A spool that keeps failing ends the process, so systemd restarts it.
                failures = self.spool.stats.commit_failures_in_a_row
                log.exception("spool commit failed (%d in a row)", failures)
                if failures >= MAX_CONSECUTIVE_ERRORS:
                    self.failed = f"{failures} consecutive spool commit failures"
                    log.error("giving up: %s", self.failed)
                    self.stop_event.set()
                    break

    def _queue_source_events(self) -> None:
        take = getattr(self.source, "take_events", None)
        if take is None or self.spool is None:
            return
        try:
            for event in take():
                self.spool.queue_event(event)
        except Exception:
            log.exception("queueing sensor events failed")

    def _tick(self, pipeline: FeaturePipeline) -> None:
        assert self.engine is not None and self.spool is not None and self.source is not None
        self.counters.ticks += 1
        try:
            obs: Observation = self.source.read()
        except SourceExhausted:
            raise
        except Exception:
            self.counters.read_errors += 1
            raise
        mono = time.monotonic()
        if obs.features is not None:
            features, flags = np.asarray(obs.features, np.float32), int(obs.flags)
        else:
            features, flags = pipeline(obs.env, obs.audio)
            flags |= int(obs.flags)
        try:
            cols = self.engine.infer_many(features.reshape(1, -1), np.array([flags], np.uint16))
        except Exception:
            self.counters.inference_errors += 1
            raise
        label = np.array([self._label_index(obs.label)], np.int16)
        block = cols.to_block(
            model_name=self.engine.model_name,
            model_version=self.engine.model_version,
            hidden_units=self.engine.n_hidden,
            ts=np.array([obs.ts]),
            mono=np.array([mono]),
            label=label,
        )
        seqs = self.spool.append(block)
        self.counters.records += 1
        if self.shadow is not None:
            self._infer_shadow(features.reshape(1, -1), np.array([flags], np.uint16), cols.pred, block)
        if self.labels is not None and obs.truth is not None:
            self.counters.late_labels += self.labels.offer(self.device_id, self.spool.epoch, seqs, [obs.truth])

    def _infer_shadow(self, X: np.ndarray, flags: np.ndarray, active_pred: np.ndarray, active: Any) -> None:
        """Run the shadow model on the inputs the active model just saw; its block follows the active one.

        The shadow records carry the active records' ``ts``, ``mono`` and label, so each pairs with the
        active record of the same inputs (in the live loop: the next seq).
        """
        assert self.spool is not None
        shadow = self.shadow
        if shadow is None:
            return
        try:
            cols = shadow.infer_many(X, flags)
        except Exception:
            self.counters.shadow_errors += 1
            if self.counters.shadow_errors in (1, 10, 100) or self.counters.shadow_errors % 1000 == 0:
                log.exception("shadow inference failed (%d so far)", self.counters.shadow_errors)
            return
        block = cols.to_block(
            model_name=shadow.model_name,
            model_version=shadow.model_version,
            hidden_units=shadow.n_hidden,
            ts=active.ts,
            mono=active.mono,
            label=active.label,
            role="shadow",
        )
        self.spool.append(block)
        self.counters.shadow_records += len(cols)
        self.counters.shadow_agree += int((cols.pred == active_pred).sum())

    def _label_index(self, label: str | None) -> int:
        assert self.engine is not None
        if label is None:
            return NO_LABEL
        try:
            return self.engine.manifest.labels.index(label)
        except ValueError:
            return NO_LABEL

    def _commit(self) -> None:
        assert self.spool is not None
        if self.spool.maybe_commit() and self.uplink is not None:
            self.uplink.notify()

    # -------------------------------------------------------------------------- replay loop

    def _replay_loop(self) -> None:
        assert self.engine is not None and self.spool is not None and self._replay is not None
        src = self._replay_source
        rate = self._replay.rate
        up = self.config.uplink
        high_water = max(20_000, 4 * up.batch_max_records * up.max_inflight_batches)
        chunk_rows = REPLAY_CHUNK_ROWS if rate <= 0 else max(1, min(REPLAY_CHUNK_ROWS, math.ceil(rate / 10)))
        t0 = time.monotonic()
        done = 0
        exhausted = False
        try:
            while not self.stop_event.is_set() and not exhausted:
                self._progress()
                self._run_loop_tasks()
                if self.spool.depth() + self.spool.pending_records() > high_water or (
                    self.spool.bytes() > self.config.spool.max_bytes // 2
                ):
                    # Back-pressure: a replay must not outrun the collector into the spool's drop-oldest.
                    self._commit()
                    self.stop_event.wait(0.05)
                    continue
                if rate > 0:
                    due = t0 + done / rate
                    now = time.monotonic()
                    if now < due:
                        self.stop_event.wait(due - now)
                        continue
                try:
                    chunk = src.read_chunk(chunk_rows)
                except SourceExhausted:
                    exhausted = True
                    break
                self.counters.replay_bad_rows = int(getattr(src, "bad_rows", 0))
                if chunk.n == 0:
                    continue
                now_wall, now_mono = time.time(), time.monotonic()
                cols = self.engine.infer_many(chunk.features, np.zeros(chunk.n, np.uint16))
                block = cols.to_block(
                    model_name=self.engine.model_name,
                    model_version=self.engine.model_version,
                    hidden_units=self.engine.n_hidden,
                    ts=np.full(chunk.n, now_wall),
                    mono=np.full(chunk.n, now_mono),
                    label=chunk.labels,
                )
                self.spool.append(block, cursor=ReplayCursor(self._replay_identity, chunk.next_row))
                if self.shadow is not None:
                    self._infer_shadow(chunk.features, np.zeros(chunk.n, np.uint16), cols.pred, block)
                done += chunk.n
                self.counters.records += chunk.n
                self.counters.replay_rows = chunk.next_row
                self._commit()
            if exhausted:
                self.counters.replay_bad_rows = int(getattr(src, "bad_rows", 0))
                self.spool.flush()
                if self.uplink is not None:
                    self.uplink.notify()
                log.info("replay source exhausted after %d rows; waiting for the collector's acks", done)
                while not self.stop_event.is_set():
                    self._progress()
                    self._run_loop_tasks()
                    if self.spool.empty():
                        log.info("replay complete: every record acknowledged")
                        self.finished.set()
                        self.stop_event.set()
                        break
                    self.stop_event.wait(0.1)
        except Exception as exc:
            self.failed = f"replay failed: {exc}"
            log.exception("replay failed")
            self.stop_event.set()

    # ------------------------------------------------------------------------------- reload

    def reload(self, new: AgentConfig) -> tuple[list[str], list[str]]:
        """Apply the run-time settings of ``new``; return ``(applied, needing_restart)`` dotted names."""
        old = self.config
        applied: list[str] = []
        restart: list[str] = []
        updates: dict[str, Any] = {}
        for name in AgentConfig.model_fields:
            before, after = getattr(old, name), getattr(new, name)
            if before == after:
                continue
            if not isinstance(before, BaseModel):
                (applied if name in RELOADABLE else restart).append(name)
                if name in RELOADABLE:
                    updates[name] = after
                continue
            changed = {
                f: getattr(after, f) for f in type(before).model_fields if getattr(before, f) != getattr(after, f)
            }
            live = {
                f: v
                for f, v in changed.items()
                if f in RELOADABLE.get(name, ()) and not (name == "sensors" and self._replay is not None)
            }
            applied += [f"{name}.{f}" for f in live]
            restart += [f"{name}.{f}" for f in changed if f not in live]
            if live:
                updates[name] = before.model_copy(update=live)
        self.config = cfg = old.model_copy(update=updates)
        if self.uplink is not None:
            self.uplink.settings = cfg.uplink
        if self.spool is not None:
            self.spool.max_bytes = cfg.spool.max_bytes
            self.spool.commit_interval_s = cfg.spool.commit_interval_s
            self.spool.commit_max_records = cfg.spool.commit_max_records
        if self.engine is not None:
            self.engine.act_sample_fraction = cfg.activations.sample_fraction
        set_rate = getattr(self.source, "set_rate", None)
        if set_rate is not None and "sensors.rate_hz" in applied:
            set_rate(cfg.sensors.rate_hz)
        if "log_level" in applied and cfg.log_level is not None:
            logging.getLogger().setLevel(cfg.log_level)
        if applied:
            log.info("reload applied: %s", ", ".join(applied))
        if restart:
            log.warning("reload: these changes need a restart (systemctl restart edge-agent): %s", ", ".join(restart))
        if not applied and not restart:
            log.info("reload: configuration unchanged")
        return applied, restart

    # ------------------------------------------------------------------------------- status

    def status_line(self) -> str:
        """One line for systemd's ``STATUS=``: model, inference rate, spool depth, unhealthy sensors."""
        engine, spool = self.engine, self.spool
        parts = [
            f"model {engine.model_name} {engine.model_version}" if engine else "no model",
            f"{self._rate:.1f} inferences/s",
            f"spool {spool.depth()} records" if spool else "no spool",
        ]
        if self.updater is not None and self.updater.record.state.value not in ("idle", "committed"):
            record = self.updater.record
            parts.append(f"update {record.state.value}" + (f" ({record.reason})" if record.reason else ""))
        if self.source is not None:
            try:
                bad = {k: v for k, v in self.source.health().items() if v.state != "ok"}
            except Exception:
                bad = {}
            if bad:
                parts.append("sensors " + ", ".join(f"{k} {v.state} ({v.reason})" for k, v in sorted(bad.items())))
        return ", ".join(parts)

    def status_message(self) -> Status:
        """The retained ``status`` payload (state ``online``)."""
        engine, spool = self.engine, self.spool
        sensors = {}
        if self.source is not None:
            try:
                sensors = self.source.health()
            except Exception:
                log.exception("reading sensor health failed")
        return Status(
            state="online",
            ts=time.time(),
            agent_version=self.version,
            boot_id=self.boot_id,
            spool_epoch=spool.epoch if spool else None,
            profile=self.config.device.profile,
            model=ModelRef(name=engine.model_name, version=engine.model_version) if engine else None,
            spool_depth=spool.depth() if spool else None,
            spool_bytes=spool.bytes() if spool else None,
            inference_rate=round(self._rate, 3),
            sensors=sensors,
            tags=list(self.config.device.tags),
        )

    def reported_message(self) -> Reported:
        """The retained ``reported`` payload: the running model, the shadow, and where the update is."""
        engine, shadow, updater = self.engine, self.shadow, self.updater
        doc: dict[str, Any] = {
            "model": ModelRef(name=engine.model_name, version=engine.model_version) if engine else None,
            "shadow": ModelRef(name=shadow.model_name, version=shadow.model_version) if shadow else None,
        }
        if updater is not None:
            record = updater.record
            target = record.target
            doc.update(
                update=updater.report(),
                model_sha256=updater.running.sha256 if updater.running else None,
                previous=ModelRef(name=record.previous.name, version=record.previous.version)
                if record.previous
                else None,
                desired_serial=record.serial if record.serial >= 0 else None,
                shadow_sha256=target.sha256 if shadow is not None and target is not None else None,
            )
        return Reported(**doc)

    def _status_loop(self) -> None:
        while not self.stop_event.wait(STATUS_FILE_INTERVAL_S):
            try:
                self._write_status_file(state="running")
            except Exception:
                log.exception("writing the status file failed")

    def snapshot(self, state: str = "running") -> dict[str, Any]:
        """Everything `edge-agent status` shows."""
        now = time.monotonic()
        records = self.counters.records
        mark_t, mark_n = self._rate_mark
        if now - mark_t >= 1.0:
            self._rate = (records - mark_n) / (now - mark_t)
            self._rate_mark = (now, records)
        engine, spool = self.engine, self.spool
        doc: dict[str, Any] = {
            "state": state,
            "device_id": self.device_id,
            "pid": os.getpid(),
            "boot_id": self.boot_id,
            "agent_version": self.version,
            "updated_at": time.time(),
            "model": {"name": engine.model_name, "version": engine.model_version} if engine else None,
            "inference_rate": round(self._rate, 3),
            "loop": asdict(self.counters),
            "profile": self.config.device.profile,
        }
        if self.source is not None:
            try:
                doc["sensors"] = {k: v.model_dump() for k, v in self.source.health().items()}
                details = getattr(self.source, "snapshot", None)
                if details is not None:
                    doc["sensor_details"] = details()
            except Exception:
                log.exception("reading sensor health failed")
        if spool is not None:
            doc.update(
                spool_epoch=spool.epoch,
                spool_depth=spool.depth(),
                spool_bytes=spool.bytes(),
                next_seq=spool.next_seq,
                last_ack_at=spool.stats.last_ack_at,
                spool_losses=spool.counters() if state != "stopped" else None,
            )
        if self.uplink is not None:
            doc["uplink"] = self.uplink.snapshot()
        if self.updater is not None:
            doc["update"] = self.updater.snapshot()
        if self.shadow is not None:
            doc["shadow"] = {"name": self.shadow.model_name, "version": self.shadow.model_version}
        return doc

    def _write_status_file(self, state: str) -> None:
        path = self.config.status_path
        try:
            doc = self.snapshot(state)
            tmp = path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(doc, indent=2, default=str))
            os.replace(tmp, path)
        except Exception as exc:
            log.warning("cannot write status file %s: %s", path, exc)
