"""Conversations in the scaled-out store (`base.Conversations`; shared parts:
`conversations.py`). Items live in PostgreSQL only (no live log: they change rarely).

A turn begins in its response's create transaction (`begin_turn`: the conversation's
`turn`, if free and its version the one read), and its items are added by the statement
that makes its response terminal (`finish_turn`: `pg_sql.FINISH` with one more step,
which also ends the turn), so exactly once. Every change of a conversation's items
updates its row (`next_position`, the version): concurrent changes take its row lock in
turn, and the guards see the row as the last of them left it.
"""

from __future__ import annotations

import functools
from typing import Any

import orjson

from tether.store import pg_sql as sql
from tether.store.base import (
    ConversationChanged,
    ConversationLocked,
    ConversationState,
    UnknownItem,
)
from tether.store.conversations import FREE, conversation_object, item_rows, turn_items
from tether.store.pg_pool import Database

# Append items to a conversation of a tenant with no turn in progress: $1 id, $2 tenant,
# $3 item ids, $4 their JSON. The UPDATE takes the row lock; a concurrent change waits,
# then sees the row as it left it.
ADD = f"""
WITH c AS (
    UPDATE conversations SET next_position = next_position + cardinality($3::text[])
    WHERE id = $1 AND tenant = $2 AND {FREE}
    RETURNING next_position - cardinality($3::text[]) AS first
), i AS (
    INSERT INTO conversation_items (conversation_id, position, item_id, response_id, data)
    SELECT $1, c.first + t.n - 1, t.item_id, NULL, t.data
    FROM c, unnest($3::text[], $4::bytea[]) WITH ORDINALITY AS t(item_id, data, n)
)
SELECT count(*) FROM c
"""


@functools.cache
def finish_turn(first: int) -> str:
    """`pg_sql.FINISH` that also adds a turn's items to its conversation and ends the
    turn: parameters `$first` (the conversation id), `$first+1` (item ids, none for a
    failed turn), `$first+2` (their JSON). Only if the terminal transition won (`u`),
    and only to a conversation of the response's own tenant whose turn it is."""
    cid, ids, data = f"${first}", f"${first + 1}", f"${first + 2}"
    turn = f""", tc AS (
    UPDATE conversations c SET next_position = c.next_position + cardinality({ids}::text[]),
        turn = NULL
    FROM u WHERE c.id = {cid} AND c.tenant = u.tenant AND c.turn = $1
    RETURNING c.next_position - cardinality({ids}::text[]) AS first
), ti AS (
    INSERT INTO conversation_items (conversation_id, position, item_id, response_id, data)
    SELECT {cid}, tc.first + t.n - 1, t.item_id, $1, t.data
    FROM tc, unnest({ids}::text[], {data}::bytea[]) WITH ORDINALITY AS t(item_id, data, n)
)
SELECT count(*) FROM u"""
    head, sep, tail = sql.FINISH.rpartition("\nSELECT count(*) FROM u")
    assert sep, "pg_sql.FINISH ends with its count"
    return head + turn + tail


class PostgresConversations:
    """The `Conversations` part of `PostgresStore`."""

    db: Database

    async def turn_values(
        self, response_id: str, cid: str, snapshot: dict[str, Any], status: str
    ) -> tuple[Any, ...]:
        """The parameters `finish_turn` adds: a response's input items never change after
        its create, so they are read before the terminal statement."""
        inputs: list[dict[str, Any]] = []
        if status != "failed":
            raw = await self.db.query(
                "fetchval", "SELECT input_items FROM response_bodies WHERE id = $1", response_id
            )
            inputs = orjson.loads(raw) if raw is not None else []
        ids, data = item_rows(turn_items(inputs, snapshot, status))
        return (cid, ids, data)

    async def begin_turn(
        self, con: Any, response_id: str, tenant: str, turn: tuple[str, int]
    ) -> None:
        """In a create's transaction: make `response_id` the conversation's turn in
        progress, if none is and its items are still those of the version read."""
        cid, version = turn
        done = await con.fetchval(
            f"UPDATE conversations SET turn = $1 WHERE id = $2 AND tenant = $3 AND {FREE} "
            "AND next_position = $4 RETURNING 1",
            response_id,
            cid,
            tenant,
            version,
        )
        if done:
            return
        free = await con.fetchval(
            f"SELECT {FREE} FROM conversations WHERE id = $1 AND tenant = $2", cid, tenant
        )
        if free is False:
            raise ConversationLocked(cid)
        raise ConversationChanged(cid)

    async def _why_not(self, con: Any, cid: str, tenant: str) -> None:
        """After a guarded change matched nothing: raise if a turn is in progress."""
        if await con.fetchval(
            "SELECT 1 FROM conversations WHERE id = $1 AND tenant = $2", cid, tenant
        ):
            raise ConversationLocked(cid)

    async def conversation_create(
        self, conversation: dict[str, Any], tenant: str, items: list[dict[str, Any]]
    ) -> None:
        ids, data = item_rows(items)
        async with self.db.conn(transaction=True) as con:
            await con.execute(
                "INSERT INTO conversations (id, tenant, created_at, metadata, next_position) "
                "VALUES ($1, $2, $3, $4, 0)",
                conversation["id"],
                tenant,
                float(conversation["created_at"]),
                orjson.dumps(conversation["metadata"]),
            )
            await con.fetchval(ADD, conversation["id"], tenant, ids, data)

    async def conversation_get(self, conversation_id: str, tenant: str) -> dict[str, Any] | None:
        row = await self.db.query(
            "fetchrow",
            "SELECT created_at, metadata FROM conversations WHERE id = $1 AND tenant = $2",
            conversation_id,
            tenant,
        )
        return None if row is None else conversation_object(conversation_id, row[0], row[1])

    async def conversation_update(
        self, conversation_id: str, tenant: str, metadata: dict[str, str]
    ) -> dict[str, Any] | None:
        async with self.db.conn() as con:
            row = await con.fetchrow(
                "UPDATE conversations SET metadata = $3 WHERE id = $1 AND tenant = $2 "
                "RETURNING created_at, metadata",
                conversation_id,
                tenant,
                orjson.dumps(metadata),
            )
        return None if row is None else conversation_object(conversation_id, row[0], row[1])

    async def conversation_delete(self, conversation_id: str, tenant: str) -> bool:
        async with self.db.conn(transaction=True) as con:
            deleted = await con.fetchval(
                "DELETE FROM conversations WHERE id = $1 AND tenant = $2 RETURNING 1",
                conversation_id,
                tenant,
            )
            if deleted:
                await con.execute(
                    "DELETE FROM conversation_items WHERE conversation_id = $1", conversation_id
                )
        return bool(deleted)

    async def conversation_add(
        self, conversation_id: str, tenant: str, items: list[dict[str, Any]]
    ) -> bool:
        ids, data = item_rows(items)
        async with self.db.conn() as con:
            if await con.fetchval(ADD, conversation_id, tenant, ids, data):
                return True
            await self._why_not(con, conversation_id, tenant)
        return False

    async def conversation_state(
        self, conversation_id: str, tenant: str
    ) -> ConversationState | None:
        async with self.db.conn() as con:
            # One statement: the row and its items as of one snapshot.
            rows = await con.fetch(
                f"SELECT c.next_position, CASE WHEN {FREE} THEN NULL ELSE c.turn END, i.data "
                "FROM conversations c LEFT JOIN conversation_items i "
                "ON i.conversation_id = c.id WHERE c.id = $1 AND c.tenant = $2 "
                "ORDER BY i.position",
                conversation_id,
                tenant,
            )
        if not rows:
            return None
        items = [orjson.loads(r[2]) for r in rows if r[2] is not None]
        return ConversationState(items, int(rows[0][0]), rows[0][1])

    async def conversation_items(
        self,
        conversation_id: str,
        tenant: str,
        after: str | None = None,
        limit: int | None = None,
        descending: bool = False,
    ) -> list[dict[str, Any]] | None:
        async with self.db.conn() as con:
            found = await con.fetchval(
                "SELECT 1 FROM conversations WHERE id = $1 AND tenant = $2",
                conversation_id,
                tenant,
            )
            if not found:
                return None
            cursor = None
            if after is not None:
                cursor = await con.fetchval(
                    "SELECT max(position) FROM conversation_items "
                    "WHERE conversation_id = $1 AND item_id = $2",
                    conversation_id,
                    after,
                )
                if cursor is None:
                    raise UnknownItem(after)
            op, order = ("<", "DESC") if descending else (">", "ASC")
            rows = await con.fetch(
                "SELECT data FROM conversation_items WHERE conversation_id = $1 "
                f"AND ($2::bigint IS NULL OR position {op} $2) ORDER BY position {order} "
                "LIMIT $3",
                conversation_id,
                cursor,
                limit,
            )
        return [orjson.loads(r[0]) for r in rows]

    async def conversation_item(
        self, conversation_id: str, tenant: str, item_id: str
    ) -> dict[str, Any] | None:
        raw = await self.db.query(
            "fetchval",
            "SELECT i.data FROM conversation_items i JOIN conversations c "
            "ON c.id = i.conversation_id WHERE c.id = $1 AND c.tenant = $2 AND i.item_id = $3 "
            "ORDER BY i.position DESC LIMIT 1",
            conversation_id,
            tenant,
            item_id,
        )
        return None if raw is None else orjson.loads(raw)

    async def conversation_remove(self, conversation_id: str, tenant: str, item_id: str) -> bool:
        async with self.db.conn(transaction=True) as con:
            # The version moves (a turn read before this must read again; moving it for
            # an item that is not there costs such a turn one more read, nothing else).
            moved = await con.fetchval(
                "UPDATE conversations SET next_position = next_position + 1 "
                f"WHERE id = $1 AND tenant = $2 AND {FREE} RETURNING 1",
                conversation_id,
                tenant,
            )
            if not moved:
                await self._why_not(con, conversation_id, tenant)
                return False
            done = await con.execute(
                "DELETE FROM conversation_items WHERE conversation_id = $1 AND item_id = $2",
                conversation_id,
                item_id,
            )
        return bool(done != "DELETE 0")
