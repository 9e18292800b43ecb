"""hooks, deployments, history and leases

Revision ID: 0001
Revises:
Create Date: 2026-11-29 16:18:58.236835
"""

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "deployment",
        sa.Column("id", sqlmodel.sql.sqltypes.AutoString(length=36), nullable=False),
        sa.Column("target", sqlmodel.sql.sqltypes.AutoString(length=63), nullable=False),
        sa.Column("kind", sqlmodel.sql.sqltypes.AutoString(length=8), nullable=False),
        sa.Column("hook_id", sa.Integer(), nullable=True),
        sa.Column("hook_name", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("image_tag", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=True),
        sa.Column("env", sa.JSON(), nullable=True),
        sa.Column("status", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
        sa.Column("message", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("created_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("updated_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("started_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.Column("finished_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.Column("previous_image", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("backend_ref", sa.JSON(), nullable=True),
        sa.Column("rollback_ref", sa.JSON(), nullable=True),
        sa.Column("superseded_by", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("rollback_of", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("slot", sa.Integer(), nullable=True),
        sa.Column("idempotency_key", sqlmodel.sql.sqltypes.AutoString(length=255), nullable=True),
        sa.Column("request_digest", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("deployment", schema=None) as batch_op:
        batch_op.create_index(
            "ix_deployment_idempotency",
            ["hook_id", "idempotency_key"],
            unique=True,
            sqlite_where=sa.text("idempotency_key IS NOT NULL"),
            postgresql_where=sa.text("idempotency_key IS NOT NULL"),
        )
        batch_op.create_index("ix_deployment_status_target", ["status", "target"], unique=False)

    op.create_table(
        "deployment_event",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("deployment_id", sqlmodel.sql.sqltypes.AutoString(length=36), nullable=False),
        sa.Column("at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("status", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
        sa.Column("message", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("deployment_event", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_deployment_event_deployment_id"), ["deployment_id"], unique=False
        )

    op.create_table(
        "hook",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sqlmodel.sql.sqltypes.AutoString(length=100), nullable=False),
        sa.Column("target", sqlmodel.sql.sqltypes.AutoString(length=63), nullable=False),
        sa.Column("token_digest", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("created_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("last_used_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("token_digest"),
        sqlite_autoincrement=True,
    )
    with op.batch_alter_table("hook", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_hook_target"), ["target"], unique=False)

    op.create_table(
        "lease",
        sa.Column("target", sqlmodel.sql.sqltypes.AutoString(length=63), nullable=False),
        sa.Column("slot", sa.Integer(), nullable=False),
        sa.Column("owner", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("expires_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("target", "slot"),
    )


def downgrade() -> None:
    op.drop_table("lease")
    with op.batch_alter_table("hook", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_hook_target"))

    op.drop_table("hook")
    with op.batch_alter_table("deployment_event", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_deployment_event_deployment_id"))

    op.drop_table("deployment_event")
    with op.batch_alter_table("deployment", schema=None) as batch_op:
        batch_op.drop_index("ix_deployment_status_target")
        batch_op.drop_index(
            "ix_deployment_idempotency",
            sqlite_where=sa.text("idempotency_key IS NOT NULL"),
            postgresql_where=sa.text("idempotency_key IS NOT NULL"),
        )

    op.drop_table("deployment")
