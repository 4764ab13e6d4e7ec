"""Conversations and their items (issue 18).

A conversation's items are rows numbered by `position` (the order clients see). A turn's
items (a response that names the conversation) are inserted by that response's terminal
transition, in its transaction: exactly once. `next_position` is the next free number,
and the conversation's version: every change of its items moves it (a deletion too), so
a turn's create can check that the items it starts from are still the conversation's.
`turn` is the response of the turn in progress (one at a time, as OpenAI: a second is
refused), set by its create and cleared by its terminal transition.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"


def upgrade() -> None:
    op.create_table(
        "conversations",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("tenant", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("metadata", sa.LargeBinary, nullable=False),
        sa.Column("next_position", sa.Integer, nullable=False, server_default="0"),
        sa.Column("turn", sa.Text),
    )
    op.create_table(
        "conversation_items",
        sa.Column("conversation_id", sa.Text, primary_key=True),
        sa.Column("position", sa.Integer, primary_key=True),
        sa.Column("item_id", sa.Text, nullable=False),
        sa.Column("response_id", sa.Text),  # the turn that added it (None: items.create)
        sa.Column("data", sa.LargeBinary, nullable=False),
        sqlite_with_rowid=False,
    )
    op.create_index(
        "conversation_items_by_id", "conversation_items", ["conversation_id", "item_id"]
    )


def downgrade() -> None:
    op.drop_table("conversation_items")
    op.drop_table("conversations")
