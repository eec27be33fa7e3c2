"""worker features: what a worker relays, and what a job needs of it

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-01

`workers.features_json` is the list of optional features a worker declared in its last
claim (`["logprobs"]`). `jobs.needs` is the features a request needs, space-separated
("" for none, every job until now); the claim lets only a worker that declared them all
take the job. Like `provider`, it is not indexed: the claim walks `ix_jobs_claim` and
checks it on the rows it reads. A later feature is a new value, not a new column.
"""
from alembic import op
import sqlalchemy as sa

revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('workers', schema=None) as batch_op:
        batch_op.add_column(sa.Column('features_json', sa.Text(), nullable=True))
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('needs', sa.String(length=191), server_default='', nullable=False))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('needs')
    with op.batch_alter_table('workers', schema=None) as batch_op:
        batch_op.drop_column('features_json')
