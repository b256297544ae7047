"""The consumer: takes messages from a tenant's queue and runs the handlers.

One loop per consumer. Each turn is one transaction (retried on conflict by
:meth:`Database.run`) that reads the lock key, the version key, the state
(only on a cache miss) and up to ``batch_size`` head messages, runs the
handlers, writes the new state with a new version token, writes replies and
clears the consumed messages. Then it runs the after-commit actions. With
an empty queue it commits a watch on the push counter and sleeps on it.

Locks: a handler's :class:`Lock` result writes a lock record (owner token,
lease deadline, the message) in the same transaction. ``handle_locked`` then
runs outside any transaction while a task renews the lease; its result is
committed with the lock's release only if the record still names this
consumer as owner (fencing). Consumers that find a live foreign lock wait on
a watch of the lock key, bounded by the lease deadline; one that finds an
expired lease takes the lock over and runs ``handle_locked`` itself.

Poison messages (``DGenServer.max_attempts``): attempts are counted in small
transactions of their own, never in the failing one. A handler that raises
records the failure (type, text, traceback) before the consumer crashes. A
consumer that starts *probes*: before it runs the first message it finds at
the head, it counts an attempt for it, because a process that died inside
that message's handler (SIGKILL) could not count its own attempt; it then
runs that message alone. Once that message commits, or the queue is seen
empty, the consumer stops probing: the happy path costs no extra commit.
At the limit the message moves to the dead letters in a transaction that
also runs ``handle_dead_letter`` and answers a waiting caller with an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import logging
import os
import socket
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from dgen import codec
from dgen.layout import Flat, StateLayout, diff
from dgen.queue import (
    Message,
    TenantKeys,
    clear_message,
    read_blob,
    read_head,
    write_blob,
    write_error_reply,
)
from dgen.server import (
    Action,
    Caller,
    DGenServer,
    ErrorInfo,
    Lock,
    NoReply,
    Reply,
    Result,
    Stop,
)
from dgen.store import CommitUnknownError, Database, Transaction, UnavailableError, Watch

__all__ = ["Consumer", "ConsumerStats"]

log = logging.getLogger("dgen.consumer")
T = TypeVar("T")

_STORE_TROUBLE = (UnavailableError, CommitUnknownError)
_CONTINUE = object()

# Reply slots are collected this long after their deadline (clock-skew margin).
_REPLY_GRACE_SECONDS = 60
# Consumers of each database object (by id) now reading with four tasks (_consume).
_gathering: dict[int, int] = {}
_GATHER_MAX = 8
# Tracebacks kept in attempt records and dead letters are cut to this length.
_MAX_TRACEBACK = 16_000
_HOLDER = f"{socket.gethostname()}:{os.getpid()}"


async def _maybe_await(value: T | Awaitable[T]) -> T:
    if inspect.isawaitable(value):
        return await value
    return value


@dataclass
class ConsumerStats:
    """Counters of one consumer, for tests, benchmarks and operators."""

    transactions: int = 0
    """Committed consume transactions (including idle and lock ones)."""
    attempts: int = 0
    """Transaction attempts; ``attempts - transactions`` were retried or failed."""
    messages: int = 0
    """Messages completed (a locked one when its handle_locked result commits)."""
    cache_hits: int = 0
    """Attempts that used the cached state after reading only the version key."""
    state_reads: int = 0
    """Times the state was read from the store (start and cache misses)."""
    state_keys_written: int = 0
    """State keys set or cleared (only what changed is written)."""
    state_bytes_written: int = 0
    """Bytes of state keys and values written."""
    lock_waits: int = 0
    """Times this consumer found another consumer's live lock and waited."""
    lock_takeovers: int = 0
    """Expired locks of other consumers taken over."""
    action_failures: int = 0
    """After-commit actions that raised (logged, not propagated)."""
    dead_letters: int = 0
    """Messages this consumer moved to the dead letters."""
    attempts_counted: int = 0
    """Attempt records written (failures, and probes before a retried message)."""


@dataclass(slots=True)
class _Cached:
    token: bytes
    state: Any
    flat: Flat
    """The state as stored: its keys and values (see :mod:`dgen.layout`)."""


@dataclass(slots=True)
class _LockRecord:
    owner: bytes
    deadline: float
    lease: float
    kind: str
    payload: bytes
    reply_slot: bytes | None
    stamp: bytes
    since: float = 0.0
    """When the lock was taken (or taken over), for operators."""
    holder: str = ""
    """``host:pid`` of the owning consumer, for operators."""
    attempts: int = 0
    """Runs of ``handle_locked`` that failed or were interrupted."""
    running: bool = True
    """The owner's run is in progress and not counted yet (a takeover counts it)."""
    error: dict[str, Any] | None = None
    """The last failure of ``handle_locked`` (see :class:`ErrorInfo`)."""

    def encode(self) -> bytes:
        return codec.encode(
            {
                "owner": self.owner,
                "deadline": self.deadline,
                "lease": self.lease,
                "kind": self.kind,
                "payload": self.payload,
                "reply": self.reply_slot,
                "id": self.stamp,
                "since": self.since,
                "holder": self.holder,
                "attempts": self.attempts,
                "running": self.running,
                "error": self.error,
            }
        )

    @classmethod
    def decode(cls, data: bytes) -> _LockRecord:
        d = codec.decode(data)
        return cls(
            d["owner"],
            d["deadline"],
            d["lease"],
            d["kind"],
            d["payload"],
            d["reply"],
            d["id"],
            d.get("since", 0.0),
            d.get("holder", ""),
            d.get("attempts", 0),
            d.get("running", True),
            d.get("error"),
        )

    def message(self) -> Message:
        return Message(self.stamp, self.kind, self.payload, self.reply_slot, len(self.payload))


@dataclass(slots=True)
class _Done:
    """Outcome of a consume transaction that processed messages."""

    cache: _Cached
    messages: int
    actions: list[tuple[Sequence[Action], Any, str]] = field(default_factory=list)
    stop: Stop | None = None
    locked: _LockRecord | None = None
    dead_letter: str | None = None
    """The id of the message this transaction dead-lettered."""
    watch: Watch | None = None
    """The push counter's watch, armed when the batch emptied the queue."""


@dataclass(slots=True)
class _Wait:
    watch: Watch
    timeout: float | None = None
    locked: bool = False


@dataclass(slots=True)
class _Counted:
    """A probe counted an attempt of the head message (see module docs)."""

    stamp: bytes
    attempts: int


@dataclass(slots=True)
class _TakeOver:
    record: _LockRecord
    cache: _Cached


class _SmallerBatch(Exception):
    """A handler failed after others in the batch succeeded: retry with only those."""

    def __init__(self, size: int) -> None:
        self.size = size


def encode_attempts(attempts: int, error: ErrorInfo | None) -> bytes:
    """An attempt record: attempts counted and the last failure, if any."""
    return codec.encode({"attempts": attempts, "error": _error_dict(error)})


def decode_attempts(data: bytes | None) -> tuple[int, ErrorInfo | None]:
    if data is None:
        return 0, None
    d = codec.decode(data)
    return d["attempts"], _error_from(d["error"])


def _error_dict(error: ErrorInfo | None) -> dict[str, Any] | None:
    if error is None:
        return None
    return {
        "type": error.type,
        "message": error.message,
        "traceback": error.traceback,
        "attempts": error.attempts,
        "time": error.time,
    }


def _error_from(d: dict[str, Any] | None) -> ErrorInfo | None:
    if d is None:
        return None
    return ErrorInfo(d["type"], d["message"], d["traceback"], d["attempts"], d["time"])


def encode_dead_letter(message: Message, error: ErrorInfo) -> bytes:
    """A dead letter: the queue record's parts plus why it failed."""
    return codec.encode(
        {
            "kind": message.kind,
            "reply": message.reply_slot,
            "payload": message.payload,
            "error": _error_dict(error),
        }
    )


def decode_dead_letter(stamp: bytes, data: bytes) -> tuple[Message, ErrorInfo]:
    d = codec.decode(data)
    error = _error_from(d["error"])
    assert error is not None
    return Message(stamp, d["kind"], d["payload"], d["reply"], len(d["payload"])), error


def _describe_failure(exc: BaseException, attempts: int) -> ErrorInfo:
    kind = type(exc)
    name = (
        kind.__qualname__
        if kind.__module__ == "builtins"
        else f"{kind.__module__}.{kind.__qualname__}"
    )
    text = "".join(traceback.format_exception(exc))
    if len(text) > _MAX_TRACEBACK:
        text = "...\n" + text[-_MAX_TRACEBACK:]
    return ErrorInfo(name, str(exc)[:_MAX_TRACEBACK], text, attempts, time.time())


class Consumer:
    """Consumes one tenant's queue on one database. Use :func:`dgen.start` or
    :func:`dgen.serve` rather than this class directly."""

    def __init__(
        self,
        server: DGenServer,
        db: Database,
        tenant: str,
        *,
        batch_size: int = 16,
        lease: float = 30.0,
        gc_interval: float = 60.0,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if lease <= 0:
            raise ValueError(f"lease must be positive, got {lease}")
        self.server = server
        self.db = db
        self.keys = TenantKeys(tenant)
        self.tenant = tenant
        self.batch_size = batch_size
        self.lease = lease
        self.gc_interval = gc_interval
        self.owner = uuid.uuid4().bytes
        self.stats = ConsumerStats()
        self.stop_reason: Any = None
        self._cache: _Cached | None = None
        self._cache_dirty = False
        self._max_value = db.limits.max_value_size
        # Read version, queue head and push key together where that saves round trips.
        self._together = db.capabilities.combines_reads
        self._lock_seen = False  # the last transaction found the tenant locked
        self.layout = StateLayout(self.keys.state, self._max_value)
        self._next_gc = 0.0
        self._batch_limit: int | None = None
        self._outage_delay = 0.0
        self.max_attempts = server.max_attempts
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1 or None, got {self.max_attempts}")
        # Poison-message bookkeeping (see the module docs).
        self._probing = self.max_attempts is not None
        self._counted: bytes | None = None  # stamp whose running attempt is counted
        self._failed: Message | None = None  # the message whose handler just raised

    # -- transactions with cache invalidation ---------------------------------

    async def _run(self, fn: Callable[[Transaction], Awaitable[T]]) -> T:
        """``db.run(fn)``, dropping the cache whenever an attempt fails: a
        handler may have mutated the cached state in place."""
        in_flight = False

        async def attempt(tr: Transaction) -> T:
            nonlocal in_flight
            if in_flight:
                self._cache_dirty = True
            in_flight = True
            self.stats.attempts += 1
            return await fn(tr)

        try:
            result = await self.db.run(attempt)
        except BaseException:
            self._cache_dirty = True
            raise
        self.stats.transactions += 1
        return result

    def _set_cache(self, cache: _Cached | None) -> None:
        self._cache = cache
        self._cache_dirty = False

    async def _load_state(self, tr: Transaction) -> _Cached | None:
        """The state as of this transaction: from the cache if the version key
        still holds the cached token, else from the store. None if no state."""
        return await self._state_at(tr, await tr.get(self.keys.version))

    async def _state_at(self, tr: Transaction, token: bytes | None) -> _Cached | None:
        """:meth:`_load_state`, the version key's value ``token`` read already."""
        if token is None:
            return None
        cache = self._cache
        if cache is not None and cache.token == token:
            self.stats.cache_hits += 1
            if self._cache_dirty:
                # A failed attempt may have mutated the cached object: rebuild it
                # from the cached bytes, which still match the token.
                state, _ = self.layout.rebuild(sorted(cache.flat.entries.items()))
                cache = self._cache = _Cached(token, state, cache.flat)
                self._cache_dirty = False
            return cache
        found, state, flat = await self.layout.read(tr)
        if not found:
            raise codec.DecodeError(f"tenant {self.tenant!r} has a version key but no state")
        self.stats.state_reads += 1
        return _Cached(token, state, flat)

    def _write_state(self, tr: Transaction, state: Any, old: _Cached | None) -> _Cached:
        # Incremental: only the keys that differ from the stored layout are written.
        try:
            flat = self.layout.flatten(state, old.flat if old is not None else None)
        except codec.UnencodableError as exc:
            exc.add_note(f"dgen: in the new state of tenant {self.tenant!r}")
            raise
        if old is None:
            tr.clear_range(*self.layout.range)  # init or reset: drop any previous state
            changes = diff(None, flat)
        else:
            changes = diff(old.flat, flat)
            if not changes.keys_touched:
                return _Cached(old.token, state, flat)
        changes.apply(tr)
        self.stats.state_keys_written += changes.keys_touched
        self.stats.state_bytes_written += changes.bytes_written
        token = os.urandom(16)  # as uuid4, without building a UUID
        tr.set(self.keys.version, token)
        return _Cached(token, state, flat)

    # -- start ------------------------------------------------------------------

    async def initialise(self, arg: Any = None, *, reset: bool = False) -> None:
        """Run ``init(arg)`` if the tenant has no state (or ``reset``); fill the cache."""

        async def init(tr: Transaction) -> _Cached:
            current = None if reset else await self._load_state(tr)
            if current is not None:
                return current
            state = await _maybe_await(self.server.init(arg))
            return self._write_state(tr, state, None)

        self._set_cache(await self._run(init))

    # -- the loop -----------------------------------------------------------------

    async def run(self) -> Any:
        """Consume until a handler returns :class:`Stop` (returns its reason)
        or the task is cancelled. A handler's exception propagates."""
        while True:
            try:
                if self._cache is None:
                    await self.initialise()
                stop = await self._turn()
            except _STORE_TROUBLE as exc:
                # The store is down or a commit's outcome is unknown: not a handler
                # bug, so wait and go on. The cache is checked against the version
                # key on the next turn, so whatever did commit is read back.
                await self._wait_for_store(exc)
                continue
            self._outage_delay = 0.0
            if stop is not _CONTINUE:
                return stop

    async def _wait_for_store(self, exc: BaseException) -> None:
        self._outage_delay = min(max(self._outage_delay * 2, 0.05), 5.0)
        log.warning(
            "store unavailable for tenant %r (%s: %s); retrying in %.2f s",
            self.tenant,
            type(exc).__name__,
            exc,
            self._outage_delay,
            extra=self._log_fields("store_unavailable", ""),
        )
        await asyncio.sleep(self._outage_delay)

    async def _turn(self) -> Any:
        """One consume transaction and what follows it; the stop reason, or
        _CONTINUE."""
        while True:
            await self._collect_garbage()
            try:
                outcome = await self._run(self._consume)
            except _SmallerBatch as smaller:
                self._batch_limit = smaller.size
                continue
            except Exception as exc:
                failed, self._failed = self._failed, None
                if failed is None or self.max_attempts is None:
                    raise
                dead = await self._count_failure(failed, exc)
                if dead is None:
                    raise
                outcome = dead
            self._batch_limit = None
            if isinstance(outcome, _Wait):
                self.stats.lock_waits += outcome.locked
                if not outcome.locked:
                    self._probing = False  # an empty queue: nothing left to suspect
                await self._sleep(outcome)
                continue
            if isinstance(outcome, _Counted):
                self._counted = outcome.stamp
                continue
            if isinstance(outcome, _Done):
                # The suspect message completed (or was dead-lettered): trust the rest.
                self._probing = False
                self._counted = None
            if isinstance(outcome, _TakeOver):
                self._set_cache(outcome.cache)
                stop = await self._run_locked(outcome.record, outcome.cache.state)
            else:
                self._set_cache(outcome.cache)
                if outcome.dead_letter is not None:
                    self._log_dead_letter(outcome.dead_letter)
                # A locked message counts once handle_locked's result commits.
                self.stats.messages += outcome.messages - (outcome.locked is not None)
                await self._run_actions(outcome.actions)
                stop = outcome.stop
                if outcome.locked is not None:
                    stop = await self._run_locked(outcome.locked, outcome.cache.state)
            watch = outcome.watch if isinstance(outcome, _Done) else None
            if stop is not None:
                if watch is not None:
                    watch.cancel()
                self.stop_reason = stop.reason
                return stop.reason
            if watch is not None:
                await self._sleep(_Wait(watch))
            return _CONTINUE

    async def _sleep(self, wait: _Wait) -> None:
        try:
            async with asyncio.timeout(wait.timeout):
                await wait.watch
        except TimeoutError:
            pass
        finally:
            wait.watch.cancel()

    async def _consume(self, tr: Transaction) -> _Done | _Wait | _TakeOver | _Counted:
        self._failed = None
        # A batch reads the head as a snapshot and declares a conflict on the
        # messages it consumes only (in _handle_batch): a short queue read no
        # longer conflicts with every producer appending behind it. A probe
        # reads one key, which conflicts with nothing behind it anyway.
        limit = 1 if self._probing else self._batch_limit or self.batch_size
        head: tuple[list[Message], bool] | None = None
        db = id(self.db)  # (a third-party Database need not be hashable)
        if (
            self._together
            and not self._probing  # (its head read is not a snapshot: conflicts)
            and not self._lock_seen  # (a lock is likely still there)
            and _gathering.get(db, 0) < _GATHER_MAX
        ):
            # All four reads in one round trip. Each read waits as a task of
            # its own (about 10 KB in all) until the transaction has a pooled
            # connection, so only a few consumers of a database do this at
            # once: 1,000 consumers starting together would cost 10 MB.
            _gathering[db] = _gathering.get(db, 0) + 1
            try:
                raw_lock, token, head, _ = await asyncio.gather(
                    read_blob(tr, self.keys.lock),
                    tr.get(self.keys.version),
                    read_head(tr, self.keys, limit, snapshot=True),
                    tr.get(self.keys.push, snapshot=True),
                )
            finally:
                if (left := _gathering.pop(db) - 1) > 0:
                    _gathering[db] = left
        else:
            raw_lock = await read_blob(tr, self.keys.lock)
        self._lock_seen = raw_lock is not None
        if raw_lock is not None:
            record = _LockRecord.decode(raw_lock)
            remaining = record.deadline - time.time()
            if remaining > 0 and record.owner != self.owner:
                return _Wait(tr.watch(self.keys.lock), remaining + 0.01, locked=True)
            return await self._take_over(tr, record)
        if head is None and self._together:
            # The other three together, on the snapshot the lock read began
            # (the push key is the baseline of the watch armed when the batch
            # empties the queue, else read at commit).
            token, head, _ = await asyncio.gather(
                tr.get(self.keys.version),
                read_head(tr, self.keys, limit, snapshot=not self._probing),
                tr.get(self.keys.push, snapshot=True),
            )
        elif head is None:
            token = await tr.get(self.keys.version)
        current = await self._state_at(tr, token)
        if current is None:
            raise RuntimeError(f"tenant {self.tenant!r} has no state (was it deleted?)")
        if head is None:
            head = await read_head(tr, self.keys, limit, snapshot=not self._probing)
        messages, whole = head
        if not messages:
            return _Wait(tr.watch(self.keys.push))
        if self._probing and messages[0].stamp != self._counted:
            # (Once counted, the suspect runs alone, limit 1: a crash is its own.)
            return await self._probe(tr, current, messages[0])
        done = await self._handle_batch(tr, current, messages)
        if whole and done.messages == len(messages) and not (done.stop or done.locked):
            # The batch emptied the queue as of this snapshot: arm the push watch
            # here, not in a read-only transaction of its own after this one (it
            # fires at once if a producer committed meanwhile).
            done.watch = tr.watch(self.keys.push)
        return done

    async def _handle_batch(
        self, tr: Transaction, current: _Cached, messages: list[Message]
    ) -> _Done:
        state = current.state
        done = _Done(current, 0)
        last = messages[0]
        budget = self.db.limits.max_transaction_size // 4
        time_budget = self.db.limits.max_transaction_seconds
        started = time.monotonic()
        for message in messages:
            # Keep a batch well inside the backend's transaction limits.
            if done.messages and (
                (budget := budget - message.size) < 0
                or (time_budget is not None and time.monotonic() - started > time_budget / 2)
            ):
                break
            try:
                result = await self._dispatch(message, state)
                reply = None
                if message.kind == "call" and not isinstance(result, (NoReply, Lock)):
                    value = result.value if isinstance(result, Reply) else result.reply
                    reply = codec.encode(value)
            except Exception:
                if done.messages:
                    # Commit the messages before the failing one without it (the
                    # handler may have half-mutated the state): retry a smaller batch.
                    raise _SmallerBatch(done.messages) from None
                self._failed = message
                raise
            state = result.state
            clear_message(tr, self.keys, message.stamp)
            done.messages += 1
            last = message
            if reply is not None:
                await self._write_reply(tr, message.reply_slot, reply)
            if result.actions:
                done.actions.append((result.actions, state, message.id))
            if isinstance(result, Lock):
                now = time.time()
                done.locked = _LockRecord(
                    self.owner,
                    now + self.lease,
                    self.lease,
                    message.kind,
                    message.payload,
                    message.reply_slot,
                    message.stamp,
                    now,
                    _HOLDER,
                )
                write_blob(tr, self.keys.lock, done.locked.encode(), self._max_value)
                break
            if isinstance(result, Stop):
                done.stop = result
                break
        try:
            done.cache = self._write_state(tr, state, current)
        except Exception:
            if done.messages > 1:
                raise _SmallerBatch(done.messages - 1) from None  # find the culprit
            self._failed = last
            raise
        # Another consumer of the same messages, or an operator requeueing one
        # at the head, conflicts here; producers (later stamps) do not.
        tr.add_read_conflict_range(self.keys.queue_begin, self.keys.message(last.stamp) + b"\xff")
        if self.max_attempts is not None:
            # Attempt records of consumed messages (and older leftovers) go too:
            # one blind range clear, which never conflicts with producers.
            tr.clear_range(self.keys.attempts_begin, self.keys.attempts_through(last.stamp))
        return done

    async def _dispatch(self, message: Message, state: Any) -> Result:
        try:
            payload = codec.decode(message.payload)
            if message.kind == "call":
                result: Any = await _maybe_await(
                    self.server.handle_call(payload, Caller(message.id), state)
                )
                allowed: tuple[type, ...] = (Reply, NoReply, Lock, Stop)
            else:
                result = await _maybe_await(self.server.handle_cast(payload, state))
                allowed = (NoReply, Lock, Stop)
            if type(result) not in allowed:
                names = ", ".join(t.__name__ for t in allowed)
                raise TypeError(
                    f"handle_{message.kind} of {type(self.server).__name__} returned "
                    f"{type(result).__name__}; expected one of {names}"
                )
        except BaseException as exc:
            exc.add_note(f"dgen: tenant {self.tenant!r}, {message.kind} message {message.id}")
            raise
        return cast(Result, result)

    async def _write_reply(self, tr: Transaction, slot: bytes | None, data: bytes) -> None:
        # A missing slot means the caller timed out and removed it: drop the reply.
        if slot is not None and await tr.get(slot) is not None:
            write_blob(tr, slot, data, self._max_value)

    async def _run_actions(self, batches: list[tuple[Sequence[Action], Any, str]]) -> None:
        for actions, state, message_id in batches:
            for action in actions:
                try:
                    await _maybe_await(action(state))
                except Exception:
                    self.stats.action_failures += 1
                    log.exception(
                        "action failure: after-commit action %r failed (tenant %r, message "
                        "%s); the commit stands and the consumer continues",
                        action,
                        self.tenant,
                        message_id,
                        extra=self._log_fields("action_failure", message_id),
                    )

    # -- poison messages -----------------------------------------------------------

    def _log_fields(self, event: str, message_id: str, **more: Any) -> dict[str, Any]:
        """``extra=`` fields of an operator log line (see docs/operating.md)."""
        return {"dgen_event": event, "tenant": self.tenant, "message_id": message_id, **more}

    async def _probe(self, tr: Transaction, current: _Cached, head: Message) -> _Done | _Counted:
        """Count an attempt of ``head`` before running it (its previous attempt
        may have died with its process), or dead-letter it at the limit."""
        assert self.max_attempts is not None
        key = self.keys.attempts(head.stamp)
        attempts, error = decode_attempts(await read_blob(tr, key))
        if attempts >= self.max_attempts:
            if error is None:
                error = ErrorInfo(
                    "Interrupted",
                    f"the handler did not complete in {attempts} attempts (its consumer "
                    "died or was stopped inside it each time)",
                    "",
                    attempts,
                    time.time(),
                )
            else:  # the last failure that raised; later attempts were interrupted
                error = dataclasses.replace(error, attempts=attempts, time=time.time())
            return await self._dead_letter(tr, current, head, error)
        # Records of stamps before the head belong to messages no longer queued.
        tr.clear_range(self.keys.attempts_begin, key)
        write_blob(tr, key, encode_attempts(attempts + 1, error), self._max_value)
        self.stats.attempts_counted += 1
        return _Counted(head.stamp, attempts + 1)

    async def _count_failure(self, message: Message, exc: Exception) -> _Done | None:
        """Record a handler's failure in a transaction of its own. Returns the
        dead-lettering outcome at the limit; None means: crash (re-raise)."""
        assert self.max_attempts is not None
        max_attempts = self.max_attempts
        counted = self._counted == message.stamp
        key = self.keys.attempts(message.stamp)

        async def record(tr: Transaction) -> _Done | int | None:
            if await tr.get(self.keys.message(message.stamp)) is None:
                return None  # consumed elsewhere meanwhile: nothing to count
            attempts, _ = decode_attempts(await read_blob(tr, key))
            # A probe already counted this attempt (unless its record was cleared).
            attempts = max(attempts, 1) if counted else attempts + 1
            error = _describe_failure(exc, attempts)
            if attempts >= max_attempts:
                current = await self._load_state(tr)
                if current is None:
                    raise RuntimeError(f"tenant {self.tenant!r} has no state (was it deleted?)")
                return await self._dead_letter(tr, current, message, error)
            write_blob(tr, key, encode_attempts(attempts, error), self._max_value)
            return attempts

        try:
            outcome = await self._run(record)
        except Exception as failure:
            exc.add_note(f"dgen: could not count this failed attempt: {failure!r}")
            return None
        self.stats.attempts_counted += 1
        if isinstance(outcome, _Done):
            return outcome
        self._log_crash(message, exc, outcome)
        return None

    def _log_crash(
        self, message: Message, exc: Exception, attempt: int | None, where: str = ""
    ) -> None:
        log.error(
            "crash: tenant %r, %s%s message %s failed (attempt %s of %s): %s: %s",
            self.tenant,
            where,
            message.kind,
            message.id,
            attempt if attempt is not None else "?",
            self.max_attempts,
            type(exc).__name__,
            exc,
            extra=self._log_fields(
                "crash",
                message.id,
                attempt=attempt,
                max_attempts=self.max_attempts,
                error_type=type(exc).__name__,
            ),
        )

    async def _dead_letter(
        self, tr: Transaction, current: _Cached, message: Message, error: ErrorInfo
    ) -> _Done:
        """Move ``message`` to the dead letters, run ``handle_dead_letter`` and
        answer a waiting caller with an error, all in this transaction."""
        state = current.state
        done = _Done(current, 0, dead_letter=message.id)
        try:
            payload = codec.decode(message.payload)
        except Exception:
            payload = None
        try:
            result = await _maybe_await(
                self.server.handle_dead_letter(message.kind, payload, error, state)
            )
            if result is not None and type(result) is not NoReply:
                raise TypeError(
                    f"handle_dead_letter of {type(self.server).__name__} returned "
                    f"{type(result).__name__}; expected None or NoReply"
                )
            new_state = state if result is None else result.state
            done.cache = self._write_state(tr, new_state, current)
            if result is not None and result.actions:
                done.actions.append((result.actions, new_state, message.id))
        except Exception:
            log.exception(
                "handle_dead_letter failed (tenant %r, message %s); the message is "
                "dead-lettered with the state unchanged",
                self.tenant,
                message.id,
                extra=self._log_fields("dead_letter_callback_failure", message.id),
            )
            # It may have mutated the cached state in place: rebuild from bytes.
            rebuilt, _ = self.layout.rebuild(sorted(current.flat.entries.items()))
            done.cache = _Cached(current.token, rebuilt, current.flat)
        write_blob(
            tr,
            self.keys.dead_letter(message.stamp),
            encode_dead_letter(message, error),
            self._max_value,
        )
        clear_message(tr, self.keys, message.stamp)
        tr.clear_range(self.keys.attempts_begin, self.keys.attempts_through(message.stamp))
        if message.reply_slot is not None and await tr.get(message.reply_slot) is not None:
            write_error_reply(
                tr,
                message.reply_slot,
                "dead-letter",
                f"the call's message {message.id} to tenant {self.tenant!r} failed "
                f"{error.attempts} times and was moved to the dead letters: "
                f"{error.type}: {error.message}",
                self._max_value,
            )
        return done

    def _log_dead_letter(self, message_id: str) -> None:
        self.stats.dead_letters += 1
        log.error(
            "dead letter: tenant %r, message %s reached max_attempts=%s and was moved to "
            "the dead letters (see: dgen dead-letters list URL %s); the queue proceeds",
            self.tenant,
            message_id,
            self.max_attempts,
            self.tenant,
            extra=self._log_fields("dead_letter", message_id, max_attempts=self.max_attempts),
        )

    # -- locks ----------------------------------------------------------------------

    async def _take_over(self, tr: Transaction, record: _LockRecord) -> _TakeOver | _Done:
        current = await self._load_state(tr)
        if current is None:
            raise RuntimeError(f"tenant {self.tenant!r} is locked but has no state")
        attempts = record.attempts
        if record.owner != self.owner:
            # The previous owner's run did not finish (unless it counted its failure).
            attempts += record.running
            if self.max_attempts is not None and attempts >= self.max_attempts:
                error = _error_from(record.error)
                error = (
                    ErrorInfo(
                        "Interrupted",
                        f"handle_locked did not complete in {attempts} attempts (its "
                        "consumer died or was stopped inside it each time)",
                        "",
                        attempts,
                        time.time(),
                    )
                    if error is None
                    else dataclasses.replace(error, attempts=attempts, time=time.time())
                )
                return await self._dead_letter_locked(tr, current, record, error)
            log.warning(
                "lock takeover: tenant %r, message %s: the lease of %s expired; "
                "handle_locked runs again",
                self.tenant,
                record.stamp.hex(),
                record.holder or "its consumer",
                extra=self._log_fields("lock_takeover", record.stamp.hex(), holder=record.holder),
            )
            self.stats.lock_takeovers += 1
        now = time.time()
        taken = _LockRecord(
            self.owner,
            now + self.lease,
            self.lease,
            record.kind,
            record.payload,
            record.reply_slot,
            record.stamp,
            now,
            _HOLDER,
            attempts,
            True,
            record.error,
        )
        write_blob(tr, self.keys.lock, taken.encode(), self._max_value)
        return _TakeOver(taken, current)

    async def _dead_letter_locked(
        self, tr: Transaction, current: _Cached, record: _LockRecord, error: ErrorInfo
    ) -> _Done:
        """Dead-letter a locked message: release the lock; the state stays as
        committed when the lock was taken."""
        tr.clear(self.keys.lock)
        tr.clear_range(self.keys.lock + b"\x00", self.keys.lock + b"\xff")
        return await self._dead_letter(tr, current, record.message(), error)

    async def _locked_failed(self, record: _LockRecord, exc: Exception) -> bool:
        """Count a failure of ``handle_locked`` in the lock record (fenced). At
        the limit, dead-letter the message and return True: carry on."""
        if self.max_attempts is None:
            return False
        max_attempts = self.max_attempts

        async def count(tr: Transaction) -> _Done | int | None:
            raw = await read_blob(tr, self.keys.lock)
            if raw is None:
                return None
            stored = _LockRecord.decode(raw)
            if stored.owner != self.owner:
                return None  # taken over meanwhile: the new owner counts
            stored.attempts += 1
            error = _describe_failure(exc, stored.attempts)
            if stored.attempts >= max_attempts:
                current = await self._load_state(tr)
                if current is None:
                    raise RuntimeError(f"tenant {self.tenant!r} is locked but has no state")
                return await self._dead_letter_locked(tr, current, stored, error)
            # Counted: the next consumer takes over after the lease without counting again.
            stored.running = False
            stored.error = _error_dict(error)
            write_blob(tr, self.keys.lock, stored.encode(), self._max_value)
            return stored.attempts

        try:
            outcome = await self._run(count)
        except Exception as failure:
            exc.add_note(f"dgen: could not count this failed attempt: {failure!r}")
            return False
        if isinstance(outcome, _Done):
            self._set_cache(outcome.cache)
            assert outcome.dead_letter is not None
            self._log_dead_letter(outcome.dead_letter)
            await self._run_actions(outcome.actions)
            return True
        self._log_crash(record.message(), exc, outcome, "handle_locked of ")
        return False

    async def _renew(self, record: _LockRecord) -> None:
        async def renew(tr: Transaction) -> bool:
            raw = await read_blob(tr, self.keys.lock)
            if raw is None or _LockRecord.decode(raw).owner != self.owner:
                return False
            record.deadline = time.time() + self.lease
            write_blob(tr, self.keys.lock, record.encode(), self._max_value)
            return True

        while True:
            await asyncio.sleep(self.lease / 3)
            try:
                held = await self.db.run(renew)
            except _STORE_TROUBLE as exc:
                log.warning(
                    "could not renew the lease of tenant %r (%s); trying again",
                    self.tenant,
                    exc,
                    extra=self._log_fields("lease_renewal_failed", record.stamp.hex()),
                )
                continue
            if not held:
                log.warning(
                    "lost the lock of tenant %r (message %s) to another consumer",
                    self.tenant,
                    record.stamp.hex(),
                    extra=self._log_fields("lock_lost", record.stamp.hex()),
                )
                return

    @staticmethod
    async def _stop_renewing(renewer: asyncio.Future[None]) -> None:
        renewer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await renewer

    async def _expire_lease(self) -> None:
        async def expire(tr: Transaction) -> None:
            raw = await read_blob(tr, self.keys.lock)
            if raw is None:
                return
            record = _LockRecord.decode(raw)
            if record.owner == self.owner:
                record.deadline = 0.0
                write_blob(tr, self.keys.lock, record.encode(), self._max_value)

        try:
            async with asyncio.timeout(5):
                await self.db.run(expire)
        except Exception:
            log.warning(
                "could not release the lock of tenant %r on stop; another consumer takes "
                "it over after the lease",
                self.tenant,
                exc_info=True,
            )

    def _locked_reply(self, record: _LockRecord, result: Any) -> bytes | None:
        """Check ``handle_locked``'s result; the encoded reply of a call."""
        allowed: tuple[type, ...] = (
            (Reply, NoReply, Stop) if record.kind == "call" else (NoReply, Stop)
        )
        if type(result) not in allowed:
            raise TypeError(
                f"handle_locked of {type(self.server).__name__} returned "
                f"{type(result).__name__}; expected one of "
                f"{', '.join(t.__name__ for t in allowed)}"
            )
        if record.kind == "call" and not isinstance(result, NoReply):
            return codec.encode(result.value if isinstance(result, Reply) else result.reply)
        return None

    async def _run_locked(self, record: _LockRecord, state: Any) -> Stop | None:
        message_id = record.stamp.hex()
        message = codec.decode(record.payload)
        renewer = asyncio.ensure_future(self._renew(record))
        try:
            result: Any = await _maybe_await(self.server.handle_locked(record.kind, message, state))
        except asyncio.CancelledError:
            # Stopped on purpose (its scope ended): give the lock up now, so another
            # consumer takes over (and reruns handle_locked) without waiting a lease.
            await self._stop_renewing(renewer)
            await self._expire_lease()
            raise
        except BaseException as exc:
            await self._stop_renewing(renewer)
            exc.add_note(f"dgen: tenant {self.tenant!r}, handle_locked of message {message_id}")
            if isinstance(exc, Exception) and await self._locked_failed(record, exc):
                return None  # dead-lettered: the queue proceeds
            raise
        await self._stop_renewing(renewer)
        try:
            reply = self._locked_reply(record, result)
        except Exception as exc:
            if await self._locked_failed(record, exc):
                return None
            raise

        async def release(tr: Transaction) -> _Cached | None:
            raw = await read_blob(tr, self.keys.lock)
            if raw is None or _LockRecord.decode(raw).owner != self.owner:
                return None  # fenced: another consumer took the lock over
            current = await self._load_state(tr)
            if reply is not None:
                await self._write_reply(tr, record.reply_slot, reply)
            tr.clear(self.keys.lock)
            tr.clear_range(self.keys.lock + b"\x00", self.keys.lock + b"\xff")
            return self._write_state(tr, result.state, current)

        try:
            while True:
                try:
                    cache = await self._run(release)
                    break
                except _STORE_TROUBLE as exc:
                    # handle_locked's side effects happened: keep trying to commit
                    # its result rather than run it again (fencing still applies).
                    await self._wait_for_store(exc)
        except codec.UnencodableError as exc:  # the new state: a failure of handle_locked
            exc.add_note(f"dgen: tenant {self.tenant!r}, handle_locked of message {message_id}")
            if await self._locked_failed(record, exc):
                return None
            raise
        if cache is None:
            log.warning(
                "discarding handle_locked result of tenant %r (message %s): the lock was "
                "taken over by another consumer after this one's lease expired",
                self.tenant,
                message_id,
                extra=self._log_fields("locked_result_discarded", message_id),
            )
            self._set_cache(None)
            return None
        self._set_cache(cache)
        self.stats.messages += 1
        await self._run_actions([(result.actions, result.state, message_id)])
        return result if isinstance(result, Stop) else None

    # -- housekeeping ---------------------------------------------------------------

    async def _collect_garbage(self) -> None:
        """Remove reply slots whose callers are long gone and expired enqueue
        receipts (throttled)."""
        now = time.time()
        if now < self._next_gc:
            return
        self._next_gc = now + self.gc_interval
        cutoff = self.keys.replies_before(int(now) - _REPLY_GRACE_SECONDS)

        receipts_cutoff = self.keys.receipts_before(int(now))

        async def collect(tr: Transaction) -> None:
            tr.clear_range(self.keys.replies_begin, cutoff)
            tr.clear_range(self.keys.receipts_begin, receipts_cutoff)

        await self.db.run(collect)

    def __repr__(self) -> str:
        return f"<Consumer tenant={self.tenant!r} pid={os.getpid()}>"
