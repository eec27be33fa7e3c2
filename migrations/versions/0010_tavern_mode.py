"""tavern mode per API key

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-01

`api_keys.tavern`: requests with this key have their system messages merged, in order,
into one leading system message before a worker sees them (clients such as SillyTavern
send several). A request's `X-Tavern-Mode` header overrides it either way.
"""
from alembic import op
import sqlalchemy as sa

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.add_column(sa.Column('tavern', sa.Boolean(), server_default='0', nullable=False))


def downgrade() -> None:
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.drop_column('tavern')
