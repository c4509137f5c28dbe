"""Storage: SQLModel tables, engine factory and Alembic migrations."""

from collector.db.engine import make_engine, normalise_url, upgrade

__all__ = ["make_engine", "normalise_url", "upgrade"]
