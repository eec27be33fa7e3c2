"""worker site, status and image models

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-24

Browser workers say which site they run on and whether they are ready, paused or waiting
for a person, and advertise image models apart from chat models.
"""
from alembic import op
import sqlalchemy as sa

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('workers', schema=None) as batch_op:
        batch_op.add_column(sa.Column('image_models_json', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('site', sa.String(length=191), nullable=False, server_default=''))
        batch_op.add_column(sa.Column('status', sa.String(length=32), nullable=False, server_default=''))
        batch_op.add_column(sa.Column('status_message', sa.String(length=255), nullable=False, server_default=''))


def downgrade() -> None:
    with op.batch_alter_table('workers', schema=None) as batch_op:
        batch_op.drop_column('status_message')
        batch_op.drop_column('status')
        batch_op.drop_column('site')
        batch_op.drop_column('image_models_json')
