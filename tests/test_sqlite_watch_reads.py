"""SQLite watches: what the watcher thread re-reads when a watch is armed.

Every URL here has ``poll_interval=60&wake=off``: without a poke, the watcher
would look again only after a minute, so a watch that fires within the 20 s
hang guard was fired by the code path under test. No assertion is about time.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

import dgen
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
