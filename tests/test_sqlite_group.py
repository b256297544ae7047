"""SQLite group commit: transactions that queue while a commit runs are
written together, in one SQLite transaction (one fsync), in order, each
validated as if committed alone.

To queue them deterministically a test holds SQLite's write lock from a bare
``sqlite3`` connection: the committer then waits on its thread (busy
timeout) with its first group, and the next transactions queue behind it.
"""

from __future__ import annotations

import asyncio
import gc
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

import dgen
from dgen.backends.sqlite import SQLiteDatabase
from dgen.store import ConflictError, StoreError, Transaction, UnavailableError, ValueTooLargeError

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
        # The writer is open before the workers start: the groups below are not
        # just commits that queued while the committer opened it.
        await put(db, b"warm", b"1")
        assert db.commit_groups == 0

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


def _writing(db: dgen.Database) -> bool:
    """A commit is on the writer's thread (the committer's group, or a lone
    commit that handed itself over): with the write lock held elsewhere, the
    blocker waits there."""
    assert isinstance(db, SQLiteDatabase)
    return db._writing is not None and not db._writing.done()


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
            await until(lambda: _writing(db) and not db._pending)
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
            await until(lambda: _writing(db) and not db._pending)
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
            await until(lambda: _writing(db) and not db._pending)
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


async def _queue_behind_blocker(
    db: dgen.Database, path: Path, **puts: bytes
) -> list[asyncio.Future[None]]:
    """With the write lock held elsewhere: a blocker commit taken by the
    committer, then ``puts`` queued behind it (the caller releases the lock)."""
    blocker = asyncio.ensure_future(put(db, b"blocker", b"1"))
    await until(lambda: _writing(db) and not db._pending)
    queued = [asyncio.ensure_future(put(db, k.encode(), v)) for k, v in puts.items()]
    await until(lambda: len(db._pending) == len(puts))
    return [blocker, *queued]


async def test_a_member_whose_write_fails_fails_alone(tmp_path: Path) -> None:
    path = tmp_path / "g.db"
    async with dgen.connect(f"sqlite:///{path}?busy_timeout=30") as db:
        await put(db, b"warm", b"1")
        assert isinstance(db, SQLiteDatabase) and db._writer is not None
        db._writer.open().setlimit(sqlite3.SQLITE_LIMIT_LENGTH, 1000)  # SQLITE_TOOBIG
        with write_lock_held(path):
            tasks = await _queue_behind_blocker(db, path, a=b"1", b=b"x" * 5000, c=b"1")
        outcomes = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), GUARD)
        assert outcomes[0] is None and outcomes[1] is None and outcomes[3] is None
        assert isinstance(outcomes[2], ValueTooLargeError)


async def test_a_full_disk_mid_group_gives_store_errors_and_the_rest_commits(
    tmp_path: Path,
) -> None:
    """SQLite rolls back by itself on SQLITE_FULL (a page quota stands in for
    the disk): the members get a StoreError, not a raw sqlite3 error, and
    those that fit alone are written."""
    path = tmp_path / "g.db"
    async with dgen.connect(f"sqlite:///{path}?busy_timeout=30") as db:
        await put(db, b"warm", b"1")
        assert isinstance(db, SQLiteDatabase) and db._writer is not None
        writer = db._writer.open()
        pages = writer.execute("PRAGMA page_count").fetchone()[0]
        writer.execute(f"PRAGMA max_page_count={pages + 3}")
        with write_lock_held(path):
            tasks = await _queue_behind_blocker(db, path, a=b"1", b=b"x" * 90_000, c=b"1")
        outcomes = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), GUARD)
        assert outcomes[0] is None and outcomes[1] is None and outcomes[3] is None
        assert isinstance(outcomes[2], StoreError)


@pytest.mark.parametrize("commit", ["thread", "inline"])
async def test_cancelling_the_committer_loses_and_strands_nothing(
    tmp_path: Path, commit: str
) -> None:
    """A shutdown may cancel every task, the committer included, while its
    group is on the writer's thread: that write still ends and its members get
    its outcome; the commits queued behind it are retried, not stranded."""
    path = tmp_path / "g.db"
    async with dgen.connect(f"sqlite:///{path}?busy_timeout=30&commit={commit}") as db:
        await put(db, b"warm", b"1")  # opens the writer
        assert isinstance(db, SQLiteDatabase)
        # As after a group of several: the blocker goes through the committer
        # task (a lone commit would hand itself to the thread).
        db._last_group = 2
        with write_lock_held(path):
            blocker, queued = await _queue_behind_blocker(db, path, queued=b"1")
            committer = db._committer
            assert committer is not None
            committer.cancel()
            await until(committer.done)
        await asyncio.wait_for(asyncio.gather(blocker, queued), GUARD)  # no error, no hang

        async def read(tr: Transaction) -> list[bytes | None]:
            return [await tr.get(b"blocker"), await tr.get(b"queued")]

        assert await db.run(read) == [b"1", b"1"]


async def test_a_lone_commit_cancelled_on_the_thread_still_ends_and_the_next_ones_group(
    tmp_path: Path,
) -> None:
    """A commit with nothing queued hands itself to the writer's thread from
    its own task. Cancelled there, its write still ends (the caller sees
    CancelledError, the data is written); the commits queued behind it meanwhile go
    out as one group once it ends."""
    path = tmp_path / "g.db"
    async with dgen.connect(f"sqlite:///{path}?busy_timeout=30") as db:
        await put(db, b"warm", b"1")
        await put(db, b"warm", b"2")  # a lone one: the last group had one member
        assert isinstance(db, SQLiteDatabase) and db._last_group == 1
        with write_lock_held(path):
            lone = asyncio.ensure_future(put(db, b"lone", b"1"))
            await until(lambda: _writing(db))
            assert db._committer is None  # handed over by its own task
            behind = [asyncio.ensure_future(put(db, b"q%d" % i, b"1")) for i in range(3)]
            await until(lambda: len(db._pending) == 3)
            lone.cancel()
            with pytest.raises(asyncio.CancelledError):
                await lone
        await asyncio.wait_for(asyncio.gather(*behind), GUARD)
        assert (db.commit_groups, db.grouped_commits) == (1, 3)

        async def read(tr: Transaction) -> list[bytes | None]:
            return [await tr.get(k) for k in (b"lone", b"q0", b"q1", b"q2")]

        assert await db.run(read) == [b"1", b"1", b"1", b"1"]


async def test_commits_all_cancelled_behind_a_lone_write_leave_no_empty_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The committer waits for a lone commit's write before taking what
    queued behind it; if all of that was cancelled meanwhile, it writes
    nothing (an empty group would still cost a transaction and an fsync)."""
    sizes: list[int] = []
    write_group = SQLiteDatabase._write_group

    def recording(self: SQLiteDatabase, sql: Any, group: list[Any], may_wait: bool) -> Any:
        sizes.append(len(group))
        return write_group(self, sql, group, may_wait)

    monkeypatch.setattr(SQLiteDatabase, "_write_group", recording)
    path = tmp_path / "g.db"
    async with dgen.connect(f"sqlite:///{path}?busy_timeout=30") as db:
        await put(db, b"warm", b"1")
        assert isinstance(db, SQLiteDatabase)
        sizes.clear()
        with write_lock_held(path):
            lone = asyncio.ensure_future(put(db, b"lone", b"1"))
            await until(lambda: _writing(db))
            behind = [asyncio.ensure_future(put(db, b"q%d" % i, b"1")) for i in range(2)]
            await until(lambda: len(db._pending) == 2 and db._committer is not None)
            for task in behind:
                task.cancel()
            await asyncio.gather(*behind, return_exceptions=True)
        await asyncio.wait_for(lone, GUARD)
        await until(lambda: db._committer is None)
        assert sizes == [1], sizes


async def test_a_lone_commit_cancelled_whose_write_fails_leaves_no_unread_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Cancelled on the writer's thread, a lone commit's failure (here a value
    over SQLite's length limit) is consumed: asyncio logs no 'exception was
    never retrieved', and later commits work."""
    path = tmp_path / "g.db"
    async with dgen.connect(f"sqlite:///{path}?busy_timeout=30") as db:
        await put(db, b"warm", b"1")
        await put(db, b"warm", b"2")  # the last group had one member: lone path
        assert isinstance(db, SQLiteDatabase) and db._writer is not None
        db._writer.open().setlimit(sqlite3.SQLITE_LIMIT_LENGTH, 1000)
        with caplog.at_level("ERROR", logger="asyncio"), write_lock_held(path):
            tr = db.create_transaction()
            tr.set(b"big", b"x" * 5000)
            lone = asyncio.ensure_future(tr.commit())
            await until(lambda: _writing(db))
            lone.cancel()
            with pytest.raises(asyncio.CancelledError):
                await lone
        await until(lambda: not _writing(db))
        await put(db, b"after", b"1")  # a new write: the failed one is unreferenced
        del tr, lone
        gc.collect()
        await asyncio.sleep(0)
        assert "never retrieved" not in caplog.text


@pytest.mark.parametrize("commit", ["thread", "inline"])
async def test_a_commit_after_close_is_refused(tmp_path: Path, commit: str) -> None:
    db = await dgen.connect(f"sqlite:///{tmp_path}/g.db?commit={commit}")
    assert isinstance(db, SQLiteDatabase)
    tr = db.create_transaction()
    tr.set(b"k", b"v")
    await db.aclose()
    with pytest.raises(UnavailableError, match="closed"):
        await tr.commit()
    assert db._writer is None


async def test_a_watch_armed_after_close_fails(tmp_path: Path) -> None:
    """A transaction that read before the close and commits after it: its
    watch fails at once, and no watcher thread starts anew (found by
    review: the watch waited for ever)."""
    db = await dgen.connect(f"sqlite:///{tmp_path}/w.db")
    assert isinstance(db, SQLiteDatabase)
    tr = db.create_transaction()
    await tr.get(b"k")
    await db.aclose()
    watch = tr.watch(b"k")
    await tr.commit()
    with pytest.raises(UnavailableError, match="closed"):
        await asyncio.wait_for(watch, 30)
    assert db._watcher is None or not db._watcher.is_alive()


async def test_a_cancelled_close_still_releases_everything(tmp_path: Path) -> None:
    """aclose waits for queued commits; cancelled while waiting, it still
    closes the store, and the commit it waited for ends normally."""
    path = tmp_path / "g.db"
    db = await dgen.connect(f"sqlite:///{path}?busy_timeout=30")
    assert isinstance(db, SQLiteDatabase)
    await put(db, b"warm", b"1")
    tr = db.create_transaction()
    watch = tr.watch(b"watched")
    await tr.commit()
    with write_lock_held(path):
        pending = asyncio.ensure_future(put(db, b"k", b"1"))
        await until(lambda: db._writing is not None and not db._writing.done())
        closing = asyncio.ensure_future(db.aclose())
        await asyncio.sleep(0.05)
        closing.cancel()
        await asyncio.gather(closing, return_exceptions=True)
    await asyncio.wait_for(pending, GUARD)
    with pytest.raises(UnavailableError):
        await asyncio.wait_for(watch, GUARD)
    assert db._writer is None and not db._idle

    def threads() -> list[str]:
        return [t.name for t in threading.enumerate() if t.name.startswith("dgen-sqlite")]

    await until(lambda: not threads())
