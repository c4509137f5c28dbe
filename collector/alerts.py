"""Alerts: the evaluation of closed monitoring windows, the alert table, acknowledgements and webhooks.

:class:`AlertEngine` turns the monitoring status of every closed window into alerts. A window
``[start, start + window_s)`` is evaluated once it is ``alert_grace_s`` past its end (late records land
first), exactly once: progress is persisted (the reserved ``alert_condition`` row :data:`CURSOR_KEY` holds
the start of the last window evaluated, and every condition row its own ``last_window``), so a restarted
collector, or a second replica, neither skips a window nor counts one twice. Each window is judged

* per (device, model version): :meth:`MonitoringService.evaluate_devices` (drift decided with
  Benjamini-Hochberg across all devices jointly), its accuracy estimate and region, its data quality, and
  the sequential detectors' alarms (``sequential_alarm`` rows) that fall in the window;
* per model version, fleet-wide: :meth:`MonitoringService.status` (drift and accuracy of the merged fleet);
* per model version and group named in ``alert_groups``: the status of the group's merged window.

Every observation goes through :func:`collector.monitoring.alerting.advance` (hysteresis, de-duplication,
severity) and the resulting alert changes are written in one transaction per window, together with their
webhook notifications (``webhook_delivery`` rows: an alert change and its notification commit or roll
back together). :func:`deliver_webhooks` then POSTs them with exponential backoff, durably across restarts.

Only the ``active`` role is alerted on: a shadow model's drift is a rollout question, not an incident.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from collector import __version__, metrics
from collector.config import Settings
from collector.db.models import Alert, AlertCondition, SequentialAlarm, WebhookDelivery
from collector.monitoring.alerting import (
    AlertPolicy,
    Hysteresis,
    Observation,
    OpenAlert,
    Step,
    Streaks,
    advance,
    condition_key,
    observe_accuracy,
    observe_drift,
    observe_quality,
    observe_region,
    observe_sequential,
    reference_accuracy,
    transition,
)
from collector.monitoring.sequential import WATCHED
from collector.monitoring.service import ModelStatus, MonitoringService, Scope
from collector.queries import decode_cursor, encode_cursor

log = logging.getLogger(__name__)

CURSOR_KEY = "_cursor/evaluated"
"""``alert_condition`` row whose ``last_window`` is the start of the last window the engine evaluated.

Condition keys start with a kind name, never with ``_``."""

ROLE = "active"
OPEN_STATES = ("firing", "acknowledged")
SEQUENTIAL_SIGNALS = tuple(sorted(WATCHED))


class AlertNotFound(LookupError):
    """No alert with that id."""


class AlertResolved(ValueError):
    """The alert is resolved: it can no longer be acknowledged (the API maps it to 409)."""


# ------------------------------------------------------------------------------------- shapes


def alert_dict(alert: Alert) -> dict[str, Any]:
    """The JSON shape of an alert (API responses and webhook payloads)."""
    return {
        "id": alert.id,
        "key": alert.key,
        "kind": alert.kind,
        "scope": alert.scope,
        "subject": alert.subject,
        "model_name": alert.model_name,
        "model_version": alert.model_version,
        "state": alert.state,
        "severity": alert.severity,
        "message": alert.message,
        "details": alert.details,
        "fired_at": alert.fired_at,
        "last_bad_at": alert.last_bad_at,
        "resolved_at": alert.resolved_at,
        "acked_at": alert.acked_at,
        "acked_by": alert.acked_by,
        "ack_note": alert.ack_note,
    }


def _enqueue(session: Session, alert: Alert, event: str, urls: Sequence[str], now: float) -> None:
    """One pending delivery per webhook URL, in the caller's transaction (the alert must have its id)."""
    payload = {"event": event, "alert": alert_dict(alert), "collector_version": __version__}
    for url in urls:
        assert alert.id is not None
        session.add(
            WebhookDelivery(
                id=None,
                alert_id=alert.id,
                event=event,
                url=url,
                payload=payload,
                state="pending",
                attempts=0,
                next_attempt_at=now,
                last_error=None,
                created_at=now,
                delivered_at=None,
            )
        )


def _write_session(engine: Engine) -> Session:
    """A session whose transactions take SQLite's write lock up front (no upgrade failure half-way)."""
    return Session(engine.execution_options(sqlite_begin="IMMEDIATE"), expire_on_commit=False)


def refresh_open_gauge(engine: Engine) -> None:
    """Set ``fleet_alerts_open`` from the table (right after a restart too, not only from this process's changes)."""
    with Session(engine) as session:
        rows = session.exec(
            select(Alert.kind, Alert.severity, sa.func.count())
            .where(col(Alert.state).in_(OPEN_STATES))
            .group_by(col(Alert.kind), col(Alert.severity))
        ).all()
    metrics.ALERTS_OPEN.clear()
    for kind, severity, n in rows:
        metrics.ALERTS_OPEN.labels(kind, severity).set(n)


# ----------------------------------------------------------------------------------- queries


def list_alerts(
    session: Session,
    *,
    limit: int,
    cursor: str | None = None,
    state: str | None = None,
    kind: str | None = None,
    scope: str | None = None,
    subject: str | None = None,
    model_version: str | None = None,
    since: float | None = None,
) -> tuple[list[Alert], int, str | None]:
    """Alerts newest first (by id), filtered: ``(page, total, next cursor)``. ``since`` bounds ``fired_at``."""
    base = select(Alert)
    if state == "open":
        base = base.where(col(Alert.state).in_(OPEN_STATES))
    elif state is not None:
        base = base.where(Alert.state == state)
    for column, value in ((Alert.kind, kind), (Alert.scope, scope), (Alert.subject, subject)):
        if value is not None:
            base = base.where(column == value)
    if model_version is not None:
        base = base.where(Alert.model_version == model_version)
    if since is not None:
        base = base.where(col(Alert.fired_at) >= since)
    total = int(session.exec(select(sa.func.count()).select_from(base.subquery())).one())
    stmt = base.order_by(col(Alert.id).desc())
    if cursor is not None:
        (before,) = decode_cursor(cursor, (int,))
        stmt = stmt.where(col(Alert.id) < before)
    rows = list(session.exec(stmt.limit(limit + 1)))
    nxt = encode_cursor([rows[limit - 1].id]) if len(rows) > limit else None
    return rows[:limit], total, nxt


def get_alert(session: Session, *, alert_id: int) -> Alert | None:
    """One alert or None."""
    return session.get(Alert, alert_id)


def acknowledge(
    engine: Engine, *, alert_id: int, by: str, note: str | None, now: float, webhooks: Sequence[str]
) -> Alert:
    """Acknowledge an open alert (and notify the webhooks in the same transaction).

    Acknowledging an acknowledged alert changes nothing and is not an error (a retried request); a resolved
    one raises :class:`AlertResolved`, an unknown id :class:`AlertNotFound`.
    """
    with _write_session(engine) as session, session.begin():
        alert = session.exec(select(Alert).where(Alert.id == alert_id).with_for_update()).first()
        if alert is None:
            raise AlertNotFound(f"no alert {alert_id}")
        if alert.state == "acknowledged":
            return alert
        if alert.state == "resolved":
            raise AlertResolved(f"alert {alert_id} is resolved (at {alert.resolved_at}); nothing to acknowledge")
        alert.state = transition("firing", "acknowledge")
        alert.acked_at = now
        alert.acked_by = by
        alert.ack_note = note
        session.add(alert)
        session.flush()
        _enqueue(session, alert, "acknowledged", webhooks, now)
    log.info("alert %d (%s) acknowledged by %s", alert_id, alert.key, by)
    return alert


# ------------------------------------------------------------------------------------ engine


@dataclass(frozen=True)
class Candidate:
    """One condition observed in one window."""

    key: str
    kind: str
    scope: str
    subject: str
    model_name: str
    model_version: str
    observation: Observation


@dataclass
class EvaluationSummary:
    """What one :meth:`AlertEngine.evaluate` call did."""

    windows: list[float] = field(default_factory=list)
    """Starts of the windows evaluated, in order."""
    skipped_windows: int = 0
    """Closed windows older than ``alert_max_catchup_windows`` that were passed over."""
    fired: list[int] = field(default_factory=list)
    escalated: list[int] = field(default_factory=list)
    resolved: list[int] = field(default_factory=list)
    observations: int = 0


class AlertEngine:
    """Evaluates closed monitoring windows into alerts. Safe to call from a scheduler thread.

    ``evaluate(now)`` takes the time explicitly (tests and simulations run hours in a second); the
    scheduler passes the wall clock.
    """

    def __init__(self, engine: Engine, service: MonitoringService, settings: Settings) -> None:
        self.engine = engine
        self.service = service
        self.window_s = float(settings.monitoring_window_s)
        self.grace_s = float(settings.alert_grace_s)
        self.max_catchup = int(settings.alert_max_catchup_windows)
        self.hysteresis = Hysteresis(settings.alert_fire_windows, settings.alert_resolve_windows)
        self.policy = AlertPolicy(
            min_expected_accuracy=settings.alert_min_expected_accuracy,
            accuracy_margin=settings.alert_accuracy_margin,
            critical_drift_share=settings.alert_critical_drift_share,
        )
        self.webhooks = list(settings.alert_webhooks)
        self.groups = list(settings.alert_groups)

    # --------------------------------------------------------------------------------- driver

    def horizon(self, now: float) -> float:
        """Start of the first window that is not yet closed (plus grace) at ``now``."""
        return math.floor((now - self.grace_s) / self.window_s) * self.window_s

    def evaluate(self, now: float | None = None) -> EvaluationSummary:
        """Evaluate every window closed by ``now`` and not evaluated yet, oldest first."""
        now = time.time() if now is None else float(now)
        summary = EvaluationSummary()
        horizon = self.horizon(now)
        last = self._cursor()
        floor = horizon - self.max_catchup * self.window_s
        first = floor if last is None else last + self.window_s
        if first < floor:
            summary.skipped_windows = round((floor - first) / self.window_s)
            log.warning(
                "alerts: %d closed window(s) before %.0f were never evaluated and are skipped (catch-up limit %d)",
                summary.skipped_windows,
                floor,
                self.max_catchup,
            )
            first = floor
        if first < horizon:
            for start in self._windows_with_data(first, horizon):
                self._evaluate_window(start, now, summary)
            # Empty windows change nothing: move the cursor past them in one step.
            self._advance_cursor(horizon - self.window_s, now)
        refresh_open_gauge(self.engine)
        return summary

    def _cursor(self) -> float | None:
        with Session(self.engine) as session:
            row = session.get(AlertCondition, CURSOR_KEY)
            return None if row is None else float(row.last_window)

    def _advance_cursor(self, window_start: float, now: float, session: Session | None = None) -> bool:
        """Move the cursor to ``window_start``; False when it already is there or beyond (another evaluator)."""
        if session is None:
            with _write_session(self.engine) as s, s.begin():
                return self._advance_cursor(window_start, now, s)
        row = session.exec(select(AlertCondition).where(AlertCondition.key == CURSOR_KEY).with_for_update()).first()
        if row is None:
            session.add(
                AlertCondition(key=CURSOR_KEY, bad_streak=0, good_streak=0, last_window=window_start, updated_at=now)
            )
            return True
        if row.last_window >= window_start:
            return False
        row.last_window = window_start
        row.updated_at = now
        session.add(row)
        return True

    def _windows_with_data(self, first: float, horizon: float) -> list[float]:
        starts = set(self.service.window_starts(Scope(role=ROLE, since=first, until=horizon)))
        with Session(self.engine) as session:
            ts = session.exec(
                select(SequentialAlarm.ts).where(col(SequentialAlarm.ts) >= first, col(SequentialAlarm.ts) < horizon)
            ).all()
        starts.update(math.floor(t / self.window_s) * self.window_s for t in ts)
        return sorted(s for s in starts if first <= s < horizon)

    # ----------------------------------------------------------------------------- one window

    def observe(self, start: float) -> list[Candidate]:
        """Every condition observed in the window starting at ``start`` (reads only)."""
        scope = Scope(role=ROLE, since=start, until=start + self.window_s)
        per_device = self.service.evaluate_devices(scope)
        fleet = self.service.status(scope)
        alarms = self._alarms(start)
        out: list[Candidate] = []
        seen: set[tuple[str, str, str]] = set()
        for device, status in per_device.items():
            for m in status.models:
                seen.add((device, m.model_name, m.model_version))
                out.extend(self._candidates("device", device, m, self.observations(m, per_device=True)))
                for signal in sorted(set(SEQUENTIAL_SIGNALS) | {key[3] for key in alarms if key[0] == device}):
                    hits = alarms.get((device, m.model_name, m.model_version, signal), [])
                    out.append(
                        self._candidate(
                            f"sequential_{signal}", "device", device, m, observe_sequential(hits, m.n_records > 0)
                        )
                    )
        # Alarms of a device whose records the status does not hold (e.g. a version without reference).
        for (device, name, version, signal), hits in sorted(alarms.items()):
            if (device, name, version) not in seen:
                key = condition_key(f"sequential_{signal}", "device", device, name, version)
                obs = observe_sequential(hits, True)
                out.append(Candidate(key, f"sequential_{signal}", "device", device, name, version, obs))
        for m in fleet.models:
            out.extend(self._candidates("model", m.model_version, m, self.observations(m, per_device=False)))
            self._export_gauges(m)
        for group in self.groups:
            status = self.service.status(Scope(group=group, role=ROLE, since=start, until=start + self.window_s))
            for m in status.models:
                out.extend(self._candidates("group", group, m, self.observations(m, per_device=False)))
        return out

    def _candidate(self, kind: str, scope: str, subject: str, m: ModelStatus, obs: Observation) -> Candidate:
        key = condition_key(kind, scope, subject, m.model_name, m.model_version)
        return Candidate(key, kind, scope, subject, m.model_name, m.model_version, obs)

    def _candidates(self, scope: str, subject: str, m: ModelStatus, found: dict[str, Observation]) -> list[Candidate]:
        return [self._candidate(kind, scope, subject, m, obs) for kind, obs in found.items()]

    def observations(self, m: ModelStatus, *, per_device: bool) -> dict[str, Observation]:
        """The condition kinds of one model version's status in one window, each bad, good or unknown.

        Data quality only for a device (``per_device``): a sensor or a clock belongs to a device, and a
        group or fleet-wide verdict would repeat the device alerts. A version without a reference has none.
        """
        found: dict[str, Observation] = {}
        if not m.has_reference:
            return found
        if m.drift is not None:
            found.update(observe_drift(m.drift, self.policy))
        if m.accuracy is not None:
            entry = self.service.catalog.get(m.model_name, m.model_version)
            ref = None if entry is None else reference_accuracy(entry.manifest.training.metrics)
            found["estimated_accuracy"] = observe_accuracy(m.accuracy.expected, ref, self.policy)
            found["estimate_unreliable"] = observe_region(m.accuracy.region)
        if per_device and m.data_quality is not None:
            found.update(observe_quality(m.data_quality.checks))
        return found

    def _export_gauges(self, m: ModelStatus) -> None:
        labels = (m.model_name, m.model_version)
        if m.drift is not None and m.drift.n_tested:
            metrics.MODEL_DRIFT_SCORE.labels(*labels).set(m.drift.max_psi)
        if m.accuracy is not None and m.accuracy.expected.estimate is not None:
            metrics.MODEL_EXPECTED_ACCURACY.labels(*labels).set(m.accuracy.expected.estimate)

    def _alarms(self, start: float) -> dict[tuple[str, str, str, str], list[dict[str, Any]]]:
        """Sequential alarms with their record's time in the window, per (device, model, version, signal)."""
        out: dict[tuple[str, str, str, str], list[dict[str, Any]]] = {}
        with Session(self.engine) as session:
            rows = session.exec(
                select(SequentialAlarm)
                .where(col(SequentialAlarm.ts) >= start, col(SequentialAlarm.ts) < start + self.window_s)
                .order_by(col(SequentialAlarm.ts))
            ).all()
        for a in rows:
            out.setdefault((a.device_id, a.model_name, a.model_version, a.signal), []).append(
                {
                    "id": a.id,
                    "signal": a.signal,
                    "detector": a.detector,
                    "spool_epoch": a.spool_epoch,
                    "seq": a.seq,
                    "ts": a.ts,
                    "detail": a.detail,
                }
            )
        return out

    def _evaluate_window(self, start: float, now: float, summary: EvaluationSummary) -> None:
        candidates = self.observe(start)
        changes: list[tuple[str, Alert]] = []
        with _write_session(self.engine) as session, session.begin():
            if not self._advance_cursor(start, now, session):
                log.info("alerts: window %.0f already evaluated (another evaluator); skipped", start)
                return
            conditions = {c.key: c for c in session.exec(select(AlertCondition)).all()}
            open_alerts = {a.key: a for a in session.exec(select(Alert).where(col(Alert.state).in_(OPEN_STATES))).all()}
            for cand in candidates:
                row = conditions.get(cand.key)
                alert = open_alerts.get(cand.key)
                streaks = Streaks() if row is None else Streaks(row.bad_streak, row.good_streak, row.last_window)
                current = None if alert is None else OpenAlert(alert.state, alert.severity)  # type: ignore[arg-type]
                step = advance(streaks, current, start, cand.observation, self.hysteresis)
                if step.action == "skip":
                    continue
                if row is None and step.streaks.bad == 0:
                    continue  # nothing to remember: a key gets a row once it is first bad
                self._store_streaks(session, row, cand.key, step.streaks, now)
                changed = self._apply(session, cand, step, alert, start, now)
                if changed is not None:
                    changes.append(changed)
            summary.observations += len(candidates)
        summary.windows.append(start)
        metrics.ALERT_WINDOWS_EVALUATED.inc()
        for action, alert in changes:
            assert alert.id is not None
            if action == "fired":
                summary.fired.append(alert.id)
                metrics.ALERTS_FIRED.labels(alert.kind, alert.severity).inc()
                log.warning("alert %d fired: %s: %s", alert.id, alert.key, alert.message)
            elif action == "escalated":
                summary.escalated.append(alert.id)
                log.warning("alert %d escalated to %s: %s", alert.id, alert.severity, alert.key)
            else:
                summary.resolved.append(alert.id)
                log.info("alert %d resolved: %s", alert.id, alert.key)

    def _store_streaks(
        self, session: Session, row: AlertCondition | None, key: str, streaks: Streaks, now: float
    ) -> None:
        assert streaks.last_window is not None
        if row is None:
            row = AlertCondition(key=key, bad_streak=0, good_streak=0, last_window=streaks.last_window, updated_at=0.0)
        row.bad_streak, row.good_streak = streaks.bad, streaks.good
        row.last_window = streaks.last_window
        row.updated_at = now
        session.add(row)

    def _apply(
        self, session: Session, cand: Candidate, step: Step, alert: Alert | None, start: float, now: float
    ) -> tuple[str, Alert] | None:
        """Carry out the step's action on the key's alert; the notification event when there is one."""
        obs = cand.observation
        end = start + self.window_s
        window = {"start": start, "end": end}
        if step.action == "fire":
            assert step.severity is not None
            alert = Alert(
                key=cand.key,
                kind=cand.kind,
                scope=cand.scope,
                subject=cand.subject,
                model_name=cand.model_name,
                model_version=cand.model_version,
                state=transition(None, "fire"),
                severity=step.severity,
                message=obs.message,
                details={
                    "verdict": obs.verdict,
                    "window": window,
                    "statistics": obs.details,
                    "hysteresis": {
                        "bad_windows": step.streaks.bad,
                        "fire_windows": self.hysteresis.fire_windows,
                        "resolve_windows": self.hysteresis.resolve_windows,
                    },
                },
                fired_at=end,
                last_bad_at=end,
                id=None,
                resolved_at=None,
                acked_at=None,
                acked_by=None,
                ack_note=None,
            )
            session.add(alert)
            session.flush()
            _enqueue(session, alert, "fired", self.webhooks, now)
            return "fired", alert
        if alert is None:
            return None
        if step.action in ("hold", "escalate"):
            assert step.severity is not None
            alert.last_bad_at = end
            alert.severity = step.severity
            alert.message = obs.message
            latest = {"window": window, "severity": obs.severity, "message": obs.message, "statistics": obs.details}
            alert.details = {**alert.details, "latest": latest}
            session.add(alert)
            if step.action == "escalate":
                session.flush()
                _enqueue(session, alert, "escalated", self.webhooks, now)
                return "escalated", alert
            return None
        if step.action == "resolve":
            alert.state = transition(alert.state, "resolve")  # type: ignore[arg-type]
            alert.resolved_at = end
            resolution = {"window": window, "good_windows": step.streaks.good, "statistics": obs.details}
            alert.details = {**alert.details, "resolution": resolution}
            session.add(alert)
            session.flush()
            _enqueue(session, alert, "resolved", self.webhooks, now)
            return "resolved", alert
        return None


# ---------------------------------------------------------------------------------- webhooks


@dataclass
class DeliveryOutcome:
    """What one :func:`deliver_webhooks` call did, by delivery id."""

    delivered: list[int] = field(default_factory=list)
    retry: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)


def backoff_s(attempts: int, base_s: float, max_s: float) -> float:
    """Wait after the ``attempts``-th failed attempt: ``base * 2**(attempts - 1)``, at most ``max_s``."""
    return float(min(base_s * 2.0 ** max(attempts - 1, 0), max_s))


def deliver_webhooks(
    engine: Engine,
    settings: Settings,
    *,
    now: float | None = None,
    client: httpx.Client | None = None,
    limit: int = 100,
) -> DeliveryOutcome:
    """POST every due pending notification once; reschedule failures with exponential backoff or give up.

    A delivery is claimed first (its ``next_attempt_at`` pushed past the HTTP timeout, committed) so a second
    replica does not send it at the same time; a collector that dies mid-request leaves the claim to expire
    and the notification is sent again: delivery is at least once, and receivers de-duplicate on the
    ``X-Fleet-Delivery`` header. Any 2xx answer is success; anything else, or no answer, is a failed attempt.
    """
    now = time.time() if now is None else float(now)
    outcome = DeliveryOutcome()
    claimed = _claim(engine, now, lease_s=2 * settings.alert_webhook_timeout_s + 1.0, limit=limit)
    if not claimed:
        return outcome
    own_client = client is None
    http = client or httpx.Client(timeout=settings.alert_webhook_timeout_s)
    try:
        for delivery in claimed:
            error = _post(http, delivery)
            _record(engine, delivery, error, now, settings, outcome)
    finally:
        if own_client:
            http.close()
    return outcome


def _claim(engine: Engine, now: float, *, lease_s: float, limit: int) -> list[WebhookDelivery]:
    with _write_session(engine) as session, session.begin():
        stmt = (
            select(WebhookDelivery)
            .where(WebhookDelivery.state == "pending", col(WebhookDelivery.next_attempt_at) <= now)
            .order_by(col(WebhookDelivery.next_attempt_at), col(WebhookDelivery.id))
            .limit(limit)
        )
        if engine.dialect.name == "postgresql":
            stmt = stmt.with_for_update(skip_locked=True)
        rows = list(session.exec(stmt).all())
        for row in rows:
            row.next_attempt_at = now + lease_s
            session.add(row)
    return rows


def _post(http: httpx.Client, delivery: WebhookDelivery) -> str | None:
    """POST one notification; the error text, or None on a 2xx answer."""
    headers = {
        "X-Fleet-Delivery": str(delivery.id),
        "X-Fleet-Event": delivery.event,
        "User-Agent": f"fleet-collector/{__version__}",
    }
    try:
        response = http.post(delivery.url, json=delivery.payload, headers=headers)
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}"
    if 200 <= response.status_code < 300:
        return None
    return f"HTTP {response.status_code}: {response.text[:200]}"


def _record(
    engine: Engine, delivery: WebhookDelivery, error: str | None, now: float, settings: Settings, out: DeliveryOutcome
) -> None:
    assert delivery.id is not None
    with _write_session(engine) as session, session.begin():
        row = session.get(WebhookDelivery, delivery.id)
        if row is None or row.state != "pending":
            return
        row.attempts += 1
        if error is None:
            row.state, row.delivered_at, row.last_error = "delivered", now, None
            result = "delivered"
            out.delivered.append(delivery.id)
        elif row.attempts >= settings.alert_webhook_max_attempts:
            row.state, row.last_error = "failed", error
            result = "failed"
            out.failed.append(delivery.id)
            log.error(
                "webhook %s: %s notification of alert %d given up after %d attempts: %s",
                row.url,
                row.event,
                row.alert_id,
                row.attempts,
                error,
            )
        else:
            row.last_error = error
            row.next_attempt_at = now + backoff_s(
                row.attempts, settings.alert_webhook_backoff_s, settings.alert_webhook_max_backoff_s
            )
            result = "retry"
            out.retry.append(delivery.id)
            log.warning(
                "webhook %s: attempt %d failed (%s); next at %.0f", row.url, row.attempts, error, row.next_attempt_at
            )
        session.add(row)
    metrics.ALERT_WEBHOOK_DELIVERIES.labels(result).inc()
