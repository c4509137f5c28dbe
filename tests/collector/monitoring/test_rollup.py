"""Daily roll-ups of windows written by real ingest: finished days only, idempotent, late records recomputed."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from collector.db import make_engine, upgrade
from collector.monitoring.rollup import rollup_days
from collector.monitoring.sketches import DAY_S, WindowSketch, merge_all
from collector.monitoring.windows import WINDOW_TABLE, WindowWriter
from tests.collector.monitoring.test_service import WINDOW_S, catalog, ingest, records_message

D0 = 1_760_054_400.0  # a UTC midnight
D1 = D0 + DAY_S
D2 = D1 + DAY_S


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest) -> Iterator[Engine]:
    url: str = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")
    upgrade(url)
    eng = make_engine(url)
    yield eng
    eng.dispose()


def rows(engine: Engine, window_s: float) -> dict[tuple[str, float], tuple[int, bytes, float]]:
    c = WINDOW_TABLE.c
    stmt = sa.select(c.device_id, c.window_start, c.n, c.sketch, c.updated_at).where(c.window_s == window_s)
    with engine.connect() as conn:
        return {(r[0], float(r[1])): (int(r[2]), bytes(r[3]), float(r[4])) for r in conn.execute(stmt)}


def day_matches_windows(engine: Engine, device: str, day: float) -> int:
    """The day row equals the merge of the day's windows (and keeps the newest window's updated_at)."""
    fine = {k: v for k, v in rows(engine, WINDOW_S).items() if k[0] == device and day <= k[1] < day + DAY_S}
    n, blob, updated = rows(engine, DAY_S)[(device, day)]
    merged = merge_all(WindowSketch.from_bytes(b) for _, b, _ in fine.values())
    assert WindowSketch.from_bytes(blob).same_as(merged) and n == merged.n
    assert updated == max(u for _, _, u in fine.values())
    return n


def test_finished_days_roll_up_once_and_late_records_recompute_them(engine: Engine) -> None:
    writer = WindowWriter(catalog().bins(), WINDOW_S)
    # veh-a: 150 records early on D0, then 100 records across midnight (50 on D0, 50 on D1).
    ingest(engine, writer, [records_message("veh-a", 150, t0=D0 + 100, seed=1)])
    ingest(engine, writer, [records_message("veh-a", 100, first_seq=150, t0=D1 - 5, seed=2)])
    # veh-c: only on D1.
    ingest(engine, writer, [records_message("veh-c", 120, t0=D1 + 600, seed=3)])

    assert rollup_days(engine, D1 - 1, WINDOW_S) == 0  # D0 is not over yet
    assert rollup_days(engine, D1 + 60, WINDOW_S) == 1
    assert sorted(rows(engine, DAY_S)) == [("veh-a", D0)]
    assert day_matches_windows(engine, "veh-a", D0) == 200
    assert rollup_days(engine, D1 + 60, WINDOW_S) == 0  # idempotent: nothing changed

    # Late records of D0 (a device back from days offline): the day is recomputed, not added to twice.
    ingest(engine, writer, [records_message("veh-a", 30, first_seq=1000, t0=D0 + 5000, seed=4)])
    assert rollup_days(engine, D1 + 120, WINDOW_S, lookback_s=0) == 1
    assert day_matches_windows(engine, "veh-a", D0) == 230

    # D1 is over: both of its series, although veh-c's windows are older than the newest day row.
    assert rollup_days(engine, D2 + 1, WINDOW_S, lookback_s=0) == 2
    assert sorted(rows(engine, DAY_S)) == [("veh-a", D0), ("veh-a", D1), ("veh-c", D1)]
    assert day_matches_windows(engine, "veh-a", D1) == 50
    assert day_matches_windows(engine, "veh-c", D1) == 120
    assert rollup_days(engine, D2 + 1, WINDOW_S) == 0

    before = rows(engine, DAY_S)
    assert rollup_days(engine, D2 + 1, WINDOW_S, full=True) == 0  # nothing stale even when looking at all
    assert rows(engine, DAY_S) == before


def test_window_length_must_divide_a_day(sqlite_url: str) -> None:
    engine = make_engine(sqlite_url)
    with pytest.raises(ValueError, match="does not divide a day"):
        rollup_days(engine, D2, 7.0)
    with pytest.raises(ValueError, match="window_s must be in"):
        rollup_days(engine, D2, DAY_S)
    engine.dispose()
