"""SQL of the registry: model versions, their stage changes, and the pins and rollouts that name a version."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.sql.schema import Table

from collector.db.models import ModelPin, ModelStageChange, ModelVersion, RolloutAssignment
from collector.queries import decode_cursor, encode_cursor

VERSIONS: Table = ModelVersion.__table__  # type: ignore[attr-defined]
CHANGES: Table = ModelStageChange.__table__  # type: ignore[attr-defined]
PINS: Table = ModelPin.__table__  # type: ignore[attr-defined]
ASSIGNMENTS: Table = RolloutAssignment.__table__  # type: ignore[attr-defined]


def _version(row: Any) -> ModelVersion:
    return ModelVersion(**row._mapping)


def get_version(conn: Connection, *, name: str, version: str) -> ModelVersion | None:
    """One version or None."""
    c = VERSIONS.c
    row = conn.execute(sa.select(VERSIONS).where(c.name == name, c.version == version)).first()
    return None if row is None else _version(row)


def insert_version(conn: Connection, *, values: dict[str, Any]) -> ModelVersion:
    """Insert a version row (``IntegrityError`` when the name and version exist)."""
    conn.execute(sa.insert(VERSIONS).values(**values))
    found = get_version(conn, name=values["name"], version=values["version"])
    assert found is not None
    return found


def list_versions(
    conn: Connection, *, limit: int, cursor: str | None = None, name: str | None = None, stage: str | None = None
) -> tuple[list[ModelVersion], int, str | None]:
    """Versions by name, then push order: ``(page, total, next cursor)``."""
    c = VERSIONS.c
    filters = []
    if name is not None:
        filters.append(c.name == name)
    if stage is not None:
        filters.append(c.stage == stage)
    total = int(conn.execute(sa.select(sa.func.count()).select_from(VERSIONS).where(*filters)).scalar_one())
    stmt = sa.select(VERSIONS).where(*filters).order_by(c.name, c.id)
    if cursor is not None:
        after_name, after_id = decode_cursor(cursor, (str, int))
        stmt = stmt.where(sa.tuple_(c.name, c.id) > sa.tuple_(sa.literal(after_name), sa.literal(after_id)))
    rows = [_version(r) for r in conn.execute(stmt.limit(limit + 1))]
    nxt = encode_cursor([rows[limit - 1].name, rows[limit - 1].id]) if len(rows) > limit else None
    return rows[:limit], total, nxt


def production_versions(conn: Connection) -> dict[str, ModelVersion]:
    """The production version of every model name that has one."""
    rows = conn.execute(sa.select(VERSIONS).where(VERSIONS.c.stage == "production"))
    return {v.name: v for v in map(_version, rows)}


def versions_named(conn: Connection, keys: set[tuple[str, str]]) -> dict[tuple[str, str], ModelVersion]:
    """The versions among ``(name, version)`` keys that exist."""
    if not keys:
        return {}
    c = VERSIONS.c
    rows = conn.execute(sa.select(VERSIONS).where(sa.tuple_(c.name, c.version).in_(sorted(keys))))
    return {(v.name, v.version): v for v in map(_version, rows)}


def set_stage(conn: Connection, *, version_id: int, stage: str, at: float) -> None:
    """Move a version to ``stage``."""
    conn.execute(sa.update(VERSIONS).where(VERSIONS.c.id == version_id).values(stage=stage, stage_changed_at=at))


def add_stage_change(
    conn: Connection,
    *,
    name: str,
    version: str,
    from_stage: str | None,
    to_stage: str,
    at: float,
    by: str,
    note: str | None,
) -> None:
    """Record one transition."""
    conn.execute(
        sa.insert(CHANGES).values(
            name=name, version=version, from_stage=from_stage, to_stage=to_stage, at=at, by=by, note=note
        )
    )


def stage_history(conn: Connection, *, name: str, version: str) -> list[ModelStageChange]:
    """Every transition of one version, oldest first."""
    c = CHANGES.c
    rows = conn.execute(sa.select(CHANGES).where(c.name == name, c.version == version).order_by(c.at, c.id))
    return [ModelStageChange(**r._mapping) for r in rows]


def pins_of(conn: Connection, *, name: str, version: str) -> list[ModelPin]:
    """The pins naming one version."""
    c = PINS.c
    rows = conn.execute(
        sa.select(PINS).where(c.model_name == name, c.model_version == version).order_by(c.scope, c.subject)
    )
    return [ModelPin(**r._mapping) for r in rows]


def rollouts_of(conn: Connection, *, name: str, version: str) -> dict[str, int]:
    """Rollout ids assigning one version (active or shadow) to devices, with their device counts."""
    c = ASSIGNMENTS.c
    named = sa.or_(
        sa.and_(c.model_name == name, c.model_version == version),
        sa.and_(c.shadow_name == name, c.shadow_version == version),
    )
    rows = conn.execute(sa.select(c.rollout_id, sa.func.count()).where(named).group_by(c.rollout_id))
    return {str(r[0]): int(r[1]) for r in rows}
