"""the system of record: bots, opt-outs, the message log, deliveries, conversations, dead letters

Revision ID: 0001
Revises: 
Create Date: 2026-12-01 15:19:57.582255
"""

from __future__ import annotations

from alembic import op
import sqlalchemy as sa


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('bots',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('account_sid', sa.String(length=64), nullable=False),
    sa.Column('auth_token_encrypted', sa.Text(), nullable=False),
    sa.Column('main_phone_number', sa.String(length=20), nullable=False),
    sa.Column('engine_url', sa.Text(), nullable=True),
    sa.Column('messages_per_second', sa.Float(), nullable=False),
    sa.Column('fallback_message', sa.Text(), nullable=True),
    sa.Column('extra', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.Float(), nullable=False),
    sa.Column('updated_at', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_bots')),
    sa.UniqueConstraint('main_phone_number', name=op.f('uq_bots_main_phone_number')),
    sqlite_autoincrement=True,
    )
    op.create_table('conversations',
    sa.Column('bot_id', sa.Integer(), nullable=False),
    sa.Column('person', sa.String(length=32), nullable=False),
    sa.Column('last_message_id', sa.String(length=64), nullable=False),
    sa.Column('last_at', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('bot_id', 'person', name=op.f('pk_conversations'))
    )
    with op.batch_alter_table('conversations', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_conversations_bot_id_last_at'), ['bot_id', 'last_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_conversations_last_at'), ['last_at'], unique=False)

    op.create_table('dead_letters',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('bot_id', sa.Integer(), nullable=False),
    sa.Column('person', sa.String(length=32), nullable=False),
    sa.Column('text', sa.Text(), nullable=False),
    sa.Column('media_url', sa.Text(), nullable=True),
    sa.Column('error_code', sa.Integer(), nullable=True),
    sa.Column('http_status', sa.Integer(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('reason', sa.String(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('failed_at', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_dead_letters'))
    )
    with op.batch_alter_table('dead_letters', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_dead_letters_failed_at'), ['failed_at'], unique=False)

    op.create_table('deliveries',
    sa.Column('sid', sa.String(length=64), nullable=False),
    sa.Column('bot_id', sa.Integer(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('rank', sa.Integer(), nullable=False),
    sa.Column('error_code', sa.Integer(), nullable=True),
    sa.Column('updated_at', sa.Float(), nullable=False),
    sa.Column('accepted_at', sa.Float(), nullable=True),
    sa.Column('scheduled_at', sa.Float(), nullable=True),
    sa.Column('queued_at', sa.Float(), nullable=True),
    sa.Column('sending_at', sa.Float(), nullable=True),
    sa.Column('sent_at', sa.Float(), nullable=True),
    sa.Column('failed_at', sa.Float(), nullable=True),
    sa.Column('undelivered_at', sa.Float(), nullable=True),
    sa.Column('delivered_at', sa.Float(), nullable=True),
    sa.Column('read_at', sa.Float(), nullable=True),
    sa.Column('canceled_at', sa.Float(), nullable=True),
    sa.PrimaryKeyConstraint('sid', name=op.f('pk_deliveries'))
    )
    with op.batch_alter_table('deliveries', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_deliveries_updated_at'), ['updated_at'], unique=False)

    op.create_table('messages',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('bot_id', sa.Integer(), nullable=False),
    sa.Column('person', sa.String(length=32), nullable=False),
    sa.Column('bot_number', sa.String(length=20), nullable=True),
    sa.Column('direction', sa.String(length=3), nullable=False),
    sa.Column('origin', sa.String(length=16), nullable=False),
    sa.Column('text', sa.Text(), nullable=False),
    sa.Column('media', sa.JSON(), nullable=False),
    sa.Column('sid', sa.String(length=64), nullable=True),
    sa.Column('in_reply_to', sa.String(length=64), nullable=True),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('error_code', sa.Integer(), nullable=True),
    sa.Column('at', sa.Float(), nullable=False),
    sa.Column('updated_at', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_messages')),
    sa.UniqueConstraint('sid', name=op.f('uq_messages_sid'))
    )
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_messages_at'), ['at'], unique=False)
        batch_op.create_index(batch_op.f('ix_messages_bot_id_person_at'), ['bot_id', 'person', 'at'], unique=False)

    op.create_table('opt_outs',
    sa.Column('bot_number', sa.String(length=20), nullable=False),
    sa.Column('person', sa.String(length=32), nullable=False),
    sa.Column('opted_out', sa.Boolean(), nullable=False),
    sa.Column('how', sa.String(length=64), nullable=False),
    sa.Column('at', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('bot_number', 'person', name=op.f('pk_opt_outs'))
    )


def downgrade() -> None:
    op.drop_table('opt_outs')
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_messages_bot_id_person_at'))
        batch_op.drop_index(batch_op.f('ix_messages_at'))

    op.drop_table('messages')
    with op.batch_alter_table('deliveries', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_deliveries_updated_at'))

    op.drop_table('deliveries')
    with op.batch_alter_table('dead_letters', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_dead_letters_failed_at'))

    op.drop_table('dead_letters')
    with op.batch_alter_table('conversations', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_conversations_last_at'))
        batch_op.drop_index(batch_op.f('ix_conversations_bot_id_last_at'))

    op.drop_table('conversations')
    op.drop_table('bots')
