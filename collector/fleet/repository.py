"""SQL of the fleet: devices as resolution sees them, groups and members, pins, rollout assignments, desired rows."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.sql.schema import Table

from collector.db.models import (
    Device,
    DeviceDesired,
    DeviceGroup,
    GroupMember,
    ModelPin,
    RolloutAssignment,
)

DEVICES: Table = Device.__table__  # type: ignore[attr-defined]
GROUPS: Table = DeviceGroup.__table__  # type: ignore[attr-defined]
MEMBERS: Table = GroupMember.__table__  # type: ignore[attr-defined]
PINS: Table = ModelPin.__table__  # type: ignore[attr-defined]
ASSIGNMENTS: Table = RolloutAssignment.__table__  # type: ignore[attr-defined]
DESIRED: Table = DeviceDesired.__table__  # type: ignore[attr-defined]
IN_CHUNK = 500  # bounded IN lists


def _chunks(values: Sequence[str]) -> Iterable[list[str]]:
    for i in range(0, len(values), IN_CHUNK):
        yield list(values[i : i + IN_CHUNK])


def _insert(conn: Connection, table: Table) -> Any:
    """``INSERT`` in the connection's dialect (for ``ON CONFLICT``)."""
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    return dialect.insert(table)


@dataclass(frozen=True)
class DeviceFacts:
    """What resolution needs of a device: its model line, reported tags and whether it is retired."""

    id: str
    model_name: str | None
    tags: tuple[str, ...]
    retired_at: float | None


def device_facts(conn: Connection, *, device_ids: Sequence[str] | None = None) -> list[DeviceFacts]:
    """Devices (all, or those of ``device_ids`` that exist), ordered by id."""
    c = DEVICES.c
    cols = sa.select(c.id, c.model_name, c.tags, c.retired_at)
    if device_ids is None:
        rows = list(conn.execute(cols.order_by(c.id)))
    else:
        rows = [r for chunk in _chunks(sorted(set(device_ids))) for r in conn.execute(cols.where(c.id.in_(chunk)))]
        rows.sort(key=lambda r: r[0])
    return [DeviceFacts(str(r[0]), r[1], tuple(t for t in (r[2] or []) if isinstance(t, str)), r[3]) for r in rows]


def device_exists(conn: Connection, *, device_id: str) -> bool:
    """Whether the collector has heard of the device."""
    return conn.execute(sa.select(DEVICES.c.id).where(DEVICES.c.id == device_id)).first() is not None


def retire_device(conn: Connection, *, device_id: str, at: float, by: str) -> bool:
    """Mark a device retired (False when it already was); its pin, rollout assignment and memberships go."""
    c = DEVICES.c
    done = conn.execute(
        sa.update(DEVICES).where(c.id == device_id, c.retired_at.is_(None)).values(retired_at=at, retired_by=by)
    )
    conn.execute(sa.delete(PINS).where(PINS.c.scope == "device", PINS.c.subject == device_id))
    conn.execute(sa.delete(ASSIGNMENTS).where(ASSIGNMENTS.c.device_id == device_id))
    conn.execute(sa.delete(MEMBERS).where(MEMBERS.c.device_id == device_id))
    return bool(done.rowcount)


# ---------------------------------------------------------------------------------- groups


def groups(conn: Connection) -> list[DeviceGroup]:
    """Every explicitly created group, by name."""
    return [DeviceGroup(**r._mapping) for r in conn.execute(sa.select(GROUPS).order_by(GROUPS.c.name))]


def get_group(conn: Connection, *, name: str) -> DeviceGroup | None:
    """One created group or None."""
    row = conn.execute(sa.select(GROUPS).where(GROUPS.c.name == name)).first()
    return None if row is None else DeviceGroup(**row._mapping)


def insert_group(conn: Connection, *, values: dict[str, Any]) -> None:
    """Create a group (``IntegrityError`` when it exists)."""
    conn.execute(sa.insert(GROUPS).values(**values))


def memberships(conn: Connection) -> list[tuple[str, str]]:
    """Every explicit ``(group, device)`` membership."""
    c = MEMBERS.c
    return [(str(r[0]), str(r[1])) for r in conn.execute(sa.select(c.group_name, c.device_id))]


def add_members(conn: Connection, *, group: str, device_ids: Sequence[str], at: float, by: str) -> int:
    """Assign devices to a group explicitly; returns how many were not members yet."""
    c = MEMBERS.c
    wanted = sorted(set(device_ids))
    present: set[str] = set()
    for chunk in _chunks(wanted):
        present |= {
            str(r[0]) for r in conn.execute(sa.select(c.device_id).where(c.group_name == group, c.device_id.in_(chunk)))
        }
    rows = [{"group_name": group, "device_id": d, "added_at": at, "added_by": by} for d in wanted if d not in present]
    if rows:
        # DO NOTHING: a concurrent assignment of the same device is not an error.
        insert = _insert(conn, MEMBERS).on_conflict_do_nothing(index_elements=["group_name", "device_id"])
        conn.execute(insert, rows)
    return len(rows)


def remove_members(conn: Connection, *, group: str, device_ids: Sequence[str]) -> int:
    """Remove explicit memberships; returns how many there were."""
    removed = 0
    for chunk in _chunks(sorted(set(device_ids))):
        c = MEMBERS.c
        removed += int(conn.execute(sa.delete(MEMBERS).where(c.group_name == group, c.device_id.in_(chunk))).rowcount)
    return removed


# ------------------------------------------------------------------------------------ pins


def pins(conn: Connection) -> list[ModelPin]:
    """Every pin."""
    return [ModelPin(**r._mapping) for r in conn.execute(sa.select(PINS).order_by(PINS.c.scope, PINS.c.subject))]


def get_pin(conn: Connection, *, scope: str, subject: str) -> ModelPin | None:
    """One pin or None."""
    row = conn.execute(sa.select(PINS).where(PINS.c.scope == scope, PINS.c.subject == subject)).first()
    return None if row is None else ModelPin(**row._mapping)


def put_pin(conn: Connection, *, values: dict[str, Any]) -> None:
    """Create or replace the pin of ``values['scope']``/``values['subject']``."""
    insert, keys = _insert(conn, PINS), ["scope", "subject"]
    update = {k: v for k, v in values.items() if k not in keys}
    conn.execute(insert.values(**values).on_conflict_do_update(index_elements=keys, set_=update))


def delete_pin(conn: Connection, *, scope: str, subject: str) -> bool:
    """Remove a pin; False when there was none."""
    return bool(conn.execute(sa.delete(PINS).where(PINS.c.scope == scope, PINS.c.subject == subject)).rowcount)


# ----------------------------------------------------------------------------- assignments


def assignments(conn: Connection, *, device_ids: Sequence[str] | None = None) -> dict[str, RolloutAssignment]:
    """Rollout assignments by device (all, or of ``device_ids``)."""
    if device_ids is None:
        rows = list(conn.execute(sa.select(ASSIGNMENTS)))
    else:
        c = ASSIGNMENTS.c
        rows = [
            r
            for chunk in _chunks(sorted(set(device_ids)))
            for r in conn.execute(sa.select(ASSIGNMENTS).where(c.device_id.in_(chunk)))
        ]
    return {str(r.device_id): RolloutAssignment(**r._mapping) for r in rows}


def put_assignments(conn: Connection, *, rows: list[dict[str, Any]]) -> None:
    """Create or replace the assignments of the rows' devices."""
    if not rows:
        return
    insert, keys = _insert(conn, ASSIGNMENTS), ["device_id"]
    cols = ["rollout_id", "model_name", "model_version", "shadow_name", "shadow_version", "assigned_at"]
    conn.execute(insert.on_conflict_do_update(index_elements=keys, set_={c: insert.excluded[c] for c in cols}), rows)


def delete_assignments(conn: Connection, *, rollout_id: str, device_ids: Sequence[str] | None = None) -> int:
    """Remove a rollout's assignments (of ``device_ids`` only, when given); returns how many."""
    c = ASSIGNMENTS.c
    if device_ids is None:
        return int(conn.execute(sa.delete(ASSIGNMENTS).where(c.rollout_id == rollout_id)).rowcount)
    removed = 0
    for chunk in _chunks(sorted(set(device_ids))):
        removed += int(
            conn.execute(sa.delete(ASSIGNMENTS).where(c.rollout_id == rollout_id, c.device_id.in_(chunk))).rowcount
        )
    return removed


# -------------------------------------------------------------------------------- desired


def desired_rows(conn: Connection, *, device_ids: Sequence[str] | None = None) -> dict[str, DeviceDesired]:
    """Stored desired states by device (all, or of ``device_ids``)."""
    if device_ids is None:
        rows = list(conn.execute(sa.select(DESIRED)))
    else:
        c = DESIRED.c
        rows = [
            r
            for chunk in _chunks(sorted(set(device_ids)))
            for r in conn.execute(sa.select(DESIRED).where(c.device_id.in_(chunk)))
        ]
    return {str(r.device_id): DeviceDesired(**r._mapping) for r in rows}


def put_desired(conn: Connection, *, rows: list[dict[str, Any]]) -> None:
    """Create or replace desired rows (the publication columns are left as they are on a replace)."""
    if not rows:
        return
    insert, keys = _insert(conn, DESIRED), ["device_id"]
    cols = ["serial", "document", "source", "explanation", "clear", "updated_at"]
    conn.execute(insert.on_conflict_do_update(index_elements=keys, set_={c: insert.excluded[c] for c in cols}), rows)


def publishable(conn: Connection, *, pending_only: bool, limit: int, after: str = "") -> list[DeviceDesired]:
    """Desired rows by device id after ``after``: those not yet published at their serial, or all."""
    c = DESIRED.c
    stmt = sa.select(DESIRED).where(c.device_id > after)
    if pending_only:
        stmt = stmt.where(sa.or_(c.published_serial.is_(None), c.published_serial < c.serial))
    return [DeviceDesired(**r._mapping) for r in conn.execute(stmt.order_by(c.device_id).limit(limit))]


def count_pending(conn: Connection) -> int:
    """Rows whose current serial is not published yet."""
    c = DESIRED.c
    pending = sa.or_(c.published_serial.is_(None), c.published_serial < c.serial)
    return int(conn.execute(sa.select(sa.func.count()).select_from(DESIRED).where(pending)).scalar_one())


def mark_published(conn: Connection, *, device_id: str, serial: int, at: float) -> None:
    """Record that ``serial`` reached the broker (never lowers what was recorded)."""
    c = DESIRED.c
    conn.execute(
        sa.update(DESIRED)
        .where(c.device_id == device_id, sa.or_(c.published_serial.is_(None), c.published_serial < serial))
        .values(published_serial=serial, published_at=at)
    )
