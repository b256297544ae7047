"""Calls on every backend: two durable commits per call, and what happens to
reply slots (cleared by the caller's next enqueue, by a timeout or a
cancellation; never re-created by a consumer once cleared).

The caller's side runs on a thin wrapper around the real backend that counts
the transactions that write (and can inject spurious watch wake-ups); the
consumer runs on the unwrapped database.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import pytest

import dgen
from dgen.queue import TenantKeys
from dgen.store import CommitUnknownError, Database, KeyValue, Transaction, Watch

pytestmark = pytest.mark.anyio

WAIT = 30.0  # hang guard for things that must happen
BIG = 250_000  # over the 100 kB value limit: a chunked reply


@pytest.fixture
async def db(store_url: str) -> AsyncIterator[Database]:
    async with dgen.connect(store_url) as database:
        yield database


class CountingTransaction(Transaction):
    """Delegates to a real transaction; remembers whether it wrote."""

    def __init__(self, outer: CountingDatabase, inner: Transaction) -> None:
        self.outer, self.inner = outer, inner
        self.wrote = False
        self.watches: list[Watch] = []

    async def get(self, key: bytes, *, snapshot: bool = False) -> bytes | None:
        return await self.inner.get(key, snapshot=snapshot)

    async def get_range(
        self, begin: bytes, end: bytes, *, limit: int = 0, reverse: bool = False,
        snapshot: bool = False,
    ) -> list[KeyValue]:  # fmt: skip
        return await self.inner.get_range(
            begin, end, limit=limit, reverse=reverse, snapshot=snapshot
        )

    def add_read_conflict_range(self, begin: bytes, end: bytes) -> None:
        self.inner.add_read_conflict_range(begin, end)

    def set(self, key: bytes, value: bytes) -> None:
        self.wrote = True
        self.inner.set(key, value)

    def clear(self, key: bytes) -> None:
        self.wrote = True
        self.inner.clear(key)

    def clear_range(self, begin: bytes, end: bytes) -> None:
        self.wrote = True
        self.inner.clear_range(begin, end)

    def add(self, key: bytes, delta: int) -> None:
        self.wrote = True
        self.inner.add(key, delta)

    def set_versionstamped_key(self, key: bytes, offset: int, value: bytes) -> None:
        self.wrote = True
        self.inner.set_versionstamped_key(key, offset, value)

    def get_versionstamp(self) -> Awaitable[bytes]:
        return self.inner.get_versionstamp()

    def watch(self, key: bytes) -> Watch:
        watch = self.inner.watch(key)
        self.watches.append(watch)
        return watch

    async def commit(self) -> None:
        if self.wrote and self.outer.faults:
            fault = self.outer.faults.pop(0)
            if fault == "applied":
                await self.inner.commit()
            else:
                await self.inner.rollback()
            raise CommitUnknownError(f"injected: commit {fault}, outcome unknown")
        await self.inner.commit()
        if self.wrote:
            self.outer.write_commits += 1
        else:
            self.outer.read_commits += 1
        for watch in self.watches:
            if self.outer.spurious > 0:
                self.outer.spurious -= 1
                watch._fire()  # an injected spurious wake-up (the contract allows them)

    async def rollback(self) -> None:
        await self.inner.rollback()


class CountingDatabase(Database):
    def __init__(self, inner: Database, spurious: int = 0, faults: list[str] | None = None) -> None:
        self.inner = inner
        self.faults = faults or []
        self.limits = inner.limits
        self.capabilities = inner.capabilities
        self.write_commits = 0
        self.read_commits = 0
        self.spurious = spurious

    def create_transaction(self) -> CountingTransaction:
        return CountingTransaction(self, self.inner.create_transaction())

    async def aclose(self) -> None:
        pass  # the inner database belongs to the fixture


class Echo(dgen.DGenServer):
    """Counts messages; replies with what was asked for. ``("hold", x)``
    waits for :attr:`gate` inside the consuming transaction."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.holding = asyncio.Event()

    def init(self, arg: Any) -> Any:
        return 0

    def handle_cast(self, message: Any, state: Any) -> Any:
        return dgen.NoReply(state + 1)

    async def handle_call(self, request: Any, caller: dgen.Caller, state: Any) -> Any:
        if isinstance(request, tuple) and request[0] == "hold":
            self.holding.set()
            await self.gate.wait()
            request = request[1]
        if request == "count":
            return dgen.Reply(state + 1, state + 1)
        if request == "big":
            return dgen.Reply(b"r" * BIG, state + 1)
        return dgen.Reply(request, state + 1)


async def slot_keys(db: Database, tenant: str) -> list[bytes]:
    """Every key under the tenant's reply slots (main keys and chunks)."""
    keys = TenantKeys(tenant)

    async def read(tr: Transaction) -> list[bytes]:
        return [k for k, _ in await tr.get_range(keys.replies_begin, keys.replies_end)]

    return await db.run(read)


async def eventually(check: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def test_a_call_commits_once_on_the_caller_side(db: Database) -> None:
    counting = CountingDatabase(db)
    h = dgen.handle(counting, "one")
    async with dgen.start(Echo(), db, "one"):
        for i in range(1, 21):
            assert await h.call("count", timeout=WAIT) == i
    # One write per call (the enqueue, carrying the previous slot's clear).
    assert counting.write_commits == 20
    if type(db).__module__.endswith(".fdb"):
        # Its watches carry no value: each reply is read in a transaction
        # that writes nothing.
        assert counting.read_commits >= 20
    else:
        # The consumer's commit fired the caller's watch with the reply in
        # it (Watch.value): nothing is read after the wake-up.
        assert counting.read_commits == 0


@dataclasses.dataclass(eq=True)
class _Unhashable(Database):
    """A user's wrapper: a dataclass compares by value, so it has no hash."""

    inner: Database

    def __post_init__(self) -> None:
        self.limits = self.inner.limits
        self.capabilities = self.inner.capabilities

    def create_transaction(self) -> Transaction:
        return self.inner.create_transaction()

    async def aclose(self) -> None:
        pass  # the inner database belongs to the fixture


async def test_a_database_need_not_be_hashable(db: Database) -> None:
    wrapped = _Unhashable(db)
    with pytest.raises(TypeError):
        hash(wrapped)
    async with dgen.start(Echo(), wrapped, "unhashable") as running:
        for i in range(3):
            assert await running.call(i, timeout=WAIT) == i


async def test_a_call_costs_the_consumer_one_transaction(db: Database) -> None:
    h = dgen.handle(db, "lean")
    async with dgen.start(Echo(), db, "lean") as running:
        assert await h.call("warm", timeout=WAIT) == "warm"
        before = running.stats.transactions
        for i in range(20):
            assert await h.call(i, timeout=WAIT) == i
        # The consume transaction that emptied the queue armed the next wake-up
        # itself: no idle read-only transaction per call (that made it 40).
        # Some slack for a backend's spurious wake-ups.
        assert running.stats.transactions - before <= 25


async def test_a_finished_slot_is_cleared_by_the_next_enqueue(db: Database) -> None:
    h = dgen.handle(db, "next")
    async with dgen.start(Echo(), db, "next") as running:
        assert await h.call("a", timeout=WAIT) == "a"
        first = await slot_keys(db, "next")
        assert len(first) == 1  # the finished call's slot, holding its reply
        assert await h.call("b", timeout=WAIT) == "b"
        second = await slot_keys(db, "next")
        assert len(second) == 1 and second != first  # the first one was cleared
        await h.cast("c")
        assert await slot_keys(db, "next") == []
        assert await running.call("count", timeout=WAIT) == 4  # the cast was applied
    await running.clear_finished()  # the last call's slot (unless leaving the block did it)
    assert await slot_keys(db, "next") == []


async def test_many_calls_leave_no_more_slots_than_are_in_flight(db: Database) -> None:
    h = dgen.handle(db, "many")
    async with dgen.start(Echo(), db, "many"):
        for i in range(30):
            assert await h.call(i, timeout=WAIT) == i
        assert len(await slot_keys(db, "many")) == 1
        results = await asyncio.gather(*(h.call(i, timeout=WAIT) for i in range(10)))
        assert results == list(range(10))
        assert 1 <= len(await slot_keys(db, "many")) <= 11
        assert await h.call("last", timeout=WAIT) == "last"
        assert len(await slot_keys(db, "many")) == 1
    assert await h.clear_finished() == 1
    assert await h.clear_finished() == 0
    assert await slot_keys(db, "many") == []


async def test_concurrent_calls_clear_different_finished_slots(db: Database) -> None:
    h = dgen.handle(db, "waves")
    async with dgen.start(Echo(), db, "waves"):
        for _ in range(3):
            results = await asyncio.gather(*(h.call(i, timeout=WAIT) for i in range(100)))
            assert results == list(range(100))
        # Each wave's enqueues took the previous wave's 100 slots between them
        # (64 + 36), so only the last wave's are left, not a growing backlog.
        assert len(await slot_keys(db, "waves")) == 100


async def test_a_large_reply_is_read_whole_and_its_chunks_cleared(db: Database) -> None:
    h = dgen.handle(db, "big")
    async with dgen.start(Echo(), db, "big"):
        assert await h.call("big", timeout=WAIT) == b"r" * BIG
        assert len(await slot_keys(db, "big")) >= 4  # main key + 3 chunks
        assert await h.call("small", timeout=WAIT) == "small"
        assert len(await slot_keys(db, "big")) == 1  # only the small reply's slot
        assert await h.call("big", timeout=WAIT) == b"r" * BIG
        await h.cast("x")
        assert await slot_keys(db, "big") == []


async def test_spurious_wake_ups_are_waited_out(db: Database) -> None:
    counting = CountingDatabase(db, spurious=3)
    h = dgen.handle(counting, "spur")
    server = Echo()
    async with dgen.start(server, db, "spur"):
        call = asyncio.ensure_future(h.call(("hold", "big"), timeout=WAIT))
        async with asyncio.timeout(WAIT):
            await server.holding.wait()
        # The wake-ups are spent while the reply is held.
        await eventually(lambda: _true(counting.spurious == 0), "the injected wake-ups")
        assert not call.done()
        server.gate.set()
        assert await asyncio.wait_for(call, WAIT) == b"r" * BIG
    # The enqueue, then one read-only transaction per wake-up (3 spurious, 1 real;
    # a backend may add spurious ones of its own).
    assert counting.write_commits == 1
    assert counting.read_commits >= 4


async def _true(value: bool) -> bool:
    return value


async def test_a_timed_out_call_removes_its_slot_and_the_reply_is_dropped(
    db: Database,
) -> None:
    h = dgen.handle(db, "late")
    server = Echo()
    async with dgen.start(server, db, "late") as running:
        assert await h.call("before", timeout=WAIT) == "before"
        call = asyncio.ensure_future(h.call(("hold", "big"), timeout=0.5))
        async with asyncio.timeout(WAIT):
            await server.holding.wait()
        (slot,) = await slot_keys(db, "late")  # the enqueue cleared the finished one
        with pytest.raises(dgen.CallTimeoutError):
            await asyncio.wait_for(call, WAIT)
        assert await slot_keys(db, "late") == []
        server.gate.set()  # the consumer now finds no slot: no reply is written
        assert await running.call("count", timeout=WAIT) == 3  # the held call was applied
        assert [k for k in await slot_keys(db, "late") if k.startswith(slot)] == []


async def test_a_slot_cleared_before_the_consumer_runs_is_not_recreated(db: Database) -> None:
    h = dgen.handle(db, "gone")
    call = asyncio.ensure_future(h.call("big", timeout=0.5))
    with pytest.raises(dgen.CallTimeoutError):
        await asyncio.wait_for(call, WAIT)
    assert await slot_keys(db, "gone") == []
    async with dgen.start(Echo(), db, "gone") as running:
        assert await running.call("count", timeout=WAIT) == 2  # "big" ran first
        await running.clear_finished()
        assert await slot_keys(db, "gone") == []  # the big reply left no chunks


async def test_a_cancelled_call_removes_its_slot(db: Database) -> None:
    h = dgen.handle(db, "cancel")
    call = asyncio.ensure_future(h.call("x", timeout=WAIT))

    async def slot_exists() -> bool:
        return len(await slot_keys(db, "cancel")) == 1

    await eventually(slot_exists, "the reply slot")
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert await slot_keys(db, "cancel") == []
    async with dgen.start(Echo(), db, "cancel") as running:
        assert await running.call("count", timeout=WAIT) == 2
        await running.clear_finished()
        assert await slot_keys(db, "cancel") == []


async def test_a_removed_slot_is_a_reply_lost_error_and_nothing_is_left(db: Database) -> None:
    h = dgen.handle(db, "lost")
    call = asyncio.ensure_future(h.call("x", timeout=WAIT))

    async def slot_exists() -> bool:
        return len(await slot_keys(db, "lost")) == 1

    await eventually(slot_exists, "the reply slot")
    (slot,) = await slot_keys(db, "lost")

    async def remove(tr: Transaction) -> None:
        tr.clear(slot)

    await db.run(remove)
    with pytest.raises(dgen.ReplyLostError):
        await asyncio.wait_for(call, WAIT)
    async with dgen.start(Echo(), db, "lost") as running:
        assert await running.call("count", timeout=WAIT) == 2
        await running.clear_finished()
    assert await slot_keys(db, "lost") == []
    assert await h.clear_finished() == 0  # a lost slot is not remembered


@pytest.mark.parametrize("fault", ["applied", "lost"])
async def test_a_call_whose_commit_outcome_is_unknown_leaves_no_slot(
    db: Database, fault: str
) -> None:
    counting = CountingDatabase(db, faults=[fault])
    h = dgen.handle(counting, "unknown")
    with pytest.raises(CommitUnknownError):
        await h.call("x", timeout=WAIT)
    assert len(await slot_keys(db, "unknown")) == (fault == "applied")
    await h.cast("y")  # clears the slot an applied commit left
    assert await slot_keys(db, "unknown") == []
    async with dgen.start(Echo(), db, "unknown") as running:
        assert await running.call("count", timeout=WAIT) == (3 if fault == "applied" else 2)
        await running.clear_finished()
        assert await slot_keys(db, "unknown") == []  # x's reply found no slot


CALLER = """
import asyncio, sys
import dgen

async def main():
    async with dgen.connect(sys.argv[1]) as db:
        print("calling", flush=True)
        await dgen.handle(db, "crash").call("x", timeout=600)

asyncio.run(main())
"""


async def test_a_killed_callers_slot_is_collected_after_its_deadline(
    db: Database, store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not db.capabilities.cross_process:
        pytest.skip("the store cannot be shared with another process")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CALLER, store_url, env=env, stdout=asyncio.subprocess.PIPE
    )
    try:

        async def slot_exists() -> bool:
            return len(await slot_keys(db, "crash")) == 1

        await eventually(slot_exists, "the caller's slot")
    finally:
        proc.kill()  # SIGKILL: no cancellation, no cleanup
        await proc.wait()
    assert len(await slot_keys(db, "crash")) == 1  # left behind
    # Pretend its deadline (call time + 601 s) is more than the grace period past.
    monkeypatch.setattr(sys.modules["dgen.consumer"], "_REPLY_GRACE_SECONDS", -700)
    async with dgen.start(Echo(), db, "crash") as running:

        async def collected() -> bool:
            return await slot_keys(db, "crash") == []

        await eventually(collected, "the consumer's collection at start")
        monkeypatch.undo()  # (the next collection is a minute away anyway)
        assert await running.call("count", timeout=WAIT) == 2  # "x" ran, its reply dropped
        await running.clear_finished()
        assert await slot_keys(db, "crash") == []
