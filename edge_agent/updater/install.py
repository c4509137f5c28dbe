"""`edge-agent model install BUNDLE`: a local bundle through the same state machine.

Two cases, told apart by the state directory's lock (``<state_dir>/agent.lock``):

* **an agent runs** (it holds the lock): the command drops a request file into
  ``<state_dir>/update/requests/``; the agent's updater picks it up between jobs, drives
  verifying → staging → self_testing → [shadowing] → activating → watching → committed on live
  inputs, and writes ``results/<id>.json``, which the command waits for. The model swap happens in
  the running main loop, with no inference dropped, and the watch period sees real inputs.
* **no agent runs**: the command takes the lock (an agent starting meanwhile waits for it) and
  drives the machine itself. The watch period cannot see live inputs, so it runs the candidate on
  inputs drawn from its reference profile (``updates.offline_watch_records``) with the same NaN/Inf
  and latency checks, then commits; the next agent start runs the installed model. Events go to the
  spool's outbox and leave with the agent's next connection.

If the agent stops before it claims the request, the command notices the free lock and installs
by itself. The outcome is a dict with ``state`` (``committed`` is the only success), ``result``,
``reason`` and ``error``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from edge_agent.config import AgentConfig
from edge_agent.inference import Engine
from edge_agent.spool import Spool
from edge_agent.updater.machine import Updater, prepare_start
from edge_agent.updater.store import StateLock, UpdateStore
from shared.bundle import Bundle, BundleError, load_bundle
from shared.messages import DeviceEvent
from shared.signing import load_public_keys

log = logging.getLogger(__name__)

T = TypeVar("T")
POLL_S = 0.2


class OfflineHost:
    """The updater's host when no agent runs: no main loop, events collected for the spool."""

    live = False

    def __init__(self, config: AgentConfig, engine: Engine | None) -> None:
        self.config = config
        self.engine = engine
        self.shadow: Engine | None = None
        self.events: list[DeviceEvent] = []

    def make_engine(self, bundle: Bundle) -> Engine:
        """An engine with the configured interpreter settings."""
        cfg = self.config
        return Engine(
            bundle,
            num_threads=cfg.model.threads,
            backend=cfg.model.backend,
            act_sample_fraction=cfg.activations.sample_fraction,
            seed=cfg.sensors.seed,
        )

    def run_in_loop(self, fn: Callable[[], T], timeout: float) -> T:
        """No loop runs: just call ``fn``."""
        return fn()

    def emit(self, event: DeviceEvent) -> None:
        """Keep the event for the spool."""
        self.events.append(event)

    def publish_reported(self) -> None:
        """Nothing to publish to: the agent publishes ``reported`` when it connects."""

    def inference_errors(self) -> int:
        """No main loop, no errors."""
        return 0

    def shadow_errors(self) -> int:
        """No shadow without a main loop."""
        return 0


def install_offline(config: AgentConfig, bundle: Path, *, agent_version: str) -> dict[str, Any]:
    """Drive the machine in this process (the caller holds the state-directory lock)."""
    from edge_agent.app import configured_slot  # the app imports the updater; import it late

    keys = load_public_keys(list(config.model.trusted_keys))
    store = UpdateStore(config.state_dir / "update")
    record, slot = prepare_start(store, config.updates.max_restarts)
    loaded: Bundle | None = None
    if slot is not None:
        try:
            loaded = load_bundle(Path(slot.path), keys)
        except (BundleError, OSError) as exc:
            log.error("installed model %s unusable (%s); the configured bundle is the current one", slot.path, exc)
            slot = None
    configured = configured_slot(config, keys)
    if loaded is None and configured is not None:
        loaded = load_bundle(Path(configured.path), keys)
    host = OfflineHost(config, None)
    host.engine = host.make_engine(loaded) if loaded is not None else None
    updater = Updater(
        config,
        store,
        host,
        keys=keys,
        agent_version=agent_version,
        record=record,
        running=slot or configured,
        configured=configured,
    )
    try:
        return updater.run_local(bundle)
    finally:
        updater.stop()
        _spool_events(config, host.events)


def _spool_events(config: AgentConfig, events: list[DeviceEvent]) -> None:
    if not events:
        return
    try:
        spool = Spool(
            config.spool_path,
            max_bytes=config.spool.max_bytes,
            commit_interval_s=config.spool.commit_interval_s,
            commit_max_records=config.spool.commit_max_records,
            chunk_max_records=config.uplink.batch_max_records,
        )
    except Exception as exc:
        log.error("cannot open the spool to keep %d update events: %s", len(events), exc)
        return
    try:
        for event in events:
            spool.queue_event(event)
    finally:
        spool.close()


def install_bundle(
    config: AgentConfig,
    bundle: Path,
    *,
    agent_version: str,
    timeout: float,
    waiting: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Install ``bundle``: through the running agent when there is one, else in this process."""
    config.state_dir.mkdir(parents=True, exist_ok=True)
    lock = StateLock(config.state_dir)
    if lock.try_acquire():
        try:
            return install_offline(config, bundle, agent_version=agent_version)
        finally:
            lock.release()
    store = UpdateStore(config.state_dir / "update")
    request_id = store.add_request(bundle)
    log.info("agent (pid %s) runs: install request %s queued", lock.holder(), request_id)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = store.read_result(request_id)
        if result is not None:
            return result
        pending = (store.requests / f"{request_id}.json").exists()
        if pending and lock.try_acquire():
            try:
                if store.drop_request(request_id):
                    log.info("the agent stopped before taking the request: installing here")
                    return install_offline(config, bundle, agent_version=agent_version)
            finally:
                lock.release()
        if waiting is not None:
            waiting({"request": request_id, "claimed": not pending, "state": store.load(repair=False).state.value})
        time.sleep(POLL_S)
    claimed = not store.drop_request(request_id)
    return {
        "state": "timeout",
        "result": "failure",
        "reason": "install_timeout",
        "error": f"no outcome within {timeout:.0f} s"
        + ("; the agent is still working on it (see edge-agent status)" if claimed else "; the agent never took it"),
    }
