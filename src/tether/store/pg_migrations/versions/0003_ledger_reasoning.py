"""Reasoning tokens in the usage ledger (PostgreSQL).

The same meaning as the SQLite revision: `reasoning_tokens` (a part of `output_tokens`)
is added by the statement that makes a response terminal; rows written before count 0.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"


def upgrade() -> None:
    # A constant default: PostgreSQL (11+) adds the column without rewriting the table.
    op.add_column(
        "usage_ledger",
        sa.Column("reasoning_tokens", sa.BigInteger, nullable=False, server_default="0"),
    )


def downgrade() -> None:
    op.drop_column("usage_ledger", "reasoning_tokens")
