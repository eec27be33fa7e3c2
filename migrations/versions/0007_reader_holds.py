"""reader heartbeat on jobs, owner on held requests

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30

The API request that relays a job renews `jobs.reader_expires_at`; the reaper cancels a job
whose reader stopped (its process died). Held requests name their user, so no one user can
hold every slot of the budget.
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import mysql

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None

TIMESTAMP = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), 'mysql')


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('reader_expires_at', TIMESTAMP, nullable=True))
        batch_op.create_index('ix_jobs_reader', ['state', 'reader_expires_at'], unique=False)
    with op.batch_alter_table('held_requests', schema=None) as batch_op:
        batch_op.add_column(sa.Column('user_id', sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('held_requests', schema=None) as batch_op:
        batch_op.drop_column('user_id')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_jobs_reader')
        batch_op.drop_column('reader_expires_at')
