"""The DGenServer API: the server base class, handler results and errors.

A server's message queue and state live in the store under a *tenant*. A
consumer (:func:`dgen.start` or :func:`dgen.serve`) takes messages from the
head of the queue and runs the handlers; producers anywhere send messages
with a :class:`dgen.Handle`. See docs/runtime.md for the guarantees.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

from dgen.store import DGenError

__all__ = [
    "Action",
    "CallTimeoutError",
    "Caller",
    "DGenServer",
    "DeadLetteredError",
    "ErrorInfo",
    "Lock",
    "MessageDeletedError",
    "MessageDroppedError",
    "NoReply",
    "Reply",
    "ReplyLostError",
    "Result",
    "Stop",
]

Action = Callable[[Any], Union[Awaitable[None], None]]  # noqa: UP007
"""A callable run after commit with the committed state (sync or async)."""


@dataclass(frozen=True, slots=True)
class Reply:
    """From ``handle_call`` (or ``handle_locked`` of a call): answer the caller
    with ``value`` and make ``state`` the new state."""

    value: Any
    state: Any
    actions: Sequence[Action] = field(default=())


@dataclass(frozen=True, slots=True)
class NoReply:
    """Make ``state`` the new state; the caller of a call gets no reply (its
    call times out), so use it for casts."""

    state: Any
    actions: Sequence[Action] = field(default=())


@dataclass(frozen=True, slots=True)
class Lock:
    """Commit ``state``, lock the tenant's queue durably and run
    ``handle_locked`` outside any transaction (see :class:`DGenServer`)."""

    state: Any
    actions: Sequence[Action] = field(default=())


@dataclass(frozen=True, slots=True)
class Stop:
    """Commit ``state``, run the actions, and end this consumer. A call that
    returns Stop is answered with ``reply``."""

    state: Any
    reason: Any = "normal"
    actions: Sequence[Action] = field(default=())
    reply: Any = None


Result = Union[Reply, NoReply, Lock, Stop]  # noqa: UP007


@dataclass(frozen=True, slots=True)
class Caller:
    """Who sent a call: ``message_id`` is the queued message's id (hex)."""

    message_id: str


class CallTimeoutError(DGenError, TimeoutError):
    """A call's reply did not arrive in time. The message stays queued and is
    still processed; its reply is discarded."""


class ReplyLostError(DGenError):
    """The reply slot of a waiting call was removed (by an operator, or by
    garbage collection after its deadline) before a reply arrived."""


class MessageDroppedError(DGenError):
    """A call's message was removed from the queue without being handled, so
    no reply will come. The message says why and names the message id."""


class MessageDeletedError(MessageDroppedError):
    """An operator deleted the call's message from the queue
    (``dgen queue delete`` or :func:`dgen.admin.delete_message`)."""


class DeadLetteredError(MessageDroppedError):
    """The call's message failed ``max_attempts`` times and was moved to the
    tenant's dead letters (``dgen dead-letters list``)."""


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """Why a message was dead-lettered: the last failure seen, and how often
    its handler was attempted."""

    type: str
    """The exception's qualified type name, e.g. ``"ValueError"``, or
    ``"Interrupted"`` when no attempt raised (the consumer died or was
    stopped inside the handler each time)."""
    message: str
    """``str()`` of the exception."""
    traceback: str
    """The formatted traceback (empty for ``Interrupted``)."""
    attempts: int
    """Attempts counted (see :attr:`DGenServer.max_attempts`)."""
    time: float
    """When it was dead-lettered (unix seconds)."""


class DGenServer:
    """Base class of a durable server. Override the callbacks you need.

    Every callback may be a plain ``def`` or an ``async def``.

    ``init``, ``handle_call`` and ``handle_cast`` run inside the consuming
    transaction and may run more than once for one message (conflict retries,
    a crash before commit): they must be pure apart from the actions they
    return. They may mutate ``state`` in place; a failed attempt discards the
    consumer's cached copy.

    ``handle_locked`` runs outside any transaction and may have side effects,
    but is *at-least-once*: if its consumer dies before committing the result,
    another consumer runs it again after the lock's lease. Make its side
    effects idempotent, e.g. pass a key derived from the message (the
    ``message`` itself, or an id you put in the state before returning
    :class:`Lock`) to the external service as its idempotency key.

    Poison messages: a message whose handler (``handle_locked`` included)
    fails ``max_attempts`` times (raises, or its consumer dies inside it) is
    moved to the tenant's dead letters and the queue behind it proceeds; see
    docs/operating.md.
    """

    max_attempts: int | None = 5
    """Attempts of one message before it is dead-lettered. Each failing
    attempt before that still crashes the consumer ("let it crash"), so the
    failure stays visible; the attempt that reaches the limit dead-letters
    the message instead and the consumer carries on. ``None`` never
    dead-letters: a poison message crashes every consumer forever."""

    def init(self, arg: Any) -> Any:
        """Return the initial state. Runs only when the tenant has no stored
        state (or when started with ``reset=True``). Default: ``arg``."""
        return arg

    def handle_call(self, request: Any, caller: Caller, state: Any) -> Any:
        """Answer a call: return :class:`Reply`, :class:`Lock` or :class:`Stop`."""
        raise NotImplementedError(f"{type(self).__name__} does not handle calls")

    def handle_cast(self, message: Any, state: Any) -> Any:
        """Handle a cast: return :class:`NoReply`, :class:`Lock` or :class:`Stop`."""
        raise NotImplementedError(f"{type(self).__name__} does not handle casts")

    def handle_locked(self, kind: str, message: Any, state: Any) -> Any:
        """Run while the tenant is locked; ``kind`` is ``"call"`` or ``"cast"``.

        Return :class:`Reply` (calls), :class:`NoReply` or :class:`Stop`; the
        result is committed together with releasing the lock.
        """
        raise NotImplementedError(f"{type(self).__name__} returned Lock but has no handle_locked")

    def handle_dead_letter(self, kind: str, message: Any, error: ErrorInfo, state: Any) -> Any:
        """React to ``message`` being dead-lettered (``kind`` is ``"call"`` or
        ``"cast"``; ``message`` is None if it cannot be decoded).

        Runs inside the dead-lettering transaction, like ``handle_cast``: it
        may run more than once and must be pure apart from its actions.
        Return None (state unchanged) or :class:`NoReply` with the new state
        and actions. If it raises, the message is dead-lettered anyway with
        the state unchanged, and the failure is logged. Default: None.
        """
        return None
