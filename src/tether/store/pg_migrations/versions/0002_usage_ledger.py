"""API key of each response, and the usage ledger of terminal responses (PostgreSQL).

The same meaning as the SQLite revision: the ledger row is updated by the statement
that makes a response terminal, so it counts each terminal response exactly once.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    op.add_column("responses", sa.Column("key_id", sa.Text, nullable=False, server_default=""))
    op.create_table(
        "usage_ledger",
        sa.Column("tenant", sa.Text, primary_key=True),
        sa.Column("key_id", sa.Text, primary_key=True),
        sa.Column("model", sa.Text, primary_key=True),
        sa.Column("status", sa.Text, primary_key=True),
        sa.Column("responses", sa.BigInteger, nullable=False),
        sa.Column("input_tokens", sa.BigInteger, nullable=False),
        sa.Column("output_tokens", sa.BigInteger, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("usage_ledger")
    op.drop_column("responses", "key_id")
