"""per-bot limits (what one bot may make the service do) and per-bot engine tokens

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 18:20:00
"""

from __future__ import annotations

from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ADD COLUMN, not batch mode: on SQLite a batch copies the table, and the copy would lose
    # AUTOINCREMENT, so a deleted bot's id (which its log keeps) could be given to a new bot.
    # Only the limits an operator set; the others take the release's defaults (shared.bots.Limits).
    op.add_column('bots', sa.Column('limits', sa.JSON(), server_default=sa.text("'{}'"), nullable=False))
    # SHA-256 of the bot's engine token (shown once, at creation or rotation); null: none issued.
    op.add_column('bots', sa.Column('engine_token_hash', sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('bots', schema=None) as batch_op:
        batch_op.drop_column('engine_token_hash')
        batch_op.drop_column('limits')
