"""job.lease_epoch: the lease's fencing token

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-08 10:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A database made before migrations existed is stamped 0001 but was created from the newest tables.
    if "lease_epoch" in {c["name"] for c in sa.inspect(op.get_bind()).get_columns("job")}:
        return
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.add_column(sa.Column("lease_epoch", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.drop_column("lease_epoch")
