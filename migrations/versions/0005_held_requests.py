"""held requests

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-24

The held-request budget: one row per open long-poll or API request, so every process
counts the same open requests, and the row their takers lock.
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import mysql

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None

TABLE = {"mysql_engine": "InnoDB", "mysql_charset": "utf8mb4", "mysql_collate": "utf8mb4_unicode_ci"}
TIMESTAMP = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), 'mysql')


def upgrade() -> None:
    op.create_table('held_requests',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('expires_at', TIMESTAMP, nullable=False),
    sa.Column('created_at', TIMESTAMP, nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_held_requests')),
    **TABLE,
    )
    with op.batch_alter_table('held_requests', schema=None) as batch_op:
        batch_op.create_index('ix_held_kind_expiry', ['kind', 'expires_at'], unique=False)
    settings = sa.table('settings', sa.column('name', sa.String), sa.column('value_json', sa.Text))
    op.bulk_insert(settings, [{"name": "_held_lock", "value_json": "null"}])


def downgrade() -> None:
    op.execute("DELETE FROM settings WHERE name = '_held_lock'")
    op.drop_table('held_requests')
