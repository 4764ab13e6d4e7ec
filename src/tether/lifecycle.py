"""The life of a response: the only module that decides a state change.

States (docs/contract.md §1): `queued → in_progress → completed | incomplete | failed | cancelled`,
and `queued → cancelled`. Every transition is one compare-and-set in the store; the
store's answer, not this process's memory, says who won.

Cancellation, the one concept to know (docs/cancellation.md):
    `Lifecycle.cancel(id)` cancels the cancel scope of the run that owns the response
    (`tether.runner`). The engine stops at its next token boundary; the run's ending,
    shielded from cancels, closes its open items (status `incomplete`) and commits
    `cancelled` together with a terminal `response.failed` event whose response has
    `status: "cancelled"` and exact usage. If the run has not answered within
    `cancel_timeout`, or no run has started, the cancel fences the run out (new run token:
    its later writes are refused) and commits the same ending itself from what reached the
    log. Only then does `cancel` return, so the reply, every later retrieve and every stream
    agree on status and usage. Whichever terminal transition commits first wins
    (completion racing a cancel included); the loser sees the winner's state. A cancel of a
    cancelled response returns the same object.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import anyio
import orjson

from tether import (
    bounds,
    context,
    conversations,
    metrics,
    reader,
    tool_loop,
    wire,
    wire_items,
    wire_output,
)
from tether.closing import Ending, closing
from tether.config import Settings
from tether.dispatch import Dispatch, LocalDispatch
from tether.engines.base import Engine
from tether.errors import APIError, bad_request, model_not_found, not_found, previous_not_found
from tether.leases import LeaseKeeper
from tether.queueing import Queueing
from tether.run import Progress
from tether.runner import Run, Runner, new_token
from tether.runspec import RunSpec
from tether.store.base import (
    ConversationChanged,
    ConversationLocked,
    ConversationState,
    IdempotencyConflict,
    LogEntry,
    Record,
    Store,
    StoreUnavailable,
)
from tether.store.owners import OwnerLocks
from tether.turns import Message
from tether.webhook_sender import Sender
from tether.worker import Worker

log = logging.getLogger("tether.lifecycle")
T = TypeVar("T")
# Reads of a conversation a turn's create makes at most while its items keep changing
# under it (items added or deleted between the read and the store's create).
MAX_TURN_READS = 20


class Lifecycle:
    """Responses in one process. `workers` is how many runs this process executes at
    once (0: an API replica that only creates, reads and cancels; runs happen in
    `tether worker` processes reached through `dispatch`). Its runs and daemons live in
    `runner`'s task group."""

    def __init__(
        self,
        store: Store,
        engine: Engine,
        settings: Settings,
        dispatch: Dispatch | None = None,
        workers: int | None = None,
        owner: str | None = None,
    ) -> None:
        self.store = store
        self.engine = engine
        self.settings = settings
        self.dispatch = dispatch or LocalDispatch()
        self.owner = owner or new_token()  # this process, in leases
        self.runner = Runner()
        metrics.watch_runs(self.runner.runs)
        if isinstance(self.dispatch, LocalDispatch):
            metrics.watch_queue(self.dispatch.queue.waiting)
        self.models = {m.id for m in engine.models()}
        self.contexts = {m.id: m.context for m in engine.models()}  # tokens, when known
        self.workers = engine.concurrency if workers is None else workers
        self.queue = Queueing(self.dispatch, settings, self.owner)
        self.queued = self.queue.queued  # taken from the queue by `worker`
        self._locks: OwnerLocks | None = None  # the embedded store's owner locks

    @property
    def runs(self) -> dict[str, Run]:
        """The runs going on in this process, by response id."""
        return self.runner.runs

    # --- process life ------------------------------------------------------------------

    async def start(self) -> None:
        await self.store.open()
        self._locks = self.store.owner_locks()
        if self._locks is not None:
            # Held until this process ends: how the next one knows it is gone (§8.7).
            self._locks.hold(self.owner)
        await self.runner.open()
        await self.dispatch.open(self._on_cancel)
        if self.workers:
            await self.engine.start()
            self.runner.daemon(Worker(self).work)
        keeper = LeaseKeeper(
            self.store,
            self.settings,
            self.owner,
            lambda: [*self.runner.runs, *self.queued],
            self._recover,
            self._locks,
        )
        self.runner.daemon(keeper.keep)
        if self.settings.webhook_sender:  # any process delivers the outbox (docs/webhooks.md)
            sender = Sender(self.store.webhooks, self.settings, self.owner)
            self.runner.daemon(sender.run)

    async def stop(self) -> None:
        """Graceful shutdown: runs are stopped (`shutdown`) and given `cancel_timeout` +
        1 s to end their responses `failed`; the tasks still going then are cancelled (and
        awaited), and what they left live is ended `failed` from its log. Queued
        responses wait for a restart (on the embedded store the next process takes them
        at once). The dispatch, engine and store are closed whatever happened before,
        even if a step raised or this call was cancelled."""
        async with contextlib.AsyncExitStack() as stack:
            if self._locks is not None:
                stack.callback(self._locks.release)  # last: after the store closed
            stack.push_async_callback(self.store.close)
            if self.workers:
                stack.push_async_callback(self.engine.close)
            stack.push_async_callback(self.dispatch.close)
            await self.runner.close(grace=self.settings.cancel_timeout + 1)
            if self.runner.cut:
                await self._end_held("The server stopped while generating this response.")

    async def _end_held(self, message: str) -> None:
        """End `failed` every started response this process still holds (its run was
        cancelled at shutdown). Best effort: what is left, a restart recovers."""
        try:
            for rec in await self.store.expired(0.0, [self.owner]):
                if rec.run_token is not None or rec.status != "queued":
                    await self.end(rec.id, rec.tenant, "failed", message)
        except Exception:
            log.exception("ending runs cut short by the shutdown failed")

    def spawn(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Run `fn(*args)` in the background, in the runner's group (`stop` awaits it).
        An exception it ends with is logged: no one else would see it."""
        self.runner.spawn(fn, *args)

    # --- create ------------------------------------------------------------------------

    async def create(
        self,
        req: wire.CreateRequest,
        tenant: str,
        idempotency_key: str | None = None,
        key_id: str | None = None,
        generate: bool = True,
    ) -> Record:
        if req.model not in self.models:
            raise model_not_found(req.model)
        cid = req.conversation_id()
        if cid is None:
            return await self._create(req, tenant, idempotency_key, key_id, generate, None)
        # A turn of a conversation starts from its items as they are when it is stored:
        # if they changed between the read and the store's create, read them again.
        for _ in range(MAX_TURN_READS):
            state = await conversations.state(self.store, cid, tenant)
            try:
                return await self._create(req, tenant, idempotency_key, key_id, generate, state)
            except ConversationChanged:
                continue
        raise conversations.locked("conversation")

    async def _create(
        self,
        req: wire.CreateRequest,
        tenant: str,
        idempotency_key: str | None,
        key_id: str | None,
        generate: bool,
        state: ConversationState | None,
    ) -> Record:
        messages, items = await self.turns(req, tenant, state)
        background = bool(req.background)
        status = "queued" if background else "in_progress"
        rid = wire.new_id("resp")
        echo = wire.echo_fields(req)
        snap = wire.snapshot(echo, id=rid, created_at=int(time.time()), status=status)
        events = [wire.lifecycle_event("created", snap)]
        if background:
            events.append(wire.lifecycle_event("queued", snap))
        spec = RunSpec.of(req, messages, echo)
        spec = await tool_loop.chained(  # MCP: hosts allowed? listings, approvals
            spec, items, req, self.settings.mcp_hosts, lambda rid: self.store.get(rid, tenant)
        )
        # Before anything is stored: a prompt that does not fit is refused (or truncated).
        spec = await context.fit(
            self.engine, self.contexts.get(req.model), req.model, spec, req.truncation
        )
        record = Record(
            id=rid,
            tenant=tenant,
            status=status,
            snapshot=snap,
            run=spec.encode(),
            input_items=items,
            run_token=None,
            owner=self.queue.owner_of_queued(),
            lease_until=self.queue.lease(spec, snap["created_at"]),
            last_seq=-1,
            input_tokens=0,
            finished_at=None,
            key_id=key_id,
        )
        idem = None
        if idempotency_key:
            # Any body, however deep or whatever its numbers, hashes (bounds.digest).
            idem = (idempotency_key, bounds.digest(req.model_dump(exclude_unset=True)))
        turn = None if state is None else (str(req.conversation_id()), state.version)
        try:
            record, created = await self.store.create(record, events, idem, turn)
        except ConversationLocked:
            raise conversations.locked("conversation") from None
        except IdempotencyConflict:
            raise APIError(
                409,
                "This Idempotency-Key was used with a different request body.",
                param="Idempotency-Key",
                code="idempotency_key_reused",
                headers={"x-should-retry": "false"},
            ) from None
        if created and not (generate and not req.prewarm()):
            # A warm-up (WebSocket `generate: false`): a response with no output, to
            # chain from; nothing runs.
            await self.end(record.id, tenant, "completed", None)
            return await self.get(record.id, tenant)
        if created:
            metrics.created()
            try:
                await self.queue.submit(record)
            except StoreUnavailable:
                # Nobody will run it: end it now rather than leave it waiting for a lease.
                with contextlib.suppress(Exception):
                    await self.end(record.id, tenant, "failed", "The response could not be queued.")
                raise
        return record

    async def turns(
        self, req: wire.CreateRequest, tenant: str, state: ConversationState | None = None
    ) -> tuple[list[Message], list[dict[str, Any]]]:
        """The conversation a create with `req` gives the engine (the previous response's
        context, or the conversation's items: `state`, else read now; then this request's
        items with their references resolved), and the request's own input items."""
        cid = req.conversation_id()
        if cid is not None:  # a turn of a conversation (docs/contract.md §9)
            state = state or await conversations.state(self.store, cid, tenant)
            return conversations.turn(state, wire.input_items(req))
        messages = await self.conversation(req.previous_response_id, tenant)
        items = await wire_items.resolve_references(
            wire.input_items(req), req.previous_response_id, lambda rid: self.store.get(rid, tenant)
        )
        return messages + wire.history(items), items

    async def conversation(self, previous_id: str | None, tenant: str) -> list[Message]:
        """The messages a response continuing `previous_id` starts from: that response's
        own context, then its output (Open Responses: prev.input + prev.output)."""
        if previous_id is None:
            return []
        prev = await self.store.get(previous_id, tenant)
        if prev is None:
            raise previous_not_found(previous_id)
        return RunSpec.decode(prev.run).messages + wire.history(prev.snapshot["output"])

    # --- the run (the one writer of a response's log) ------------------------------------

    async def patiently(self, call: Callable[..., Awaitable[T]], *args: Any) -> T:
        """`call(*args)`, riding out a store outage as long as a lease (`reader.patiently`)."""
        return await reader.patiently(call, *args, within=self.settings.lease_timeout)

    def _on_cancel(self, rid: str) -> None:
        """A cancel signal (from this process or another replica)."""
        self.runner.stop(rid, "cancel")

    async def conclude(
        self, rid: str, token: str, snap: dict[str, Any], run: Run, progress: Progress
    ) -> None:
        """The terminal transition a run proposes; the store's CAS says if it wins."""
        error = progress.error
        if error is not None:
            ending: Ending = "failed"
        elif progress.reason == "stop":
            ending = "completed"
        elif progress.reason == "length":
            ending = "incomplete"
        elif run.reason == "cancel":
            ending = "cancelled"
        else:
            ending, error = "failed", "The server stopped while generating this response."
        final = closing(
            snap,
            ending,
            progress.items(),
            progress.done(),
            progress.input_tokens,
            progress.output_tokens,
            error,
            progress.error_code,
            progress.notes,
            progress.reasoning_tokens,
        )
        if await self.patiently(self.store.finish, rid, token, ending, *final):
            metrics.ended(ending, final[0]["usage"])

    # --- endings not decided by a run: cancel timeouts, lost runs ------------------------

    async def end(self, rid: str, tenant: str, ending: Ending, error: str | None) -> None:
        """End a live response from what reached its log, fencing out any run."""
        rec = await self.store.get(rid, tenant)
        if rec is None or rec.status not in wire.LIVE_STATES:
            return
        guard: str | None = None
        if rec.run_token is not None:
            guard = new_token()
            if not await self.store.fence(rid, guard):
                return
            rec = await self.store.get(rid, tenant) or rec
        events = [orjson.loads(e.data) for e in await self.store.read(rid, -1, rec.last_seq)]
        done, still_open = wire_output.replay(events)
        for item in still_open:  # sealed as its run would have (`include`)
            if isinstance(item, wire_output.ReasoningItem):
                item.sealed = "reasoning.encrypted_content" in (
                    (rec.run.get("forward") or {}).get("include") or ()
                )
        snap = {**rec.snapshot, "status": "in_progress"}
        output_tokens = await self.store.output_tokens(rid)
        reasoning = wire_output.reasoning_deltas(events)  # a count of deltas (its docstring)
        final = closing(
            snap,
            ending,
            still_open,
            done,
            rec.input_tokens,
            output_tokens,
            error,
            reasoning_tokens=reasoning,
        )
        if await self.store.finish(rid, guard, ending, *final):
            metrics.ended(ending, final[0]["usage"])

    async def cancel(self, rid: str, tenant: str) -> dict[str, Any]:
        rec = await self.store.get(rid, tenant)
        if rec is None:
            raise not_found(rid)
        deadline = time.monotonic() + self.settings.cancel_timeout
        timer = metrics.CancelTimer(rec.status in wire.LIVE_STATES)
        while rec.status in wire.LIVE_STATES:
            # Ask the run to stop and give it until the deadline to end the response
            # itself (exact usage); then end it from the log, fencing the run out. A run
            # that claims the response meanwhile makes `end` miss: go round again.
            await self._stop_run(rec, deadline)
            await self.end(rid, tenant, "cancelled", None)
            rec = await self.store.get(rid, tenant)
            if rec is None:
                raise not_found(rid)
        timer.stop()
        if rec.status == "cancelled":
            return rec.snapshot
        article = "an" if rec.status == "incomplete" else "a"
        raise APIError(
            400,
            f"Cannot cancel {article} {rec.status} response.",
            param="response_id",
            code="response_not_cancellable",
            headers={"x-should-retry": "false"},
        )

    async def cancel_quietly(self, rid: str, tenant: str) -> None:
        """Cancel for a non-background response's reader that went away (an SSE or
        synchronous client, a WebSocket; docs/contract.md §4.7): one that ended first is fine.

        It runs where nobody would see an exception (a spawned task, a handler whose
        client left), so a store outage is ridden out here: a run in this process is told
        to stop at once (that needs no store; the run then ends the response `cancelled`
        itself once it can write), and the cancel is retried until the lease would have
        run out (`patiently`). If the store stays unreachable longer, the failure is
        logged and the response is left to its lease (docs/contract.md §6.2)."""
        try:
            try:
                await self.cancel(rid, tenant)
            except StoreUnavailable as exc:
                log.warning("cancel of %s waits for the store: %s", rid, exc)
                self._on_cancel(rid)
                await self.patiently(self.cancel, rid, tenant)
        except APIError:
            pass  # it ended first, or is gone
        except StoreUnavailable as exc:
            log.error(
                "cancel of %s given up, the store stayed unreachable (%s); its lease ends it",
                rid,
                exc,
            )

    async def _stop_run(self, rec: Record, deadline: float) -> None:
        """Signal the run of a live response to stop; wait until it ended the response
        or `deadline` passed."""
        rid = rec.id
        run = self.runner.stop(rid, "cancel")
        if run is not None:
            if run.claimed:
                with anyio.move_on_after(max(deadline - time.monotonic(), 0)):
                    await run.done.wait()
            return
        if not self.dispatch.remote or rec.run_token is None:
            return  # nobody runs it: a claim after this is refused by `end`'s finish
        await self.dispatch.cancel(rid)
        while time.monotonic() < deadline:
            # Short waits: the run's closing wake-up may come before this wait begins.
            await self.store.wait(rid, rec.last_seq, min(deadline - time.monotonic(), 0.02))
            fresh = await self.store.get(rid, rec.tenant)
            if fresh is None or fresh.status not in wire.LIVE_STATES:
                return
            rec = fresh

    # --- reading -----------------------------------------------------------------------

    async def get(self, rid: str, tenant: str) -> Record:
        rec = await self.store.get(rid, tenant)
        if rec is None:
            raise not_found(rid)
        return rec

    async def retrieve(self, rid: str, tenant: str) -> dict[str, Any]:
        """The Response object; for a live response, with its output so far."""
        rec = await self.get(rid, tenant)
        if rec.status not in wire.LIVE_STATES:
            return rec.snapshot
        events = [orjson.loads(e.data) for e in await self.store.read(rid, -1, rec.last_seq)]
        done, still_open = wire_output.replay(events)
        output = done + [m.live() for m in still_open]
        return {**rec.snapshot, "output": output}

    async def check_streamable(self, rec: Record) -> None:
        finished = rec.finished_at
        if finished is not None and finished < time.time() - self.settings.retention:
            raise bad_request(
                "This response can no longer be streamed.", "stream", "stream_expired"
            )

    def follow(self, rid: str, tenant: str, after: int) -> AsyncIterator[list[LogEntry]]:
        """Every stream: the log after `after`, then live events, until the terminal one
        (`tether.reader.follow`)."""
        return reader.follow(
            self.store, rid, tenant, after, self.settings.keepalive, self.settings.lease_timeout
        )

    async def wait_done(self, rid: str, tenant: str) -> dict[str, Any]:
        async for _ in self.follow(rid, tenant, -1):
            pass
        return (await self.get(rid, tenant)).snapshot

    async def delete(self, rid: str, tenant: str) -> None:
        rec = await self.get(rid, tenant)
        if rec.status in wire.LIVE_STATES:
            raise bad_request(
                "Cannot delete an in-flight response.", "response_id", "response_in_flight"
            )
        await self.store.delete(rid, tenant)

    # --- leases (docs/contract.md §6.2, `tether.leases`) ------------------------------------

    async def _recover(self, rec: Record, owner_gone: bool = False) -> None:
        """A response whose owner stopped renewing its lease (or is `owner_gone`): re-run
        it if it never started, else end it `failed` so every stream gets its terminal
        event (docs/contract.md §6.2)."""
        if rec.run_token is None and rec.status == "queued":
            lease_until = time.time() + self.settings.lease_timeout
            if await self.store.adopt(
                rec.id, rec.owner, self.queue.owner_of_queued(), lease_until, owner_gone
            ):
                await self.queue.submit(rec)
            return
        await self.end(
            rec.id,
            rec.tenant,
            "failed",
            "The server running this response stopped before it finished.",
        )
