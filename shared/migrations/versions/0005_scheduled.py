"""scheduled sends and messages held through quiet hours

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07 00:40:00
"""

from __future__ import annotations

from alembic import op
import sqlalchemy as sa


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'scheduled',
        sa.Column('seq', sa.Integer(), autoincrement=True, nullable=False),
        sa.Column('id', sa.String(length=32), nullable=False),
        sa.Column('bot_id', sa.Integer(), nullable=False),
        sa.Column('person', sa.String(length=32), nullable=False),
        sa.Column('text', sa.Text(), nullable=False),
        sa.Column('media_url', sa.Text(), nullable=True),
        sa.Column('origin', sa.String(length=16), nullable=False),
        sa.Column('reason', sa.String(length=16), nullable=False),
        sa.Column('send_at', sa.Float(), nullable=False),
        sa.Column('state', sa.String(length=16), nullable=False),
        sa.Column('created_at', sa.Float(), nullable=False),
        sa.Column('done_at', sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint('seq', name=op.f('pk_scheduled')),
        sa.UniqueConstraint('id', name=op.f('uq_scheduled_id')),
    )
    op.create_index(op.f('ix_scheduled_state_send_at'), 'scheduled', ['state', 'send_at'], unique=False)
    op.create_index(op.f('ix_scheduled_bot_id_send_at'), 'scheduled', ['bot_id', 'send_at'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_scheduled_bot_id_send_at'), table_name='scheduled')
    op.drop_index(op.f('ix_scheduled_state_send_at'), table_name='scheduled')
    op.drop_table('scheduled')
