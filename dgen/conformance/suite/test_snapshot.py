"""Snapshot reads and explicit read-conflict ranges (FoundationDB's
``tr.snapshot`` and ``add_read_conflict_range``): a transaction can read more
than its outcome depends on and declare only the part it does depend on."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable

from dgen.conformance.support import ConformanceStore, conformance_test
from dgen.store import ConflictError, Database, Transaction

__all__ = [
    "test_snapshot_reads_do_not_conflict",
    "test_snapshot_reads_see_own_writes",
    "test_added_conflict_range_conflicts_inside_only",
    "test_queue_head_pattern",
    "test_concurrent_reads",
]

_Reads = Callable[[Transaction], Awaitable[None]]
_TRIES = 3  # a shared store's other clients may cause a conflict now and then


async def _setup(store: ConformanceStore) -> None:
    async def setup(tr: Transaction) -> None:
        tr.clear_range(*store.range("sn"))
        for i in range(0, 20, 2):  # even keys exist, odd keys do not
            tr.set(store.key("sn", i), b"original")

    await store.db.run(setup)


async def _commits(
    store: ConformanceStore,
    db2: Database,
    reads: _Reads,
    write_at: int,
) -> bool:
    """Run ``reads(tr)`` in a transaction that also reads an unrelated key
    (so its snapshot is taken first), let ``db2`` commit a fresh value at key
    ``write_at``, then write elsewhere and commit: True if it committed."""
    reader = store.db.create_transaction()
    try:
        await reader.get(store.key("sn-anchor"))
        await reads(reader)

        async def write(tr: Transaction) -> None:
            tr.set(store.key("sn", write_at), uuid.uuid4().bytes)

        await db2.run(write)
        reader.set(store.key("sn-out"), b"x")
        try:
            await reader.commit()
        except ConflictError:
            return False
        return True
    finally:
        await reader.rollback()


async def _sometimes_commits(
    store: ConformanceStore, db2: Database, reads: _Reads, write_at: int
) -> bool:
    for _ in range(_TRIES):
        await _setup(store)
        if await _commits(store, db2, reads, write_at):
            return True
    return False


@conformance_test()
async def test_snapshot_reads_do_not_conflict(store: ConformanceStore) -> None:
    """A key or range read with ``snapshot=True`` adds no read conflict: a
    concurrent write inside it does not stop the commit, where the same
    read without ``snapshot`` does."""
    db2 = await store.connect()

    def k(i: int) -> bytes:
        return store.key("sn", i)

    async def snap_get(tr: Transaction) -> None:
        assert await tr.get(k(4), snapshot=True) == b"original"

    async def snap_range(tr: Transaction) -> None:
        rows = await tr.get_range(k(2), k(12), snapshot=True)
        assert [key for key, _ in rows] == [k(i) for i in (2, 4, 6, 8, 10)]

    async def snap_range_limited(tr: Transaction) -> None:
        rows = await tr.get_range(k(0), k(20), limit=3, reverse=True, snapshot=True)
        assert [key for key, _ in rows] == [k(18), k(16), k(14)]

    async def plain_get(tr: Transaction) -> None:
        await tr.get(k(4))

    assert await _sometimes_commits(store, db2, snap_get, 4), "snapshot get conflicted"
    assert await _sometimes_commits(store, db2, snap_range, 5), "snapshot range conflicted"
    assert await _sometimes_commits(store, db2, snap_range_limited, 15), (
        "limited reverse snapshot range conflicted"
    )
    # The control: the same scenario without snapshot must conflict.
    await _setup(store)
    assert not await _commits(store, db2, plain_get, 4), "a plain read did not conflict"


@conformance_test()
async def test_snapshot_reads_see_own_writes(store: ConformanceStore) -> None:
    """Snapshot reads merge the transaction's own writes like plain reads."""
    await _setup(store)

    def k(i: int) -> bytes:
        return store.key("sn", i)

    async def check(tr: Transaction) -> None:
        tr.set(k(3), b"mine")
        tr.clear(k(4))
        tr.set(k(6), b"changed")
        assert await tr.get(k(3), snapshot=True) == b"mine"
        assert await tr.get(k(4), snapshot=True) is None
        rows = await tr.get_range(k(2), k(8), snapshot=True)
        assert rows == [(k(2), b"original"), (k(3), b"mine"), (k(6), b"changed")]
        rows = await tr.get_range(k(2), k(8), limit=2, snapshot=True)
        assert rows == [(k(2), b"original"), (k(3), b"mine")]
        tr.clear_range(*store.range("sn"))

    await store.db.run(check)


@conformance_test()
async def test_added_conflict_range_conflicts_inside_only(store: ConformanceStore) -> None:
    """``add_read_conflict_range(b, e)`` makes the commit conflict with a
    concurrent write to a key in ``[b, e)``, existing or not, exactly as a
    read of that range would; a write outside it does not.
    ``add_read_conflict_key`` covers one key."""
    db2 = await store.connect()

    def k(i: int) -> bytes:
        return store.key("sn", i)

    async def add_range(tr: Transaction) -> None:
        tr.add_read_conflict_range(k(4), k(9))

    async def add_key(tr: Transaction) -> None:
        tr.add_read_conflict_key(k(7))

    for inside in (4, 5, 8):
        await _setup(store)
        assert not await _commits(store, db2, add_range, inside), (
            f"a write at {inside} did not conflict with conflict range [4, 9)"
        )
    for outside in (3, 9, 12):
        assert await _sometimes_commits(store, db2, add_range, outside), (
            f"a write at {outside} conflicted with conflict range [4, 9)"
        )
    await _setup(store)
    assert not await _commits(store, db2, add_key, 7), "conflict key 7 did not conflict"
    assert await _sometimes_commits(store, db2, add_key, 8), "conflict key 7 conflicted at 8"


@conformance_test()
async def test_queue_head_pattern(store: ConformanceStore) -> None:
    """How DGen's consumers read a queue: a snapshot read of up to 16 keys
    that returns fewer, then a conflict range up to the last key used. A
    concurrent append after that key does not conflict (producers never
    stop the consumer); a concurrent change at or before it does."""
    db2 = await store.connect()

    def k(i: int) -> bytes:
        return store.key("sn", i)

    async def consume_through_6(tr: Transaction) -> None:
        rows = await tr.get_range(k(0), k(9), limit=16, snapshot=True)
        assert len(rows) == 5  # keys 0, 2, 4, 6, 8: fewer than the limit
        tr.add_read_conflict_range(k(0), k(6) + b"\x00")
        for key, _ in rows[:4]:
            tr.clear(key)

    assert await _sometimes_commits(store, db2, consume_through_6, 7), (
        "an append after the last consumed key conflicted"
    )
    await _setup(store)
    assert not await _commits(store, db2, consume_through_6, 6), (
        "a change to a consumed key did not conflict"
    )
    await _setup(store)
    assert not await _commits(store, db2, consume_through_6, 1), (
        "an insert before the last consumed key did not conflict"
    )


@conformance_test()
async def test_concurrent_reads(store: ConformanceStore) -> None:
    """Reads awaited together (``asyncio.gather``) each return what they
    return one after another: as the first reads of a transaction, after
    others, merged with its own writes, with and without ``snapshot``; the
    plain ones among them still conflict with a later write."""
    await _setup(store)
    db2 = await store.connect()

    def k(i: int) -> bytes:
        return store.key("sn", i)

    def reads(tr: Transaction) -> list[Awaitable[object]]:
        return [
            tr.get(k(4)),
            tr.get(k(5)),
            tr.get(k(3), snapshot=True),
            tr.get(k(6)),
            tr.get_range(k(0), k(20)),
            tr.get_range(k(2), k(9), limit=2, snapshot=True),
            tr.get_range(k(0), k(20), limit=3, reverse=True),
            tr.get_range(k(20), k(30)),
        ]

    async def one_by_one(tr: Transaction) -> list[object]:
        return [await read for read in reads(tr)]

    expected = await store.db.run(one_by_one)
    assert expected[0] == b"original" and expected[1] is None
    assert len(expected[4]) == 10  # type: ignore[arg-type]

    async def together(tr: Transaction) -> list[object]:
        return list(await asyncio.gather(*reads(tr)))

    assert await store.db.run(together) == expected, "first reads of a transaction, together"

    async def after_others(tr: Transaction) -> list[object]:
        await tr.get(store.key("sn-anchor"))
        return list(await asyncio.gather(*reads(tr)))

    assert await store.db.run(after_others) == expected, "later reads, together"

    async def with_writes(tr: Transaction) -> list[object]:
        tr.set(k(3), b"mine")
        tr.clear(k(6))
        mine = list(await asyncio.gather(*reads(tr)))
        tr.clear(k(3))
        tr.set(k(6), b"original")
        return mine

    mine = await store.db.run(with_writes)
    assert mine[2] == b"mine" and mine[3] is None, "own writes in concurrent point reads"
    rows = mine[4]
    assert isinstance(rows, list) and (k(3), b"mine") in rows and k(6) not in dict(rows)

    # The plain reads of a concurrent batch are read conflicts like any other.
    async def plain_together(tr: Transaction) -> None:
        await asyncio.gather(tr.get(k(3), snapshot=True), tr.get(k(4)), tr.get(k(9)))

    assert not await _commits(store, db2, plain_together, 4), (
        "a concurrent plain read did not conflict"
    )
