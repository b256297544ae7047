"""SQLite watches: what the watcher thread re-reads when a watch is armed.

Every URL here has ``poll_interval=60&wake=off``: without a poke, the watcher
would look again only after a minute, so a watch that fires within the 20 s
hang guard was fired by the code path under test. No assertion is about time.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

import dgen
from dgen.backends import sqlite as sqlite_backend
from dgen.store import Transaction

pytestmark = pytest.mark.anyio

GUARD = 20.0  # seconds: a hang guard, never a measurement
DEAF = "poll_interval=60&wake=off"


async def put(db: dgen.Database, key: bytes, value: bytes) -> None:
    async def body(tr: Transaction) -> None:
        tr.set(key, value)

    await db.run(body)


async def settle(db: dgen.Database, aux: dgen.Database, key: bytes) -> None:
    """Return once the watcher of ``db`` has read after ``aux``'s last commit:
    a watch with a baseline that ``aux`` makes stale fires at that read."""
    tr = db.create_transaction()
    await tr.get(key)
    await put(aux, key, b"stale")
    watch = tr.watch(key)
    await tr.commit()
    await asyncio.wait_for(watch, GUARD)


async def test_watch_with_a_stale_baseline_fires_after_the_watcher_read(tmp_path: Path) -> None:
    """The baseline was read before another database object's commit that
    the watcher has already seen; the watcher must still re-read the new key."""
    url = f"sqlite:///{tmp_path}/w.db?{DEAF}"
    async with dgen.connect(url) as db, dgen.connect(url) as aux:
        await put(db, b"k", b"v0")
        tr = db.create_transaction()
        assert await tr.get(b"k") == b"v0"
        await put(aux, b"k", b"v1")
        await settle(db, aux, b"settle")  # the watcher's data_version is past v1's commit now
        watch = tr.watch(b"k")
        await tr.commit()
        await asyncio.wait_for(watch, GUARD)


async def test_many_watches_see_another_commit(tmp_path: Path) -> None:
    """600 watched keys (more than one IN list of the watcher) all fire when
    another database object changes them; unchanged ones stay armed."""
    url = f"sqlite:///{tmp_path}/w.db?{DEAF}"
    keys = [b"k%04d" % i for i in range(600)]
    async with dgen.connect(url) as db, dgen.connect(url) as aux:
        watches = []
        for key in keys:  # one at a time: the watcher reads the new keys each time
            tr = db.create_transaction()
            await tr.get(key)
            watches.append(tr.watch(key))
            await tr.commit()
        quiet = db.create_transaction()
        await quiet.get(b"quiet")
        unchanged = quiet.watch(b"quiet")
        await quiet.commit()

        async def change_all(tr: Transaction) -> None:
            for key in keys:
                tr.set(key, b"x")

        await aux.run(change_all)
        await settle(db, aux, b"settle")
        await asyncio.wait_for(asyncio.gather(*watches), GUARD)
        assert not unchanged.done()
        unchanged.cancel()


async def test_a_watch_sees_another_objects_commit_among_its_own(tmp_path: Path) -> None:
    """The watcher tells this object's commits (already delivered on the
    loop) from other connections' by commit version; a commit of another
    object between two of this object's must still be seen, with only the
    2 ms poll to find it (no wake-up sockets)."""
    url = f"sqlite:///{tmp_path}/w.db?poll_interval=0.002&wake=off"
    async with dgen.connect(url) as db, dgen.connect(url) as other:
        await put(db, b"k", b"0")
        for i in range(1, 31):
            tr = db.create_transaction()
            await tr.get(b"k")
            watch = tr.watch(b"k")
            await tr.commit()
            await put(db, b"own", b"%d" % i)
            await put(other, b"k", b"%d" % i)
            await put(db, b"own", b"%d+" % i)
            await asyncio.wait_for(watch, GUARD)
            assert watch.value in (None, b"%d" % i)


async def test_the_watcher_does_not_reread_after_this_objects_commits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """This object's commits fire its watches on the loop; the watcher,
    which sees every commit through data_version, re-reads the watched keys
    only for other connections' commits (with 10,000 idle watches those
    re-reads every 2 ms took two thirds of a committing process's time)."""
    reads: list[int] = []
    real = sqlite_backend._read_keys

    def counting(sql: Any, keys: list[bytes]) -> Any:
        reads.append(len(keys))
        return real(sql, keys)

    monkeypatch.setattr(sqlite_backend, "_read_keys", counting)
    url = f"sqlite:///{tmp_path}/w.db?poll_interval=0.002&wake=off"
    async with dgen.connect(url) as db, dgen.connect(url) as other:
        watches = []
        for i in range(20):
            tr = db.create_transaction()
            await tr.get(b"w%d" % i)
            watches.append(tr.watch(b"w%d" % i))
            await tr.commit()
        await asyncio.sleep(0.05)  # the watcher's first look, after the arming
        before = len(reads)
        for i in range(100):
            await put(db, b"own", b"%d" % i)
            if i % 10 == 0:
                await asyncio.sleep(0.003)  # a poll or more
        # (A look racing a commit, before its writer noted the version,
        # re-reads once: rare, hence a little slack; before, every poll did.)
        assert len(reads) - before <= 3, reads[before:]
        await put(other, b"w3", b"theirs")  # another connection: a full re-read
        await asyncio.wait_for(watches[3], GUARD)
        assert len(reads) > before and max(reads[before:]) >= 19
        for watch in watches:
            watch.cancel()
