"""Monitoring windows: one merged sketch per (device, model version, role, window).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 03:40:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade the schema."""
    op.create_table(
        "monitoring_window",
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("model_name", sa.String(length=128), nullable=False),
        sa.Column("model_version", sa.String(length=128), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("window_start", sa.Double(), nullable=False),
        sa.Column("window_s", sa.Double(), nullable=False),
        sa.Column("n", sa.BigInteger(), nullable=False),
        sa.Column("sketch", sa.LargeBinary(), nullable=False),
        sa.Column("updated_at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("device_id", "model_name", "model_version", "role", "window_start", "window_s"),
    )
    op.create_index(
        "ix_monitoring_window_model_start",
        "monitoring_window",
        ["model_name", "model_version", "window_start"],
        unique=False,
    )
    op.create_index("ix_monitoring_window_start", "monitoring_window", ["window_start"], unique=False)


def downgrade() -> None:
    """Downgrade the schema."""
    op.drop_index("ix_monitoring_window_start", table_name="monitoring_window")
    op.drop_index("ix_monitoring_window_model_start", table_name="monitoring_window")
    op.drop_table("monitoring_window")
