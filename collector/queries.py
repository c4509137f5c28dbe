"""Read-side data access for the API: plain functions, keyword-only arguments, no HTTP.

Time filters and ordering of inference records use ``ts_corrected``: the device's clock when it
was NTP-synced, else the collector's estimate (a Pi has no real-time clock, so an unsynced device
may believe it is 1970). Lists use keyset pagination: the cursor is an opaque base64 of the last row's sort key, so a
page costs the same wherever it is in a table of millions of rows.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, col, select

from collector.db.models import Device, Inference, Quarantine


class BadCursor(ValueError):
    """A ``cursor`` parameter that this API did not hand out."""


def encode_cursor(key: Sequence[Any]) -> str:
    """Opaque cursor for a sort key."""
    return base64.urlsafe_b64encode(json.dumps(list(key), separators=(",", ":")).encode()).decode()


def decode_cursor(cursor: str, types: Sequence[type]) -> list[Any]:
    """The sort key inside ``cursor``, checked against the expected types."""
    try:
        key = json.loads(base64.urlsafe_b64decode(cursor.encode()))
    except (ValueError, UnicodeDecodeError):
        raise BadCursor("cursor is not one this API issued") from None
    if not isinstance(key, list) or len(key) != len(types):
        raise BadCursor("cursor is not one this API issued")
    out = []
    for value, typ in zip(key, types, strict=True):
        if typ is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, typ) or isinstance(value, bool):
            raise BadCursor("cursor is not one this API issued")
        out.append(value)
    return out


def _count(session: Session, stmt: Any) -> int:
    return int(session.exec(select(sa.func.count()).select_from(stmt.order_by(None).subquery())).one())


# ------------------------------------------------------------------------------------- devices


def list_devices(
    session: Session, *, limit: int, cursor: str | None = None, status: str | None = None, retired: bool | None = None
) -> tuple[list[Device], int, str | None]:
    """Devices ordered by id: ``(page, total, next cursor)``."""
    base = select(Device)
    if status is not None:
        base = base.where(Device.status == status)
    if retired is not None:
        base = base.where(col(Device.retired_at).is_not(None) if retired else col(Device.retired_at).is_(None))
    total = _count(session, base)
    stmt = base.order_by(col(Device.id))
    if cursor is not None:
        (after,) = decode_cursor(cursor, (str,))
        stmt = stmt.where(col(Device.id) > after)
    rows = list(session.exec(stmt.limit(limit + 1)))
    nxt = encode_cursor([rows[limit - 1].id]) if len(rows) > limit else None
    return rows[:limit], total, nxt


def get_device(session: Session, *, device_id: str) -> Device | None:
    """One device or None."""
    return session.get(Device, device_id)


# ---------------------------------------------------------------------------------- inferences


def _inference_filters(
    *, device_id: str | None, model_version: str | None, since: float | None, until: float | None
) -> list[Any]:
    where: list[Any] = []
    if device_id is not None:
        where.append(col(Inference.device_id) == device_id)
    if model_version is not None:
        where.append(col(Inference.model_version) == model_version)
    if since is not None:
        where.append(col(Inference.ts_corrected) >= since)
    if until is not None:
        where.append(col(Inference.ts_corrected) < until)
    return where


def count_inferences(
    session: Session,
    *,
    device_id: str | None = None,
    model_version: str | None = None,
    since: float | None = None,
    until: float | None = None,
) -> int:
    """Stored records matching the filters (``until`` exclusive)."""
    where = _inference_filters(device_id=device_id, model_version=model_version, since=since, until=until)
    stmt = select(sa.func.count()).select_from(Inference)
    for clause in where:
        stmt = stmt.where(clause)
    return int(session.exec(stmt).one())


def list_inferences(
    session: Session,
    *,
    limit: int,
    cursor: str | None = None,
    device_id: str | None = None,
    model_version: str | None = None,
    since: float | None = None,
    until: float | None = None,
) -> tuple[list[Inference], int, str | None]:
    """Records ordered by (corrected) device time, then key: ``(page, total, next cursor)``."""
    where = _inference_filters(device_id=device_id, model_version=model_version, since=since, until=until)
    total = count_inferences(session, device_id=device_id, model_version=model_version, since=since, until=until)
    key = (col(Inference.ts_corrected), col(Inference.device_id), col(Inference.spool_epoch), col(Inference.seq))
    stmt = select(Inference).order_by(*key)
    for clause in where:
        stmt = stmt.where(clause)
    if cursor is not None:
        after = decode_cursor(cursor, (float, str, str, int))
        stmt = stmt.where(sa.tuple_(*key) > sa.tuple_(*after))
    rows = list(session.exec(stmt.limit(limit + 1)))
    nxt = None
    if len(rows) > limit:
        last = rows[limit - 1]
        nxt = encode_cursor([last.ts_corrected, last.device_id, last.spool_epoch, last.seq])
    return rows[:limit], total, nxt


# ---------------------------------------------------------------------------------- quarantine


def list_quarantine(
    session: Session,
    *,
    limit: int,
    cursor: str | None = None,
    reason: str | None = None,
    device_id: str | None = None,
) -> tuple[list[Quarantine], int, str | None]:
    """Quarantine entries, newest first: ``(page, total, next cursor)``."""
    base = select(Quarantine)
    if reason is not None:
        base = base.where(Quarantine.reason == reason)
    if device_id is not None:
        base = base.where(Quarantine.device_id == device_id)
    total = _count(session, base)
    stmt = base.order_by(col(Quarantine.id).desc())
    if cursor is not None:
        (before,) = decode_cursor(cursor, (int,))
        stmt = stmt.where(col(Quarantine.id) < before)
    rows = list(session.exec(stmt.limit(limit + 1)))
    nxt = encode_cursor([rows[limit - 1].id]) if len(rows) > limit else None
    return rows[:limit], total, nxt


def get_quarantine(session: Session, *, entry_id: int) -> Quarantine | None:
    """One quarantine entry or None."""
    return session.get(Quarantine, entry_id)


def quarantine_reasons(session: Session) -> dict[str, int]:
    """Entries per reason."""
    stmt = select(Quarantine.reason, sa.func.count()).group_by(Quarantine.reason)
    return {reason: int(n) for reason, n in session.exec(stmt)}
