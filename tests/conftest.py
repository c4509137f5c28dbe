"""Shared fixtures: real brokers and databases, the reference bundle and its keys."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.services import (
    REPO,
    Mosquitto,
    Postgres,
    ServiceUnavailable,
    create_database,
    drop_database,
    machine_postgres_admin_url,
    private_postgres,
)

REQUIRE_SERVICES = os.environ.get("FLEET_REQUIRE_SERVICES") == "1"
DATA = REPO.parent / "shared" / "data"


def service_missing(reason: str) -> None:
    """Skip loudly, or fail when CI requires every service (FLEET_REQUIRE_SERVICES=1)."""
    message = f"SERVICE MISSING: {reason}"
    if REQUIRE_SERVICES:
        pytest.fail(message + " (FLEET_REQUIRE_SERVICES=1)")
    pytest.skip(message)


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """A private Mosquitto for the whole run (production config). Do not stop it in a test."""
    try:
        b = Mosquitto(tmp_path_factory.mktemp("mosquitto")).start()
    except ServiceUnavailable as exc:
        service_missing(str(exc))
        raise
    yield b
    b.stop()


@pytest.fixture
def private_broker(tmp_path: Path) -> Iterator[Callable[[], Mosquitto]]:
    """Factory for a broker this test may stop, kill and restart."""
    started: list[Mosquitto] = []

    def make() -> Mosquitto:
        try:
            b = Mosquitto(tmp_path / f"mosquitto-{len(started)}").start()
        except ServiceUnavailable as exc:
            service_missing(str(exc))
            raise
        started.append(b)
        return b

    yield make
    for b in started:
        b.stop()


@pytest.fixture(scope="session")
def pg_admin_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Admin URL of the machine's PostgreSQL, or of a private cluster when there is none."""
    url = machine_postgres_admin_url()
    if url is not None:
        yield url
        return
    try:
        pg = private_postgres(tmp_path_factory.mktemp("pg"))
    except ServiceUnavailable as exc:
        service_missing(str(exc))
        raise
    yield pg.admin_url
    pg.stop()


@pytest.fixture
def pg_url(pg_admin_url: str) -> Iterator[str]:
    """SQLAlchemy URL of a fresh PostgreSQL database, dropped after the test."""
    name = create_database(pg_admin_url)
    base = pg_admin_url.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    yield f"{base}/{name}"
    drop_database(pg_admin_url, name)


@pytest.fixture
def private_pg(tmp_path: Path) -> Iterator[Postgres]:
    """A private PostgreSQL cluster this test may stop and restart."""
    try:
        pg = private_postgres(tmp_path / "pg")
    except ServiceUnavailable as exc:
        service_missing(str(exc))
        raise
    yield pg
    pg.stop("immediate")


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """SQLAlchemy URL of a fresh SQLite file (the embedded default)."""
    return f"sqlite:///{tmp_path / 'fleet.db'}"
