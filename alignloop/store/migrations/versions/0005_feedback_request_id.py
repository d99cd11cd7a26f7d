"""feedback: request_id, the X-Request-Id of the HTTP request that carried it

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04
"""

from alembic import op
import sqlalchemy as sa

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable, no default: adding it rewrites no existing row, and feedback stored before it stays NULL.
    with op.batch_alter_table('feedback', schema=None) as batch_op:
        batch_op.add_column(sa.Column('request_id', sa.String(length=128), nullable=True))
        batch_op.create_index(batch_op.f('ix_feedback_request_id'), ['request_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('feedback', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_feedback_request_id'))
        batch_op.drop_column('request_id')
