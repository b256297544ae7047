"""The SQLite write-ahead log stays bounded: under a steady consumer, and
after a reader held it open for a while (real files, sizes read from disk)."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import pytest

import dgen
from dgen.backends import sqlite as sqlite_backend
from dgen.store import Transaction

pytestmark = pytest.mark.anyio

MESSAGES = 4000


class Counter(dgen.DGenServer):
    def __init__(self, done: asyncio.Event) -> None:
        self.done = done

    def init(self, arg: Any) -> int:
        return 0

    def handle_cast(self, message: Any, state: int) -> dgen.NoReply:
        if state + 1 == MESSAGES:
            self.done.set()
        return dgen.NoReply(state + 1)


def wal_size(path: Path) -> int:
    wal = path.with_name(path.name + "-wal")
    return wal.stat().st_size if wal.exists() else 0


async def test_wal_stays_bounded_under_a_steady_consumer(tmp_path: Path) -> None:
    """A consumer committing one message per transaction held its read
    snapshot through each commit, so no checkpoint could finish and the WAL
    grew by about 6 KB a message (25 MB here) and every fsync slowed down."""
    path = tmp_path / "s.db"
    async with dgen.connect(f"sqlite:///{path}") as db:
        producer = dgen.handle(db, "t")
        for start in range(0, MESSAGES, 500):
            await producer.cast_many(range(start, start + 500))
        largest = 0
        done = asyncio.Event()

        async def watch_size() -> None:
            nonlocal largest
            while True:
                largest = max(largest, wal_size(path))
                await asyncio.sleep(0.02)

        watcher = asyncio.ensure_future(watch_size())
        try:
            async with dgen.start(Counter(done), db, "t", batch_size=1):
                await asyncio.wait_for(done.wait(), 120)
        finally:
            watcher.cancel()
        largest = max(largest, wal_size(path))
    # SQLite checkpoints at 1,000 pages (4 MB); a WAL that restarts stays near that.
    assert largest < 8 << 20, f"the WAL grew to {largest / 2**20:.1f} MB"


async def test_wal_is_cut_back_after_a_long_reader_lets_go(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While another connection holds a snapshot the WAL must grow; once it
    lets go and a checkpoint restarts the log, the file is cut back to the
    limit instead of keeping its largest size on disk."""
    monkeypatch.setattr(sqlite_backend, "WAL_SIZE_LIMIT", 1 << 20)
    path = tmp_path / "r.db"
    async with dgen.connect(f"sqlite:///{path}") as db:

        async def write(tr: Transaction, i: int) -> None:  # about 15 pages
            tr.set(b"big%d" % (i % 4), bytes([i % 256]) * 60_000)

        await db.run(lambda tr: write(tr, 0))
        reader = sqlite3.connect(path, isolation_level=None)
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM dgen_kv").fetchone()
        for i in range(120):
            await db.run(lambda tr, i=i: write(tr, i))
        held = wal_size(path)
        assert held > 4 << 20, f"the WAL did not grow behind the reader ({held} bytes)"
        reader.execute("ROLLBACK")
        reader.close()

        async def small(tr: Transaction) -> None:
            tr.set(b"small", b"x")

        for _ in range(5):  # small commits: a checkpoint finishes, the log restarts
            await db.run(small)
        after = wal_size(path)
    assert after <= 1 << 20, f"the WAL kept {after / 2**20:.1f} MB after the reader let go"
