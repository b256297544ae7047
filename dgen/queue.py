"""A tenant's keys in the store: queue, state, version, lock and reply slots.

Every key is tuple-packed under the tenant's prefix ``("dgen", tenant)``:

========================  ===================================================
``("q", stamp)``          a queued message; ``stamp`` is an ordered-commit
                          key (versionstamp + user version), so key order is
                          enqueue-commit order. Large messages add chunk keys
                          ``("q", stamp, i)``.
``("n",)``                push counter, bumped with atomic add on every
                          enqueue; idle consumers watch it.
``("s", ...)``            the state, laid out field by field and item by
                          item by :mod:`dgen.layout`.
``("v",)``                version token: 16 random bytes rewritten on every
                          state write; outside the state's key range, so it
                          is never read as part of the state.
``("k",)``                the lock record (a blob), present while locked.
``("r", deadline, id)``   a reply slot: ``b""`` while the caller waits, then
                          the reply blob (or an error blob, see below).
                          ``deadline`` (unix seconds) lets consumers
                          garbage-collect slots of dead callers.
``("a", stamp)``          attempt record of a queued message that failed or
                          is being retried (a blob; see docs/operating.md).
``("x", stamp)``          a dead letter (a blob): the message, its error
                          and attempts. Retrying re-queues it at
                          ``("q", stamp)``, its original place.
========================  ===================================================

A *blob* is a value that may exceed the backend's value limit: its main key
holds ``b"\\x00" + data`` when that fits, else ``b"\\x01" + packed (chunks,
size)`` with the data split over keys ``main + pack((i,))``, which sort
right after the main key and inside its :func:`dgen.keys.range_of`.

An *error blob* (``b"\x02" + encoded (kind, text)``) in a reply slot tells
the caller that its message was dropped: :func:`read_blob` raises the
matching :class:`dgen.MessageDroppedError`.

Queue items, lock records and replies are blobs. This module only reads and
writes keys inside a caller's transaction; the consumer and the handles
decide what a transaction contains.
"""

from __future__ import annotations

from dataclasses import dataclass

from dgen import codec
from dgen.keys import Versionstamp, pack, pack_with_versionstamp, range_of, unpack
from dgen.server import DeadLetteredError, MessageDeletedError, MessageDroppedError
from dgen.store import Transaction

__all__ = [
    "Message",
    "TenantKeys",
    "parse_message_id",
    "read_blob",
    "write_blob",
    "write_error_reply",
]

_INLINE, _CHUNKED, _ERROR = 0, 1, 2
_DROPPED: dict[str, type[MessageDroppedError]] = {
    "deleted": MessageDeletedError,
    "dead-letter": DeadLetteredError,
}


def _stamp(stamp: bytes) -> bytes:
    """A message stamp as a tuple element's payload (the tuple encoding of a
    complete Versionstamp is 0x33 and its 12 bytes, unescaped)."""
    if len(stamp) != 12:
        raise ValueError(f"a versionstamp is 12 bytes, got {len(stamp)}")
    return bytes(stamp)


class TenantKeys:
    """The keys of one tenant."""

    __slots__ = (
        "_attempts_stamp_prefix",
        "_dead_stamp_prefix",
        "_receipt_head",
        "attempts_begin",
        "attempts_end",
        "dead_begin",
        "dead_end",
        "lock",
        "prefix",
        "push",
        "queue_begin",
        "queue_end",
        "queue_stamp_prefix",
        "receipts_begin",
        "replies_begin",
        "replies_end",
        "state",
        "tenant",
        "version",
    )

    def __init__(self, tenant: str) -> None:
        if not isinstance(tenant, str) or not tenant:
            raise ValueError(f"a tenant is a non-empty str, got {tenant!r}")
        self.tenant = tenant
        self.prefix = pack(("dgen", tenant))
        self.queue_begin, self.queue_end = range_of(("q",), self.prefix)
        self.push = pack(("n",), self.prefix)
        self.state = pack(("s",), self.prefix)
        self.version = pack(("v",), self.prefix)
        self.lock = pack(("k",), self.prefix)
        self.replies_begin, self.replies_end = range_of(("r",), self.prefix)
        self.receipts_begin = range_of(("e",), self.prefix)[0]
        self._receipt_head = pack(("e",), self.prefix)
        # Everything before a queue key's 10-byte placeholder (0x33: versionstamp).
        self.queue_stamp_prefix = pack(("q",), self.prefix) + b"\x33"
        self.attempts_begin, self.attempts_end = range_of(("a",), self.prefix)
        self.dead_begin, self.dead_end = range_of(("x",), self.prefix)
        # Likewise for the per-message keys: a complete stamp is its 12 bytes.
        self._attempts_stamp_prefix = pack(("a",), self.prefix) + b"\x33"
        self._dead_stamp_prefix = pack(("x",), self.prefix) + b"\x33"

    def message(self, stamp: bytes) -> bytes:
        """The queue key of the message with this stamp."""
        return self.queue_stamp_prefix + _stamp(stamp)

    def attempts(self, stamp: bytes) -> bytes:
        """The attempt record's key of the message with this stamp."""
        return self._attempts_stamp_prefix + _stamp(stamp)

    def attempts_through(self, stamp: bytes) -> bytes:
        """End of the range holding the attempt records of every stamp up to
        and including ``stamp`` (chunks included)."""
        return self.attempts(stamp) + b"\xff"

    def dead_letter(self, stamp: bytes) -> bytes:
        """The dead letter's key of the message with this stamp."""
        return self._dead_stamp_prefix + _stamp(stamp)

    def reply_slot(self, deadline: int, reply_id: bytes) -> bytes:
        return pack(("r", deadline, reply_id), self.prefix)

    def receipt(self, expires: int, token: bytes) -> tuple[bytes, int]:
        """An enqueue receipt: an ordered-commit key written with the messages,
        so a producer that got CommitUnknownError can tell whether (and under
        which stamp) its messages were queued."""
        # pack_with_versionstamp(("e", expires, token, Versionstamp()), prefix),
        # without re-packing the prefix (0x33: a versionstamp, user version 0).
        head = self._receipt_head + pack((expires, token)) + b"\x33"
        return head + b"\xff" * 10 + b"\x00\x00", len(head)

    def receipts_of(self, expires: int, token: bytes) -> tuple[bytes, bytes]:
        return range_of(("e", expires, token), self.prefix)

    def receipts_before(self, unix_seconds: int) -> bytes:
        """End of the range holding every receipt that expired earlier."""
        return pack(("e", unix_seconds), self.prefix)

    def replies_before(self, unix_seconds: int) -> bytes:
        """End of the range holding every slot whose deadline is earlier."""
        return pack(("r", unix_seconds), self.prefix)


def _split(data: bytes, max_value: int) -> list[bytes]:
    return [data[i : i + max_value] for i in range(0, len(data), max_value)] or [b""]


def write_blob(tr: Transaction, key: bytes, data: bytes, max_value: int) -> None:
    """Write ``data`` at ``key``, chunked if it exceeds ``max_value``.

    Clears chunks of a previous, longer blob at the same key.
    """
    begin, end = key + b"\x00", key + b"\xff"
    tr.clear_range(begin, end)
    if len(data) < max_value:
        tr.set(key, bytes((_INLINE,)) + data)
        return
    chunks = _split(data, max_value)
    tr.set(key, bytes((_CHUNKED,)) + pack((len(chunks), len(data))))
    for i, chunk in enumerate(chunks):
        tr.set(key + pack((i,)), chunk)


def write_error_reply(tr: Transaction, slot: bytes, kind: str, text: str, max_value: int) -> None:
    """Tell a waiting caller that its message was dropped (``kind``:
    ``"deleted"`` or ``"dead-letter"``); :func:`read_blob` of the slot raises
    the matching :class:`dgen.MessageDroppedError` with ``text``."""
    data = bytes((_ERROR,)) + codec.encode((kind, text[: max_value // 8]))
    tr.clear_range(slot + b"\x00", slot + b"\xff")
    tr.set(slot, data)


async def read_blob(tr: Transaction, key: bytes) -> bytes | None:
    """The blob at ``key`` (None if absent).

    Raises :class:`dgen.MessageDroppedError` if it is an error blob.
    """
    head = await tr.get(key)
    if head is None:
        return None
    if head[:1] == bytes((_ERROR,)):
        kind, text = codec.decode(head[1:])
        raise _DROPPED.get(kind, MessageDroppedError)(text)
    return await _join(tr, key, head)


async def _join(tr: Transaction, key: bytes, head: bytes) -> bytes:
    if head[:1] == bytes((_INLINE,)):
        return head[1:]
    count, size = unpack(head[1:])
    assert isinstance(count, int) and isinstance(size, int)
    rows = await tr.get_range(key + b"\x00", key + b"\xff")
    data = b"".join(value for _, value in rows)
    if len(rows) != count or len(data) != size:
        raise codec.DecodeError(
            f"blob at {key!r} is incomplete: {len(rows)} of {count} chunks, "
            f"{len(data)} of {size} bytes"
        )
    return data


# -- the queue -----------------------------------------------------------------


@dataclass(slots=True)
class Message:
    """A queued message as the consumer sees it."""

    stamp: bytes
    """12 bytes: commit stamp + user version; the message id."""
    kind: str
    """``"cast"`` or ``"call"``."""
    payload: bytes
    """The encoded message (decode with :func:`dgen.codec.decode`)."""
    reply_slot: bytes | None
    """The caller's reply slot key (calls only)."""
    size: int

    @property
    def id(self) -> str:
        return self.stamp.hex()


def encode_record(kind: str, payload: bytes, reply_slot: bytes | None) -> bytes:
    return codec.encode((kind, reply_slot, payload))


def enqueue(
    tr: Transaction, keys: TenantKeys, record: bytes, user_version: int, max_value: int
) -> None:
    """Append a message record to the tenant's queue in this transaction.

    Several enqueues in one transaction must use increasing user versions.
    """
    stamp = Versionstamp(None, user_version)
    # pack_with_versionstamp(("q", stamp), prefix), without re-packing the prefix.
    offset = len(keys.queue_stamp_prefix)
    main = keys.queue_stamp_prefix + b"\xff" * 10 + user_version.to_bytes(2, "big")
    if len(record) < max_value:
        tr.set_versionstamped_key(main, offset, bytes((_INLINE,)) + record)
    else:
        chunks = _split(record, max_value)
        tr.set_versionstamped_key(
            main, offset, bytes((_CHUNKED,)) + pack((len(chunks), len(record)))
        )
        for i, chunk in enumerate(chunks):
            key, off = pack_with_versionstamp(("q", stamp, i), keys.prefix)
            tr.set_versionstamped_key(key, off, chunk)
    tr.add(keys.push, 1)


async def read_head(
    tr: Transaction, keys: TenantKeys, limit: int, *, snapshot: bool = False
) -> tuple[list[Message], bool]:
    """Up to ``limit`` messages from the head of the queue, oldest first, and
    whether they are the whole queue (as of this transaction's snapshot).

    Reads at most ``limit`` keys, so chunked messages make the batch smaller;
    a chunked first message is always read whole. With ``snapshot`` the head
    read adds no read conflict: the caller declares one over what it consumes.
    """
    rows = await tr.get_range(keys.queue_begin, keys.queue_end, limit=limit, snapshot=snapshot)
    whole = len(rows) < limit
    plen = len(keys.prefix)
    messages: list[Message] = []
    i = 0
    while i < len(rows):
        key, head = rows[i]
        parts = unpack(key, plen)
        stamp = parts[1]
        assert isinstance(stamp, Versionstamp) and len(parts) == 2, f"stray queue key {key!r}"
        if head[:1] == bytes((_INLINE,)):
            record = head[1:]
            i += 1
        else:
            count = unpack(head[1:])[0]
            assert isinstance(count, int)
            if i + 1 + count <= len(rows):
                record = b"".join(v for _, v in rows[i + 1 : i + 1 + count])
                i += 1 + count
            elif not messages:
                record = await _join(tr, key, head)
                i = len(rows)
            else:
                break  # the rest of this message is beyond the limit: next batch
        kind, reply_slot, payload = codec.decode(record)
        messages.append(Message(stamp.to_bytes(), kind, payload, reply_slot, len(record)))
    return messages, whole


def clear_message(tr: Transaction, keys: TenantKeys, stamp: bytes) -> None:
    """Remove a consumed message (and its chunks)."""
    main = keys.message(stamp)
    tr.clear(main)
    tr.clear_range(main + b"\x00", main + b"\xff")


def requeue(tr: Transaction, keys: TenantKeys, message: Message, max_value: int) -> None:
    """Put ``message`` back into the queue under its original stamp.

    The stamp is older than anything queued after the message first was, so
    it is consumed before those (at the head, for a retried dead letter).
    Bumps the push counter to wake idle consumers.
    """
    record = encode_record(message.kind, message.payload, message.reply_slot)
    write_blob(tr, keys.message(message.stamp), record, max_value)
    tr.add(keys.push, 1)


def parse_message_id(text: str) -> bytes:
    """A message id (24 hex digits, as ``cast`` returns it) as its stamp bytes.

    Raises ValueError naming the bad id.
    """
    try:
        stamp = bytes.fromhex(text)
    except (ValueError, TypeError):
        stamp = b""
    if len(stamp) != 12:
        raise ValueError(
            f"not a message id: {text!r} (a message id is 24 hex digits, as "
            "cast() returns it and 'dgen queue list' shows it)"
        )
    return stamp


async def messages_in(tr: Transaction, begin: bytes, end: bytes, limit: int) -> list[Message]:
    """Up to ``limit`` whole queue records (blobs under stamp keys) in
    ``[begin, end)``: the queue, or from a given stamp on."""
    rows = await tr.get_range(begin, end, limit=limit)
    out: list[Message] = []
    for key, head in rows:
        parts = unpack(key)
        stamp = parts[-1]
        if not isinstance(stamp, Versionstamp):
            continue  # a chunk of the previous record
        record = head[1:] if head[:1] == bytes((_INLINE,)) else await _join(tr, key, head)
        kind, reply_slot, payload = codec.decode(record)
        out.append(Message(stamp.to_bytes(), kind, payload, reply_slot, len(record)))
    return out
