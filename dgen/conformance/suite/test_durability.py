"""Causal visibility between clients (FoundationDB's Sideband) and
durability across close/reopen and across SIGKILL of a writing process."""

from __future__ import annotations

import contextlib

from dgen.conformance.support import ConformanceStore, conformance_test, read_prefix
from dgen.keys import Versionstamp, pack, pack_with_versionstamp, unpack
from dgen.store import Transaction, decode_counter

__all__ = [
    "test_sideband_across_connections",
    "test_sideband_across_processes",
    "test_durable_across_close_and_reopen",
    "test_acknowledged_writes_survive_sigkill",
    "test_commits_survive_connections_coming_and_going",
]


@conformance_test()
async def test_sideband_across_connections(store: ConformanceStore) -> None:
    """A writer commits and tells a reader on another connection out of band;
    the reader's next transaction sees the write."""
    reader = await store.connect()
    key = store.key("sideband")
    for i in range(30):

        async def write(tr: Transaction, i: int = i) -> None:
            tr.set(key, pack((i,)))

        await store.db.run(write)

        async def read(tr: Transaction) -> bytes | None:
            return await tr.get(key)

        assert await reader.run(read) == pack((i,)), f"round {i}: the reader missed the commit"


@conformance_test("cross_process")
async def test_sideband_across_processes(store: ConformanceStore) -> None:
    """A writer process commits values 1..30 and prints each after its
    commit; on reading the line, this process must see that value (or a
    later one)."""
    worker = await store.spawn("sideband", 30)
    key = store.key("sideband")

    async def read(tr: Transaction) -> bytes | None:
        return await tr.get(key)

    for i in range(1, 31):
        assert int(await worker.readline()) == i
        raw = await store.db.run(read)
        assert raw is not None, f"value {i} was acknowledged but not visible"
        seen = unpack(raw)[0]
        assert isinstance(seen, int) and seen >= i, f"saw {seen!r} after {i} was acknowledged"
    await worker.wait()


@conformance_test("durable")
async def test_durable_across_close_and_reopen(store: ConformanceStore) -> None:
    """Data committed before every connection is closed is there after
    reopening: plain keys, counters and ordered-commit keys."""
    db = store.db

    async def write(tr: Transaction) -> None:
        for i in range(50):
            tr.set(store.key("d", i), pack((i,)) * 10)
        tr.add(store.key("n"), 7)
        key, offset = pack_with_versionstamp(("log", Versionstamp()), store.prefix)
        tr.set_versionstamped_key(key, offset, b"ordered")

    await db.run(write)

    async def more(tr: Transaction) -> None:
        tr.clear(store.key("d", 0))
        tr.add(store.key("n"), 1)

    await db.run(more)
    before = await read_prefix(db, *store.range())
    db = await store.reopen()
    after = await read_prefix(db, *store.range())
    assert after == before
    assert len(after) == 49 + 1 + 1
    assert decode_counter(dict(after)[store.key("n")]) == 8


@conformance_test("durable", "cross_process")
async def test_acknowledged_writes_survive_sigkill(store: ConformanceStore) -> None:
    """A process commits two-key transactions and acknowledges each after its
    commit returns; it is killed with SIGKILL mid-stream. Every acknowledged
    transaction survives, and no transaction survives in part."""
    worker = await store.spawn("crash-writer")
    acked = -1
    while acked < 40:
        acked = int(await worker.readline())
    await worker.kill()
    # Its remaining output is what it acknowledged before dying.
    assert worker.proc.stdout is not None
    with contextlib.suppress(ValueError):
        for line in (await worker.proc.stdout.read()).decode().split():
            acked = max(acked, int(line))
    db = await store.reopen()
    a = await read_prefix(db, *store.range("a"))
    b = await read_prefix(db, *store.range("b"))
    a_ids = [unpack(k, len(store.prefix))[1] for k, _ in a]
    b_ids = [unpack(k, len(store.prefix))[1] for k, _ in b]
    assert a_ids == b_ids, "a transaction survived the crash in part"
    assert a_ids == list(range(len(a_ids))), "a gap in the committed sequence"
    assert len(a_ids) >= acked + 1, (
        f"transaction {acked} was acknowledged but only {len(a_ids)} transactions survived"
    )
    assert all(v == pack((i,)) for i, (_, v) in enumerate(b))


@conformance_test("durable", "cross_process")
async def test_commits_survive_connections_coming_and_going(store: ConformanceStore) -> None:
    """While this process keeps one connection and commits through it, more
    connections open here and short-lived worker processes open the store,
    commit and exit. Every acknowledged commit, ours and theirs, is there
    after closing everything and reopening. (Catches, for example, an
    SQLite adapter that opens the database file itself: closing that file
    drops the process's POSIX locks, so another process's last close
    deletes the write-ahead log this process is still writing to.)"""
    db = store.db
    expected = []
    for i in range(3):
        await store.connect()  # another connection in this process, kept open
        worker = await store.spawn("set", f"visitor{i}", b"visited".hex())
        assert await worker.readline() == "committed"
        await worker.wait()
        expected.append(store.key(f"visitor{i}"))

        async def write(tr: Transaction, i: int = i) -> None:
            tr.set(store.key("mine", i), b"acknowledged")

        await db.run(write)
        expected.append(store.key("mine", i))
    db = await store.reopen()
    present = {k for k, _ in await read_prefix(db, *store.range())}
    lost = [k for k in expected if k not in present]
    assert not lost, f"acknowledged commits lost after reopening: {lost}"
