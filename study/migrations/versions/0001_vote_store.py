"""The vote store: systems, participants, blobs, comparisons, votes and per-aspect choices.

Revision ID: 0001
Revises: (none)
Create Date: 2026-11-22
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('blobs',
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('media_type', sa.String(length=64), nullable=False),
    sa.Column('size', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('sha256', name=op.f('pk_blobs'))
    )
    op.create_table('participants',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('pseudonym', sa.String(length=64), nullable=False),
    sa.Column('kind', sa.String(length=8), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.CheckConstraint("kind IN ('human', 'judge')", name=op.f('ck_participants_kind')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_participants')),
    sa.UniqueConstraint('pseudonym', name=op.f('uq_participants_pseudonym'))
    )
    op.create_table('systems',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('task', sa.String(length=32), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('engine', sa.String(length=200), nullable=False),
    sa.Column('config', sa.JSON(), nullable=False),
    sa.Column('version', sa.String(length=64), nullable=False),
    sa.Column('source', sa.String(length=16), nullable=False),
    sa.Column('parent_id', sa.Integer(), nullable=True),
    sa.Column('enabled', sa.Boolean(), nullable=False),
    sa.Column('weight', sa.Float(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.CheckConstraint("source IN ('config', 'trained', 'imported')", name=op.f('ck_systems_source')),
    sa.ForeignKeyConstraint(['parent_id'], ['systems.id'], name=op.f('fk_systems_parent_id_systems')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_systems')),
    sa.UniqueConstraint('task', 'name', name=op.f('uq_systems_task'))
    )
    op.create_table('comparisons',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('token', sa.String(length=64), nullable=False),
    sa.Column('task', sa.String(length=32), nullable=False),
    sa.Column('prompt', sa.Text(), nullable=True),
    sa.Column('system_a_id', sa.Integer(), nullable=False),
    sa.Column('system_b_id', sa.Integer(), nullable=False),
    sa.Column('output_a', sa.String(length=64), nullable=True),
    sa.Column('output_b', sa.String(length=64), nullable=True),
    sa.Column('meta', sa.JSON(), nullable=False),
    sa.Column('participant_id', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('expires_at', sa.DateTime(), nullable=True),
    sa.ForeignKeyConstraint(['output_a'], ['blobs.sha256'], name=op.f('fk_comparisons_output_a_blobs')),
    sa.ForeignKeyConstraint(['output_b'], ['blobs.sha256'], name=op.f('fk_comparisons_output_b_blobs')),
    sa.ForeignKeyConstraint(['participant_id'], ['participants.id'], name=op.f('fk_comparisons_participant_id_participants')),
    sa.ForeignKeyConstraint(['system_a_id'], ['systems.id'], name=op.f('fk_comparisons_system_a_id_systems')),
    sa.ForeignKeyConstraint(['system_b_id'], ['systems.id'], name=op.f('fk_comparisons_system_b_id_systems')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_comparisons')),
    sa.UniqueConstraint('token', name=op.f('uq_comparisons_token'))
    )
    with op.batch_alter_table('comparisons', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_comparisons_task'), ['task'], unique=False)

    op.create_table('votes',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('comparison_id', sa.Integer(), nullable=False),
    sa.Column('choice', sa.String(length=8), nullable=False),
    sa.Column('reason', sa.Text(), nullable=True),
    sa.Column('latency_ms', sa.Integer(), nullable=True),
    sa.Column('participant_id', sa.Integer(), nullable=True),
    sa.Column('counts_for_board', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.CheckConstraint("choice IN ('a', 'b', 'tie', 'both_bad')", name=op.f('ck_votes_choice')),
    sa.ForeignKeyConstraint(['comparison_id'], ['comparisons.id'], name=op.f('fk_votes_comparison_id_comparisons')),
    sa.ForeignKeyConstraint(['participant_id'], ['participants.id'], name=op.f('fk_votes_participant_id_participants')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_votes')),
    sa.UniqueConstraint('comparison_id', name=op.f('uq_votes_comparison_id'))
    )
    with op.batch_alter_table('votes', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_votes_created_at'), ['created_at'], unique=False)

    op.create_table('vote_aspects',
    sa.Column('vote_id', sa.Integer(), nullable=False),
    sa.Column('aspect', sa.String(length=32), nullable=False),
    sa.Column('choice', sa.String(length=8), nullable=False),
    sa.CheckConstraint("choice IN ('a', 'b', 'tie', 'both_bad')", name=op.f('ck_vote_aspects_choice')),
    sa.ForeignKeyConstraint(['vote_id'], ['votes.id'], name=op.f('fk_vote_aspects_vote_id_votes'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('vote_id', 'aspect', name=op.f('pk_vote_aspects'))
    )


def downgrade() -> None:
    op.drop_table('vote_aspects')
    with op.batch_alter_table('votes', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_votes_created_at'))

    op.drop_table('votes')
    with op.batch_alter_table('comparisons', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_comparisons_task'))

    op.drop_table('comparisons')
    op.drop_table('systems')
    op.drop_table('participants')
    op.drop_table('blobs')
