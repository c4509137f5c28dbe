"""The collector's background jobs: registration with APScheduler only; the work lives in the services.

Three jobs run in a :class:`~apscheduler.schedulers.background.BackgroundScheduler` inside the process
that serves the API (started and stopped by the app's lifespan, off with ``alert_jobs_enabled: false``):

* ``alerts.evaluate`` (:meth:`collector.alerts.AlertEngine.evaluate`): at every window close plus
  ``alert_grace_s``, and in between at most a minute apart (a failed run is retried soon; a run with
  nothing closed costs two small queries). It also runs at start, catching up the windows that closed
  while the collector was down.
* ``alerts.webhooks`` (:func:`collector.alerts.deliver_webhooks`): every ``alert_webhook_poll_s``, and right
  after an evaluation produced notifications.
* ``monitoring.rollup`` (:func:`collector.monitoring.rollup.rollup_days`): hourly; merging a finished UTC
  day's windows is idempotent, so running it more often than daily only makes it prompt.

Every job runs one instance at a time (``max_instances=1``) and coalesces missed runs. State is in the
database, so several replicas may run the jobs: the alert cursor and the delivery claims keep them from
doing the same work twice.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from datetime import UTC, datetime

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger
from sqlalchemy.engine import Engine

from collector import metrics
from collector.alerts import AlertEngine, deliver_webhooks
from collector.config import Settings
from collector.monitoring.catalog import ReferenceCatalog
from collector.monitoring.rollup import rollup_days
from collector.monitoring.service import MonitoringService

log = logging.getLogger(__name__)

EVALUATE_JOB = "alerts.evaluate"
WEBHOOK_JOB = "alerts.webhooks"
ROLLUP_JOB = "monitoring.rollup"
MAX_EVALUATION_GAP_S = 60.0
ROLLUP_INTERVAL_S = 3600.0


def evaluation_step(window_s: float, max_gap_s: float = MAX_EVALUATION_GAP_S) -> float:
    """The largest interval of at most ``max_gap_s`` that divides ``window_s`` evenly (so runs hit every close)."""
    return window_s / math.ceil(window_s / max_gap_s)


def first_evaluation(now: float, window_s: float, grace_s: float, step: float) -> float:
    """The next instant after ``now`` that is a window end plus grace, or a whole ``step`` after one."""
    anchor = math.floor((now - grace_s) / window_s) * window_s + grace_s
    return anchor + (math.floor((now - anchor) / step) + 1) * step


def _guarded(name: str, work: Callable[[], object], on_failure: Callable[[], None] | None = None) -> Callable[[], None]:
    def run() -> None:
        try:
            work()
        except Exception:  # a job must never take the scheduler down; the next run retries
            log.exception("job %s failed", name)
            if on_failure is not None:
                on_failure()

    return run


def start_jobs(engine: Engine, settings: Settings, service: MonitoringService | None = None) -> BackgroundScheduler:
    """Register the collector's jobs and start the scheduler (its threads are daemons); stop with ``shutdown()``.

    ``service``: the app's monitoring service, so the bundles are read once (default: a new one).
    """
    if service is None:
        service = MonitoringService(engine, ReferenceCatalog.from_settings(settings), settings)
    alert_engine = AlertEngine(engine, service, settings)
    window_s = float(settings.monitoring_window_s)
    writer = engine.execution_options(sqlite_begin="IMMEDIATE")
    scheduler = BackgroundScheduler(
        timezone=UTC, job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None}
    )

    def wake_webhooks() -> None:
        job = scheduler.get_job(WEBHOOK_JOB)
        if job is not None:
            job.modify(next_run_time=datetime.now(UTC))

    def evaluate() -> None:
        summary = alert_engine.evaluate(time.time())
        if summary.fired or summary.escalated or summary.resolved:
            wake_webhooks()

    now = time.time()
    step = evaluation_step(window_s)
    scheduler.add_job(
        _guarded(EVALUATE_JOB, evaluate, metrics.ALERT_EVALUATION_FAILURES.inc),
        IntervalTrigger(
            seconds=step,
            start_date=datetime.fromtimestamp(first_evaluation(now, window_s, settings.alert_grace_s, step), UTC),
            timezone=UTC,
        ),
        id=EVALUATE_JOB,
        name="evaluate closed monitoring windows into alerts",
        next_run_time=datetime.now(UTC),
    )
    scheduler.add_job(
        _guarded(WEBHOOK_JOB, lambda: deliver_webhooks(engine, settings)),
        IntervalTrigger(seconds=settings.alert_webhook_poll_s, timezone=UTC),
        id=WEBHOOK_JOB,
        name="deliver alert notifications to webhooks",
        next_run_time=datetime.now(UTC),
    )
    scheduler.add_job(
        # On SQLite the roll-up writes beside ingest and the evaluation: take the write lock up front, or
        # upgrading a read transaction fails at once with "database is locked" instead of waiting.
        _guarded(ROLLUP_JOB, lambda: rollup_days(writer, time.time(), window_s)),
        IntervalTrigger(seconds=ROLLUP_INTERVAL_S, timezone=UTC),
        id=ROLLUP_JOB,
        name="merge finished UTC days of monitoring windows",
        next_run_time=datetime.now(UTC),
    )
    scheduler.start()
    log.info(
        "jobs started: alert evaluation every %.3g s (windows of %.3g s, grace %.3g s), webhooks every %.3g s, "
        "daily roll-up hourly",
        step,
        window_s,
        settings.alert_grace_s,
        settings.alert_webhook_poll_s,
    )
    return scheduler
