"""Producers: send casts and calls to a tenant from anywhere.

A :class:`Handle` needs only a database and a tenant name; no consumer has to
run in the same process. ``cast`` returns after its message is committed to
the queue. ``call`` enqueues the request together with a reply slot and
waits on a watch of that slot; the consuming transaction fills it, in
whatever process the consumer runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Iterable
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


def handle(db: Database, tenant: str) -> Handle:
    """A producer-only handle for ``tenant`` on ``db``."""
    return Handle(db, tenant)


class Handle:
    """Send messages to one tenant's queue. Cheap to create; holds no resources."""

    def __init__(self, db: Database, tenant: str) -> None:
        self.db = db
        self.tenant = tenant
        self.keys = TenantKeys(tenant)

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
        token = uuid.uuid4().bytes
        expires = int(time.time()) + _RECEIPT_SECONDS
        receipt, offset = self.keys.receipt(expires, token)
        checking = False

        async def send(tr: Transaction) -> asyncio.Future[bytes]:
            if checking:
                found = await tr.get_range(*self.keys.receipts_of(expires, token), limit=1)
                if found:
                    stamp = unpack(found[0][0], len(self.keys.prefix))[-1]
                    assert isinstance(stamp, Versionstamp) and stamp.tr_version is not None
                    done: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
                    done.set_result(stamp.tr_version)
                    return done
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
        removed. Raises :class:`dgen.codec.UnencodableError` before writing
        anything if ``request`` cannot be stored.
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

        async def send(tr: Transaction) -> Watch:
            enqueue(tr, self.keys, record, 0, max_value)
            tr.set(slot, b"")
            return tr.watch(slot)

        watch = await self.db.run(send)
        try:
            while True:
                try:
                    async with asyncio.timeout(max(give_up - loop.time(), 0)):
                        await watch
                except TimeoutError:
                    return await self._give_up(slot, timeout)
                finally:
                    watch.cancel()
                outcome = await self.db.run(lambda tr: self._take_reply(tr, slot))
                if isinstance(outcome, Watch):
                    watch = outcome  # spurious wake-up: wait again
                elif isinstance(outcome, MessageDroppedError):
                    raise outcome  # raised after the slot's removal committed
                else:
                    return codec.decode(outcome)
        except asyncio.CancelledError:
            # Best effort: remove our slot now; consumers collect it otherwise.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1):
                    await self.db.run(lambda tr: self._remove(tr, slot))
            raise

    @staticmethod
    async def _remove(tr: Transaction, slot: bytes) -> None:
        tr.clear(slot)
        tr.clear_range(slot + b"\x00", slot + b"\xff")

    async def _take_reply(
        self, tr: Transaction, slot: bytes
    ) -> bytes | Watch | MessageDroppedError:
        value = await tr.get(slot)
        if value is None:
            raise ReplyLostError(
                f"the reply slot of a call to tenant {self.tenant!r} was removed before "
                "the reply arrived"
            )
        if not value:
            return tr.watch(slot)
        data = await _read_reply(tr, slot)
        tr.clear(slot)
        tr.clear_range(slot + b"\x00", slot + b"\xff")
        return data

    async def _give_up(self, slot: bytes, waited: float) -> Any:
        async def remove(tr: Transaction) -> bytes | MessageDroppedError | None:
            value = await tr.get(slot)
            data = await _read_reply(tr, slot) if value else None
            tr.clear(slot)
            tr.clear_range(slot + b"\x00", slot + b"\xff")
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


async def _read_reply(tr: Transaction, slot: bytes) -> bytes | MessageDroppedError:
    """The reply in ``slot``, or the error a consumer or operator left there
    (returned, not raised, so the transaction removing the slot commits)."""
    try:
        data = await read_blob(tr, slot)
    except MessageDroppedError as exc:
        return exc
    assert data is not None
    return data
