"""Inspecting and administering tenants: what the ``dgen`` command uses.

Every function takes an open :class:`dgen.Database`. Reading functions
(:func:`list_tenants`, :func:`inspect_tenant`, :func:`list_queue`,
:func:`list_dead_letters`) use plain read transactions: they write nothing
and never take a tenant's lock, so consumers carry on while an operator
looks (on the optimistic backends a reader never blocks a writer). Long
listings are read in pages, one transaction each, so a listing is not one
snapshot of a tenant that changes meanwhile.

Acting functions (:func:`delete_message`, :func:`retry_dead_letters`,
:func:`purge_dead_letters`) each commit one transaction per call (retry and
purge of *every* dead letter: one per page of 100) and touch exactly the
messages they name.

Errors: :class:`TenantNotFoundError` and :class:`MessageNotFoundError`
(both ``LookupError``), ValueError for a malformed message id, and the
store's own errors (:class:`dgen.UnavailableError` when it cannot be
reached).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from dgen import codec
from dgen.consumer import _LockRecord, decode_attempts, decode_dead_letter
from dgen.keys import Versionstamp, pack, range_of, unpack
from dgen.layout import StateLayout
from dgen.queue import (
    Message,
    TenantKeys,
    clear_message,
    messages_in,
    parse_message_id,
    read_blob,
    requeue,
    write_error_reply,
)
from dgen.server import ErrorInfo
from dgen.store import Database, DGenError, Transaction

__all__ = [
    "DeadLetter",
    "LockInfo",
    "MessageNotFoundError",
    "QueuedMessage",
    "TenantInfo",
    "TenantNotFoundError",
    "TenantSummary",
    "delete_message",
    "inspect_tenant",
    "list_dead_letters",
    "list_queue",
    "list_tenants",
    "purge_dead_letters",
    "retry_dead_letters",
    "tenant_names",
]

log = logging.getLogger("dgen.admin")

_PAGE = 1000  # rows per read transaction
_ACT_PAGE = 100  # dead letters per retry/purge transaction
_PREVIEW = 80  # characters of a message shown in a table


class TenantNotFoundError(DGenError, LookupError):
    """The store holds no key of this tenant."""


class MessageNotFoundError(DGenError, LookupError):
    """No queued message (or dead letter) has this id."""


@dataclass(frozen=True)
class QueuedMessage:
    """A message waiting in a tenant's queue."""

    id: str
    kind: str
    """``"cast"`` or ``"call"``."""
    message: Any
    """The decoded message (None if :attr:`decode_error`)."""
    preview: str
    """A one-line ``repr`` of the message, cut to 80 characters."""
    size: int
    """Bytes of the encoded record."""
    attempts: int = 0
    """Failed or interrupted attempts counted so far (0 on the happy path)."""
    last_error: str = ""
    """``"Type: text"`` of the last recorded failure."""
    caller_waiting: bool = False
    """A call whose caller still waits for the reply."""
    decode_error: str = ""


@dataclass(frozen=True)
class DeadLetter:
    """A message moved out of the queue after ``max_attempts`` failures."""

    id: str
    kind: str
    message: Any
    preview: str
    error: ErrorInfo
    decode_error: str = ""


@dataclass(frozen=True)
class LockInfo:
    """The tenant's lock, held while ``handle_locked`` runs."""

    message_id: str
    kind: str
    holder: str
    """``host:pid`` of the consumer holding it ("" if unknown)."""
    since: float
    """When it was taken (unix seconds; 0 if unknown)."""
    deadline: float
    """When its lease ends unless renewed (unix seconds)."""
    lease: float
    attempts: int = 0
    """Runs of ``handle_locked`` for this message that failed or were interrupted."""

    @property
    def expired(self) -> bool:
        """The lease ran out: the next consumer takes the lock over."""
        return self.deadline <= time.time()

    @property
    def age(self) -> float | None:
        """Seconds since the lock was taken (None if unknown)."""
        return time.time() - self.since if self.since else None


@dataclass(frozen=True)
class TenantSummary:
    """One row of :func:`list_tenants`."""

    tenant: str
    has_state: bool
    queue_length: int
    locked: bool
    lock_expired: bool
    dead_letters: int


@dataclass(frozen=True)
class TenantInfo:
    """Everything :func:`inspect_tenant` found about one tenant."""

    tenant: str
    has_state: bool
    state_summary: str
    state_keys: int
    state_bytes: int
    queue_length: int
    head: QueuedMessage | None
    lock: LockInfo | None
    dead_letters: list[DeadLetter] = field(default_factory=list)
    state: Any = None
    """The decoded state (only with ``full_state=True``)."""
    state_error: str = ""
    """Why the state could not be decoded here (e.g. a dataclass whose module
    is not imported in this process)."""


# -- helpers --------------------------------------------------------------------------


def _cut(text: str, width: int) -> str:
    text = text.replace("\n", " ")
    return text if len(text) <= width else text[: width - 3] + "..."


def _decode(payload: bytes) -> tuple[Any, str, str]:
    """(message, preview, decode error)."""
    try:
        value = codec.decode(payload)
    except Exception as exc:
        return None, f"<cannot decode: {_cut(str(exc), _PREVIEW - 17)}>", str(exc)
    return value, _cut(repr(value), _PREVIEW), ""


def _head_length(keys: TenantKeys, space: str) -> int:
    # ("q" | "x", stamp): the space's prefix, the versionstamp code and 12 bytes.
    return len(pack((space,), keys.prefix)) + 13


async def _count(db: Database, begin: bytes, end: bytes, head_length: int) -> int:
    """Records (not chunk keys) in ``[begin, end)``, one page per transaction."""
    total = 0
    while True:

        async def page(tr: Transaction, begin: bytes = begin) -> list[tuple[bytes, bytes]]:
            return await tr.get_range(begin, end, limit=_PAGE)

        rows = await db.run(page)
        total += sum(1 for key, _ in rows if len(key) == head_length)
        if len(rows) < _PAGE:
            return total
        begin = rows[-1][0] + b"\x00"


async def _exists(db: Database, keys: TenantKeys) -> bool:
    async def probe(tr: Transaction) -> bool:
        begin, end = range_of((), keys.prefix)
        return bool(await tr.get_range(begin, end, limit=1))

    return bool(await db.run(probe))


async def _require(db: Database, tenant: str) -> TenantKeys:
    keys = TenantKeys(tenant)
    if not await _exists(db, keys):
        raise TenantNotFoundError(
            f"no tenant {tenant!r} in this store (no queue, state or dead letters); "
            "'dgen tenants URL' lists the tenants"
        )
    return keys


def _lock_info(raw: bytes | None) -> LockInfo | None:
    if raw is None:
        return None
    record = _LockRecord.decode(raw)
    return LockInfo(
        record.stamp.hex(),
        record.kind,
        record.holder,
        record.since,
        record.deadline,
        record.lease,
        record.attempts,
    )


def _queued(tr_message: Message, attempts: bytes | None, waiting: bool) -> QueuedMessage:
    value, preview, error = _decode(tr_message.payload)
    count, last = decode_attempts(attempts)
    return QueuedMessage(
        tr_message.id,
        tr_message.kind,
        value,
        preview,
        tr_message.size,
        count,
        f"{last.type}: {last.message}" if last is not None else "",
        waiting,
        error,
    )


async def _describe_messages(tr: Transaction, keys: TenantKeys, messages: list[Message]) -> Any:
    if not messages:
        return []
    # Attempt records are rare: one range read finds those of the whole page.
    begin = keys.attempts(messages[0].stamp)
    end = keys.attempts_through(messages[-1].stamp)
    found = {k for k, _ in await tr.get_range(begin, end) if len(k) == len(begin)}
    out = []
    for m in messages:
        key = keys.attempts(m.stamp)
        attempts = await read_blob(tr, key) if key in found else None
        # b"" while the caller waits; gone once it gave up.
        slot = await tr.get(m.reply_slot) if m.reply_slot is not None else None
        out.append(_queued(m, attempts, slot == b""))
    return out


# -- tenants ----------------------------------------------------------------------------


async def tenant_names(db: Database) -> list[str]:
    """Every tenant with at least one key, in key order.

    A skip-scan: read the first key at or after the cursor, take its tenant,
    jump past that tenant's keys, repeat (one short range read per tenant).
    """
    names: list[str] = []
    begin, end = range_of(("dgen",))
    while True:

        async def step(tr: Transaction, begin: bytes = begin) -> Any:
            out: list[tuple[str | None, bytes]] = []
            cursor = begin
            for _ in range(100):  # tenants per transaction
                rows = await tr.get_range(cursor, end, limit=1)
                if not rows:
                    break
                key = rows[0][0]
                try:
                    parts = unpack(key)
                except ValueError:
                    cursor = key + b"\x00"  # not tuple-encoded: not ours, skip it
                    continue
                tenant = parts[1] if len(parts) > 1 else None
                # The end of range_of, not strinc: a tenant named "t\x00..." sorts
                # inside strinc(pack(("dgen", "t"))) and would be skipped.
                cursor = range_of(parts[:2])[1]
                out.append((tenant if isinstance(tenant, str) and tenant else None, cursor))
            return out

        found = await db.run(step)
        names.extend(name for name, _ in found if name is not None)
        if len(found) < 100:
            return names
        begin = found[-1][1]


async def list_tenants(db: Database) -> list[TenantSummary]:
    """Every tenant with its queue length, lock state and dead-letter count."""
    out = []
    for tenant in await tenant_names(db):
        keys = TenantKeys(tenant)

        async def heads(tr: Transaction, keys: TenantKeys = keys) -> tuple[bool, bytes | None]:
            has_state = await tr.get(keys.version) is not None
            return has_state, await read_blob(tr, keys.lock)

        has_state, raw_lock = await db.run(heads)
        lock = _lock_info(raw_lock)
        queue = await _count(db, keys.queue_begin, keys.queue_end, _head_length(keys, "q"))
        dead = await _count(db, keys.dead_begin, keys.dead_end, _head_length(keys, "x"))
        out.append(
            TenantSummary(
                tenant,
                has_state,
                queue,
                lock is not None,
                lock is not None and lock.expired,
                dead,
            )
        )
    return out


def _summarise_state(state: Any) -> str:
    kind = type(state).__name__
    if isinstance(state, dict):
        names = ", ".join(repr(k) for k in list(state)[:8])
        more = ", ..." if len(state) > 8 else ""
        return f"dict with {len(state)} key(s) ({names}{more})"
    if isinstance(state, (list, tuple, set, frozenset)):
        return f"{kind} of {len(state)} items"
    text = repr(state).replace("\n", " ")
    return f"{kind}: {text[:_PREVIEW]}{'...' if len(text) > _PREVIEW else ''}"


async def inspect_tenant(db: Database, tenant: str, *, full_state: bool = False) -> TenantInfo:
    """The tenant's state (a summary; the value too with ``full_state``), queue
    length, head message, lock and dead letters. Raises
    :class:`TenantNotFoundError` for a tenant with no keys at all."""
    keys = await _require(db, tenant)
    layout = StateLayout(keys.state, db.limits.max_value_size)

    async def read(tr: Transaction) -> Any:
        pairs = await tr.get_range(*layout.range)
        raw_lock = await read_blob(tr, keys.lock)
        head = await messages_in(tr, keys.queue_begin, keys.queue_end, 1)
        described = await _describe_messages(tr, keys, head)
        return pairs, raw_lock, described

    pairs, raw_lock, head = await db.run(read)
    state: Any = None
    summary, error = "no state (no consumer has started yet)", ""
    if pairs:
        try:
            state, _ = layout.rebuild(pairs)
            summary = _summarise_state(state)
        except Exception as exc:
            error = str(exc)
            summary = f"cannot decode here: {exc}"
    return TenantInfo(
        tenant,
        bool(pairs),
        summary,
        len(pairs),
        sum(len(k) + len(v) for k, v in pairs),
        await _count(db, keys.queue_begin, keys.queue_end, _head_length(keys, "q")),
        head[0] if head else None,
        _lock_info(raw_lock),
        await list_dead_letters(db, tenant),
        state if full_state else None,
        error,
    )


# -- the queue --------------------------------------------------------------------------


async def list_queue(db: Database, tenant: str, *, limit: int | None = None) -> list[QueuedMessage]:
    """The tenant's queued messages, oldest (next to run) first; at most
    ``limit`` of them. Raises :class:`TenantNotFoundError`."""
    keys = await _require(db, tenant)
    out: list[QueuedMessage] = []
    begin = keys.queue_begin
    while limit is None or len(out) < limit:

        async def page(tr: Transaction, begin: bytes = begin) -> Any:
            messages = await messages_in(tr, begin, keys.queue_end, _PAGE)
            return await _describe_messages(tr, keys, messages)

        found = await db.run(page)
        out.extend(found)
        if not found:
            break
        begin = keys.message(bytes.fromhex(found[-1].id)) + b"\xff"
    return out if limit is None else out[:limit]


async def delete_message(db: Database, tenant: str, message_id: str) -> QueuedMessage:
    """Remove one queued message. A caller waiting on it gets
    :class:`dgen.MessageDeletedError`. Returns what was removed; raises
    :class:`MessageNotFoundError` if no queued message has that id (it may
    have been consumed meanwhile)."""
    stamp = parse_message_id(message_id)
    keys = await _require(db, tenant)

    async def delete(tr: Transaction) -> QueuedMessage:
        main = keys.message(stamp)
        found = await messages_in(tr, main, main + b"\xff", _PAGE)
        if not found or found[0].stamp != stamp:
            raise MessageNotFoundError(
                f"no queued message {message_id} in tenant {tenant!r} (consumed, deleted "
                "or dead-lettered already?); 'dgen queue list URL TENANT' shows the queue"
            )
        message = found[0]
        (described,) = await _describe_messages(tr, keys, [message])
        clear_message(tr, keys, stamp)
        tr.clear_range(keys.attempts(stamp), keys.attempts_through(stamp))
        if described.caller_waiting:
            assert message.reply_slot is not None
            write_error_reply(
                tr,
                message.reply_slot,
                "deleted",
                f"the call's message {message_id} to tenant {tenant!r} was deleted by an "
                "operator before it was processed",
                db.limits.max_value_size,
            )
        return described  # type: ignore[no-any-return]

    removed = await db.run(delete)
    log.info(
        "operator deleted queued %s message %s of tenant %r",
        removed.kind,
        message_id,
        tenant,
        extra={"dgen_event": "delete", "tenant": tenant, "message_id": message_id},
    )
    return removed


# -- dead letters -----------------------------------------------------------------------


async def _dead_page(
    tr: Transaction, keys: TenantKeys, begin: bytes, limit: int
) -> list[tuple[Message, ErrorInfo]]:
    rows = await tr.get_range(begin, keys.dead_end, limit=limit)
    out = []
    for key, _ in rows:
        stamp = unpack(key)[-1]
        if isinstance(stamp, Versionstamp):
            data = await read_blob(tr, key)
            assert data is not None
            out.append(decode_dead_letter(stamp.to_bytes(), data))
    return out


def _dead_letter(message: Message, error: ErrorInfo) -> DeadLetter:
    value, preview, decode_error = _decode(message.payload)
    return DeadLetter(message.id, message.kind, value, preview, error, decode_error)


async def list_dead_letters(db: Database, tenant: str) -> list[DeadLetter]:
    """The tenant's dead letters, oldest message first. Raises
    :class:`TenantNotFoundError`."""
    keys = await _require(db, tenant)
    out: list[DeadLetter] = []
    begin = keys.dead_begin
    while True:

        async def page(tr: Transaction, begin: bytes = begin) -> Any:
            return await _dead_page(tr, keys, begin, _PAGE)

        found = await db.run(page)
        out.extend(_dead_letter(m, e) for m, e in found)
        if not found:
            return out
        begin = keys.dead_letter(found[-1][0].stamp) + b"\xff"


async def _act_on_dead_letters(
    db: Database, tenant: str, message_ids: Sequence[str] | None, retry: bool
) -> list[str]:
    keys = await _require(db, tenant)
    max_value = db.limits.max_value_size

    def act(tr: Transaction, message: Message) -> None:
        key = keys.dead_letter(message.stamp)
        tr.clear(key)
        tr.clear_range(key + b"\x00", key + b"\xff")
        if retry:
            # Back under its original stamp: the head of the queue, before
            # everything queued after it; with a fresh attempt count.
            tr.clear_range(keys.attempts(message.stamp), keys.attempts_through(message.stamp))
            requeue(tr, keys, message, max_value)

    if message_ids is not None:
        stamps = [parse_message_id(i) for i in message_ids]

        async def named(tr: Transaction) -> list[str]:
            for stamp, message_id in zip(stamps, message_ids, strict=True):
                data = await read_blob(tr, keys.dead_letter(stamp))
                if data is None:
                    raise MessageNotFoundError(
                        f"no dead letter {message_id} in tenant {tenant!r}; "
                        "'dgen dead-letters list URL TENANT' shows them"
                    )
                act(tr, decode_dead_letter(stamp, data)[0])
            return [stamp.hex() for stamp in stamps]

        done = await db.run(named)
    else:
        done = []
        while True:

            async def page(tr: Transaction) -> list[str]:
                found = await _dead_page(tr, keys, keys.dead_begin, _ACT_PAGE)
                for message, _ in found:
                    act(tr, message)
                return [m.id for m, _ in found]

            ids = await db.run(page)
            done.extend(ids)
            if not ids:
                break
    verb = "retry" if retry else "purge"
    for message_id in done:
        log.info(
            "operator %s of dead letter %s of tenant %r",
            verb,
            message_id,
            tenant,
            extra={"dgen_event": verb, "tenant": tenant, "message_id": message_id},
        )
    return done


async def retry_dead_letters(
    db: Database, tenant: str, message_ids: Sequence[str] | None = None
) -> list[str]:
    """Put dead letters back at the head of the queue, under their original
    ids, with a fresh attempt count; ``None`` retries every one. Named ids
    are retried in one transaction, all or none (:class:`MessageNotFoundError`
    if one is missing). Returns the ids retried."""
    return await _act_on_dead_letters(db, tenant, message_ids, retry=True)


async def purge_dead_letters(
    db: Database, tenant: str, message_ids: Sequence[str] | None = None
) -> list[str]:
    """Delete dead letters for good; ``None`` purges every one. Named ids are
    purged in one transaction, all or none. Returns the ids purged."""
    return await _act_on_dead_letters(db, tenant, message_ids, retry=False)
