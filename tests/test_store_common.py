"""Parts every store shares (`tether.store.common`): readers waiting for a log to grow."""

from __future__ import annotations

import asyncio

import pytest

from tether.store.common import Waiters

pytestmark = pytest.mark.anyio


async def test_a_commit_wakes_the_readers_behind_it_and_no_other() -> None:
    waiters = Waiters()
    behind = asyncio.ensure_future(waiters.wait("resp_1", 3, 30))
    ahead = asyncio.ensure_future(waiters.wait("resp_1", 5, 30))
    other = asyncio.ensure_future(waiters.wait("resp_2", 0, 30))
    while waiters.waiting("resp_1") < 2 or waiters.waiting("resp_2") < 1:
        await asyncio.sleep(0)
    waiters.wake("resp_1", last=5)  # events up to 5: news for the reader at 3 only
    await asyncio.wait_for(behind, 5)
    assert not ahead.done() and not other.done()
    assert waiters.waiting("resp_1") == 1
    waiters.wake_all()
    await asyncio.wait_for(asyncio.gather(ahead, other), 5)
    assert waiters.waiting("resp_1") == waiters.waiting("resp_2") == 0


async def test_a_wait_ends_at_its_timeout_without_a_commit() -> None:
    waiters = Waiters()
    loop = asyncio.get_running_loop()
    began = loop.time()
    await asyncio.wait_for(waiters.wait("resp_1", 0, 0.05), 5)
    assert loop.time() - began >= 0.05 - 0.005  # the loop's clock rounds to its resolution
    assert waiters.waiting("resp_1") == 0


async def test_a_cancelled_wait_raises_and_leaves_nothing_behind() -> None:
    waiters = Waiters()
    task = asyncio.ensure_future(waiters.wait("resp_1", 0, 30))
    while not waiters.waiting("resp_1"):
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert waiters.waiting("resp_1") == 0
    waiters.wake("resp_1")  # nothing left to wake: no error
