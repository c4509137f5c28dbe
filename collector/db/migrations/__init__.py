"""Alembic migrations of the collector database (a package so that installs ship them)."""
