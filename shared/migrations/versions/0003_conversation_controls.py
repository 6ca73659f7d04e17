"""conversation controls: human handoff (a bot's handoff URL and secret, and paused conversations)

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 21:20:00
"""

from __future__ import annotations

from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ADD COLUMN (see 0002: a batch copy on SQLite would lose AUTOINCREMENT).
    # Where a paused conversation's messages are forwarded, encrypted like engine-url (it may carry a key).
    op.add_column('bots', sa.Column('handoff_url', sa.Text(), nullable=True))
    # The HMAC key those forwards are signed with, encrypted under CREDENTIALS_KEY; shown once.
    op.add_column('bots', sa.Column('handoff_secret_encrypted', sa.Text(), nullable=True))
    op.create_table(
        'handoffs',
        sa.Column('bot_id', sa.Integer(), nullable=False),
        sa.Column('person', sa.String(length=32), nullable=False),
        sa.Column('since', sa.Float(), nullable=False),
        sa.Column('until', sa.Float(), nullable=True),
        sa.Column('by', sa.String(length=16), nullable=False),
        sa.Column('note', sa.Text(), nullable=True),
        sa.Column('message_sid', sa.String(length=64), nullable=True),
        sa.PrimaryKeyConstraint('bot_id', 'person', name=op.f('pk_handoffs')),
    )


def downgrade() -> None:
    op.drop_table('handoffs')
    with op.batch_alter_table('bots', schema=None) as batch_op:
        batch_op.drop_column('handoff_secret_encrypted')
        batch_op.drop_column('handoff_url')
