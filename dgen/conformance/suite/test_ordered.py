"""Ordered-commit keys (versionstamps): readable after commit, unique,
ordered by commit and by user version, and monotonically visible to a reader
tailing the prefix while writers in several tasks and processes append
(eventsourcing's NonInterleavingNotificationIDs)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable

from dgen.conformance.support import (
    ConformanceStore,
    Worker,
    conformance_test,
    read_prefix,
    rerun_on_conflict,
)
from dgen.keys import Versionstamp, pack, pack_with_versionstamp, unpack
from dgen.store import Database, Transaction

__all__ = [
    "test_versionstamp_readable_after_commit",
    "test_several_stamped_keys_in_one_transaction_follow_user_version",
    "test_the_same_stamped_key_written_twice_keeps_the_last_value",
    "test_stamps_follow_commit_order",
    "test_stamps_agree_with_serial_order",
    "test_monotonic_visibility_concurrent_tasks",
    "test_monotonic_visibility_several_processes",
]


def _stamped(store: ConformanceStore, *items: object, user_version: int = 0) -> tuple[bytes, int]:
    return pack_with_versionstamp(
        (*items, Versionstamp(user_version=user_version)),  # type: ignore[arg-type]
        store.prefix,
    )


def _stamp_of(store: ConformanceStore, key: bytes) -> Versionstamp:
    stamp = unpack(key, len(store.prefix))[-1]
    assert isinstance(stamp, Versionstamp), f"not an ordered-commit key: {key!r}"
    return stamp


@conformance_test()
async def test_versionstamp_readable_after_commit(store: ConformanceStore) -> None:
    """The stamp awaited from get_versionstamp() is the 10 bytes written into
    the key; the key is not readable inside its own transaction and is
    readable after commit."""

    async def scenario() -> bytes:
        tr = store.db.create_transaction()
        try:
            key, offset = _stamped(store, "vs")
            tr.set_versionstamped_key(key, offset, b"payload")
            stamp_future = tr.get_versionstamp()
            assert await tr.get_range(*store.range("vs")) == []
            await tr.commit()
        finally:
            await tr.rollback()
        return await stamp_future

    stamp = await rerun_on_conflict(scenario)
    assert isinstance(stamp, bytes) and len(stamp) == 10
    pairs = await read_prefix(store.db, *store.range("vs"))
    assert pairs == [(store.key("vs", Versionstamp(stamp, 0)), b"payload")]


@conformance_test()
async def test_several_stamped_keys_in_one_transaction_follow_user_version(
    store: ConformanceStore,
) -> None:
    """Keys written by one transaction share its stamp and are ordered by
    user version, whatever order they were written in; other writes of the
    same transaction land too."""
    versions = list(range(8))
    random.Random(1).shuffle(versions)

    async def write(tr: Transaction) -> None:
        tr.set(store.key("plain"), b"p")
        for v in versions:
            key, offset = _stamped(store, "many", user_version=v)
            tr.set_versionstamped_key(key, offset, pack((v,)))

    await store.db.run(write)
    pairs = await read_prefix(store.db, *store.range("many"))
    stamps = [_stamp_of(store, k) for k, _ in pairs]
    assert [s.user_version for s in stamps] == sorted(versions)
    assert len({s.tr_version for s in stamps}) == 1
    assert [unpack(v)[0] for _, v in pairs] == sorted(versions)
    assert (await read_prefix(store.db, store.key("plain"), store.key("plain") + b"\x00")) == [
        (store.key("plain"), b"p")
    ]


@conformance_test()
async def test_the_same_stamped_key_written_twice_keeps_the_last_value(
    store: ConformanceStore,
) -> None:
    """Writing one ordered-commit key (same template, same user version)
    twice in a transaction makes one key, with the last value, as a plain
    key set twice does."""

    async def write(tr: Transaction) -> None:
        for value in (b"first", b"second"):
            key, offset = _stamped(store, "twice", user_version=3)
            tr.set_versionstamped_key(key, offset, value)
        key, offset = _stamped(store, "twice", user_version=4)
        tr.set_versionstamped_key(key, offset, b"other")

    await store.db.run(write)
    pairs = await read_prefix(store.db, *store.range("twice"))
    assert [(_stamp_of(store, k).user_version, v) for k, v in pairs] == [
        (3, b"second"),
        (4, b"other"),
    ]


@conformance_test()
async def test_stamps_follow_commit_order(store: ConformanceStore) -> None:
    """Stamps increase in commit order, not in the order transactions were
    created or wrote their keys: a transaction that sets its key first but
    commits last gets the largest stamp."""
    attempt = 0

    async def race() -> int:
        nonlocal attempt
        attempt += 1
        slow = store.db.create_transaction()
        fast = store.db.create_transaction()
        try:
            key, offset = _stamped(store, "race", attempt)
            slow.set_versionstamped_key(key, offset, b"slow")
            fast.set_versionstamped_key(key, offset, b"fast")
            slow_stamp, fast_stamp = slow.get_versionstamp(), fast.get_versionstamp()
            await fast.commit()
            await slow.commit()
        finally:
            await fast.rollback()
            await slow.rollback()
        assert await fast_stamp < await slow_stamp, "the later commit got the smaller stamp"
        return attempt

    attempt = await rerun_on_conflict(race)
    pairs = await read_prefix(store.db, *store.range("race", attempt))
    assert [v for _, v in pairs] == [b"fast", b"slow"]

    # Sequential transactions: strictly increasing stamps.
    stamps = []
    for i in range(5):

        async def write(tr: Transaction, i: int = i) -> Awaitable[bytes]:
            tr.set_versionstamped_key(*_stamped(store, "seq"), pack((i,)))
            return tr.get_versionstamp()

        stamps.append(await (await store.db.run(write)))
    assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)


@conformance_test()
async def test_stamps_agree_with_serial_order(store: ConformanceStore) -> None:
    """Concurrent tasks on two connections each read-and-increment a counter
    and write an ordered-commit key holding the value read. Serializability
    fixes the commit order to the counter order, so stamps must sort the
    keys by value, with no duplicates."""
    counter = store.key("serial", "n")
    dbs = [store.db, await store.connect()]

    async def append(tr: Transaction) -> None:
        raw = await tr.get(counter)
        n = int(raw) if raw else 0
        await asyncio.sleep(0)
        tr.set(counter, str(n + 1).encode())
        tr.set_versionstamped_key(*_stamped(store, "serial", "log"), pack((n,)))

    async def worker(db: Database) -> None:
        for _ in range(8):
            await db.run(append)

    await asyncio.gather(*(worker(dbs[i % 2]) for i in range(5)))
    pairs = await read_prefix(store.db, *store.range("serial", "log"))
    values = [unpack(v)[0] for _, v in pairs]
    assert values == list(range(40)), f"stamp order disagrees with commit order: {values}"


class _Tail:
    """A reader tailing a prefix: every poll reads the whole prefix in a new
    transaction and checks that nothing appeared behind (or vanished from)
    what an earlier poll saw."""

    def __init__(self, store: ConformanceStore, db: Database) -> None:
        self.store, self.db = store, db
        self.begin, self.end = store.range("log")
        self.seen: list[bytes] = []
        self.polls = 0

    async def poll(self) -> None:
        keys = [k for k, _ in await read_prefix(self.db, self.begin, self.end)]
        self.polls += 1
        assert len(set(keys)) == len(keys)
        old = self.seen
        if keys[: len(old)] != old:
            late = sorted(set(keys[: len(old)]) - set(old))
            lost = sorted(set(old) - set(keys))
            detail = (
                f"key {late[0]!r} appeared behind {old[-1]!r}, which was read earlier"
                if late
                else f"key {lost[0]!r} vanished"
            )
            raise AssertionError(
                f"monotonic visibility violated after {self.polls} polls: {detail}"
            )
        self.seen = keys

    async def run_until(self, finished: asyncio.Future[None]) -> None:
        while not finished.done():
            await self.poll()
            await asyncio.sleep(0)
        await self.poll()


def _check_log(pairs: list[tuple[bytes, bytes]], expected: int) -> None:
    assert len(pairs) == expected, f"expected {expected} ordered keys, found {len(pairs)}"
    # Within one writer, its transactions and user versions appear in order.
    last: dict[object, tuple[int, int]] = {}
    for _, value in pairs:
        writer, t, i = unpack(value)
        assert isinstance(t, int) and isinstance(i, int)
        assert last.get(writer, (-1, -1)) < (t, i), f"writer {writer!r} out of order"
        last[writer] = (t, i)


async def _task_writer(db: Database, store: ConformanceStore, name: str, txs: int) -> None:
    rng = random.Random(name)
    for t in range(txs):

        async def write(tr: Transaction, t: int = t) -> None:
            for i in range(rng.randrange(1, 4)):
                tr.set_versionstamped_key(
                    *_stamped(store, "log", user_version=i), pack((name, t, i))
                )
            # Hold the transaction open across other tasks' commits.
            await asyncio.sleep(rng.random() * 0.003)

        await db.run(write)


@conformance_test()
async def test_monotonic_visibility_concurrent_tasks(store: ConformanceStore) -> None:
    """Writer tasks on two connections append ordered-commit keys (1-3 per
    transaction, each transaction held open for a while) while a reader on a
    third connection tails the prefix: it never sees a new key appear behind
    one it has already read."""
    writers = [store.db, await store.connect()]
    tail = _Tail(store, await store.connect())
    loop = asyncio.get_running_loop()
    finished: asyncio.Future[None] = loop.create_future()

    async def write_all() -> None:
        try:
            await asyncio.gather(
                *(_task_writer(writers[i % 2], store, f"task{i}", 25) for i in range(4))
            )
        finally:
            finished.set_result(None)

    await asyncio.gather(write_all(), tail.run_until(finished))
    pairs = await read_prefix(store.db, tail.begin, tail.end)
    assert [k for k, _ in pairs] == tail.seen
    assert len({_stamp_of(store, k) for k, _ in pairs}) == len(pairs)
    writers_seen = {unpack(v)[0] for _, v in pairs}
    assert writers_seen == {f"task{i}" for i in range(4)}
    _check_log(pairs, len(pairs))


@conformance_test("cross_process")
async def test_monotonic_visibility_several_processes(store: ConformanceStore) -> None:
    """Three OS processes and a task in this one append ordered-commit keys
    (three per transaction) while this process tails the prefix: no key ever
    appears behind one already read, no key is lost, and each transaction's
    keys stay in user-version order."""
    txs, per_tx = 40, 3
    workers: list[Worker] = [await store.spawn("append", f"proc{i}", txs, per_tx) for i in range(3)]
    for w in workers:
        assert await w.readline() == "ready"
    tail = _Tail(store, await store.connect())
    loop = asyncio.get_running_loop()
    finished: asyncio.Future[None] = loop.create_future()

    async def write_all() -> None:
        try:
            for w in workers:
                w.send("go")
            local = asyncio.ensure_future(_task_writer(store.db, store, "local", txs))
            for w in workers:
                assert await w.readline() == "done"
                await w.wait()
            await local
        finally:
            finished.set_result(None)

    await asyncio.gather(write_all(), tail.run_until(finished))
    pairs = await read_prefix(store.db, tail.begin, tail.end)
    assert [k for k, _ in pairs] == tail.seen
    by_writer: dict[object, int] = {}
    for _, value in pairs:
        writer = unpack(value)[0]
        by_writer[writer] = by_writer.get(writer, 0) + 1
    for i in range(3):
        assert by_writer.get(f"proc{i}") == txs * per_tx, f"keys of proc{i} lost: {by_writer}"
    _check_log(pairs, len(pairs))
