"""``/api/v1/quarantine``: payloads the collector refused, with the reason."""

from __future__ import annotations

import base64

from fastapi import APIRouter, HTTPException, status

from collector import queries
from collector.api.deps import UNPROCESSABLE, CursorQuery, LimitQuery, SessionDep
from collector.api.schemas import Page, QuarantineDetail, QuarantinePublic

router = APIRouter(prefix="/quarantine", tags=["quarantine"])


@router.get("", response_model=Page[QuarantinePublic])
def list_quarantine(
    session: SessionDep,
    reason: str | None = None,
    device_id: str | None = None,
    limit: LimitQuery = 100,
    cursor: CursorQuery = None,
) -> Page[QuarantinePublic]:
    """Entries newest first, filtered by reason and device."""
    try:
        rows, total, nxt = queries.list_quarantine(
            session, limit=limit, cursor=cursor, reason=reason, device_id=device_id
        )
    except queries.BadCursor as exc:
        raise HTTPException(UNPROCESSABLE, str(exc)) from None
    return Page[QuarantinePublic](items=[QuarantinePublic.model_validate(r) for r in rows], total=total, next=nxt)


@router.get("/{entry_id}", response_model=QuarantineDetail)
def get_quarantine(entry_id: int, session: SessionDep) -> QuarantineDetail:
    """One entry with its stored payload bytes (base64)."""
    row = queries.get_quarantine(session, entry_id=entry_id)
    if row is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no quarantine entry {entry_id}")
    public = QuarantinePublic.model_validate(row)
    return QuarantineDetail(
        **public.model_dump(),
        payload_b64=base64.b64encode(row.payload).decode(),
        payload_stored_bytes=len(row.payload),
    )
