"""messaging services and number pools: a bot's Messaging Service SID, its further numbers, and bots
without a main-phone-number

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 21:30:00
"""

from __future__ import annotations

from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Every number of every bot, the main ones included, so its primary key keeps any number to one bot.
    op.create_table(
        'bot_numbers',
        sa.Column('number', sa.String(length=20), nullable=False),
        sa.Column('bot_id', sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint('number', name=op.f('pk_bot_numbers')),
    )
    op.create_index(op.f('ix_bot_numbers_bot_id'), 'bot_numbers', ['bot_id'], unique=False)
    op.execute("INSERT INTO bot_numbers (number, bot_id) SELECT main_phone_number, id FROM bots "
               "WHERE main_phone_number IS NOT NULL")
    if op.get_bind().dialect.name == "sqlite":
        _bots_on_sqlite()
        return  # SQLite does not enforce a VARCHAR's length: opt_outs.bot_number takes a service SID as it is
    op.add_column('bots', sa.Column('messaging_service_sid', sa.String(length=34), nullable=True))
    op.create_unique_constraint(op.f('uq_bots_messaging_service_sid'), 'bots', ['messaging_service_sid'])
    op.alter_column('bots', 'main_phone_number', existing_type=sa.String(length=20), nullable=True)
    # An opt-out learnt from a send Twilio picked the number for is kept under the service's SID.
    op.alter_column('opt_outs', 'bot_number', existing_type=sa.String(length=20), type_=sa.String(length=40))


def _bots_on_sqlite() -> None:
    """SQLite cannot drop a NOT NULL without copying the table. The copy keeps AUTOINCREMENT, and
    the counter is put back, so a deleted bot's id (which its log keeps) is never given again."""
    bind = op.get_bind()
    seq = bind.exec_driver_sql("SELECT seq FROM sqlite_sequence WHERE name = 'bots'").scalar()
    with op.batch_alter_table('bots', recreate='always', table_kwargs={'sqlite_autoincrement': True}) as batch:
        batch.add_column(sa.Column('messaging_service_sid', sa.String(length=34), nullable=True))
        batch.alter_column('main_phone_number', existing_type=sa.String(length=20), nullable=True)
        batch.create_unique_constraint(op.f('uq_bots_messaging_service_sid'), ['messaging_service_sid'])
    if seq is not None:
        bind.exec_driver_sql("DELETE FROM sqlite_sequence WHERE name = 'bots'")
        bind.exec_driver_sql("INSERT INTO sqlite_sequence (name, seq) VALUES ('bots', ?)",
                             (max(seq, bind.exec_driver_sql("SELECT COALESCE(MAX(id), 0) FROM bots").scalar()),))


def downgrade() -> None:
    # main_phone_number stays nullable: bots registered with only a messaging service have none.
    with op.batch_alter_table('bots', schema=None) as batch_op:
        batch_op.drop_constraint(op.f('uq_bots_messaging_service_sid'), type_='unique')
        batch_op.drop_column('messaging_service_sid')
    op.drop_index(op.f('ix_bot_numbers_bot_id'), table_name='bot_numbers')
    op.drop_table('bot_numbers')
