"""completions: cached_tokens, the prompt tokens the policy's engine found in its prefix cache

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06
"""

from alembic import op
import sqlalchemy as sa

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable: rows stored before it stay NULL (unknown), which the usage report counts as none cached.
    with op.batch_alter_table('completions', schema=None) as batch_op:
        batch_op.add_column(sa.Column('cached_tokens', sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('completions', schema=None) as batch_op:
        batch_op.drop_column('cached_tokens')
