"""index the deployments by status, target and id: the queue in order

Superseding takes a target's oldest queued deployments in id order; with an index on status and
target only, SQLite walked the primary key from the first deployment ever recorded to find them.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 07:00:00.000000
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_deployment_status_target_id", "deployment", ["status", "target", "id"])
    op.drop_index("ix_deployment_status_target", table_name="deployment")


def downgrade() -> None:
    op.create_index("ix_deployment_status_target", "deployment", ["status", "target"])
    op.drop_index("ix_deployment_status_target_id", table_name="deployment")
