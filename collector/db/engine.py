"""Engine factory (SQLite or PostgreSQL by URL) and programmatic Alembic upgrades."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import URL, Connection, Engine, make_url

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 30_000
# Serialises concurrent `db upgrade` runs (several replicas starting at once) on PostgreSQL.
_MIGRATION_LOCK_KEY = 0x666C656574  # "fleet"


def normalise_url(url: str) -> str:
    """Return ``url`` with PostgreSQL URLs pointed at the psycopg 3 driver."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def is_sqlite(engine_or_conn: Engine | Connection) -> bool:
    """True when the engine or connection talks to SQLite."""
    return engine_or_conn.dialect.name == "sqlite"


def _sqlite_file(url: URL) -> Path | None:
    database = url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database)


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for ``url``: SQLite in WAL mode with a busy timeout and foreign keys, or PostgreSQL via psycopg.

    On SQLite, a connection opened with ``execution_options(sqlite_begin="IMMEDIATE")`` starts its
    transactions with ``BEGIN IMMEDIATE`` (takes the write lock up front, so a writer never fails
    half-way with "database is locked" when it upgrades a read lock).
    """
    sa_url = make_url(normalise_url(url))
    if sa_url.get_backend_name() == "sqlite":
        path = _sqlite_file(sa_url)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        connect_args = {"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}
        connect_args.update(kwargs.pop("connect_args", {}))
        engine = create_engine(sa_url, connect_args=connect_args, **kwargs)
        _configure_sqlite(engine)
        return engine
    if sa_url.get_backend_name() == "postgresql":
        kwargs.setdefault("pool_pre_ping", True)
        kwargs.setdefault("connect_args", {"connect_timeout": 10})
        return create_engine(sa_url, **kwargs)
    raise ValueError(
        f"unsupported database URL {sa_url.render_as_string(hide_password=True)!r}: "
        "use sqlite:///PATH or postgresql://..."
    )


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event below issue BEGIN, instead of pysqlite's implicit one.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cur.execute("PRAGMA foreign_keys=ON")
            # FULL: a commit the collector acknowledged to a device must survive a power cut.
            cur.execute("PRAGMA synchronous=FULL")
        finally:
            cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        mode = conn.get_execution_options().get("sqlite_begin", "")
        if mode not in ("", "DEFERRED", "IMMEDIATE", "EXCLUSIVE"):
            raise ValueError(f"sqlite_begin must be DEFERRED, IMMEDIATE or EXCLUSIVE, not {mode!r}")
        conn.exec_driver_sql(f"BEGIN {mode}".strip())


def alembic_config(database_url: str | None = None) -> Config:
    """An Alembic configuration for the collector's migrations (no ini file needed)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    if database_url is not None:
        # configparser interpolation: a literal % in a password must be doubled.
        cfg.set_main_option("sqlalchemy.url", normalise_url(database_url).replace("%", "%%"))
    return cfg


def upgrade(database_url: str, revision: str = "head") -> None:
    """Upgrade the schema at ``database_url`` to ``revision`` (idempotent; safe to run at every start)."""
    engine = make_engine(database_url)
    try:
        with engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY})
            cfg = alembic_config(database_url)
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
    finally:
        engine.dispose()
    log.info(
        "database schema at %s is at revision %s",
        make_url(normalise_url(database_url)).render_as_string(hide_password=True),
        revision,
    )


def current_revision(engine: Engine) -> str | None:
    """The Alembic revision the database is at, or None before the first upgrade."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


# Serialises every change of desired-state inputs (pins, stages, groups, rollouts) with the serials they
# bump, across API requests, jobs and replicas; SQLite's BEGIN IMMEDIATE serialises writers anyway.
DESIRED_LOCK_KEY = 0x666C656564  # "fleed"


@contextmanager
def write_transaction(engine: Engine, *, desired_lock: bool = False) -> Iterator[Connection]:
    """A connection inside one write transaction, committed on success.

    SQLite: ``BEGIN IMMEDIATE`` (the write lock up front, so it never fails half-way beside ingest).
    PostgreSQL with ``desired_lock``: the transaction first takes the desired-state advisory lock.
    """
    with engine.connect().execution_options(sqlite_begin="IMMEDIATE") as conn, conn.begin():
        if desired_lock and conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": DESIRED_LOCK_KEY})
        yield conn
