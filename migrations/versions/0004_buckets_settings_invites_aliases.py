"""rate buckets, settings, invites and model aliases

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24

Per-minute rate buckets keep admission fast for heavy users; settings hold what the admin
turns on and off (public sign-up, retention); invites and model aliases are the admin's.
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import mysql

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None

TABLE = {"mysql_engine": "InnoDB", "mysql_charset": "utf8mb4", "mysql_collate": "utf8mb4_unicode_ci"}
TIMESTAMP = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), 'mysql')


def upgrade() -> None:
    op.create_table('rate_buckets',
    sa.Column('subject', sa.String(length=1), nullable=False),
    sa.Column('subject_id', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('minute', sa.DateTime(), nullable=False),
    sa.Column('requests', sa.Integer(), nullable=False),
    sa.Column('tokens', sa.BigInteger(), nullable=False),
    sa.Column('first_at', TIMESTAMP, nullable=False),
    sa.PrimaryKeyConstraint('subject', 'subject_id', 'minute', name=op.f('pk_rate_buckets')),
    **TABLE,
    )
    op.create_table('settings',
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('value_json', sa.Text(), nullable=False),
    sa.PrimaryKeyConstraint('name', name=op.f('pk_settings')),
    **TABLE,
    )
    op.create_table('invites',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('token_hash', sa.String(length=64), nullable=False),
    sa.Column('email', sa.String(length=191), nullable=False),
    sa.Column('tier_id', sa.Integer(), nullable=True),
    sa.Column('created_by', sa.Integer(), nullable=True),
    sa.Column('created_at', TIMESTAMP, nullable=False),
    sa.Column('expires_at', TIMESTAMP, nullable=False),
    sa.Column('used_at', TIMESTAMP, nullable=True),
    sa.Column('used_by', sa.Integer(), nullable=True),
    sa.ForeignKeyConstraint(['tier_id'], ['tiers.id'], name=op.f('fk_invites_tier_id_tiers'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['created_by'], ['users.id'], name=op.f('fk_invites_created_by_users'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['used_by'], ['users.id'], name=op.f('fk_invites_used_by_users'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_invites')),
    sa.UniqueConstraint('token_hash', name=op.f('uq_invites_token_hash')),
    **TABLE,
    )
    op.create_table('model_aliases',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('alias', sa.String(length=191), nullable=False),
    sa.Column('target', sa.String(length=191), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_model_aliases')),
    sa.UniqueConstraint('alias', name=op.f('uq_model_aliases_alias')),
    **TABLE,
    )


def downgrade() -> None:
    op.drop_table('model_aliases')
    op.drop_table('invites')
    op.drop_table('settings')
    op.drop_table('rate_buckets')
