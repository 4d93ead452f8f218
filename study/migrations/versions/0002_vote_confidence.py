"""Votes carry the voter's confidence (1–5), as HPIR weighs its retrieval judgements.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # batch mode, because SQLite cannot add a CHECK constraint to an existing table in place.
    with op.batch_alter_table("votes") as batch:
        batch.add_column(sa.Column("confidence", sa.SmallInteger(), nullable=True))
        batch.create_check_constraint("confidence", "confidence BETWEEN 1 AND 5")


def downgrade() -> None:
    with op.batch_alter_table("votes") as batch:
        batch.drop_constraint(op.f("ck_votes_confidence"), type_="check")
        batch.drop_column("confidence")
