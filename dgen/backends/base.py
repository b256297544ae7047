"""Building blocks for adapters whose store has no native read-your-writes.

:class:`BufferedTransaction` keeps a transaction's writes in memory, merges
them into reads, checks limits and drives commit; an adapter supplies the
snapshot reads and the atomic apply. The memory, SQLite and PostgreSQL
backends are built on it; a third-party backend may be too.
"""

from __future__ import annotations

import abc
import asyncio
import bisect
from dataclasses import dataclass, field

from dgen.store import (
    KeyValue,
    Limits,
    StoreError,
    Transaction,
    TransactionClosedError,
    TransactionTooLargeError,
    Watch,
    check_key,
    check_value,
    decode_counter,
    encode_counter,
)

__all__ = ["UNKNOWN", "BufferedTransaction", "Op", "WriteBuffer"]

UNKNOWN = object()
"""Returned by :meth:`BufferedTransaction._snapshot_get` when the snapshot
value can no longer be told; a watch with that baseline fires at once."""

SET, CLEAR, ADD = 0, 1, 2


@dataclass(slots=True)
class Op:
    kind: int
    value: bytes = b""
    delta: int = 0

    def apply(self, base: bytes | None) -> bytes | None:
        if self.kind == SET:
            return self.value
        if self.kind == CLEAR:
            return None
        return encode_counter(decode_counter(base) + self.delta)


@dataclass
class WriteBuffer:
    """A transaction's pending writes: point operations over cleared ranges.

    A point operation always post-dates the cleared ranges covering it
    (clear_range drops the points inside), so applying every cleared range
    first and then every point reproduces the transaction's order.
    """

    points: dict[bytes, Op] = field(default_factory=dict)
    keys: list[bytes] = field(default_factory=list)
    cleared: list[tuple[bytes, bytes]] = field(default_factory=list)
    stamped: list[tuple[bytes, int, bytes]] = field(default_factory=list)
    size: int = 0
    # Where each ordered-commit key is in ``stamped``, by its template
    # outside the stamp and its offset: one written twice is one key, so the
    # later write replaces the earlier (as for a plain key set twice).
    _stamped_at: dict[tuple[bytes, bytes, int], int] = field(default_factory=dict)

    def _put(self, key: bytes, op: Op) -> None:
        if key not in self.points:
            bisect.insort(self.keys, key)
        self.points[key] = op
        self.size += len(key) + len(op.value) + 8

    def set(self, key: bytes, value: bytes) -> None:
        self._put(key, Op(SET, value))

    def clear(self, key: bytes) -> None:
        self._put(key, Op(CLEAR))

    def set_stamped(self, key: bytes, offset: int, value: bytes) -> None:
        at = (key[:offset], key[offset + 10 :], offset)
        i = self._stamped_at.get(at)
        if i is None:
            self._stamped_at[at] = len(self.stamped)
            self.stamped.append((key, offset, value))
        else:
            self.stamped[i] = (key, offset, value)
        self.size += len(key) + len(value)

    def add(self, key: bytes, delta: int) -> None:
        old = self.points.get(key)
        if old is not None:
            self._put(
                key,
                Op(SET, encode_counter(decode_counter(old.apply(None)) + delta))
                if old.kind != ADD
                else Op(ADD, delta=old.delta + delta),
            )
        elif self.is_cleared(key):
            self._put(key, Op(SET, encode_counter(delta)))
        else:
            self._put(key, Op(ADD, delta=delta))

    def clear_range(self, begin: bytes, end: bytes) -> None:
        lo = bisect.bisect_left(self.keys, begin)
        hi = bisect.bisect_left(self.keys, end)
        for key in self.keys[lo:hi]:
            del self.points[key]
        del self.keys[lo:hi]
        merged: list[tuple[bytes, bytes]] = []
        for b, e in sorted([*self.cleared, (begin, end)]):
            if merged and b <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], e))
            else:
                merged.append((b, e))
        self.cleared = merged
        self.size += len(begin) + len(end)

    def is_cleared(self, key: bytes) -> bool:
        # The cleared ranges are disjoint and sorted: find the last one that
        # begins at or before ``key``.
        i = bisect.bisect_right(self.cleared, key, key=lambda r: r[0]) - 1
        return i >= 0 and key < self.cleared[i][1]

    def points_in(self, begin: bytes, end: bytes) -> list[tuple[bytes, Op]]:
        lo = bisect.bisect_left(self.keys, begin)
        hi = bisect.bisect_left(self.keys, end)
        return [(k, self.points[k]) for k in self.keys[lo:hi]]

    def is_empty(self) -> bool:
        return not (self.points or self.cleared or self.stamped)


class BufferedTransaction(Transaction):
    """Read-your-writes, limits and the commit sequence, over adapter hooks.

    An adapter implements :meth:`_read`, :meth:`_read_range` (consistent
    snapshot reads of committed data), :meth:`_apply` (atomically check for
    conflicts and apply :attr:`buffer`) and :meth:`_register_watch`. Reads
    record their conflict ranges in :attr:`read_ranges`, FoundationDB-style;
    snapshot reads go through :meth:`_read_snapshot` and
    :meth:`_read_range_snapshot` and record none, and
    :meth:`add_read_conflict_range` records one without reading.
    """

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.buffer = WriteBuffer()
        self.read_ranges: list[tuple[bytes, bytes]] = []
        self._watches: list[Watch] = []
        self._stamp: asyncio.Future[bytes] | None = None
        self._closed = False
        # Committed values point reads returned: a watch on such a key takes
        # its baseline from here instead of reading it again at commit.
        self._seen: dict[bytes, bytes | None] = {}

    # -- adapter hooks ---------------------------------------------------

    @abc.abstractmethod
    async def _read(self, key: bytes) -> bytes | None:
        """The committed value at this transaction's snapshot."""

    @abc.abstractmethod
    async def _read_range(
        self, begin: bytes, end: bytes, limit: int, reverse: bool
    ) -> list[KeyValue]:
        """Committed pairs at this transaction's snapshot (limit 0: all)."""

    async def _read_snapshot(self, key: bytes) -> bytes | None:
        """Like :meth:`_read` for a snapshot read. Override it if ``_read``
        keeps per-read bookkeeping for conflict checks (the default reuses it,
        which is correct but may conflict more than asked)."""
        return await self._read(key)

    async def _read_range_snapshot(
        self, begin: bytes, end: bytes, limit: int, reverse: bool
    ) -> list[KeyValue]:
        """Like :meth:`_read_range` for a snapshot read (see :meth:`_read_snapshot`)."""
        return await self._read_range(begin, end, limit, reverse)

    async def _snapshot_get(self, key: bytes) -> object:
        """The snapshot value for a watch baseline, without conflict checks;
        UNKNOWN if it cannot be told."""
        return await self._read(key)

    @abc.abstractmethod
    async def _apply(self) -> bytes | None:
        """Atomically check conflicts and apply :attr:`buffer`; return the
        10-byte commit stamp, or None if nothing was written."""

    @abc.abstractmethod
    def _register_watch(self, watch: Watch, baseline: object) -> None:
        """Arm ``watch`` after commit; fire it at once if the stored value
        differs from ``baseline`` (or baseline is UNKNOWN)."""

    async def _release(self) -> None:
        """Free snapshot resources; called once when the transaction ends."""

    # -- the protocol ------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise TransactionClosedError("this transaction was already committed or rolled back")

    def _check_key(self, key: bytes) -> None:
        check_key(key, self.limits)

    async def get(self, key: bytes, *, snapshot: bool = False) -> bytes | None:
        self._check_open()
        self._check_key(key)
        op = self.buffer.points.get(key)
        if op is not None and op.kind != ADD:
            return op.apply(None)
        if op is None and self.buffer.is_cleared(key):
            return None
        if snapshot:
            value = await self._read_snapshot(key)
        else:
            self.read_ranges.append((key, key + b"\x00"))
            value = await self._read(key)
        self._seen[key] = value
        return op.apply(value) if op is not None else value

    async def get_range(
        self,
        begin: bytes,
        end: bytes,
        *,
        limit: int = 0,
        reverse: bool = False,
        snapshot: bool = False,
    ) -> list[KeyValue]:
        self._check_open()
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        if begin >= end:
            return []
        out = await self._merged(begin, end, limit, reverse, snapshot)
        if not snapshot:
            if limit and len(out) >= limit:
                last = out[-1][0]
                self.read_ranges.append((last, end) if reverse else (begin, last + b"\x00"))
            else:
                self.read_ranges.append((begin, end))
        return out

    def add_read_conflict_range(self, begin: bytes, end: bytes) -> None:
        self._check_open()
        if not isinstance(begin, bytes) or not isinstance(end, bytes):
            raise TypeError("range bounds are bytes")
        if begin < end:
            self.read_ranges.append((begin, end))

    async def _merged(
        self, begin: bytes, end: bytes, limit: int, reverse: bool, snapshot: bool = False
    ) -> list[KeyValue]:
        """Committed pairs merged with the buffer, up to ``limit`` (0: all).

        A list, not an async generator: one left early (at the limit) is
        finalized through the event loop's thread-safe queue, a wake-up and
        a task per range read.
        """
        points = self.buffer.points_in(begin, end)
        if reverse:
            points.reverse()
        page = limit + len(points) if limit else 0
        out: list[KeyValue] = []
        i = 0

        def before(a: bytes, b: bytes) -> bool:
            return a > b if reverse else a < b

        def full() -> bool:
            return bool(limit) and len(out) >= limit

        lo, hi = begin, end
        while True:
            if snapshot:
                rows = await self._read_range_snapshot(lo, hi, page, reverse)
            else:
                rows = await self._read_range(lo, hi, page, reverse)
            exhausted = page == 0 or len(rows) < page
            for key, value in rows:
                while i < len(points) and before(points[i][0], key):
                    new = points[i][1].apply(None)
                    if new is not None:
                        out.append((points[i][0], new))
                        if full():
                            return out
                    i += 1
                if i < len(points) and points[i][0] == key:
                    new = points[i][1].apply(value)
                    i += 1
                    if new is not None:
                        out.append((key, new))
                elif not self.buffer.is_cleared(key):
                    out.append((key, value))
                if full():
                    return out
            if exhausted:
                break
            if reverse:
                hi = rows[-1][0]
            else:
                lo = rows[-1][0] + b"\x00"
        for key, op in points[i:]:
            new = op.apply(None)
            if new is not None:
                out.append((key, new))
                if full():
                    break
        return out

    def _check_write(self, key: bytes, value: bytes = b"") -> None:
        self._check_open()
        check_key(key, self.limits)
        check_value(value, self.limits)

    def set(self, key: bytes, value: bytes) -> None:
        self._check_write(key, value)
        self.buffer.set(key, value)

    def clear(self, key: bytes) -> None:
        self._check_write(key)
        self.buffer.clear(key)

    def clear_range(self, begin: bytes, end: bytes) -> None:
        self._check_open()
        if begin < end:
            self.buffer.clear_range(begin, end)

    def add(self, key: bytes, delta: int) -> None:
        self._check_write(key)
        self.buffer.add(key, delta)

    def set_versionstamped_key(self, key: bytes, offset: int, value: bytes) -> None:
        self._check_write(key, value)
        if not 0 <= offset <= len(key) - 10:
            raise ValueError(f"versionstamp offset {offset} is outside the {len(key)}-byte key")
        self.buffer.set_stamped(key, offset, value)

    def get_versionstamp(self) -> asyncio.Future[bytes]:
        self._check_open()
        if self._stamp is None:
            self._stamp = asyncio.get_running_loop().create_future()
        return self._stamp

    def watch(self, key: bytes) -> Watch:
        self._check_open()
        self._check_key(key)
        if self.limits.max_watches is not None and len(self._watches) >= self.limits.max_watches:
            raise StoreError(
                f"too many watches in one transaction (limit {self.limits.max_watches})"
            )
        watch = Watch(key)
        self._watches.append(watch)
        return watch

    async def _baseline(self, key: bytes) -> object:
        op = self.buffer.points.get(key)
        if op is not None and op.kind != ADD:
            return op.apply(None)
        if op is None and self.buffer.is_cleared(key):
            return None
        value = self._seen[key] if key in self._seen else await self._snapshot_get(key)
        if value is UNKNOWN:
            return UNKNOWN
        assert value is None or isinstance(value, bytes)
        return op.apply(value) if op is not None else value

    async def commit(self) -> None:
        self._check_open()
        if self.buffer.size > self.limits.max_transaction_size:
            exc: BaseException = TransactionTooLargeError(
                f"transaction writes {self.buffer.size} bytes, over this backend's limit of "
                f"{self.limits.max_transaction_size}; split the work over several transactions"
            )
            await self._end(exc)
            raise exc
        try:
            baselines = [await self._baseline(w.key) for w in self._watches]
            stamp = await self._apply()
        except BaseException as error:
            await self._end(error)
            raise
        await self._end(None)
        if self._stamp is not None and not self._stamp.done():
            if stamp is None:
                self._stamp.set_exception(StoreError("a read-only transaction has no versionstamp"))
                self._stamp.exception()
            else:
                self._stamp.set_result(stamp)
        for watch, baseline in zip(self._watches, baselines, strict=True):
            self._register_watch(watch, baseline)

    async def rollback(self) -> None:
        if not self._closed:
            await self._end(TransactionClosedError("the transaction was rolled back"))

    async def _end(self, error: BaseException | None) -> None:
        self._closed = True
        try:
            await self._release()
        finally:
            if error is not None:
                for watch in self._watches:
                    watch._fail(error)
                if self._stamp is not None and not self._stamp.done():
                    self._stamp.set_exception(error)
                    self._stamp.exception()
