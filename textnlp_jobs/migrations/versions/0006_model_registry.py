"""model registry: version metadata, promotions history, loads, corrupt flag, quantization link

Revision ID: 0006_model_registry
Revises: 0002_device_workers
Create Date: 2026-11-27 14:50:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = '0006_model_registry'
down_revision = '0002_device_workers'
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql')


def upgrade() -> None:
    with op.batch_alter_table('models', schema=None) as batch_op:
        batch_op.add_column(sa.Column('quantize_eligible', sa.Boolean(), nullable=False, server_default=sa.false()))

    with op.batch_alter_table('model_versions', schema=None) as batch_op:
        batch_op.add_column(sa.Column('description', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('in_place', sa.Boolean(), nullable=False, server_default=sa.false()))
        batch_op.add_column(sa.Column('architecture', sa.String(length=128), nullable=True))
        batch_op.add_column(sa.Column('dtype', sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column('parameter_count', sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column('max_positions', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('special_tokens', JSON, nullable=False, server_default='{}'))
        batch_op.add_column(sa.Column('source_version_id', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('corrupt', sa.Boolean(), nullable=False, server_default=sa.false()))
        batch_op.add_column(sa.Column('corrupt_reason', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('validation', JSON, nullable=False, server_default='{}'))
        batch_op.create_foreign_key(batch_op.f('fk_model_versions_source_version_id_model_versions'),
                                    'model_versions', ['source_version_id'], ['id'], ondelete='SET NULL')
        batch_op.create_index(batch_op.f('ix_model_versions_source_version_id'), ['source_version_id'], unique=False)

    op.create_table('model_promotions',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('model_id', sa.Integer(), nullable=False),
    sa.Column('environment', sa.String(length=64), nullable=False),
    sa.Column('action', sa.String(length=16), nullable=False),
    sa.Column('version', sa.String(length=128), nullable=False),
    sa.Column('previous_version', sa.String(length=128), nullable=True),
    sa.Column('actor', sa.String(length=255), nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], name=op.f('fk_model_promotions_model_id_models'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_model_promotions'))
    )
    with op.batch_alter_table('model_promotions', schema=None) as batch_op:
        batch_op.create_index('ix_model_promotions_model_id_environment', ['model_id', 'environment', 'id'], unique=False)

    op.create_table('model_loads',
    sa.Column('worker', sa.String(length=255), nullable=False),
    sa.Column('model_version_id', sa.Integer(), nullable=False),
    sa.Column('seen_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['model_version_id'], ['model_versions.id'], name=op.f('fk_model_loads_model_version_id_model_versions'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('worker', 'model_version_id', name=op.f('pk_model_loads'))
    )
    with op.batch_alter_table('model_loads', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_model_loads_model_version_id'), ['model_version_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('model_loads', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_model_loads_model_version_id'))
    op.drop_table('model_loads')
    with op.batch_alter_table('model_promotions', schema=None) as batch_op:
        batch_op.drop_index('ix_model_promotions_model_id_environment')
    op.drop_table('model_promotions')

    with op.batch_alter_table('model_versions', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_model_versions_source_version_id'))
        batch_op.drop_constraint(batch_op.f('fk_model_versions_source_version_id_model_versions'), type_='foreignkey')
        for column in ('validation', 'corrupt_reason', 'corrupt', 'source_version_id', 'special_tokens',
                       'max_positions', 'parameter_count', 'dtype', 'architecture', 'in_place', 'description'):
            batch_op.drop_column(column)

    with op.batch_alter_table('models', schema=None) as batch_op:
        batch_op.drop_column('quantize_eligible')
