"""``memory://``: the in-process backend and executable specification.

It implements FoundationDB's semantics directly: optimistic concurrency with
read-conflict ranges checked against the write ranges of every transaction
committed since this one's read version, versionstamps from a commit
counter, and watches. ``memory://NAME`` shares one store between connections
in the same process; plain ``memory://`` is private to its connection.

Reads check the commit log too: a read that would see data changed after
the transaction's read version raises :class:`ConflictError` at once, so
every read observes one snapshot without keeping old versions.
"""

from __future__ import annotations

import bisect
import weakref
from dataclasses import dataclass, field

from dgen.backends.base import UNKNOWN, BufferedTransaction
from dgen.store import Capabilities, ConflictError, Database, KeyValue, Limits, Watch
from dgen.urls import URL

__all__ = ["MemoryDatabase", "MemoryStore", "open_database"]


def _overlaps(ranges: list[tuple[bytes, bytes]], begin: bytes, end: bytes) -> bool:
    return any(b < end and begin < e for b, e in ranges)


class SortedKeys:
    """The store's keys in order, kept as a list of short sorted chunks, so
    an insert moves at most one chunk instead of every key after it (a flat
    list made a cast into a million-key store cost a 8 MB memmove)."""

    _CHUNK = 512

    def __init__(self) -> None:
        self._chunks: list[list[bytes]] = []
        self._firsts: list[bytes] = []  # the first key of each chunk

    def _chunk_of(self, key: bytes) -> int:
        return max(bisect.bisect_right(self._firsts, key) - 1, 0)

    def insert(self, key: bytes) -> None:
        """Add ``key`` (the caller knows it is absent)."""
        if not self._chunks:
            self._chunks.append([key])
            self._firsts.append(key)
            return
        i = self._chunk_of(key)
        chunk = self._chunks[i]
        bisect.insort(chunk, key)
        self._firsts[i] = chunk[0]
        if len(chunk) > 2 * self._CHUNK:
            self._chunks[i : i + 1] = [chunk[: self._CHUNK], chunk[self._CHUNK :]]
            self._firsts[i : i + 1] = [chunk[0], chunk[self._CHUNK]]

    def remove(self, key: bytes) -> None:
        """Remove ``key`` (the caller knows it is present)."""
        i = self._chunk_of(key)
        chunk = self._chunks[i]
        del chunk[bisect.bisect_left(chunk, key)]
        if chunk:
            self._firsts[i] = chunk[0]
        else:
            del self._chunks[i], self._firsts[i]

    def between(
        self, begin: bytes, end: bytes, limit: int = 0, reverse: bool = False
    ) -> list[bytes]:
        """The keys in ``[begin, end)``, at most ``limit`` (0: all) from the
        start, or from the end with ``reverse`` (then in descending order)."""
        out: list[bytes] = []
        if not self._chunks or begin >= end:
            return out
        first, last = self._chunk_of(begin), self._chunk_of(end)
        order = range(last, first - 1, -1) if reverse else range(first, last + 1)
        for i in order:
            chunk = self._chunks[i]
            lo, hi = bisect.bisect_left(chunk, begin), bisect.bisect_left(chunk, end)
            part = chunk[lo:hi]
            if reverse:
                part.reverse()
            out.extend(part)
            if limit and len(out) >= limit:
                return out[:limit]
        return out

    def __len__(self) -> int:
        return sum(len(c) for c in self._chunks)


@dataclass(eq=False)
class MemoryStore:
    """The committed data, shared by the connections to one store."""

    keys: SortedKeys = field(default_factory=SortedKeys)
    data: dict[bytes, bytes] = field(default_factory=dict)
    version: int = 0
    log: list[tuple[int, list[tuple[bytes, bytes]]]] = field(default_factory=list)
    readers: dict[int, int] = field(default_factory=dict)
    watches: dict[bytes, list[tuple[Watch, object]]] = field(default_factory=dict)

    def changed_since(self, version: int, begin: bytes, end: bytes) -> bool:
        i = bisect.bisect_right(self.log, version, key=lambda entry: entry[0])
        return any(_overlaps(ranges, begin, end) for _, ranges in self.log[i:])

    def prune(self) -> None:
        oldest = min(self.readers.values(), default=self.version)
        i = bisect.bisect_right(self.log, oldest, key=lambda entry: entry[0])
        del self.log[:i]

    def put(self, key: bytes, value: bytes | None) -> None:
        if value is None:
            if self.data.pop(key, None) is not None:
                self.keys.remove(key)
        else:
            if key not in self.data:
                self.keys.insert(key)
            self.data[key] = value

    def clear_range(self, begin: bytes, end: bytes) -> None:
        for key in self.keys.between(begin, end):
            del self.data[key]
            self.keys.remove(key)

    def notify(self, written: list[tuple[bytes, bytes]]) -> None:
        for key in list(self.watches):
            if _overlaps(written, key, key + b"\x00"):
                self.check_watches(key)

    def check_watches(self, key: bytes) -> None:
        current = self.data.get(key)
        keep: list[tuple[Watch, object]] = []
        for watch, baseline in self.watches.get(key, []):
            if watch.done():
                continue
            if baseline is UNKNOWN or baseline != current:
                watch._fire(current)
            else:
                keep.append((watch, baseline))
        if keep:
            self.watches[key] = keep
        else:
            self.watches.pop(key, None)


class MemoryTransaction(BufferedTransaction):
    def __init__(self, db: MemoryDatabase) -> None:
        super().__init__(db.limits)
        self._store = db.store
        self._read_version: int | None = None

    def _snapshot(self) -> int:
        if self._read_version is None:
            self._read_version = self._store.version
            self._store.readers[id(self)] = self._read_version
            # An abandoned transaction must not pin the conflict log forever.
            weakref.finalize(self, self._store.readers.pop, id(self), None)
        return self._read_version

    async def _read(self, key: bytes) -> bytes | None:
        if self._store.changed_since(self._snapshot(), key, key + b"\x00"):
            raise ConflictError("a key read by this transaction changed since it started")
        return self._store.data.get(key)

    async def _read_range(
        self, begin: bytes, end: bytes, limit: int, reverse: bool
    ) -> list[KeyValue]:
        if self._store.changed_since(self._snapshot(), begin, end):
            raise ConflictError("a range read by this transaction changed since it started")
        selected = self._store.keys.between(begin, end, limit, reverse)
        return [(k, self._store.data[k]) for k in selected]

    async def _snapshot_get(self, key: bytes) -> object:
        if self._store.changed_since(self._snapshot(), key, key + b"\x00"):
            return UNKNOWN
        return self._store.data.get(key)

    async def _apply(self) -> bytes | None:
        store, buf = self._store, self.buffer
        if buf.is_empty():
            return None
        if self._read_version is not None:
            for begin, end in self.read_ranges:
                if store.changed_since(self._read_version, begin, end):
                    raise ConflictError("a key read by this transaction was changed by another")
        store.version += 1
        stamp = store.version.to_bytes(8, "big") + b"\x00\x00"
        written = list(buf.cleared)
        for begin, end in buf.cleared:
            store.clear_range(begin, end)
        for key, op in buf.points.items():
            store.put(key, op.apply(store.data.get(key)))
            written.append((key, key + b"\x00"))
        for key, offset, value in buf.stamped:
            final = key[:offset] + stamp + key[offset + 10 :]
            store.put(final, value)
            written.append((final, final + b"\x00"))
        store.log.append((store.version, written))
        store.notify(written)
        return stamp

    def _register_watch(self, watch: Watch, baseline: object) -> None:
        self._store.watches.setdefault(watch.key, []).append((watch, baseline))
        self._store.check_watches(watch.key)

    async def _release(self) -> None:
        self._store.readers.pop(id(self), None)
        self._store.prune()


_NAMED: weakref.WeakValueDictionary[str, MemoryStore] = weakref.WeakValueDictionary()


class MemoryDatabase(Database):
    limits = Limits()
    capabilities = Capabilities(durable=False, cross_process=False, watches_cross_process=False)

    def __init__(self, url: URL, store: MemoryStore) -> None:
        self.url = url
        self.store = store

    def create_transaction(self) -> MemoryTransaction:
        return MemoryTransaction(self)

    async def aclose(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"<MemoryDatabase {self.url}>"


async def open_database(url: URL) -> MemoryDatabase:
    url.check_options(())
    name = url.host or url.path.strip("/")
    if not name:
        return MemoryDatabase(url, MemoryStore())
    store = _NAMED.get(name)
    if store is None:
        store = MemoryStore()
        _NAMED[name] = store
    return MemoryDatabase(url, store)
