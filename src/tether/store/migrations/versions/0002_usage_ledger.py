"""API key of each response, and the usage ledger of terminal responses.

The ledger is written in the same transaction as a response's terminal transition, so it
counts every terminal response exactly once, and outlives the response (delete, retention).

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    # '' (not NULL) for "no key", so the ledger's primary key can hold it.
    with op.batch_alter_table("responses") as batch:
        batch.add_column(sa.Column("key_id", sa.Text, nullable=False, server_default=""))
    op.create_table(
        "usage_ledger",
        sa.Column("tenant", sa.Text, primary_key=True),
        sa.Column("key_id", sa.Text, primary_key=True),
        sa.Column("model", sa.Text, primary_key=True),
        sa.Column("status", sa.Text, primary_key=True),
        sa.Column("responses", sa.Integer, nullable=False),
        sa.Column("input_tokens", sa.Integer, nullable=False),
        sa.Column("output_tokens", sa.Integer, nullable=False),
        sqlite_with_rowid=False,
    )


def downgrade() -> None:
    op.drop_table("usage_ledger")
    with op.batch_alter_table("responses") as batch:
        batch.drop_column("key_id")
