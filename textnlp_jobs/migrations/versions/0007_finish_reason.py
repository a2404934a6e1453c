"""generations.finish_reason: why a succeeded job's text ends, as its worker saw it

Before, it was told from the token count alone, which cannot tell a stop string written by the
last allowed token from a cut. Rows written before this revision keep NULL (and that reading).

Revision ID: 0007_finish_reason
Revises: 0006_model_registry
Create Date: 2026-12-07 13:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0007_finish_reason'
down_revision = '0006_model_registry'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('generations', schema=None) as batch_op:
        batch_op.add_column(sa.Column('finish_reason', sa.String(length=16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('generations', schema=None) as batch_op:
        batch_op.drop_column('finish_reason')
