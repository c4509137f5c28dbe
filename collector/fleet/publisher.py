"""Publishes every device's desired state, retained, on ``fleet/v1/<id>/desired``, signed when it is sent.

One named thread (``desired-publisher``) in the process that runs ingest, on ingest's MQTT connection:

* after every (re)connection it recomputes every device (:meth:`DesiredStates.reconcile`) and publishes
  **every** stored state, changed or not: a broker that lost its retained messages gets them back, and
  a device that already holds that serial ignores it (idempotent at start);
* when woken (an API change committed) and every ``desired_reconcile_s`` it publishes what is not
  published at its current serial, after a reconcile on the timer (tags reported in ``status``, new
  devices).

A state is signed with the current release key at publication (Ed25519 is deterministic: the same
state and key give the same bytes, so re-publication is harmless, and a rotated key takes effect at
the next publication). It counts as published only when the broker acknowledged it (QoS 1 PUBACK);
what was not is retried at the next pass. A retired device's ``desired``, ``status`` and ``reported``
retained messages are emptied instead.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Protocol

from sqlalchemy.engine import Engine

from collector import metrics
from collector.db.engine import write_transaction
from collector.db.models import DeviceDesired
from collector.fleet import repository as repo
from collector.fleet.desired import DesiredStates
from collector.registry.keys import ReleaseKeys
from shared.messages import Desired
from shared.signing import sign_desired

log = logging.getLogger(__name__)

PAGE = 500
CONFIRM_TIMEOUT_S = 10.0


class DeliveryLike(Protocol):
    """A publication whose broker acknowledgement can be awaited."""

    def wait(self, timeout: float) -> bool:
        """True once the broker acknowledged it."""
        ...


class Transport(Protocol):
    """What the publisher needs of the MQTT client (:class:`collector.mqtt.CollectorMqtt`)."""

    @property
    def connected(self) -> bool:
        """Connected and subscribed."""
        ...

    @property
    def session(self) -> int:
        """Changes after every (re)connection."""
        ...

    def publish_desired(self, device_id: str, desired: Desired) -> DeliveryLike:
        """Publish retained on ``desired``."""
        ...

    def clear_retained(self, device_id: str) -> Sequence[DeliveryLike]:
        """Empty the device's retained topics."""
        ...


class DesiredPublisher:
    """The publishing thread: ``start()``, ``wake()``, ``stop()``; :meth:`publish_pass` does one pass."""

    def __init__(
        self, engine: Engine, states: DesiredStates, keys: ReleaseKeys, transport: Transport, *, reconcile_s: float
    ) -> None:
        self.engine = engine
        self.states = states
        self.keys = keys
        self.transport = transport
        self.reconcile_s = reconcile_s
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._session: int | None = None
        self._warned_no_key = False
        self.passes = 0

    def start(self) -> None:
        """Start the thread."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="desired-publisher", daemon=True)
            self._thread.start()

    def wake(self) -> None:
        """Publish soon (something changed)."""
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread (after the pass in progress)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        next_reconcile = 0.0
        while not self._stop.is_set():
            woken = self._wake.wait(timeout=0.5 if self._session is None else self.reconcile_s)
            self._wake.clear()
            if self._stop.is_set() or not self.transport.connected:
                continue
            try:
                fresh = self.transport.session != self._session
                now = time.monotonic()
                if fresh or now >= next_reconcile:
                    self.states.reconcile()
                    next_reconcile = now + self.reconcile_s
                self.publish_pass(everything=fresh)
                if fresh:
                    self._session = self.transport.session
            except Exception:  # the thread must survive a database hiccup; the next pass retries
                log.exception("desired-state publication pass failed (woken: %s); retrying", woken)
                self._stop.wait(1.0)

    def publish_pass(self, *, everything: bool = False) -> int:
        """Publish the pending states (all of them with ``everything``); return how many the broker confirmed."""
        confirmed = 0
        after = ""
        while True:
            with self.engine.connect() as conn:
                rows = repo.publishable(conn, pending_only=not everything, limit=PAGE, after=after)
            if not rows:
                break
            after = rows[-1].device_id
            confirmed += self._publish(rows)
            if len(rows) < PAGE:
                break
        with self.engine.connect() as conn:
            metrics.DESIRED_PENDING.set(repo.count_pending(conn))
        self.passes += 1
        return confirmed

    def _publish(self, rows: list[DeviceDesired]) -> int:
        if not self.transport.connected:
            metrics.DESIRED_PUBLISH_FAILURES.labels("not_connected").inc(len(rows))
            return 0
        sent: list[tuple[DeviceDesired, list[DeliveryLike]]] = []
        for row in rows:
            if row.clear:
                sent.append((row, list(self.transport.clear_retained(row.device_id))))
                continue
            if self.keys.signing is None:
                metrics.DESIRED_PUBLISH_FAILURES.labels("no_release_key").inc()
                if not self._warned_no_key:
                    log.error("no release key: desired states cannot be signed, nothing is published")
                    self._warned_no_key = True
                continue
            try:
                message = sign_desired(Desired.model_validate(row.document), self.keys.signing)
            except ValueError:
                log.exception("stored desired state of %s is not a valid message; skipped", row.device_id)
                metrics.DESIRED_PUBLISH_FAILURES.labels("error").inc()
                continue
            sent.append((row, [self.transport.publish_desired(row.device_id, message)]))
        deadline = time.monotonic() + CONFIRM_TIMEOUT_S
        done: list[DeviceDesired] = []
        for row, deliveries in sent:
            if all(d.wait(deadline - time.monotonic()) for d in deliveries):
                done.append(row)
                metrics.DESIRED_PUBLISHED.labels("cleared" if row.clear else "desired").inc()
            else:
                metrics.DESIRED_PUBLISH_FAILURES.labels("timeout").inc()
        if done:
            at = time.time()
            with write_transaction(self.engine) as conn:
                for row in done:
                    repo.mark_published(conn, device_id=row.device_id, serial=row.serial, at=at)
        return len(done)
