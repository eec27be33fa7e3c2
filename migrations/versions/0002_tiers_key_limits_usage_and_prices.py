"""tiers, key limits, usage and prices

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24

Tiers with request and token limits per sliding window, per-key limits, expiry and model
allow-lists, one usage row per request with daily roll-ups, and per-model prices. Seeds the
three default tiers.
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import mysql

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None

TABLE = {"mysql_engine": "InnoDB", "mysql_charset": "utf8mb4", "mysql_collate": "utf8mb4_unicode_ci"}
# name, priority, max concurrent jobs, requests per minute / hour / day
DEFAULT_TIERS = [
    ("free", 0, 2, 10, 100, 1_000),
    ("premium", 5, 8, 60, 1_000, 10_000),
    ("enterprise", 10, 32, 300, 5_000, 50_000),
]


def upgrade() -> None:
    op.create_table('model_prices',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('model', sa.String(length=191), nullable=False),
    sa.Column('prompt_micros_per_m', sa.BigInteger(), nullable=False),
    sa.Column('completion_micros_per_m', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_model_prices')),
    sa.UniqueConstraint('model', name=op.f('uq_model_prices_model')),
    **TABLE,
    )
    op.create_table('tiers',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('priority', sa.Integer(), nullable=False),
    sa.Column('max_concurrent', sa.Integer(), nullable=True),
    sa.Column('requests_per_minute', sa.Integer(), nullable=True),
    sa.Column('requests_per_hour', sa.Integer(), nullable=True),
    sa.Column('requests_per_day', sa.Integer(), nullable=True),
    sa.Column('tokens_per_minute', sa.Integer(), nullable=True),
    sa.Column('tokens_per_hour', sa.Integer(), nullable=True),
    sa.Column('tokens_per_day', sa.Integer(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_tiers')),
    sa.UniqueConstraint('name', name=op.f('uq_tiers_name')),
    **TABLE,
    )
    tiers = sa.table(
        "tiers",
        sa.column("name", sa.String), sa.column("priority", sa.Integer), sa.column("max_concurrent", sa.Integer),
        sa.column("requests_per_minute", sa.Integer), sa.column("requests_per_hour", sa.Integer),
        sa.column("requests_per_day", sa.Integer),
    )
    op.bulk_insert(tiers, [
        {"name": n, "priority": p, "max_concurrent": c, "requests_per_minute": m, "requests_per_hour": h,
         "requests_per_day": d}
        for n, p, c, m, h, d in DEFAULT_TIERS
    ])
    op.create_table('usage_daily',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('day', sa.Date(), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('api_key_id', sa.Integer(), nullable=False),
    sa.Column('model', sa.String(length=191), nullable=False),
    sa.Column('requests', sa.Integer(), nullable=False),
    sa.Column('errors', sa.Integer(), nullable=False),
    sa.Column('prompt_tokens', sa.BigInteger(), nullable=False),
    sa.Column('completion_tokens', sa.BigInteger(), nullable=False),
    sa.Column('cost_nanos', sa.BigInteger(), nullable=False),
    sa.Column('latency_ms', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_usage_daily_user_id_users'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_usage_daily')),
    sa.UniqueConstraint('day', 'user_id', 'api_key_id', 'model', name=op.f('uq_usage_daily_day_user_id_api_key_id_model')),
    **TABLE,
    )
    with op.batch_alter_table('usage_daily', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_usage_daily_user_id'), ['user_id'], unique=False)

    op.create_table('usage',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('job_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.Column('request_id', sa.String(length=64), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('api_key_id', sa.Integer(), nullable=True),
    sa.Column('worker_id', sa.Integer(), nullable=True),
    sa.Column('model', sa.String(length=191), nullable=False),
    sa.Column('stream', sa.Boolean(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('error_code', sa.String(length=64), nullable=True),
    sa.Column('prompt_tokens', sa.Integer(), nullable=False),
    sa.Column('completion_tokens', sa.Integer(), nullable=False),
    sa.Column('usage_source', sa.String(length=16), nullable=True),
    sa.Column('cost_nanos', sa.BigInteger(), nullable=False),
    sa.Column('latency_ms', sa.Integer(), nullable=True),
    sa.Column('ttft_ms', sa.Integer(), nullable=True),
    sa.Column('settled', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.DateTime().with_variant(mysql.DATETIME(fsp=6), 'mysql'), nullable=False),
    sa.Column('finished_at', sa.DateTime().with_variant(mysql.DATETIME(fsp=6), 'mysql'), nullable=True),
    sa.ForeignKeyConstraint(['api_key_id'], ['api_keys.id'], name=op.f('fk_usage_api_key_id_api_keys'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_usage_job_id_jobs'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_usage_user_id_users'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['worker_id'], ['workers.id'], name=op.f('fk_usage_worker_id_workers'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_usage')),
    sa.UniqueConstraint('job_id', name=op.f('uq_usage_job_id')),
    **TABLE,
    )
    with op.batch_alter_table('usage', schema=None) as batch_op:
        batch_op.create_index('ix_usage_key_time', ['api_key_id', 'created_at'], unique=False)
        batch_op.create_index('ix_usage_settled', ['settled', 'created_at'], unique=False)
        batch_op.create_index('ix_usage_user_time', ['user_id', 'created_at'], unique=False)

    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.add_column(sa.Column('expires_at', sa.DateTime().with_variant(mysql.DATETIME(fsp=6), 'mysql'), nullable=True))
        batch_op.add_column(sa.Column('allowed_models_json', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('requests_per_minute', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('requests_per_hour', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('requests_per_day', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('tokens_per_minute', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('tokens_per_hour', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('tokens_per_day', sa.Integer(), nullable=True))

    with op.batch_alter_table('users', schema=None) as batch_op:
        batch_op.add_column(sa.Column('tier_id', sa.Integer(), nullable=True))
        batch_op.create_foreign_key(batch_op.f('fk_users_tier_id_tiers'), 'tiers', ['tier_id'], ['id'], ondelete='SET NULL')



def downgrade() -> None:
    with op.batch_alter_table('users', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('fk_users_tier_id_tiers'), type_='foreignkey')
        batch_op.drop_column('tier_id')

    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.drop_column('tokens_per_day')
        batch_op.drop_column('tokens_per_hour')
        batch_op.drop_column('tokens_per_minute')
        batch_op.drop_column('requests_per_day')
        batch_op.drop_column('requests_per_hour')
        batch_op.drop_column('requests_per_minute')
        batch_op.drop_column('allowed_models_json')
        batch_op.drop_column('expires_at')

    with op.batch_alter_table('usage', schema=None) as batch_op:
        batch_op.drop_index('ix_usage_user_time')
        batch_op.drop_index('ix_usage_settled')
        batch_op.drop_index('ix_usage_key_time')

    op.drop_table('usage')
    with op.batch_alter_table('usage_daily', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_usage_daily_user_id'))

    op.drop_table('usage_daily')
    op.drop_table('tiers')
    op.drop_table('model_prices')
