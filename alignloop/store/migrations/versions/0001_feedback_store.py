"""feedback store: completions, feedback, dead letters

Revision ID: 0001
Revises: 
Create Date: 2026-11-21
"""

from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('completions',
    sa.Column('completion_id', sa.String(length=64), nullable=False),
    sa.Column('response_id', sa.String(length=64), nullable=False),
    sa.Column('choice_index', sa.Integer(), nullable=False),
    sa.Column('api_key_hash', sa.String(length=64), nullable=False),
    sa.Column('prompt_hash', sa.String(length=64), nullable=False),
    sa.Column('messages', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('response_text', sa.Text(), nullable=False),
    sa.Column('finish_reason', sa.String(length=32), nullable=True),
    sa.Column('prompt_tokens', sa.Integer(), nullable=False),
    sa.Column('completion_tokens', sa.Integer(), nullable=False),
    sa.Column('model_name', sa.String(length=128), nullable=False),
    sa.Column('model_version', sa.String(length=32), nullable=False),
    sa.Column('sampling', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('stream', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('ingested_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('completion_id')
    )
    with op.batch_alter_table('completions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_completions_api_key_hash'), ['api_key_hash'], unique=False)
        batch_op.create_index(batch_op.f('ix_completions_prompt_hash'), ['prompt_hash'], unique=False)
        batch_op.create_index(batch_op.f('ix_completions_response_id'), ['response_id'], unique=False)

    op.create_table('dead_letters',
    sa.Column('topic', sa.String(length=255), nullable=False),
    sa.Column('kafka_partition', sa.Integer(), nullable=False),
    sa.Column('kafka_offset', sa.BigInteger(), nullable=False),
    sa.Column('key', sa.LargeBinary(), nullable=True),
    sa.Column('value', sa.LargeBinary(), nullable=True),
    sa.Column('error', sa.Text(), nullable=False),
    sa.Column('ingested_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('topic', 'kafka_partition', 'kafka_offset')
    )
    op.create_table('feedback',
    sa.Column('feedback_id', sa.String(length=64), nullable=False),
    sa.Column('client_feedback_id', sa.String(length=255), nullable=True),
    sa.Column('request_hash', sa.String(length=64), nullable=False),
    sa.Column('api_key_hash', sa.String(length=64), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('completion_id', sa.String(length=64), nullable=False),
    sa.Column('completion_ids', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('thumbs_up', sa.Boolean(), nullable=True),
    sa.Column('rating', sa.Integer(), nullable=True),
    sa.Column('preferred_completion_id', sa.String(length=64), nullable=True),
    sa.Column('comment', sa.Text(), nullable=True),
    sa.Column('correction', sa.Text(), nullable=True),
    sa.Column('fails_instruction', sa.Boolean(), nullable=False),
    sa.Column('hallucination', sa.Boolean(), nullable=False),
    sa.Column('inappropriate', sa.Boolean(), nullable=False),
    sa.Column('prompt_hash', sa.String(length=64), nullable=False),
    sa.Column('model_name', sa.String(length=128), nullable=False),
    sa.Column('model_version', sa.String(length=32), nullable=False),
    sa.Column('model_versions', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('day', sa.String(length=10), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('accepted_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('ingested_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('kafka_partition', sa.Integer(), nullable=False),
    sa.Column('kafka_offset', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('feedback_id')
    )
    with op.batch_alter_table('feedback', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_feedback_api_key_hash'), ['api_key_hash'], unique=False)
        batch_op.create_index(batch_op.f('ix_feedback_completion_id'), ['completion_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_feedback_day'), ['day'], unique=False)
        batch_op.create_index(batch_op.f('ix_feedback_kind'), ['kind'], unique=False)
        batch_op.create_index(batch_op.f('ix_feedback_model_version'), ['model_version'], unique=False)
        batch_op.create_index(batch_op.f('ix_feedback_prompt_hash'), ['prompt_hash'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('feedback', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_feedback_prompt_hash'))
        batch_op.drop_index(batch_op.f('ix_feedback_model_version'))
        batch_op.drop_index(batch_op.f('ix_feedback_kind'))
        batch_op.drop_index(batch_op.f('ix_feedback_day'))
        batch_op.drop_index(batch_op.f('ix_feedback_completion_id'))
        batch_op.drop_index(batch_op.f('ix_feedback_api_key_hash'))

    op.drop_table('feedback')
    op.drop_table('dead_letters')
    with op.batch_alter_table('completions', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_completions_response_id'))
        batch_op.drop_index(batch_op.f('ix_completions_prompt_hash'))
        batch_op.drop_index(batch_op.f('ix_completions_api_key_hash'))

    op.drop_table('completions')
