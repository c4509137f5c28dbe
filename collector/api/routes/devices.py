"""``/api/v1/devices``."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Query, status

from collector import queries
from collector.api.deps import UNPROCESSABLE, CursorQuery, LimitQuery, SessionDep
from collector.api.schemas import DevicePublic, Page

router = APIRouter(prefix="/devices", tags=["devices"])


@router.get("", response_model=Page[DevicePublic])
def list_devices(
    session: SessionDep,
    limit: LimitQuery = 100,
    cursor: CursorQuery = None,
    status_filter: Annotated[Literal["online", "offline", "stopped", "unknown"] | None, Query(alias="status")] = None,
) -> Page[DevicePublic]:
    """Devices ordered by id."""
    try:
        rows, total, nxt = queries.list_devices(session, limit=limit, cursor=cursor, status=status_filter)
    except queries.BadCursor as exc:
        raise HTTPException(UNPROCESSABLE, str(exc)) from None
    return Page[DevicePublic](items=[DevicePublic.model_validate(r) for r in rows], total=total, next=nxt)


@router.get("/{device_id}", response_model=DevicePublic)
def get_device(device_id: str, session: SessionDep) -> DevicePublic:
    """One device."""
    device = queries.get_device(session, device_id=device_id)
    if device is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no device {device_id!r}")
    return DevicePublic.model_validate(device)
