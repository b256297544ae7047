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
    "Lock",
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
    """

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
