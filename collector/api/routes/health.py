"""``GET /api/v1/health``."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from fastapi import APIRouter, Request

from collector import __version__
from collector.api.deps import SessionDep
from collector.api.schemas import Health

router = APIRouter(tags=["health"])
PUBLIC = True  # load balancers and systemd health checks call it without a token


@router.get("/health", response_model=Health)
def health(request: Request, session: SessionDep) -> Health:
    """Liveness: the database answers; MQTT state and ingest counters for the curious."""
    try:
        session.exec(sa.select(1))  # type: ignore[call-overload]
        database = "ok"
    except sa.exc.SQLAlchemyError as exc:
        database = f"error: {type(exc).__name__}"
    ingest = getattr(request.app.state, "ingest", None)
    stats: dict[str, Any] = {}
    if ingest is None:
        mqtt = "disabled"
    else:
        mqtt = "connected" if ingest.connected else "disconnected"
        stats = ingest.stats()
    overall = "ok" if database == "ok" and mqtt != "disconnected" else ("degraded" if database == "ok" else "error")
    return Health(status=overall, version=__version__, database=database, mqtt=mqtt, ingest=stats)
