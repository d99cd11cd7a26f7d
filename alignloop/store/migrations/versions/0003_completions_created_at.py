"""completions: an index on created_at, for the served-per-version counts of a period

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-21
"""

from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index('ix_completions_created_at', 'completions', ['created_at'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_completions_created_at', table_name='completions')
