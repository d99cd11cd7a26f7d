"""completions: request_id, the HTTP request's X-Request-Id (a request's answers, by the id its caller logged)

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04
"""

from alembic import op
import sqlalchemy as sa

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable, no default: adding it rewrites no existing row, and rows stored before it stay NULL.
    with op.batch_alter_table('completions', schema=None) as batch_op:
        batch_op.add_column(sa.Column('request_id', sa.String(length=128), nullable=True))
        batch_op.create_index(batch_op.f('ix_completions_request_id'), ['request_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('completions', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_completions_request_id'))
        batch_op.drop_column('request_id')
