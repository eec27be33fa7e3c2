"""session generation, who shared a worker, answer bytes per job, sign-in throttle

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30

`users.session_gen` is part of the session cookie's user id, so signing out or changing the
password ends every earlier session. `workers.shared_by`/`shared_at` record which admin
shared a worker. `jobs.output_bytes` caps the answer a worker may store. `signin_throttle`
counts failed sign-ins per address and per (email, address), atomically.
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import mysql

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None

TIMESTAMP = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), 'mysql')


def upgrade() -> None:
    with op.batch_alter_table('users', schema=None) as batch_op:
        batch_op.add_column(sa.Column('session_gen', sa.Integer(), server_default='0', nullable=False))
    with op.batch_alter_table('workers', schema=None) as batch_op:
        batch_op.add_column(sa.Column('shared_by', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('shared_at', TIMESTAMP, nullable=True))
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('output_bytes', sa.BigInteger(), server_default='0', nullable=False))
    op.create_table(
        'signin_throttle',
        sa.Column('key_hash', sa.String(length=64), nullable=False),
        sa.Column('failures', sa.Integer(), nullable=False),
        sa.Column('window_start', TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint('key_hash'),
    )
    op.create_index('ix_signin_throttle_window_start', 'signin_throttle', ['window_start'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_signin_throttle_window_start', table_name='signin_throttle')
    op.drop_table('signin_throttle')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('output_bytes')
    with op.batch_alter_table('workers', schema=None) as batch_op:
        batch_op.drop_column('shared_at')
        batch_op.drop_column('shared_by')
    with op.batch_alter_table('users', schema=None) as batch_op:
        batch_op.drop_column('session_gen')
