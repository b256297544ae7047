"""Serializable isolation: lost updates, write skew, FoundationDB's Cycle and
ConflictRange workloads, and the retry helper."""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid
from collections.abc import Awaitable, Callable

import pytest

from dgen.conformance.support import ConformanceStore, conformance_test, read_prefix
from dgen.keys import pack, unpack
from dgen.store import ConflictError, Database, Transaction, decode_counter, encode_counter

__all__ = [
    "test_concurrent_increments_lose_nothing",
    "test_write_skew_is_prevented",
    "test_cycle_workload",
    "test_conflict_range_write_inside_conflicts",
    "test_conflict_range_write_outside_does_not_conflict",
    "test_run_retries_conflicts_only",
    "test_real_conflict_is_retried_by_run",
]


@conformance_test()
async def test_concurrent_increments_lose_nothing(store: ConformanceStore) -> None:
    """Tasks on two connections each do read-modify-write increments of one
    counter through db.run (yielding between the read and the write): no
    increment is lost."""
    key = store.key("incr")
    dbs = [store.db, await store.connect()]
    tasks, per_task = 6, 8

    async def increment(tr: Transaction) -> None:
        value = decode_counter(await tr.get(key))
        await asyncio.sleep(0)
        tr.set(key, encode_counter(value + 1))

    async def worker(db: Database) -> None:
        for _ in range(per_task):
            await db.run(increment)

    await asyncio.gather(*(worker(dbs[i % 2]) for i in range(tasks)))

    async def read(tr: Transaction) -> int:
        return decode_counter(await tr.get(key))

    assert await store.db.run(read) == tasks * per_task


class _Barrier:
    """Lets two transactions' first attempts both finish reading before
    either writes. A lock-based backend may block one of them in its reads;
    the wait then times out and the test checks the outcome all the same."""

    def __init__(self, parties: int) -> None:
        self.parties = parties
        self.arrived = 0
        self.event = asyncio.Event()

    async def wait(self) -> None:
        self.arrived += 1
        if self.arrived >= self.parties:
            self.event.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.event.wait(), 1.0)


@conformance_test()
async def test_write_skew_is_prevented(store: ConformanceStore) -> None:
    """Two doctors on call: each transaction reads both flags and takes its
    own doctor off call only if the other is still on. Under serializable
    isolation at least one doctor stays on call."""
    alice, bob = store.key("oncall", "alice"), store.key("oncall", "bob")
    db2 = await store.connect()
    for _ in range(3):

        async def setup(tr: Transaction) -> None:
            tr.set(alice, b"1")
            tr.set(bob, b"1")

        await store.db.run(setup)
        barrier = _Barrier(2)

        def go_off_call(
            me: bytes, barrier: _Barrier = barrier
        ) -> Callable[[Transaction], Awaitable[None]]:
            attempts = 0

            async def fn(tr: Transaction) -> None:
                nonlocal attempts
                attempts += 1
                on_call = [await tr.get(alice), await tr.get(bob)]
                if attempts == 1:
                    await barrier.wait()
                if on_call.count(b"1") >= 2:
                    tr.set(me, b"0")

            return fn

        await asyncio.gather(
            store.db.run(go_off_call(alice)),
            db2.run(go_off_call(bob)),
        )

        async def read(tr: Transaction) -> list[bytes | None]:
            return [await tr.get(alice), await tr.get(bob)]

        flags = await store.db.run(read)
        assert b"1" in flags, f"write skew: both doctors went off call ({flags})"


def _is_one_cycle(nodes: int, links: dict[int, int]) -> bool:
    seen, at = set(), 0
    for _ in range(nodes):
        if at in seen or at not in links:
            return False
        seen.add(at)
        at = links[at]
    return at == 0 and len(seen) == nodes


@conformance_test()
async def test_cycle_workload(store: ConformanceStore) -> None:
    """FoundationDB's Cycle: keys form a ring (i -> i+1); concurrent
    transactions on two connections swap neighbours (a->b->c->d becomes
    a->c->b->d). The ring stays one cycle, both at the end and as seen by
    concurrent checking transactions."""
    nodes = 10
    db2 = await store.connect()

    def node(i: int) -> bytes:
        return store.key("cycle", i)

    async def setup(tr: Transaction) -> None:
        for i in range(nodes):
            tr.set(node(i), pack(((i + 1) % nodes,)))

    await store.db.run(setup)

    async def next_of(tr: Transaction, i: int) -> int:
        value = await tr.get(node(i))
        assert value is not None, f"cycle node {i} vanished"
        target = unpack(value)[0]
        assert isinstance(target, int)
        return target

    async def swap(tr: Transaction, a: int) -> None:
        b = await next_of(tr, a)
        await asyncio.sleep(0)
        c = await next_of(tr, b)
        d = await next_of(tr, c)
        await asyncio.sleep(0)
        tr.set(node(a), pack((c,)))
        tr.set(node(c), pack((b,)))
        tr.set(node(b), pack((d,)))

    async def swapper(db: Database, seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(12):
            a = rng.randrange(nodes)

            async def fn(tr: Transaction, a: int = a) -> None:
                await swap(tr, a)

            await db.run(fn)

    async def links(tr: Transaction) -> dict[int, int]:
        pairs = await tr.get_range(*store.range("cycle"))
        out: dict[int, int] = {}
        for key, value in pairs:
            i, target = unpack(key, len(store.prefix))[1], unpack(value)[0]
            assert isinstance(i, int) and isinstance(target, int)
            out[i] = target
        return out

    done = False
    broken: list[dict[int, int]] = []

    async def checker() -> None:
        while not done:
            seen = await store.db.run(links)
            if not _is_one_cycle(nodes, seen):
                broken.append(seen)
            await asyncio.sleep(0.001)

    check_task = asyncio.ensure_future(checker())
    try:
        await asyncio.gather(*(swapper([store.db, db2][i % 2], i) for i in range(4)))
    finally:
        done = True
        await check_task
    assert not broken, f"a transaction saw a broken ring: {broken[0]}"
    final = await store.db.run(links)
    assert _is_one_cycle(nodes, final), f"the ring is no longer one cycle: {final}"


async def _conflicts(
    store: ConformanceStore,
    db2: Database,
    read_begin: int,
    read_end: int,
    limit: int,
    reverse: bool,
    write_at: int,
) -> bool:
    """Does a transaction that read a range conflict with a concurrent
    commit that wrote key ``write_at``?"""

    def k(i: int) -> bytes:
        return store.key("cr", i)

    reader = store.db.create_transaction()
    try:
        await reader.get_range(k(read_begin), k(read_end), limit=limit, reverse=reverse)

        async def write(tr: Transaction) -> None:
            # A fresh value: rewriting a value the reader saw is no conflict
            # for a backend that validates reads by value.
            tr.set(k(write_at), uuid.uuid4().bytes)

        await db2.run(write)
        reader.set(store.key("cr-out"), b"x")
        try:
            await reader.commit()
        except ConflictError:
            return True
        return False
    except ConflictError:
        return True  # a backend may detect the conflict already at a read
    finally:
        await reader.rollback()


async def _conflict_range_setup(store: ConformanceStore) -> None:
    async def setup(tr: Transaction) -> None:
        tr.clear_range(*store.range("cr"))
        for i in range(0, 20, 2):  # even keys exist, odd keys do not
            tr.set(store.key("cr", i), b"original")

    await store.db.run(setup)


@conformance_test()
async def test_conflict_range_write_inside_conflicts(store: ConformanceStore) -> None:
    """FoundationDB's ConflictRange: a transaction that read a range (with or
    without a limit, either direction) and writes elsewhere must fail to
    commit when a concurrent commit wrote a key inside the part it read,
    whether or not that key existed before."""
    db2 = await store.connect()
    rng = random.Random(3)
    for _ in range(16):
        await _conflict_range_setup(store)
        b = rng.randrange(0, 16)
        e = rng.randrange(b + 2, 20)
        w = rng.randrange(b, e)
        assert await _conflicts(store, db2, b, e, 0, rng.random() < 0.5, w), (
            f"read of keys [{b}, {e}) did not conflict with a concurrent write at {w}"
        )
    await _conflict_range_setup(store)
    # Forward limit 2 from key 4 reads keys 4 and 6: a write at 5 is inside.
    assert await _conflicts(store, db2, 4, 18, 2, False, 5), "limited read, write inside"


async def _never_conflicts(
    store: ConformanceStore,
    db2: Database,
    read_begin: int,
    read_end: int,
    limit: int,
    reverse: bool,
    write_at: int,
) -> bool:
    """True if the scenario commits without conflict in one of three tries:
    other clients of a shared store may cause a conflict now and then."""
    for _ in range(3):
        await _conflict_range_setup(store)
        if not await _conflicts(store, db2, read_begin, read_end, limit, reverse, write_at):
            return True
    return False


@conformance_test()
async def test_conflict_range_write_outside_does_not_conflict(store: ConformanceStore) -> None:
    """ConflictRange, the other half: a concurrent write outside the range a
    transaction read (or beyond the last key a limited read returned) does
    not make it conflict. A backend that conflicts on every concurrent write
    is still correct but fails this test: it is too coarse for many
    independent tenants sharing one store."""
    db2 = await store.connect()
    rng = random.Random(5)
    for _ in range(16):
        b = rng.randrange(2, 14)
        e = rng.randrange(b + 1, 18)
        w = rng.choice([rng.randrange(0, b), rng.randrange(e, 20)])
        assert await _never_conflicts(store, db2, b, e, 0, rng.random() < 0.5, w), (
            f"read of keys [{b}, {e}) conflicted with a concurrent write at {w} outside it"
        )
    # Forward limit 2 from key 4 reads keys 4 and 6 only: a write at 10 is outside.
    assert await _never_conflicts(store, db2, 4, 18, 2, False, 10), "limited read, write beyond"
    # Reverse limit 2 below 18 reads keys 16 and 14 only: a write at 9 is outside.
    assert await _never_conflicts(store, db2, 0, 18, 2, True, 9), "reverse limited read"


@conformance_test()
async def test_run_retries_conflicts_only(store: ConformanceStore) -> None:
    """db.run retries a ConflictError with a fresh transaction, gives up
    after max_attempts, and does not retry other errors."""
    key = store.key("retry")
    attempts = 0

    async def conflict_once(tr: Transaction) -> str:
        nonlocal attempts
        attempts += 1
        tr.set(key, str(attempts).encode())
        if attempts == 1:
            raise ConflictError("simulated conflict")
        return "ok"

    assert await store.db.run(conflict_once) == "ok"
    assert attempts == 2
    assert await read_prefix(store.db, *store.range()) == [(key, b"2")]

    calls = 0

    async def always_conflicts(tr: Transaction) -> None:
        nonlocal calls
        calls += 1
        raise ConflictError("simulated conflict")

    with pytest.raises(ConflictError):
        await store.db.run(always_conflicts, max_attempts=3)
    assert calls == 3

    async def bad(tr: Transaction) -> None:
        nonlocal calls
        calls += 1
        raise KeyError("not a conflict")

    calls = 0
    with pytest.raises(KeyError):
        await store.db.run(bad)
    assert calls == 1


@conformance_test()
async def test_real_conflict_is_retried_by_run(store: ConformanceStore) -> None:
    """A genuine conflict (a concurrent commit to a key the transaction read)
    surfaces as ConflictError and db.run retries it on fresh data."""
    key = store.key("real")
    db2 = await store.connect()

    async def setup(tr: Transaction) -> None:
        tr.set(key, encode_counter(0))

    await store.db.run(setup)
    attempts = 0

    async def bump(tr: Transaction) -> int:
        nonlocal attempts
        attempts += 1
        value = decode_counter(await tr.get(key))
        if attempts == 1:

            async def interfere(tr2: Transaction) -> None:
                tr2.set(key, encode_counter(100))

            await db2.run(interfere)
        tr.set(key, encode_counter(value + 1))
        return value

    assert await store.db.run(bump) == 100
    assert attempts == 2

    async def read(tr: Transaction) -> int:
        return decode_counter(await tr.get(key))

    assert await store.db.run(read) == 101
