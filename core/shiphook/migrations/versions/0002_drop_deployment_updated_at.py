"""drop deployment.updated_at, which nothing read

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 00:30:00.000000
"""

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("deployment", schema=None) as batch_op:
        batch_op.drop_column("updated_at")


def downgrade() -> None:
    # the latest time the row records stands in for the last update
    with op.batch_alter_table("deployment", schema=None) as batch_op:
        batch_op.add_column(sa.Column("updated_at", sqlmodel.sql.sqltypes.UTCDateTime()))
    op.execute("UPDATE deployment SET updated_at = COALESCE(finished_at, started_at, created_at)")
    with op.batch_alter_table("deployment", schema=None) as batch_op:
        batch_op.alter_column(
            "updated_at", existing_type=sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False
        )
