"""The collector's FastAPI application: the ``lifespan`` starts the database, MQTT ingest and desired-state publishing.

Ingest (and later the scheduler) runs inside the one process that serves the API; running the
app under ``uvicorn --workers N`` would start N ingest clients (ARCHITECTURE §9), so the
``serve`` command runs a single worker and scales out with replicas and shared subscriptions.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Response
from fastapi.responses import RedirectResponse
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from collector import __version__
from collector import metrics as _metrics  # noqa: F401  (registers the collector's metrics)
from collector.api.routes import api_router
from collector.config import Settings, get_settings
from collector.db.engine import make_engine, upgrade
from collector.fleet.desired import DesiredStates
from collector.fleet.publisher import DesiredPublisher
from collector.monitoring.catalog import ReferenceCatalog
from collector.monitoring.service import MonitoringService
from collector.registry.keys import ReleaseKeys
from collector.registry.service import Registry
from collector.registry.store import FolderStore

log = logging.getLogger(__name__)


def create_app(
    settings: Settings | None = None, *, start_ingest: bool = True, start_jobs: bool | None = None
) -> FastAPI:
    """The application for ``settings`` (default: from the environment).

    ``start_jobs`` (default: as ``start_ingest``) starts the background jobs (:mod:`collector.jobs`) unless
    ``alert_jobs_enabled`` is off: an API-only app runs no jobs.
    """
    settings = settings or get_settings()
    run_jobs = (start_ingest if start_jobs is None else start_jobs) and settings.alert_jobs_enabled

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.auto_migrate:
            upgrade(settings.database)
        engine = make_engine(settings.database)
        app.state.settings = settings
        app.state.engine = engine
        # One catalog and service for every request (bundles are read and verified once).
        app.state.monitoring = MonitoringService(engine, ReferenceCatalog.from_settings(settings), settings)
        keys = ReleaseKeys.from_settings(settings)
        desired = DesiredStates(engine, base_url=settings.base_url)
        app.state.desired = desired
        app.state.registry = Registry(
            engine,
            FolderStore(settings.artefacts),
            keys,
            max_upload_bytes=settings.registry_max_upload_bytes,
            on_change=desired.on_change,
        )
        app.state.ingest = None
        app.state.publisher = None
        if start_ingest:
            from collector.ingest import Ingest

            ingest = Ingest(settings, engine)
            ingest.start()
            app.state.ingest = ingest
            if settings.desired_enabled:
                publisher = DesiredPublisher(
                    engine, desired, keys, ingest.mqtt, reconcile_s=settings.desired_reconcile_s
                )
                desired.notify = publisher.wake
                publisher.start()
                app.state.publisher = publisher
        app.state.jobs = None
        if run_jobs:
            from collector.jobs import start_jobs as start_scheduler

            app.state.jobs = start_scheduler(engine, settings, app.state.monitoring)
        log.info("collector %s ready (database %s)", __version__, engine.url.render_as_string(hide_password=True))
        try:
            yield
        finally:
            if app.state.jobs is not None:
                app.state.jobs.shutdown(wait=True)
            if app.state.publisher is not None:
                app.state.publisher.stop()
            if app.state.ingest is not None:
                app.state.ingest.stop()
            engine.dispose()

    app = FastAPI(
        title="Fleet model health collector",
        version=__version__,
        description="Ingests inference telemetry from the fleet exactly once and serves it to operators.",
        lifespan=lifespan,
    )
    app.include_router(api_router)

    @app.get("/metrics", include_in_schema=False)
    def prometheus() -> Response:
        """Prometheus exposition of the process's metrics ."""
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        """The dashboard arrives with its own issue; until then the API's documentation is the front page."""
        return RedirectResponse("/docs")

    return app
