"""provider routing: a job's provider and the worker it is pinned to

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01

`jobs.provider` is the X-Provider (or X-Target-Domain) a request named, lower case; empty
for `auto`. `jobs.pinned_worker_id` is the caller's own worker that X-Session-Name named.
The claim filters on both. Neither is indexed on its own: the claim walks `ix_jobs_claim`
(state, model, rank) as before and checks them on the rows it reads. No foreign key on the
pin: adding one rebuilds the jobs table on SQLite, and a pin to a deleted worker only
leaves its job to expire unclaimed.
"""
from alembic import op
import sqlalchemy as sa

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('provider', sa.String(length=191), server_default='', nullable=False))
        batch_op.add_column(sa.Column('pinned_worker_id', sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('pinned_worker_id')
        batch_op.drop_column('provider')
