"""SQLite group commit: transactions that queue while a commit runs are
written together, in one SQLite transaction (one fsync), in order, each
validated as if committed alone.

To queue them deterministically a test holds SQLite's write lock from a bare
``sqlite3`` connection: the committer then waits on its thread (busy
timeout) with its first group, and the next transactions queue behind it.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import dgen
from dgen.store import ConflictError, Transaction

pytestmark = pytest.mark.anyio

GUARD = 20.0  # seconds: a hang guard, never a measurement


@contextmanager
def write_lock_held(path: Path) -> Iterator[None]:
    raw = sqlite3.connect(path, isolation_level=None)
    raw.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        raw.execute("ROLLBACK")
        raw.close()


async def until(condition: Callable[[], bool]) -> None:
    """Poll the backend's queue (no event to wait on: it is internal state)."""
    async with asyncio.timeout(GUARD):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.001)


async def put(db: dgen.Database, key: bytes, value: bytes) -> None:
    async def body(tr: Transaction) -> None:
        tr.set(key, value)

    await db.run(body)


@pytest.mark.parametrize("commit", ["thread", "inline"])
async def test_concurrent_read_modify_writes_stay_serializable(tmp_path: Path, commit: str) -> None:
    """(inline: the first commit of a loop iteration runs in its task, the
    others of that iteration queue for the committer and form a group)"""
    async with dgen.connect(f"sqlite:///{tmp_path}/g.db?commit={commit}") as db:

        async def increment(tr: Transaction) -> None:
            n = int(await tr.get(b"n") or b"0")
            tr.set(b"n", str(n + 1).encode())

        async def worker(w: int) -> None:
            for i in range(20):
                await db.run(increment)
                await put(db, b"blind-%d-%d" % (w, i), b"x")

        await asyncio.wait_for(asyncio.gather(*(worker(w) for w in range(16))), GUARD)
        assert await db.run(lambda tr: tr.get(b"n")) == b"320"
        blind = await db.run(lambda tr: tr.get_range(b"blind-", b"blind.", limit=0))
        assert len(blind) == 320
        assert db.commit_groups > 0  # the point of the test: they did share commits


async def test_a_member_that_conflicts_fails_alone(tmp_path: Path) -> None:
    path = tmp_path / "g.db"
    async with dgen.connect(f"sqlite:///{path}?busy_timeout=30") as db:
        await put(db, b"k", b"0")
        first, second = db.create_transaction(), db.create_transaction()
        assert await first.get(b"k") == b"0"
        assert await second.get(b"k") == b"0"
        first.set(b"k", b"first")
        second.set(b"k", b"second")
        first.set(b"only-first", b"1")
        second.set(b"only-second", b"1")
        stamp = first.get_versionstamp()
        with write_lock_held(path):
            blocker = asyncio.ensure_future(put(db, b"blocker", b"1"))
            await until(lambda: db._committer is not None and not db._pending)
            commits = asyncio.ensure_future(
                asyncio.gather(first.commit(), second.commit(), return_exceptions=True)
            )
            await until(lambda: len(db._pending) == 2)
        await asyncio.wait_for(blocker, GUARD)
        outcomes = await asyncio.wait_for(commits, GUARD)
        assert outcomes[0] is None
        assert isinstance(outcomes[1], ConflictError)
        assert (db.commit_groups, db.grouped_commits) == (1, 2)

        async def read(tr: Transaction) -> list[bytes | None]:
            return [await tr.get(k) for k in (b"k", b"only-first", b"only-second", b"blocker")]

        assert await db.run(read) == [b"first", b"1", None, b"1"]
        assert len(await stamp) == 10


async def test_group_members_get_distinct_stamps_in_commit_order(tmp_path: Path) -> None:
    path = tmp_path / "g.db"
    async with dgen.connect(f"sqlite:///{path}?busy_timeout=30") as db:
        trs = [db.create_transaction() for _ in range(5)]
        for i, tr in enumerate(trs):
            tr.set_versionstamped_key(b"log-" + b"\xff" * 10, 4, b"%d" % i)
        stamps = [tr.get_versionstamp() for tr in trs]
        with write_lock_held(path):
            blocker = asyncio.ensure_future(put(db, b"blocker", b"1"))
            await until(lambda: db._committer is not None and not db._pending)
            commits = asyncio.ensure_future(asyncio.gather(*(tr.commit() for tr in trs)))
            await until(lambda: len(db._pending) == 5)
        await asyncio.wait_for(asyncio.gather(blocker, commits), GUARD)
        got = [await s for s in stamps]
        assert got == sorted(got) and len(set(got)) == 5
        log = await db.run(lambda tr: tr.get_range(b"log-", b"log.", limit=0))
        assert [value for _, value in log] == [b"0", b"1", b"2", b"3", b"4"]
        assert [key[4:] for key, _ in log] == got


async def test_a_cancelled_queued_commit_is_not_written(tmp_path: Path) -> None:
    path = tmp_path / "g.db"
    async with dgen.connect(f"sqlite:///{path}?busy_timeout=30") as db:
        with write_lock_held(path):
            blocker = asyncio.ensure_future(put(db, b"blocker", b"1"))
            await until(lambda: db._committer is not None and not db._pending)
            cancelled = asyncio.ensure_future(put(db, b"cancelled", b"1"))
            kept = asyncio.ensure_future(put(db, b"kept", b"1"))
            await until(lambda: len(db._pending) == 2)
            cancelled.cancel()
            with pytest.raises(asyncio.CancelledError):
                await cancelled
        await asyncio.wait_for(asyncio.gather(blocker, kept), GUARD)

        async def read(tr: Transaction) -> list[bytes | None]:
            return [await tr.get(k) for k in (b"blocker", b"cancelled", b"kept")]

        assert await db.run(read) == [b"1", None, b"1"]
