"""Watches: fire on change and not without one, baseline semantics, cancel,
failure with their transaction, commits from another process, and bursts of
writes that must never leave a watcher asleep (FoundationDB's Watches)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable

import pytest

from dgen.conformance.support import (
    ConformanceStore,
    conformance_test,
    rerun_on_conflict,
    wait_fired,
)
from dgen.store import Database, StoreError, Transaction, Watch, decode_counter, encode_counter

__all__ = [
    "test_watch_fires_on_change",
    "test_watch_does_not_fire_without_change",
    "test_watch_baseline_is_the_transactions_view",
    "test_watch_cancel",
    "test_watch_of_failed_transaction_raises",
    "test_a_fired_watch_carries_the_new_value_or_none",
    "test_watch_burst_never_misses_a_change",
    "test_watch_fires_on_commit_from_another_process",
    "test_watch_burst_from_another_process",
]


async def _watch(db: Database, key: bytes) -> Watch:
    async def fn(tr: Transaction) -> Watch:
        return tr.watch(key)

    return await db.run(fn)


async def _set(db: Database, key: bytes, value: bytes | None) -> None:
    await db.run(_setter(key, value))


@conformance_test()
async def test_watch_fires_on_change(store: ConformanceStore) -> None:
    """A committed watch fires when another connection sets, clears or adds
    to the key, or creates it."""
    db2 = await store.connect()
    key, absent = store.key("w", "k"), store.key("w", "absent")
    await _set(store.db, key, b"v0")

    async def add(tr: Transaction) -> None:
        tr.add(key, 1)

    for what in ("set", "clear", "set after clear", "add"):
        watch = await _watch(store.db, key)
        if what == "add":
            await db2.run(add)
        else:
            await _set(db2, key, {"set": b"v1", "clear": None}.get(what, encode_counter(5)))
        await wait_fired(watch, f"the key changed by {what}")

    watch = await _watch(store.db, absent)
    await _set(db2, absent, b"now present")
    await wait_fired(watch, "a watched absent key was created")


@conformance_test()
async def test_watch_does_not_fire_without_change(store: ConformanceStore) -> None:
    """Writes to other keys, including keys that extend the watched key and
    its neighbours, do not fire a watch (checked after a short wait;
    spurious fires are allowed by the contract but must not be the rule)."""
    db2 = await store.connect()
    key = store.key("w", "k")
    await _set(store.db, key, b"v0")
    watch = await _watch(store.db, key)

    async def others(tr: Transaction) -> None:
        tr.set(key + b"\x00", b"extends the key")
        tr.set(store.key("w", "k", "child"), b"x")
        tr.set(store.key("w", "j"), b"before")
        tr.set(store.key("w", "l"), b"after")
        tr.add(store.key("w", "n"), 1)

    for _ in range(3):
        await db2.run(others)
    await asyncio.sleep(0.3)
    assert not watch.done(), "the watch fired although its key never changed"
    watch.cancel()


@conformance_test()
async def test_watch_baseline_is_the_transactions_view(store: ConformanceStore) -> None:
    """The baseline is the value the watching transaction saw: a change
    committed between its read and its commit fires the watch at once; a
    watch on a key the transaction wrote itself fires on the next change."""
    db2 = await store.connect()
    key = store.key("w", "base")
    await _set(store.db, key, b"v0")

    async def change_after_read() -> Watch:
        tr = store.db.create_transaction()
        try:
            before = await tr.get(key)
            watch = tr.watch(key)
            await _set(db2, key, (before or b"") + b"+")
            await tr.commit()
        finally:
            await tr.rollback()
        return watch

    watch = await rerun_on_conflict(change_after_read)
    await wait_fired(watch, "the key changed between the watching transaction's read and commit")

    async def change_after_snapshot() -> Watch:
        tr = store.db.create_transaction()
        try:
            await tr.get(store.key("w", "other"))  # fixes the snapshot without reading key
            watch = tr.watch(key)
            await _set(db2, key, uuid.uuid4().bytes)
            await tr.commit()
        finally:
            await tr.rollback()
        return watch

    watch = await rerun_on_conflict(change_after_snapshot)
    await wait_fired(watch, "the key changed after the watching transaction's snapshot")

    async def own_write(tr: Transaction) -> Watch:
        tr.set(key, b"mine")
        return tr.watch(key)

    watch = await store.db.run(own_write)
    await _set(db2, key, b"theirs")
    await wait_fired(watch, "the key changed after the transaction wrote and watched it")


@conformance_test()
async def test_watch_cancel(store: ConformanceStore) -> None:
    """A cancelled watch is done and raises CancelledError when awaited; other
    watches on the same key still fire; cancelling before commit is fine."""
    key = store.key("w", "cancel")
    await _set(store.db, key, b"v0")
    cancelled = await _watch(store.db, key)
    kept = await _watch(store.db, key)
    cancelled.cancel()
    assert cancelled.done()
    with pytest.raises(asyncio.CancelledError):
        await cancelled

    async def early(tr: Transaction) -> None:
        tr.watch(key).cancel()

    await store.db.run(early)
    await _set(store.db, key, b"v1")
    await wait_fired(kept, "a watch on a key whose other watch was cancelled")


@conformance_test()
async def test_watch_of_failed_transaction_raises(store: ConformanceStore) -> None:
    """A watch whose transaction is rolled back never becomes active:
    awaiting it raises a StoreError instead of hanging."""
    key = store.key("w", "failed")
    tr = store.db.create_transaction()
    watch = tr.watch(key)
    await tr.rollback()
    with pytest.raises(StoreError):
        await asyncio.wait_for(_awaited(watch), 5)


@conformance_test()
async def test_a_fired_watch_carries_the_new_value_or_none(store: ConformanceStore) -> None:
    """``Watch.value`` of a fired watch is None (not known) or the value the
    change left (callers use it instead of a read): for sets by this and by
    another connection, a clear and an add, with nothing else writing."""
    db2 = await store.connect()
    key = store.key("w", "value")
    await _set(store.db, key, encode_counter(5))

    async def add(tr: Transaction) -> None:
        tr.add(key, 1)

    async def get(tr: Transaction) -> bytes | None:
        return await tr.get(key)

    changes = [
        ("add", store.db, add),
        ("set here", store.db, _setter(key, b"v1")),
        ("set by another connection", db2, _setter(key, b"v2")),
        ("clear", store.db, _setter(key, None)),
        ("set after clear", store.db, _setter(key, b"v3")),
    ]
    for what, db, change in changes:
        watch = await _watch(store.db, key)
        await db.run(change)
        await wait_fired(watch, what)
        now = await store.db.run(get)
        assert watch.value in (None, now), f"{what}: the watch carried {watch.value!r}, not {now!r}"


def _setter(key: bytes, value: bytes | None) -> Callable[[Transaction], Awaitable[None]]:
    async def fn(tr: Transaction) -> None:
        if value is None:
            tr.clear(key)
        else:
            tr.set(key, value)

    return fn


async def _awaited(watch: Watch) -> None:
    await watch


async def _watch_until(db: Database, key: bytes, final: int, writer: str) -> int:
    """Read the counter, watch it, wait; until it reaches ``final``. Returns
    how many watches it took."""
    rounds = 0
    while True:

        async def read_and_watch(tr: Transaction) -> tuple[int, Watch | None]:
            value = decode_counter(await tr.get(key))
            return value, (tr.watch(key) if value < final else None)

        value, watch = await db.run(read_and_watch)
        if watch is None:
            return rounds
        rounds += 1
        await wait_fired(watch, f"the counter stood at {value} of {final} ({writer})")


@conformance_test()
async def test_watch_burst_never_misses_a_change(store: ConformanceStore) -> None:
    """A writer task commits 120 adds, one per transaction, while a watcher
    on another connection loops read, watch, wait: the watcher must reach
    the final value, never left asleep by a missed change."""
    total = 120
    key = store.key("w", "burst")
    db2 = await store.connect()

    async def add(tr: Transaction) -> None:
        tr.add(key, 1)

    async def writer() -> None:
        for i in range(total):
            await store.db.run(add)
            if i % 3 == 0:
                await asyncio.sleep(0)

    watcher = asyncio.ensure_future(_watch_until(db2, key, total, "writer task"))
    await asyncio.sleep(0)
    await writer()
    await watcher


@conformance_test("watches_cross_process")
async def test_watch_fires_on_commit_from_another_process(store: ConformanceStore) -> None:
    """A watch fires when a separate OS process commits a change to its key."""
    key = store.key("xp")
    await _set(store.db, key, b"v0")
    watch = await _watch(store.db, key)
    worker = await store.spawn("set", "xp", b"from another process".hex())
    assert await worker.readline() == "committed"
    await worker.wait()
    await wait_fired(watch, "another process committed a change")


@conformance_test("watches_cross_process")
async def test_watch_burst_from_another_process(store: ConformanceStore) -> None:
    """Another OS process commits 120 adds while this one loops read, watch,
    wait: the watcher must reach the final value."""
    total = 120
    worker = await store.spawn("add", "burst", total)
    assert await worker.readline() == "ready"
    key = store.key("counter", "burst")
    watcher = asyncio.ensure_future(_watch_until(store.db, key, total, "writer process"))
    await asyncio.sleep(0)
    worker.send("go")
    try:
        assert await worker.readline() == "done"
        await worker.wait()
    finally:
        await watcher
