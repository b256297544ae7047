"""The storage contract: what every DGen backend provides and guarantees.

DGen's runtime talks to storage only through the classes in this module. A
backend implements :class:`Database` and :class:`Transaction` for one kind of
store and passes the conformance suite (``python -m dgen.conformance URL``).

The model is FoundationDB's: an ordered keyspace of byte keys and byte
values, read and written in optimistic, serializable transactions. Two ideas
are generalised from FoundationDB:

* **Ordered-commit keys** (versionstamps). A key whose stamp part is fixed at
  commit. Within one prefix, stamps increase in commit order; transactions
  that do not overlap in time get stamps in real-time order; a reader that has
  seen a key with stamp *s* never later sees a new key with a smaller stamp
  under the same prefix (monotonic visibility); several keys written by one
  transaction keep the order of their user versions.
* **Watches**. An awaitable that completes after a key's value changes,
  counting only changes after the watching transaction commits. It may fire
  spuriously; it never misses a change that is still in effect when it is
  checked; it works across processes that share the store.

Errors: every backend maps its native failures onto the :class:`StoreError`
hierarchy below, in one place, so that callers see one retryable
:class:`ConflictError` whatever the store.
"""

from __future__ import annotations

import abc
import asyncio
import random
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass
from typing import Any, TypeVar

__all__ = [
    "Capabilities",
    "CommitUnknownError",
    "ConflictError",
    "DGenError",
    "Database",
    "KeyTooLargeError",
    "KeyValue",
    "Limits",
    "StoreError",
    "TransactionClosedError",
    "Transaction",
    "TransactionTooLargeError",
    "UnavailableError",
    "ValueTooLargeError",
    "Watch",
    "check_key",
    "check_value",
    "decode_counter",
    "encode_counter",
]

T = TypeVar("T")
KeyValue = tuple[bytes, bytes]


class DGenError(Exception):
    """Base class of every error DGen raises on purpose."""


class StoreError(DGenError):
    """A storage operation failed. ``retryable`` says whether a new
    transaction may succeed where this one failed."""

    retryable = False


class ConflictError(StoreError):
    """The transaction was not applied and may simply be retried.

    Usually a concurrent transaction interfered; an adapter also raises it
    when it knows for certain that nothing was committed (a connection lost
    before the commit was sent). The one retryable error: FoundationDB 1020,
    PostgreSQL SQLSTATE 40001 and 40P01 and SQLite BUSY all arrive as this.
    :meth:`Database.run` retries it.
    """

    retryable = True


class TransactionTooLargeError(StoreError):
    """The transaction's writes exceed ``Limits.max_transaction_size``."""


class KeyTooLargeError(StoreError, ValueError):
    """A key is longer than ``Limits.max_key_size``."""


class ValueTooLargeError(StoreError, ValueError):
    """A value is longer than ``Limits.max_value_size``."""


class UnavailableError(StoreError):
    """The store cannot be reached, opened or used (server down, file
    missing or read-only, wrong password). Nothing was committed."""


class CommitUnknownError(StoreError):
    """The connection failed during commit: the transaction may or may not
    have been applied. Not retried automatically, because a blind retry can
    apply a transaction twice; the caller must check a unique effect."""


class TransactionClosedError(StoreError):
    """The transaction was already committed or rolled back."""


@dataclass(frozen=True)
class Limits:
    """Sizes a backend accepts. Defaults are FoundationDB's, so data that fits
    one backend fits every backend."""

    max_key_size: int = 10_000
    max_value_size: int = 100_000
    max_transaction_size: int = 10_000_000
    max_transaction_seconds: float | None = None
    max_watches: int | None = None


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do beyond the mandatory contract. The conformance
    suite skips a test whose capability is absent and says why."""

    durable: bool = False
    """Committed data survives closing the database and killing the process."""
    cross_process: bool = False
    """Several OS processes can open the same store concurrently."""
    watches_cross_process: bool = False
    """A watch fires on a commit made by another process."""
    combines_reads: bool = False
    """Reads issued concurrently on one transaction (``asyncio.gather``) cost
    fewer round trips than the same reads one after another, so a caller with
    independent reads should issue them together. Concurrent reads are allowed
    on every backend; this only says whether they are worth a task each."""


def check_key(key: bytes, limits: Limits, hint: str = "") -> None:
    """Raise TypeError or :class:`KeyTooLargeError` for a key the backend refuses
    (adapters call it before anything is sent)."""
    if not isinstance(key, bytes):
        raise TypeError(f"keys are bytes, got {type(key).__name__}")
    if len(key) > limits.max_key_size:
        raise KeyTooLargeError(
            f"key of {len(key)} bytes exceeds this backend's limit of "
            f"{limits.max_key_size} bytes{hint}"
        )


def check_value(value: bytes, limits: Limits) -> None:
    """Raise TypeError or :class:`ValueTooLargeError` for a value the backend refuses."""
    if not isinstance(value, bytes):
        raise TypeError(f"values are bytes, got {type(value).__name__}")
    if len(value) > limits.max_value_size:
        raise ValueTooLargeError(
            f"value of {len(value)} bytes exceeds this backend's limit of "
            f"{limits.max_value_size} bytes; split it over several keys"
        )


def encode_counter(value: int) -> bytes:
    """The 8-byte little-endian form :meth:`Transaction.add` works on."""
    return (value & 0xFFFF_FFFF_FFFF_FFFF).to_bytes(8, "little")


def decode_counter(value: bytes | None) -> int:
    """Read a counter written by :meth:`Transaction.add` (None counts as 0)."""
    if not value:
        return 0
    raw = int.from_bytes(value[:8].ljust(8, b"\x00"), "little")
    return raw - (1 << 64) if raw >= 1 << 63 else raw


class Watch:
    """Completes after the watched key's value changes (see module docs).

    Await it, or poll :meth:`done`. It becomes active only when its
    transaction commits; if the transaction fails, awaiting it raises that
    transaction's error. :meth:`cancel` releases it.
    """

    __slots__ = ("_future", "key", "value")

    def __init__(self, key: bytes) -> None:
        self.key = key
        self.value: bytes | None = None
        """Once fired: the key's new value if the backend had it at hand (a
        commit of this database object wrote it, or the backend read it to
        decide to fire), which saves the watcher a read; else None (not
        known, or the key was cleared). Like any value read outside a
        transaction it may be stale by the time it is used."""
        self._future: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def __await__(self) -> Generator[Any, None, None]:
        return self._future.__await__()

    def done(self) -> bool:
        return self._future.done()

    def cancel(self) -> None:
        self._future.cancel()

    # Backends call these; safe from the event loop thread only.
    def _fire(self, value: bytes | None = None) -> None:
        if not self._future.done():
            self.value = value
            self._future.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        if not self._future.done():
            self._future.set_exception(exc)
            self._future.exception()  # nobody may await a watch of a failed transaction

    def __repr__(self) -> str:
        return f"<Watch {self.key!r} {'fired' if self.done() else 'waiting'}>"


class Transaction(abc.ABC):
    """One optimistic, serializable transaction.

    Reads see a consistent snapshot plus this transaction's own writes
    (read-your-writes). Writes are buffered and applied atomically by
    :meth:`commit`; if a concurrent commit changed anything this transaction
    read, commit raises :class:`ConflictError` and applies nothing. A
    transaction that is neither committed nor rolled back leaves nothing
    behind. Backends may raise :class:`ConflictError` from a read as well.

    Reads may be issued concurrently (``asyncio.gather``), each as if issued
    alone; backends with :attr:`Capabilities.combines_reads` send them
    together. Writes are not awaited, so there is nothing to order.

    Ranges are half-open ``[begin, end)`` in byte order.
    """

    @abc.abstractmethod
    async def get(self, key: bytes, *, snapshot: bool = False) -> bytes | None:
        """The value of ``key``, or None if it has none.

        A ``snapshot`` read sees the same consistent snapshot (and this
        transaction's writes) but adds no read conflict: a concurrent change to
        the key does not make this transaction conflict, as with
        FoundationDB's ``tr.snapshot``. A backend that cannot serve an old
        version may still raise :class:`ConflictError` from the read itself.
        """

    @abc.abstractmethod
    async def get_range(
        self,
        begin: bytes,
        end: bytes,
        *,
        limit: int = 0,
        reverse: bool = False,
        snapshot: bool = False,
    ) -> list[KeyValue]:
        """Key-value pairs with ``begin <= key < end``, in key order (descending
        if ``reverse``), at most ``limit`` of them when ``limit > 0``.

        With a limit, only the part of the range up to the last pair returned
        counts as read for conflict checking, as in FoundationDB. A
        ``snapshot`` read adds no read conflict (see :meth:`get`); pair it
        with :meth:`add_read_conflict_range` over the part the transaction's
        outcome depends on.
        """

    @abc.abstractmethod
    def add_read_conflict_range(self, begin: bytes, end: bytes) -> None:
        """Make the commit conflict if a concurrent transaction changed any
        key in ``[begin, end)`` since this transaction's snapshot, exactly as
        if the range had been read (FoundationDB's call of the same name).
        Used after a snapshot read to depend on less than was read."""

    def add_read_conflict_key(self, key: bytes) -> None:
        """:meth:`add_read_conflict_range` over the single key ``key``."""
        self.add_read_conflict_range(key, key + b"\x00")

    @abc.abstractmethod
    def set(self, key: bytes, value: bytes) -> None:
        """Write ``value`` at ``key``. Raises :class:`KeyTooLargeError` or
        :class:`ValueTooLargeError` at once if a limit is exceeded."""

    @abc.abstractmethod
    def clear(self, key: bytes) -> None:
        """Remove ``key`` (no error if absent)."""

    @abc.abstractmethod
    def clear_range(self, begin: bytes, end: bytes) -> None:
        """Remove every key in ``[begin, end)``."""

    @abc.abstractmethod
    def add(self, key: bytes, delta: int) -> None:
        """Atomically add ``delta`` to the 64-bit little-endian counter at
        ``key`` (absent counts as 0), without reading it: concurrent adds do
        not conflict. Read it back with :func:`decode_counter`."""

    @abc.abstractmethod
    def set_versionstamped_key(self, key: bytes, offset: int, value: bytes) -> None:
        """Write an ordered-commit key.

        ``key[offset:offset + 10]`` is a placeholder that the backend replaces
        at commit with this commit's 10-byte stamp; build such keys with
        :func:`dgen.keys.pack_with_versionstamp`. Stamps follow commit order
        as the module docs define. Keys written this way are not visible to
        reads in the same transaction (as in FoundationDB) and are applied
        after the transaction's other writes.
        """

    @abc.abstractmethod
    def get_versionstamp(self) -> Awaitable[bytes]:
        """An awaitable for this transaction's 10-byte commit stamp; it
        resolves after a successful commit and fails if the commit fails."""

    @abc.abstractmethod
    def watch(self, key: bytes) -> Watch:
        """Watch ``key`` for changes made after this transaction commits.

        The baseline is the value this transaction sees (its own writes
        included); if the stored value already differs at commit, the watch
        fires at once. A change that is reverted before the watcher checks
        may go unreported (as in FoundationDB): watch keys whose values only
        move forward, such as counters. On SQLite and PostgreSQL, closing
        the database fails its pending watches with
        :class:`UnavailableError`, and so a watch armed by a commit after
        the close; ``memory://`` keeps them (its store outlives the object).
        """

    @abc.abstractmethod
    async def commit(self) -> None:
        """Apply every write atomically, or raise and apply none.

        Raises :class:`ConflictError` (retry), :class:`TransactionTooLargeError`,
        :class:`UnavailableError` or :class:`CommitUnknownError`.
        """

    @abc.abstractmethod
    async def rollback(self) -> None:
        """Discard the transaction; its watches fail. Safe to call twice."""


class Database(abc.ABC):
    """An open store. Create it with :func:`dgen.connect`; use it as an async
    context manager or call :meth:`aclose`."""

    limits: Limits = Limits()
    capabilities: Capabilities = Capabilities()

    @abc.abstractmethod
    def create_transaction(self) -> Transaction:
        """A new transaction. Prefer :meth:`run`, which retries conflicts."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Release connections and fail outstanding watches."""

    async def __aenter__(self) -> Database:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def run(
        self,
        fn: Callable[[Transaction], Awaitable[T]],
        *,
        max_attempts: int | None = None,
        max_backoff: float = 0.1,
    ) -> T:
        """Run ``fn(tr)`` in a transaction and commit; retry on conflict.

        Each retry uses a fresh transaction after a jittered exponential
        backoff that starts at 1 ms and is capped at ``max_backoff`` seconds.
        ``fn`` may run several times, so it must have no effect outside the
        transaction. Gives up after ``max_attempts`` (default: never) by
        re-raising the last :class:`ConflictError`. Any other exception rolls
        the transaction back and propagates; :class:`CommitUnknownError` is
        never retried.
        """
        attempt = 0
        delay = 0.001
        while True:
            attempt += 1
            tr = self.create_transaction()
            try:
                result = await fn(tr)
                await tr.commit()
                return result
            except ConflictError:
                await tr.rollback()
                if max_attempts is not None and attempt >= max_attempts:
                    raise
            except BaseException:
                await tr.rollback()
                raise
            await asyncio.sleep(random.uniform(0, delay))
            delay = min(delay * 2, max_backoff)
