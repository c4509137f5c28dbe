"""FastAPI dependencies: the database session, settings, token check and common query parsing."""

from __future__ import annotations

import hmac
import math
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Annotated

from fastapi import Depends, Header, HTTPException, Query, Request, status
from sqlalchemy.engine import Engine
from sqlmodel import Session

from collector.config import Settings
from collector.fleet.desired import DesiredStates
from collector.registry.errors import RegistryError
from collector.registry.service import Registry

MAX_PAGE = 1000
UNPROCESSABLE = 422  # the constant was renamed across Starlette versions


def get_engine(request: Request) -> Engine:
    """The engine the app was started with."""
    engine: Engine = request.app.state.engine
    return engine


def get_app_settings(request: Request) -> Settings:
    """The settings the app was started with."""
    settings: Settings = request.app.state.settings
    return settings


def get_session(engine: Annotated[Engine, Depends(get_engine)]) -> Iterator[Session]:
    """One session per request."""
    with Session(engine) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[Settings, Depends(get_app_settings)]


def require_token(settings: SettingsDep, authorization: Annotated[str | None, Header()] = None) -> None:
    """Reject the request unless it carries the configured bearer token (no token configured: open)."""
    if settings.api_token is None:
        return
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), settings.api_token.encode()):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, "a valid bearer token is required", headers={"WWW-Authenticate": "Bearer"}
        )


def parse_time(value: str | None, name: str) -> float | None:
    """``value`` as seconds since the epoch: a number, or ISO 8601 (UTC when no zone is given)."""
    if value is None or value == "":
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise HTTPException(
                UNPROCESSABLE,
                f"{name} must be seconds since the epoch or an ISO 8601 time, not {value!r}",
            ) from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        return when.timestamp()
    if not math.isfinite(seconds):
        raise HTTPException(UNPROCESSABLE, f"{name} must be finite")
    return seconds


class TimeRange:
    """``since`` (inclusive) and ``until`` (exclusive) query parameters, on the corrected device time."""

    def __init__(
        self,
        since: Annotated[str | None, Query(description="ISO 8601 or seconds since the epoch (inclusive)")] = None,
        until: Annotated[str | None, Query(description="ISO 8601 or seconds since the epoch (exclusive)")] = None,
    ) -> None:
        self.since = parse_time(since, "since")
        self.until = parse_time(until, "until")
        if self.since is not None and self.until is not None and self.until < self.since:
            raise HTTPException(UNPROCESSABLE, "until is before since")


TimeRangeDep = Annotated[TimeRange, Depends()]
LimitQuery = Annotated[int, Query(ge=1, le=MAX_PAGE, description="page size")]
CursorQuery = Annotated[str | None, Query(description="the `next` value of the previous page")]


_STATUS = {"invalid": UNPROCESSABLE, "too_large": 413, "conflict": 409, "not_found": 404, "unavailable": 503}


def refused(exc: RegistryError) -> HTTPException:
    """A registry or fleet refusal as an HTTP error whose ``detail`` is ``{"reason", "message"}``."""
    return HTTPException(_STATUS[exc.kind], exc.to_dict())


def get_registry(request: Request) -> Registry:
    """The app's registry service."""
    registry: Registry = request.app.state.registry
    return registry


def get_desired(request: Request) -> DesiredStates:
    """The app's desired-state service."""
    desired: DesiredStates = request.app.state.desired
    return desired


RegistryDep = Annotated[Registry, Depends(get_registry)]
DesiredDep = Annotated[DesiredStates, Depends(get_desired)]
