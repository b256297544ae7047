"""Deliberately broken toy backends: the memory backend with one bug each.

tests/test_broken_backends.py registers each under its own URL scheme and
shows that the conformance suite fails on it. ``open_database`` picks the
bug by the URL's scheme (see BROKEN).
"""

from __future__ import annotations

import dataclasses
import itertools
import time
import weakref

from dgen.backends.base import ADD, UNKNOWN
from dgen.backends.memory import MemoryDatabase, MemoryStore, MemoryTransaction
from dgen.backends.sqlite import SQLiteDatabase, SQLiteTransaction
from dgen.backends.sqlite import open_database as open_sqlite
from dgen.store import KeyValue, Watch
from dgen.urls import URL

_early_stamps = itertools.count(1)


class EarlyStampTransaction(MemoryTransaction):
    """Assigns an ordered-commit key's stamp when the key is set, from a
    counter, instead of at commit: a slow committer lands behind a fast one
    (PostgreSQL's sequence-before-commit trap)."""

    _early: bytes | None = None

    def set_versionstamped_key(self, key: bytes, offset: int, value: bytes) -> None:
        self._check_write(key, value)
        self._early = next(_early_stamps).to_bytes(8, "big") + b"\x00\x00"
        self.buffer.stamped.append((key[:offset] + self._early + key[offset + 10 :], -1, value))

    async def _apply(self) -> bytes | None:
        stamped, self.buffer.stamped = self.buffer.stamped, []
        for key, _, value in stamped:
            self.buffer.set(key, value)
        stamp = await super()._apply()
        return self._early or stamp


class DeafWatchTransaction(MemoryTransaction):
    """Watches compare with their baseline once, at commit, and are never
    armed for later changes."""

    def _register_watch(self, watch: Watch, baseline: object) -> None:
        if baseline is UNKNOWN or baseline != self._store.data.get(watch.key):
            watch._fire()


class NoBaselineTransaction(MemoryTransaction):
    """Watches are armed for later changes but ignore a change that landed
    between the watching transaction's read and its commit."""

    def _register_watch(self, watch: Watch, baseline: object) -> None:
        current = self._store.data.get(watch.key)
        self._store.watches.setdefault(watch.key, []).append((watch, current))


class AddMuteStore(MemoryStore):
    """Skips watch notification while ``muted``."""

    muted = False

    def notify(self, written: list[tuple[bytes, bytes]]) -> None:
        if not self.muted:
            super().notify(written)


class AddMuteTransaction(MemoryTransaction):
    """Misses changes made by atomic adds: a commit holding only adds does
    not notify watchers (a plausible 'blind writes need no wake-up' bug)."""

    async def _apply(self) -> bytes | None:
        store = self._store
        assert isinstance(store, AddMuteStore)
        points = self.buffer.points.values()
        store.muted = bool(points) and all(op.kind == ADD for op in points)
        try:
            return await super()._apply()
        finally:
            store.muted = False


class LostUpdateTransaction(MemoryTransaction):
    """No read-conflict check: reads see the latest committed data and
    commits never conflict (read committed, not serializable). Without a
    read version, _apply skips the conflict check."""

    async def _read(self, key: bytes) -> bytes | None:
        return self._store.data.get(key)

    async def _read_range(
        self, begin: bytes, end: bytes, limit: int, reverse: bool
    ) -> list[KeyValue]:
        selected = self._store.keys.between(begin, end, limit, reverse)
        return [(k, self._store.data[k]) for k in selected]


class EagerWriteTransaction(MemoryTransaction):
    """Applies each set to the store at once instead of buffering it, so a
    transaction that fails half-way leaves its earlier writes behind."""

    def set(self, key: bytes, value: bytes) -> None:
        super().set(key, value)
        self._store.put(key, value)


BROKEN: dict[str, type[MemoryTransaction]] = {
    "earlystamp": EarlyStampTransaction,
    "deafwatch": DeafWatchTransaction,
    "nobaseline": NoBaselineTransaction,
    "addmute": AddMuteTransaction,
    "lostupdate": LostUpdateTransaction,
    "eagerwrite": EagerWriteTransaction,
}

_STORES: weakref.WeakValueDictionary[tuple[str, str], MemoryStore] = weakref.WeakValueDictionary()


class BrokenDatabase(MemoryDatabase):
    def __init__(self, url: URL, store: MemoryStore, tr_class: type[MemoryTransaction]) -> None:
        super().__init__(url, store)
        self.tr_class = tr_class

    def create_transaction(self) -> MemoryTransaction:
        return self.tr_class(self)


class EarlyStampSQLiteTransaction(SQLiteTransaction):
    """SQLite, but an ordered-commit key's stamp is the wall clock when the
    key is set, not the commit counter: comparable across processes, and
    wrong whenever a transaction that stamped earlier commits later."""

    _early: bytes | None = None

    def set_versionstamped_key(self, key: bytes, offset: int, value: bytes) -> None:
        self._check_write(key, value)
        self._early = time.time_ns().to_bytes(8, "big") + b"\x00\x00"
        self.buffer.stamped.append((key[:offset] + self._early + key[offset + 10 :], -1, value))

    async def _apply(self) -> bytes | None:
        stamped, self.buffer.stamped = self.buffer.stamped, []
        for key, _, value in stamped:
            self.buffer.set(key, value)
        stamp = await super()._apply()
        return self._early or stamp


class EarlyStampSQLiteDatabase(SQLiteDatabase):
    def create_transaction(self) -> SQLiteTransaction:
        super().create_transaction()  # raises if closed
        return EarlyStampSQLiteTransaction(self)


SCHEMES = [*BROKEN, "earlysqlite"]


async def open_database(url: URL) -> MemoryDatabase | SQLiteDatabase:
    if url.scheme == "earlysqlite":
        db = await open_sqlite(dataclasses.replace(url, scheme="sqlite"))
        db.__class__ = EarlyStampSQLiteDatabase
        return db
    tr_class = BROKEN[url.scheme]
    name = (url.scheme, url.host or url.path.strip("/"))
    store = _STORES.get(name)
    if store is None:
        store = AddMuteStore()
        _STORES[name] = store
    return BrokenDatabase(url, store, tr_class)
