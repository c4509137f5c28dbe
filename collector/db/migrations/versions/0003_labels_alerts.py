"""Late labels, alerts with their hysteresis state and webhook deliveries, sequential detector alarms.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25 10:20:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSONType = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    """Upgrade the schema."""
    op.create_table(
        "label",
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("spool_epoch", sa.String(length=128), nullable=False),
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("label", sa.SmallInteger(), nullable=False),
        sa.Column("received_at", sa.Double(), nullable=False),
        sa.Column("source", sa.String(length=128), nullable=False),
        sa.PrimaryKeyConstraint("device_id", "spool_epoch", "seq"),
    )
    op.create_index("ix_label_received", "label", ["received_at"], unique=False)
    op.create_table(
        "alert",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("key", sa.String(length=512), nullable=False),
        sa.Column("kind", sa.String(length=64), nullable=False),
        sa.Column("scope", sa.String(length=16), nullable=False),
        sa.Column("subject", sa.String(length=128), nullable=False),
        sa.Column("model_name", sa.String(length=128), nullable=True),
        sa.Column("model_version", sa.String(length=128), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("severity", sa.String(length=16), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("details", JSONType, nullable=False),
        sa.Column("fired_at", sa.Double(), nullable=False),
        sa.Column("last_bad_at", sa.Double(), nullable=False),
        sa.Column("resolved_at", sa.Double(), nullable=True),
        sa.Column("acked_at", sa.Double(), nullable=True),
        sa.Column("acked_by", sa.String(length=128), nullable=True),
        sa.Column("ack_note", sa.Text(), nullable=True),
    )
    op.create_index("ix_alert_key_state", "alert", ["key", "state"], unique=False)
    op.create_index("ix_alert_state_fired", "alert", ["state", "fired_at"], unique=False)
    op.create_table(
        "alert_condition",
        sa.Column("key", sa.String(length=512), nullable=False),
        sa.Column("bad_streak", sa.Integer(), nullable=False),
        sa.Column("good_streak", sa.Integer(), nullable=False),
        sa.Column("last_window", sa.Double(), nullable=False),
        sa.Column("updated_at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("key"),
    )
    op.create_table(
        "webhook_delivery",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("alert_id", sa.BigInteger(), nullable=False),
        sa.Column("event", sa.String(length=16), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("payload", JSONType, nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.Double(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("delivered_at", sa.Double(), nullable=True),
    )
    op.create_index("ix_webhook_delivery_state_next", "webhook_delivery", ["state", "next_attempt_at"], unique=False)
    op.create_table(
        "sequential_alarm",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("model_name", sa.String(length=128), nullable=False),
        sa.Column("model_version", sa.String(length=128), nullable=False),
        sa.Column("signal", sa.String(length=32), nullable=False),
        sa.Column("detector", sa.String(length=32), nullable=False),
        sa.Column("spool_epoch", sa.String(length=128), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("ts", sa.Double(), nullable=False),
        sa.Column("detail", JSONType, nullable=False),
        sa.Column("received_at", sa.Double(), nullable=False),
    )
    op.create_index("ix_sequential_alarm_received", "sequential_alarm", ["received_at"], unique=False)
    op.create_index("ix_sequential_alarm_device_ts", "sequential_alarm", ["device_id", "ts"], unique=False)


def downgrade() -> None:
    """Downgrade the schema."""
    op.drop_index("ix_sequential_alarm_device_ts", table_name="sequential_alarm")
    op.drop_index("ix_sequential_alarm_received", table_name="sequential_alarm")
    op.drop_table("sequential_alarm")
    op.drop_index("ix_webhook_delivery_state_next", table_name="webhook_delivery")
    op.drop_table("webhook_delivery")
    op.drop_table("alert_condition")
    op.drop_index("ix_alert_state_fired", table_name="alert")
    op.drop_index("ix_alert_key_state", table_name="alert")
    op.drop_table("alert")
    op.drop_index("ix_label_received", table_name="label")
    op.drop_table("label")
