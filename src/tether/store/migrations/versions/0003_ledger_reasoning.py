"""Reasoning tokens in the usage ledger.

`reasoning_tokens` (a part of `output_tokens`, as a response's usage counts them) is
added by the same statement as the rest of a row, in the terminal transition's commit.
Rows written before this revision count 0: the thinking of those responses was not
counted apart then.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"


def upgrade() -> None:
    # SQLite adds a NOT NULL column with a default in place (no table copy).
    op.add_column(
        "usage_ledger",
        sa.Column("reasoning_tokens", sa.Integer, nullable=False, server_default="0"),
    )


def downgrade() -> None:
    with op.batch_alter_table("usage_ledger") as batch:
        batch.drop_column("reasoning_tokens")
