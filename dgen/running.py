"""Starting consumers: :func:`start` (a scoped task) and :func:`serve` (a coroutine)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from dgen.consumer import Consumer, ConsumerStats
from dgen.handle import Handle
from dgen.server import DGenServer
from dgen.store import Database
from dgen.urls import connect

__all__ = ["RunningServer", "serve", "start"]


class RunningServer(Handle):
    """A :class:`Handle` whose tenant has a consumer running in this process."""

    def __init__(self, consumer: Consumer) -> None:
        super().__init__(consumer.db, consumer.tenant)
        self.consumer = consumer
        self.stopped = asyncio.Event()
        """Set when the consumer ended through a :class:`dgen.Stop` result."""

    @property
    def stats(self) -> ConsumerStats:
        return self.consumer.stats

    @property
    def stop_reason(self) -> Any:
        """The reason of the :class:`dgen.Stop` that ended the consumer, if any."""
        return self.consumer.stop_reason

    async def wait_stopped(self) -> Any:
        """Wait until a handler stops the consumer; return the stop reason."""
        await self.stopped.wait()
        return self.consumer.stop_reason


async def serve(
    server: DGenServer,
    db: Database,
    tenant: str,
    *,
    arg: Any = None,
    reset: bool = False,
    batch_size: int = 16,
    lease: float = 30.0,
) -> Any:
    """Initialise ``tenant`` if needed and consume its queue until a handler
    returns :class:`dgen.Stop` (returns the reason) or the task is cancelled.

    For your own task group; :func:`start` wraps this in a scope.
    """
    consumer = Consumer(server, db, tenant, batch_size=batch_size, lease=lease)
    await consumer.initialise(arg, reset=reset)
    return await consumer.run()


@asynccontextmanager
async def start(
    server: DGenServer,
    store: Database | str,
    tenant: str,
    *,
    arg: Any = None,
    reset: bool = False,
    batch_size: int = 16,
    lease: float = 30.0,
) -> AsyncIterator[RunningServer]:
    """Run a consumer for ``tenant`` while the ``async with`` block runs.

    ``store`` is an open :class:`Database` or a URL (opened and closed here).
    ``init(arg)`` runs before the block starts if the tenant has no state, or
    always with ``reset=True``. ``batch_size`` is the most messages consumed
    per transaction (1 disables batching); ``lease`` is how long, in seconds,
    a lock survives its consumer's death before another takes it over.

    Leaving the block cancels the consumer and removes the reply slots of
    the calls made through the yielded handle. If the consumer crashes (a
    handler raised), the block is cancelled and its exception propagates
    from the ``async with``; starting again retries the message.
    """
    async with _opened(store) as db:
        consumer = Consumer(server, db, tenant, batch_size=batch_size, lease=lease)
        await consumer.initialise(arg, reset=reset)
        running = RunningServer(consumer)

        async def consume() -> None:
            await consumer.run()
            running.stopped.set()

        try:
            async with asyncio.TaskGroup() as group:
                task = group.create_task(consume(), name=f"dgen consumer {tenant!r}")
                try:
                    yield running
                finally:
                    task.cancel()
        except BaseExceptionGroup as group_error:
            # One failure (the usual case): raise it as itself, not wrapped.
            if len(group_error.exceptions) == 1:
                raise group_error.exceptions[0] from None
            raise
        # The block's last call left its reply slot for the next enqueue;
        # there is none, so clear it now (best effort: else the GC does).
        with contextlib.suppress(Exception):
            await running.clear_finished()


@asynccontextmanager
async def _opened(store: Database | str) -> AsyncIterator[Database]:
    if isinstance(store, Database):
        yield store
    else:
        async with connect(store) as db:
            yield db
