"""``/api/v1/alerts``: alerts with the statistics that raised them, and their acknowledgement."""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, status
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.engine import Engine

from collector import alerts
from collector.api.deps import UNPROCESSABLE, CursorQuery, LimitQuery, SessionDep, SettingsDep, get_engine, parse_time
from collector.api.schemas import Page
from collector.db.models import NAME_LEN
from collector.queries import BadCursor

router = APIRouter(prefix="/alerts", tags=["alerts"])


class AlertPublic(BaseModel):
    """One alert: what held, on what, since when, and the statistics, thresholds and verdict behind it."""

    model_config = ConfigDict(protected_namespaces=())

    id: int
    key: str = Field(description="the condition: kind/scope/subject/model_name/model_version")
    kind: str = Field(description="input_drift, estimated_accuracy, stuck_sensor, sequential_calibrated, ...")
    scope: str = Field(description="device | group | model (a model version fleet-wide)")
    subject: str = Field(description="device id, group name, or the model version for scope model")
    model_name: str | None
    model_version: str | None
    state: Literal["firing", "acknowledged", "resolved"]
    severity: Literal["warning", "critical"]
    message: str
    details: dict[str, Any] = Field(
        description="verdict, window, statistics and thresholds that fired it; latest: the last bad window; "
        "resolution: the window that resolved it"
    )
    fired_at: float = Field(description="end of the window in which the condition had held long enough")
    last_bad_at: float = Field(description="end of the last window the condition held in")
    resolved_at: float | None
    acked_at: float | None
    acked_by: str | None
    ack_note: str | None


class AckRequest(BaseModel):
    """Who acknowledges, and why."""

    model_config = ConfigDict(extra="forbid")

    by: str = Field(min_length=1, max_length=NAME_LEN, description="operator name")
    note: str | None = Field(None, max_length=4000)


StateQuery = Annotated[
    Literal["firing", "acknowledged", "resolved", "open"] | None,
    Query(description="open = firing or acknowledged"),
]


@router.get("", response_model=Page[AlertPublic])
def list_alerts(
    session: SessionDep,
    state: StateQuery = None,
    kind: str | None = None,
    scope: Literal["device", "group", "model"] | None = None,
    subject: str | None = None,
    device_id: Annotated[str | None, Query(description="shorthand for scope=device&subject=ID")] = None,
    model_version: str | None = None,
    since: Annotated[str | None, Query(description="fired at or after: ISO 8601 or seconds since the epoch")] = None,
    limit: LimitQuery = 100,
    cursor: CursorQuery = None,
) -> Page[AlertPublic]:
    """Alerts newest first, filtered by state, kind, scope, subject (or device), model version and firing time."""
    if device_id is not None:
        if (subject is not None and subject != device_id) or scope not in (None, "device"):
            raise HTTPException(UNPROCESSABLE, "device_id selects scope=device and subject=device_id; do not mix")
        scope, subject = "device", device_id
    try:
        rows, total, nxt = alerts.list_alerts(
            session,
            limit=limit,
            cursor=cursor,
            state=state,
            kind=kind,
            scope=scope,
            subject=subject,
            model_version=model_version,
            since=parse_time(since, "since"),
        )
    except BadCursor as exc:
        raise HTTPException(UNPROCESSABLE, str(exc)) from None
    return Page[AlertPublic](
        items=[AlertPublic.model_validate(alerts.alert_dict(r)) for r in rows], total=total, next=nxt
    )


@router.get("/{alert_id}", response_model=AlertPublic)
def get_alert(alert_id: int, session: SessionDep) -> AlertPublic:
    """One alert with its details."""
    row = alerts.get_alert(session, alert_id=alert_id)
    if row is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no alert {alert_id}")
    return AlertPublic.model_validate(alerts.alert_dict(row))


@router.post("/{alert_id}/ack", response_model=AlertPublic)
def ack_alert(
    alert_id: int, body: AckRequest, settings: SettingsDep, engine: Annotated[Engine, Depends(get_engine)]
) -> AlertPublic:
    """Acknowledge an open alert (again: no change). 404 for an unknown id, 409 when it is resolved."""
    try:
        row = alerts.acknowledge(
            engine, alert_id=alert_id, by=body.by, note=body.note, now=time.time(), webhooks=settings.alert_webhooks
        )
    except alerts.AlertNotFound as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
    except alerts.AlertResolved as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
    return AlertPublic.model_validate(alerts.alert_dict(row))
