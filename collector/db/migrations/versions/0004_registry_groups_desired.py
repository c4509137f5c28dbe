"""Model registry (versions, stage changes, pins), device groups, rollout assignments, desired states; retired devices.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-08 09:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSONType = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    """Upgrade the schema."""
    with op.batch_alter_table("device") as batch:
        batch.add_column(sa.Column("retired_at", sa.Double(), nullable=True))
        batch.add_column(sa.Column("retired_by", sa.String(length=128), nullable=True))
    op.create_table(
        "model_version",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("version", sa.String(length=128), nullable=False),
        sa.Column("stage", sa.String(length=16), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("manifest_sha256", sa.String(length=64), nullable=False),
        sa.Column("model_sha256", sa.String(length=64), nullable=False),
        sa.Column("manifest", JSONType, nullable=False),
        sa.Column("uploader_key_id", sa.String(length=64), nullable=False),
        sa.Column("release_key_id", sa.String(length=64), nullable=False),
        sa.Column("dataset_version", sa.String(length=128), nullable=True),
        sa.Column("dataset_sha256", sa.String(length=64), nullable=True),
        sa.Column("code_version", sa.Text(), nullable=True),
        sa.Column("parent_version", sa.String(length=128), nullable=True),
        sa.Column("metrics", JSONType, nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("pushed_at", sa.Double(), nullable=False),
        sa.Column("pushed_by", sa.String(length=128), nullable=False),
        sa.Column("stage_changed_at", sa.Double(), nullable=False),
        sa.UniqueConstraint("name", "version", name="uq_model_version_name_version"),
    )
    op.create_index("ix_model_version_name_stage", "model_version", ["name", "stage"], unique=False)
    op.create_table(
        "model_stage_change",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("version", sa.String(length=128), nullable=False),
        sa.Column("from_stage", sa.String(length=16), nullable=True),
        sa.Column("to_stage", sa.String(length=16), nullable=False),
        sa.Column("at", sa.Double(), nullable=False),
        sa.Column("by", sa.String(length=128), nullable=False),
        sa.Column("note", sa.Text(), nullable=True),
    )
    op.create_index("ix_model_stage_change_version", "model_stage_change", ["name", "version", "at"], unique=False)
    op.create_table(
        "model_pin",
        sa.Column("scope", sa.String(length=16), nullable=False),
        sa.Column("subject", sa.String(length=128), nullable=False),
        sa.Column("model_name", sa.String(length=128), nullable=False),
        sa.Column("model_version", sa.String(length=128), nullable=False),
        sa.Column("pinned_at", sa.Double(), nullable=False),
        sa.Column("pinned_by", sa.String(length=128), nullable=False),
        sa.Column("note", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("scope", "subject"),
    )
    op.create_table(
        "device_group",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("created_by", sa.String(length=128), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    op.create_table(
        "group_member",
        sa.Column("group_name", sa.String(length=64), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("added_at", sa.Double(), nullable=False),
        sa.Column("added_by", sa.String(length=128), nullable=False),
        sa.PrimaryKeyConstraint("group_name", "device_id"),
    )
    op.create_index("ix_group_member_device", "group_member", ["device_id"], unique=False)
    op.create_table(
        "rollout_assignment",
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("rollout_id", sa.String(length=64), nullable=False),
        sa.Column("model_name", sa.String(length=128), nullable=True),
        sa.Column("model_version", sa.String(length=128), nullable=True),
        sa.Column("shadow_name", sa.String(length=128), nullable=True),
        sa.Column("shadow_version", sa.String(length=128), nullable=True),
        sa.Column("assigned_at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("device_id"),
    )
    op.create_index("ix_rollout_assignment_rollout", "rollout_assignment", ["rollout_id"], unique=False)
    op.create_table(
        "device_desired",
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("serial", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("document", JSONType, nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("explanation", JSONType, nullable=False),
        sa.Column("clear", sa.Boolean(), nullable=False),
        sa.Column("updated_at", sa.Double(), nullable=False),
        sa.Column("published_serial", sa.BigInteger(), nullable=True),
        sa.Column("published_at", sa.Double(), nullable=True),
        sa.PrimaryKeyConstraint("device_id"),
    )


def downgrade() -> None:
    """Downgrade the schema."""
    op.drop_table("device_desired")
    op.drop_index("ix_rollout_assignment_rollout", table_name="rollout_assignment")
    op.drop_table("rollout_assignment")
    op.drop_index("ix_group_member_device", table_name="group_member")
    op.drop_table("group_member")
    op.drop_table("device_group")
    op.drop_table("model_pin")
    op.drop_index("ix_model_stage_change_version", table_name="model_stage_change")
    op.drop_table("model_stage_change")
    op.drop_index("ix_model_version_name_stage", table_name="model_version")
    op.drop_table("model_version")
    with op.batch_alter_table("device") as batch:
        batch.drop_column("retired_by")
        batch.drop_column("retired_at")
