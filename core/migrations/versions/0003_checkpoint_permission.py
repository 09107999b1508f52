"""checkpoint_permission: checkpoints shared with other projects

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 00:10:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A database made before migrations existed is stamped 0001 but was created from the newest tables.
    if "checkpoint_permission" in sa.inspect(op.get_bind()).get_table_names():
        return
    op.create_table(
        "checkpoint_permission",
        sa.Column("pk", sa.Integer(), nullable=False),
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("checkpoint", sa.String(), nullable=False),
        sa.Column("owner_project_id", sa.String(), nullable=False),
        sa.Column("project_id", sa.String(), nullable=False),
        sa.Column("created_at", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("pk"),
    )
    with op.batch_alter_table("checkpoint_permission", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_checkpoint_permission_id"), ["id"], unique=True)
        batch_op.create_index(
            batch_op.f("ix_checkpoint_permission_owner_project_id"), ["owner_project_id"], unique=False
        )
        batch_op.create_index(
            "ux_checkpoint_permission_checkpoint_project", ["checkpoint", "project_id"], unique=True
        )


def downgrade() -> None:
    op.drop_table("checkpoint_permission")
