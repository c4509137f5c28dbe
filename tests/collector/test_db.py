"""Storage: settings, engine factory and Alembic migrations on SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlmodel import SQLModel

import collector.db.models  # noqa: F401  (registers the tables)
from collector.config import ConfigError, Settings, get_settings, load_settings
from collector.db import make_engine, normalise_url, upgrade
from collector.db.engine import alembic_config, current_revision

TABLES = {
    "device",
    "inference",
    "ingest_batch",
    "declared_gap",
    "quarantine",
    "device_event",
    "model_version",
    "model_stage_change",
    "model_pin",
    "device_group",
    "group_member",
    "rollout_assignment",
    "device_desired",
    "alembic_version",
}


def _head() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def _check_schema(url: str) -> None:
    engine = make_engine(url)
    try:
        assert current_revision(engine) == _head()
        with engine.connect() as conn:
            assert set(sa.inspect(conn).get_table_names()) >= TABLES
            # The migration creates exactly what the models declare (tables of other modules may come later).
            diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), SQLModel.metadata)
            assert [d for d in diff if any(f"'{t}'" in repr(d) for t in TABLES)] == []
            indexes = {ix["name"] for ix in sa.inspect(conn).get_indexes("inference")}
            assert {"ix_inference_device_ts", "ix_inference_model_ts", "ix_inference_ts"} <= indexes
            pk = sa.inspect(conn).get_pk_constraint("inference")["constrained_columns"]
            assert pk == ["device_id", "spool_epoch", "seq"]
    finally:
        engine.dispose()


def test_sqlite_upgrade_from_empty_is_idempotent(sqlite_url: str) -> None:
    upgrade(sqlite_url)
    _check_schema(sqlite_url)
    upgrade(sqlite_url)  # second run: nothing to do, no error
    _check_schema(sqlite_url)


@pytest.mark.services
def test_postgresql_upgrade_from_empty_is_idempotent(pg_url: str) -> None:
    upgrade(pg_url.replace("postgresql+psycopg://", "postgresql://"))  # plain URL is rewritten to psycopg 3
    _check_schema(pg_url)
    upgrade(pg_url)
    _check_schema(pg_url)


def test_sqlite_engine_pragmas(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'sub' / 'dir' / 'fleet.db'}")  # parent folders are created
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        # BEGIN IMMEDIATE takes the write lock at once: a second immediate writer waits, then times out.
        other = make_engine(f"sqlite:///{tmp_path / 'sub' / 'dir' / 'fleet.db'}")
        with engine.connect().execution_options(sqlite_begin="IMMEDIATE") as a, a.begin():
            a.exec_driver_sql("CREATE TABLE IF NOT EXISTS t (x INTEGER)")
            with other.connect().execution_options(sqlite_begin="IMMEDIATE") as b:
                b.connection.dbapi_connection.execute("PRAGMA busy_timeout=200")  # type: ignore[union-attr]
                with pytest.raises(sa.exc.OperationalError, match="locked"), b.begin():
                    pass
        other.dispose()
    finally:
        engine.dispose()


def test_normalise_url_and_unsupported_backend() -> None:
    assert normalise_url("postgresql://u:p@h/db") == "postgresql+psycopg://u:p@h/db"
    assert normalise_url("postgres://h/db") == "postgresql+psycopg://h/db"
    assert normalise_url("postgresql+psycopg://h/db") == "postgresql+psycopg://h/db"
    assert normalise_url("sqlite:///x.db") == "sqlite:///x.db"
    with pytest.raises(ValueError, match="unsupported database URL"):
        make_engine("mysql://h/db")


# ------------------------------------------------------------------------------- settings


def test_settings_defaults_and_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FLEET_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("FLEET_MQTT_PROTOCOL", "3.1.1")
    monkeypatch.setenv("FLEET_INGEST_MAX_BATCH_MESSAGES", "50")
    monkeypatch.setenv("FLEET_SOMETHING_ELSE", "ignored")  # other tools' FLEET_* variables are not errors
    monkeypatch.delenv("FLEET_DATABASE_URL", raising=False)
    get_settings.cache_clear()
    try:
        s = get_settings()
        assert s.database_url == f"sqlite:///{tmp_path / 'fleet.db'}"
        assert s.mqtt_protocol == "3.1.1"
        assert s.ingest_max_batch_messages == 50
        assert s.mqtt_client_id == "fleet-collector"
        assert s.auto_migrate is True
        assert get_settings() is s  # cached
    finally:
        get_settings.cache_clear()
    assert all(f.description for f in Settings.model_fields.values())


def test_settings_file_rules(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("FLEET_HTTP_PORT", raising=False)
    good = tmp_path / "good.yaml"
    good.write_text("mqtt_protocol: 5\nhttp_port: 9000\ndatabase_url: postgresql://db/fleet\n")
    s = load_settings(good)
    assert (s.mqtt_protocol, s.http_port, s.database_url) == ("5", 9000, "postgresql://db/fleet")
    monkeypatch.setenv("FLEET_HTTP_PORT", "9100")  # the environment overrides the file
    assert load_settings(good).http_port == 9100

    typo = tmp_path / "typo.yaml"
    typo.write_text("mqtt_protcol: 5\n")
    with pytest.raises(ConfigError, match="mqtt_protcol"):
        load_settings(typo)
    bad_value = tmp_path / "bad.yaml"
    bad_value.write_text("ingest_max_batch_messages: 0\n")
    with pytest.raises(ConfigError, match="ingest_max_batch_messages"):
        load_settings(bad_value)
    not_yaml = tmp_path / "broken.yaml"
    not_yaml.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(not_yaml)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_settings(listing)
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "missing.yaml")
    bad_url = tmp_path / "url.yaml"
    bad_url.write_text("mqtt_url: http://broker\n")
    with pytest.raises(ConfigError, match="mqtt_url"):
        load_settings(bad_url)
