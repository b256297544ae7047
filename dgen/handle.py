"""Producers: send casts and calls to a tenant from anywhere.

A :class:`Handle` needs only a database and a tenant name; no consumer has to
run in the same process. ``cast`` returns after its message is committed to
the queue. ``call`` enqueues the request together with a reply slot and
waits on a watch of that slot; the consuming transaction fills it, in
whatever process the consumer runs.

A call costs two durable commits: the enqueue (with the slot) and the
consumer's. The caller reads the reply in a read-only transaction, which
commits nothing, and clears the finished slot blind in the handle's next
enqueue (cast or call); slots of handles never used again are collected by
the consumers after their deadline (see docs/runtime.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import os
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from dgen import codec
from dgen.keys import Versionstamp, unpack
from dgen.queue import TenantKeys, encode_record, enqueue, read_blob
from dgen.server import CallTimeoutError, MessageDroppedError, ReplyLostError
from dgen.store import CommitUnknownError, Database, Transaction, Watch

__all__ = ["Handle", "handle"]

# Receipts outlive any retry of the cast that wrote them; consumers clear them.
_RECEIPT_SECONDS = 600
_UNKNOWN_RETRIES = 5
# Finished reply slots cleared by one enqueue transaction at most (the rest wait).
_CLEARS_PER_COMMIT = 64
# Blob tags (documented in dgen.queue): an inline value and a chunked one.
_INLINE, _CHUNKED = b"\x00", b"\x01"


def handle(db: Database, tenant: str) -> Handle:
    """A producer-only handle for ``tenant`` on ``db``."""
    return Handle(db, tenant)


class Handle:
    """Send messages to one tenant's queue. Cheap to create; holds no resources
    but the keys of reply slots its finished calls left for its next enqueue."""

    def __init__(self, db: Database, tenant: str) -> None:
        self.db = db
        self.tenant = tenant
        self.keys = TenantKeys(tenant)
        # Slots whose reply was read (key -> has chunk keys), cleared blind by the
        # next enqueue: a blind clear never conflicts, and a consumer that still
        # finds the slot gone drops its reply (it reads the slot first).
        self._finished: dict[bytes, bool] = {}

    @contextlib.contextmanager
    def _claim(self) -> Iterator[dict[bytes, bool]]:
        """Take up to 64 finished slots for one transaction to clear; they
        go back if it fails. Taking them (rather than reading) lets concurrent
        enqueues clear different slots, so the backlog cannot outgrow them."""
        slots = dict(itertools.islice(self._finished.items(), _CLEARS_PER_COMMIT))
        for slot in slots:
            del self._finished[slot]
        try:
            yield slots
        except BaseException:
            self._finished.update(slots)
            raise

    async def clear_finished(self) -> int:
        """Remove the reply slots of this handle's finished calls now, in one
        commit per 64; return how many. Optional: the next cast or call clears
        them anyway, and consumers collect them a minute after their deadline."""
        count = 0
        while self._finished:
            with self._claim() as slots:
                await self.db.run(functools.partial(_cleared_in, slots=slots))
            count += len(slots)
        return count

    def __repr__(self) -> str:
        return f"<Handle tenant={self.tenant!r} db={self.db!r}>"

    async def cast(self, message: Any) -> str:
        """Queue ``message`` durably and return its message id.

        Raises :class:`dgen.codec.UnencodableError` (a TypeError) before
        writing anything if ``message`` cannot be stored.
        """
        (message_id,) = await self.cast_many([message])
        return message_id

    async def cast_many(self, messages: Iterable[Any]) -> list[str]:
        """Queue several messages in one transaction, in order; return their ids.

        If the commit's outcome is unknown (:class:`dgen.CommitUnknownError`),
        it retries by itself, checking a receipt written with the messages, so
        they are queued exactly once; after 5 unknown outcomes in a row the
        error reaches the caller.
        """
        payloads = [codec.encode(m) for m in messages]
        if not payloads:
            return []
        if len(payloads) > 0xFFFF:
            raise ValueError(f"at most 65535 messages per transaction, got {len(payloads)}")
        records = [encode_record("cast", p, None) for p in payloads]
        max_value = self.db.limits.max_value_size

        # A receipt written with the messages makes a retry after
        # CommitUnknownError safe: the retry first looks for it, so the messages
        # are queued once whatever happened to the first commit.
        token = os.urandom(16)
        expires = int(time.time()) + _RECEIPT_SECONDS
        receipt, offset = self.keys.receipt(expires, token)
        checking = False

        with self._claim() as clears:  # (a found receipt: the first commit cleared them)

            async def send(tr: Transaction) -> asyncio.Future[bytes]:
                if checking:
                    found = await tr.get_range(*self.keys.receipts_of(expires, token), limit=1)
                    if found:
                        stamp = unpack(found[0][0], len(self.keys.prefix))[-1]
                        assert isinstance(stamp, Versionstamp) and stamp.tr_version is not None
                        done: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
                        done.set_result(stamp.tr_version)
                        return done
                _clear_slots(tr, clears)
                for i, record in enumerate(records):
                    enqueue(tr, self.keys, record, i, max_value)
                tr.set_versionstamped_key(receipt, offset, b"")
                return asyncio.ensure_future(tr.get_versionstamp())

            for attempt in range(_UNKNOWN_RETRIES + 1):
                try:
                    stamp = await (await self.db.run(send))
                    break
                except CommitUnknownError:
                    if attempt == _UNKNOWN_RETRIES:
                        raise
                    checking = True
        return [(stamp + i.to_bytes(2, "big")).hex() for i in range(len(records))]

    async def call(self, request: Any, timeout: float = 5.0) -> Any:  # noqa: ASYNC109 (GenServer API)
        """Queue ``request`` and wait for the reply from the consuming transaction.

        Raises :class:`CallTimeoutError` (a TimeoutError) after ``timeout``
        seconds; the request is still processed later and its reply slot is
        removed. Raises the :class:`dgen.MessageDroppedError` subclass a
        consumer or operator left if the message was dead-lettered or
        deleted, and :class:`dgen.ReplyLostError` if the slot was removed
        before the reply arrived. Raises :class:`dgen.codec.UnencodableError`
        before writing anything if ``request`` cannot be stored.

        Two durable commits: the enqueue and the consumer's. The reply
        comes with the watch that wakes the caller where the backend has it
        at hand (:attr:`dgen.Watch.value`), else from a read-only
        transaction; its slot is cleared by this handle's next enqueue (see
        :meth:`clear_finished`).
        """
        payload = codec.encode(request)
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        loop = asyncio.get_running_loop()
        give_up = loop.time() + timeout
        # Slots of callers that died are collected by consumers after the deadline.
        deadline = int(time.time() + timeout) + 1
        slot = self.keys.reply_slot(deadline, uuid.uuid4().bytes)
        record = encode_record("call", payload, slot)
        max_value = self.db.limits.max_value_size

        with self._claim() as clears:

            async def send(tr: Transaction) -> Watch:
                _clear_slots(tr, clears)
                enqueue(tr, self.keys, record, 0, max_value)
                tr.set(slot, b"")
                # The baseline is this write, so arming the watch reads nothing.
                return tr.watch(slot)

            try:
                watch = await self.db.run(send)
            except (asyncio.CancelledError, CommitUnknownError):
                self._finished[slot] = False  # it may have been committed
                raise
        try:
            while True:
                try:
                    async with asyncio.timeout(max(give_up - loop.time(), 0)):
                        await watch
                except TimeoutError:
                    return await self._give_up(slot, timeout)
                finally:
                    watch.cancel()
                reply = watch.value
                if reply is not None and reply[:1] == _INLINE:
                    # The backend had the committed reply at hand (see Watch.value).
                    self._finished[slot] = False
                    return codec.decode(reply[1:])
                # Read-only: its commit writes nothing (no fsync) on every backend.
                outcome = await self.db.run(lambda tr: self._check_slot(tr, slot))
                if isinstance(outcome, Watch):
                    watch = outcome  # spurious wake-up: wait again
                    continue
                data, chunked = outcome
                if isinstance(data, MessageDroppedError):
                    await self._remove_dropped(slot)
                    raise data
                self._finished[slot] = chunked
                return codec.decode(data)
        except asyncio.CancelledError:
            # Best effort: remove our slot now; else the next enqueue or the GC does.
            try:
                async with asyncio.timeout(1):
                    await self.db.run(lambda tr: _cleared_in(tr, {slot: True}))
            except Exception:
                self._finished[slot] = True
            raise

    async def _check_slot(
        self, tr: Transaction, slot: bytes
    ) -> tuple[bytes | MessageDroppedError, bool] | Watch:
        """The reply (or the error left instead) and whether it has chunk
        keys; a new watch if the slot is still empty. Writes nothing."""
        head = await tr.get(slot)
        if head is None:
            raise ReplyLostError(
                f"the reply slot of a call to tenant {self.tenant!r} was removed before "
                "the reply arrived"
            )
        if not head:
            return tr.watch(slot)
        if head[:1] == _INLINE:
            return head[1:], False  # the usual case: one read
        return await _read_reply(tr, slot), head[:1] == _CHUNKED

    async def _remove_dropped(self, slot: bytes) -> None:
        """Remove the slot of a dropped message before its error is raised
        (errors are rare; this commit is off the normal path)."""
        try:
            with self._claim() as clears:
                await self.db.run(functools.partial(_cleared_in, slots={**clears, slot: True}))
        except Exception:
            self._finished[slot] = True  # the error still reaches the caller

    async def _give_up(self, slot: bytes, waited: float) -> Any:
        with self._claim() as clears:

            async def remove(tr: Transaction) -> bytes | MessageDroppedError | None:
                # Reading the slot makes this conflict with a consumer writing the
                # reply concurrently: either the reply is read here, or the
                # consumer finds the slot gone and drops it.
                value = await tr.get(slot)
                data = await _read_reply(tr, slot) if value else None
                _clear_slots(tr, {**clears, slot: True})
                return data

            data = await self.db.run(remove)
        if isinstance(data, MessageDroppedError):
            raise data
        if data is not None:  # the reply landed just as we timed out
            return codec.decode(data)
        raise CallTimeoutError(
            f"no reply from tenant {self.tenant!r} within {waited} s; the request stays "
            "queued and will still be processed (its reply is discarded)"
        )


def _clear_slots(tr: Transaction, slots: Mapping[bytes, bool]) -> None:
    """Blind clears of finished slots: no reads, so they never conflict. A
    range clear only where chunks were seen (on PostgreSQL a range clear
    wakes every watcher to re-check)."""
    for slot, chunked in slots.items():
        tr.clear(slot)
        if chunked:
            tr.clear_range(slot + b"\x00", slot + b"\xff")


async def _cleared_in(tr: Transaction, slots: Mapping[bytes, bool]) -> None:
    _clear_slots(tr, slots)


async def _read_reply(tr: Transaction, slot: bytes) -> bytes | MessageDroppedError:
    """The reply in ``slot``, or the error a consumer or operator left there
    (returned, not raised, so the transaction removing the slot commits)."""
    try:
        data = await read_blob(tr, slot)
    except MessageDroppedError as exc:
        return exc
    assert data is not None
    return data
