"""Conversations in the embedded store (`base.Conversations`; shared parts:
`conversations.py`). Every call runs on the event loop thread, as the rest of the store;
the functions taking `db` run inside the caller's transaction."""

from __future__ import annotations

import sqlite3
from typing import Any

import orjson

from tether.store.base import (
    ConversationChanged,
    ConversationLocked,
    ConversationState,
    UnknownItem,
)
from tether.store.conversations import FREE, conversation_object, item_rows, turn_items, turn_of
from tether.store.sqlite_io import transaction


def insert_items(
    db: sqlite3.Connection,
    cid: str,
    tenant: str,
    items: list[dict[str, Any]],
    response_id: str | None = None,
) -> bool:
    """Append `items` to a conversation of `tenant`: by its turn `response_id`, or (None)
    by a client while no turn is in progress. False: no such conversation."""
    guard = "turn = ?" if response_id is not None else FREE
    row = db.execute(
        "UPDATE conversations SET next_position = next_position + ? "
        f"WHERE id = ? AND tenant = ? AND {guard} RETURNING next_position",
        (len(items), cid, tenant, *((response_id,) if response_id is not None else ())),
    ).fetchone()
    if row is None:
        if response_id is None:
            _why_not(db, cid, tenant)
        return False
    first = row[0] - len(items)
    ids, data = item_rows(items)
    db.executemany(
        "INSERT INTO conversation_items VALUES (?, ?, ?, ?, ?)",
        [(cid, first + n, ids[n], response_id, data[n]) for n in range(len(items))],
    )
    return True


def _why_not(db: sqlite3.Connection, cid: str, tenant: str) -> None:
    """After a guarded change of a conversation matched nothing: raise if it is because
    a turn is in progress (an unknown conversation raises nothing)."""
    row = db.execute(
        "SELECT 1 FROM conversations WHERE id = ? AND tenant = ?", (cid, tenant)
    ).fetchone()
    if row is not None:
        raise ConversationLocked(cid)


def begin_turn(
    db: sqlite3.Connection, response_id: str, tenant: str, turn: tuple[str, int]
) -> None:
    """In a create's transaction: make `response_id` the conversation's turn in
    progress, if none is and its items are still those of the version read."""
    cid, version = turn
    cur = db.execute(
        f"UPDATE conversations SET turn = ? WHERE id = ? AND tenant = ? AND {FREE} "
        "AND next_position = ?",
        (response_id, cid, tenant, version),
    )
    if cur.rowcount == 1:
        return
    row = db.execute(
        f"SELECT next_position, {FREE} FROM conversations WHERE id = ? AND tenant = ?",
        (cid, tenant),
    ).fetchone()
    if row is not None and not row[1]:
        raise ConversationLocked(cid)
    raise ConversationChanged(cid)


def end_turn(
    db: sqlite3.Connection, response_id: str, status: str, snapshot: dict[str, Any]
) -> None:
    """In a terminal transition's transaction: add a turn's items to its conversation
    (if it still exists; a failed turn adds none: `conversations.turn_items`) and end
    the turn."""
    cid = turn_of(snapshot)
    if cid is None:
        return
    row = db.execute(
        "SELECT r.tenant, b.input_items FROM responses r JOIN response_bodies b ON b.id = r.id "
        "WHERE r.id = ?",
        (response_id,),
    ).fetchone()
    if row is None:
        return
    items = turn_items(orjson.loads(row[1]), snapshot, status)
    if items:
        insert_items(db, cid, row[0], items, response_id)
    db.execute("UPDATE conversations SET turn = NULL WHERE id = ? AND turn = ?", (cid, response_id))


class SQLiteConversations:
    """The `Conversations` part of `SQLiteStore`."""

    @property
    def db(self) -> sqlite3.Connection:
        raise NotImplementedError  # the store's connection (`SQLiteStore.db`)

    async def conversation_create(
        self, conversation: dict[str, Any], tenant: str, items: list[dict[str, Any]]
    ) -> None:
        db = self.db
        with transaction(db):
            db.execute(
                "INSERT INTO conversations (id, tenant, created_at, metadata, next_position) "
                "VALUES (?, ?, ?, ?, 0)",
                (
                    conversation["id"],
                    tenant,
                    conversation["created_at"],
                    orjson.dumps(conversation["metadata"]),
                ),
            )
            insert_items(db, conversation["id"], tenant, items)

    async def conversation_get(self, conversation_id: str, tenant: str) -> dict[str, Any] | None:
        row = self.db.execute(
            "SELECT created_at, metadata FROM conversations WHERE id = ? AND tenant = ?",
            (conversation_id, tenant),
        ).fetchone()
        return None if row is None else conversation_object(conversation_id, row[0], row[1])

    async def conversation_update(
        self, conversation_id: str, tenant: str, metadata: dict[str, str]
    ) -> dict[str, Any] | None:
        with transaction(self.db):
            row = self.db.execute(
                "UPDATE conversations SET metadata = ? WHERE id = ? AND tenant = ? "
                "RETURNING created_at, metadata",
                (orjson.dumps(metadata), conversation_id, tenant),
            ).fetchone()
        return None if row is None else conversation_object(conversation_id, row[0], row[1])

    async def conversation_delete(self, conversation_id: str, tenant: str) -> bool:
        db = self.db
        with transaction(db):
            cur = db.execute(
                "DELETE FROM conversations WHERE id = ? AND tenant = ?", (conversation_id, tenant)
            )
            if cur.rowcount:
                db.execute(
                    "DELETE FROM conversation_items WHERE conversation_id = ?", (conversation_id,)
                )
        return cur.rowcount == 1

    async def conversation_add(
        self, conversation_id: str, tenant: str, items: list[dict[str, Any]]
    ) -> bool:
        with transaction(self.db):
            return insert_items(self.db, conversation_id, tenant, items)

    async def conversation_state(
        self, conversation_id: str, tenant: str
    ) -> ConversationState | None:
        db = self.db
        with transaction(db):  # one snapshot of the row and its items
            row = db.execute(
                f"SELECT next_position, CASE WHEN {FREE} THEN NULL ELSE turn END "
                "FROM conversations WHERE id = ? AND tenant = ?",
                (conversation_id, tenant),
            ).fetchone()
            if row is None:
                return None
            rows = db.execute(
                "SELECT data FROM conversation_items WHERE conversation_id = ? ORDER BY position",
                (conversation_id,),
            ).fetchall()
        return ConversationState([orjson.loads(r[0]) for r in rows], row[0], row[1])

    async def conversation_items(
        self,
        conversation_id: str,
        tenant: str,
        after: str | None = None,
        limit: int | None = None,
        descending: bool = False,
    ) -> list[dict[str, Any]] | None:
        db = self.db
        if await self.conversation_get(conversation_id, tenant) is None:
            return None
        where, args = "", tuple[Any, ...]()
        if after is not None:
            row = db.execute(
                "SELECT position FROM conversation_items WHERE conversation_id = ? "
                "AND item_id = ? ORDER BY position DESC LIMIT 1",
                (conversation_id, after),
            ).fetchone()
            if row is None:
                raise UnknownItem(after)
            where, args = f" AND position {'<' if descending else '>'} ?", (row[0],)
        rows = db.execute(
            f"SELECT data FROM conversation_items WHERE conversation_id = ?{where} "
            f"ORDER BY position {'DESC' if descending else 'ASC'} LIMIT ?",
            (conversation_id, *args, -1 if limit is None else limit),
        ).fetchall()
        return [orjson.loads(r[0]) for r in rows]

    async def conversation_item(
        self, conversation_id: str, tenant: str, item_id: str
    ) -> dict[str, Any] | None:
        row = self.db.execute(
            "SELECT i.data FROM conversation_items i JOIN conversations c "
            "ON c.id = i.conversation_id WHERE c.id = ? AND c.tenant = ? AND i.item_id = ? "
            "ORDER BY i.position DESC LIMIT 1",
            (conversation_id, tenant, item_id),
        ).fetchone()
        return None if row is None else orjson.loads(row[0])

    async def conversation_remove(self, conversation_id: str, tenant: str, item_id: str) -> bool:
        db = self.db
        with transaction(db):
            # The version moves (a turn read before this must read again; moving it for
            # an item that is not there costs such a turn one more read, nothing else).
            row = db.execute(
                "UPDATE conversations SET next_position = next_position + 1 "
                f"WHERE id = ? AND tenant = ? AND {FREE} RETURNING 1",
                (conversation_id, tenant),
            ).fetchone()
            if row is None:
                _why_not(db, conversation_id, tenant)
                return False
            cur = db.execute(
                "DELETE FROM conversation_items WHERE conversation_id = ? AND item_id = ?",
                (conversation_id, item_id),
            )
        return cur.rowcount > 0
