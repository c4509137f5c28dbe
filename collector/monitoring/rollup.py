"""Daily roll-ups: the windows of each finished UTC day merged into one ``monitoring_window`` row.

A month of 15-minute windows is 2,880 rows per device and model version; a status over it reads
and merges them all. Once a UTC day is over, :func:`rollup_days` merges its windows (of the
configured length) per (device, model version, role) into one row with ``window_s = 86400`` and
``window_start`` = the day's start, so long ranges read one row per day instead.

Idempotent, and safe against late records: a day row is (re)computed from *all* of the day's
windows, never added to, and stores as ``updated_at`` the newest ``updated_at`` of the windows it
merged. A window updated after that (records of a device that was offline for days) makes the
day stale, and the next run recomputes it. Each run only looks at windows updated since the
newest day row (plus ``lookback_s`` of slack for clocks of collector replicas that disagree) and at
days after it, so its cost follows what changed, not the table's age; ``full=True`` looks at every
finished day.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Iterable

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from collector.monitoring.sketches import DAY_S, SketchError, WindowSketch, merge_all
from collector.monitoring.windows import KEY_COLUMNS, WINDOW_TABLE

log = logging.getLogger(__name__)

SeriesKey = tuple[str, str, str, str]  # (device_id, model_name, model_version, role)
DEFAULT_LOOKBACK_S = 3600.0
IN_CHUNK = 500


def _day(start: float) -> float:
    return math.floor(start / DAY_S) * DAY_S


def stale_days(
    conn: Connection, *, now: float, window_s: float, full: bool = False, lookback_s: float = DEFAULT_LOOKBACK_S
) -> dict[float, set[SeriesKey]]:
    """Finished UTC days (by start) whose day row is missing or older than one of its windows, per series."""
    c = WINDOW_TABLE.c
    cutoff = _day(now)  # windows of days that ended at or before now
    where = [c.window_s == float(window_s), c.window_start < cutoff, c.n > 0]
    if not full:
        # Days after the newest day row finished since the last run: all their windows count. Days up
        # to it were finished then, so only windows updated since (the newest day row's updated_at is
        # the newest window the last run merged) can have made them stale.
        last_day, watermark = conn.execute(
            sa.select(sa.func.max(c.window_start), sa.func.max(c.updated_at)).where(c.window_s == DAY_S)
        ).one()
        if last_day is not None and watermark is not None:
            where.append(
                sa.or_(c.window_start >= float(last_day) + DAY_S, c.updated_at >= float(watermark) - lookback_s)
            )
    newest: dict[tuple[SeriesKey, float], float] = {}
    stmt = sa.select(c.device_id, c.model_name, c.model_version, c.role, c.window_start, c.updated_at).where(*where)
    for device, name, version, role, start, updated in conn.execute(stmt):
        key = ((str(device), str(name), str(version), str(role)), _day(float(start)))
        newest[key] = max(newest.get(key, -math.inf), float(updated))
    if not newest:
        return {}
    # Day rows already up to date (stored updated_at >= newest window) need nothing.
    days = sorted({d for _, d in newest})
    current: dict[tuple[SeriesKey, float], float] = {}
    stmt = sa.select(c.device_id, c.model_name, c.model_version, c.role, c.window_start, c.updated_at).where(
        c.window_s == DAY_S, c.window_start.in_(days)
    )
    for device, name, version, role, start, updated in conn.execute(stmt):
        current[((str(device), str(name), str(version), str(role)), float(start))] = float(updated)
    out: dict[float, set[SeriesKey]] = defaultdict(set)
    for (series, day), updated in newest.items():
        if current.get((series, day), -math.inf) < updated:
            out[day].add(series)
    return dict(out)


def _chunks(keys: list[SeriesKey]) -> Iterable[list[SeriesKey]]:
    for lo in range(0, len(keys), IN_CHUNK):
        yield keys[lo : lo + IN_CHUNK]


def _merge_day(conn: Connection, day: float, series: set[SeriesKey], window_s: float) -> int:
    """Recompute the day rows of ``series`` for ``day`` from their windows, on ``conn``; rows written."""
    c = WINDOW_TABLE.c
    parts: dict[SeriesKey, list[WindowSketch]] = defaultdict(list)
    newest: dict[SeriesKey, float] = {}
    for chunk in _chunks(sorted(series)):
        stmt = sa.select(
            c.device_id, c.model_name, c.model_version, c.role, c.window_start, c.updated_at, c.sketch
        ).where(
            c.window_s == float(window_s),
            c.window_start >= day,
            c.window_start < day + DAY_S,
            c.n > 0,
            sa.tuple_(c.device_id, c.model_name, c.model_version, c.role).in_(chunk),
        )
        for device, name, version, role, start, updated, blob in conn.execute(stmt):
            key = (str(device), str(name), str(version), str(role))
            newest[key] = max(newest.get(key, -math.inf), float(updated))
            try:
                parts[key].append(WindowSketch.from_bytes(bytes(blob)))
            except SketchError as exc:
                log.warning("rollup: window %s %s of %s left out: %s", key, start, day, exc)
    rows = []
    for key, sketches in parts.items():
        try:
            total = merge_all(sketches)
        except SketchError as exc:  # windows of one series made with different bins (a replaced bundle)
            log.warning("rollup: day %s of %s not merged: %s", day, key, exc)
            continue
        rows.append(
            dict(zip(KEY_COLUMNS, (*key, day, DAY_S), strict=True))
            | {"n": total.n, "sketch": total.to_bytes(), "updated_at": newest[key]}
        )
    if not rows:
        return 0
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    insert = dialect.insert(WINDOW_TABLE)
    stmt = insert.on_conflict_do_update(
        index_elements=list(KEY_COLUMNS),
        set_={"n": insert.excluded.n, "sketch": insert.excluded.sketch, "updated_at": insert.excluded.updated_at},
    )
    conn.execute(stmt, rows)
    return len(rows)


def rollup_days(
    engine: Engine, now: float, window_s: float, *, full: bool = False, lookback_s: float = DEFAULT_LOOKBACK_S
) -> int:
    """Merge the ``window_s`` windows of every finished UTC day into day rows (``window_s = 86400``).

    A day is finished when it ended at or before ``now``. Only days whose row is missing or older
    than one of their windows are (re)computed, one transaction per day. Returns the day rows
    written. ``full`` looks at every window instead of those updated since the newest day row.
    """
    if not window_s > 0 or window_s >= DAY_S:
        raise ValueError(f"window_s must be in (0, {DAY_S:g}), got {window_s!r}")
    if DAY_S % window_s:
        raise ValueError(f"window_s {window_s:g} does not divide a day: windows would straddle midnight")
    with engine.connect() as conn:
        todo = stale_days(conn, now=now, window_s=window_s, full=full, lookback_s=lookback_s)
    written = 0
    for day in sorted(todo):
        with engine.begin() as conn:
            written += _merge_day(conn, day, todo[day], window_s)
    if written:
        log.info("rollup: %d day row(s) written for %d day(s)", written, len(todo))
    return written
