"""Machinery shared by the conformance tests.

:func:`conformance_test` turns an ``async def check(store)`` into a plain
pytest test that takes the ``dgen_url`` fixture, runs the check in a fresh
event loop with a hang guard, skips it when the backend lacks a required
capability and clears the test's key prefix afterwards.
:class:`ConformanceStore` is what a check receives: its connections, its
private key prefix and its worker subprocesses.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import fields
from typing import TypeVar

import pytest

from dgen.keys import Element, pack, range_of
from dgen.store import (
    Capabilities,
    ConflictError,
    Database,
    KeyValue,
    Limits,
    Transaction,
    Watch,
)
from dgen.urls import connect

__all__ = [
    "TEST_TIMEOUT",
    "ConformanceStore",
    "Worker",
    "conformance_test",
    "read_prefix",
    "rerun_on_conflict",
    "wait_seconds",
    "wait_fired",
]

TEST_TIMEOUT = float(os.environ.get("DGEN_CONFORMANCE_TIMEOUT", "90"))
"""Seconds after which a hung conformance test fails (a hang guard only)."""


def wait_seconds() -> float:
    """Seconds to wait for something that must happen (a watch firing, a
    worker's line) before declaring it lost: ``DGEN_CONFORMANCE_WAIT``,
    default 20. Generous, because it only bounds a failing test."""
    return float(os.environ.get("DGEN_CONFORMANCE_WAIT", "20"))


PREFIX_ROOT = "dgen-conformance"
"""Every key the suite writes starts with ``pack((PREFIX_ROOT, <random hex>))``."""

_CAPABILITIES = {f.name for f in fields(Capabilities)}

T = TypeVar("T")
AsyncCheck = Callable[["ConformanceStore"], Awaitable[None]]


class Worker:
    """A ``python -m dgen.conformance.worker`` subprocess: it prints one line
    per event and may wait for lines on its stdin."""

    def __init__(self, proc: asyncio.subprocess.Process, mode: str) -> None:
        self.proc = proc
        self.mode = mode
        assert proc.stderr is not None
        self._stderr = asyncio.ensure_future(proc.stderr.read())

    async def readline(self, within: float | None = None) -> str:
        """The worker's next output line; fails the test at end of output."""
        assert self.proc.stdout is not None
        timeout = within or wait_seconds()
        try:
            raw = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        except TimeoutError:
            raw = None
        if raw is None:  # outside the except block: no chained traceback
            pytest.fail(f"worker {self.mode!r} printed nothing for {timeout} s")
        if not raw:
            await self._finish()
            pytest.fail(
                f"worker {self.mode!r} exited with code {self.proc.returncode} "
                f"before printing the expected line; its stderr:\n{await self.stderr()}"
            )
        return raw.decode().strip()

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")

    async def stderr(self) -> str:
        return (await self._stderr).decode(errors="replace")

    async def _finish(self) -> None:
        await self.proc.wait()
        await self._stderr

    async def wait(self, within: float | None = None) -> None:
        """Wait for a clean exit; fail the test on a non-zero exit code."""
        timeout = within or wait_seconds()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.proc.wait(), timeout)
        if self.proc.returncode is None:
            pytest.fail(f"worker {self.mode!r} did not finish within {timeout} s")
        await self._stderr
        if self.proc.returncode != 0:
            pytest.fail(
                f"worker {self.mode!r} failed with exit code {self.proc.returncode}; "
                f"its stderr:\n{await self.stderr()}"
            )

    async def kill(self) -> None:
        """SIGKILL the worker (no cleanup, as in a crash) and reap it."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGKILL)
        await self._finish()


class ConformanceStore:
    """The backend under test, as one conformance test sees it.

    ``db`` is an open connection; :meth:`connect` opens more to the same URL.
    Every key a test writes is under :attr:`prefix`, a tuple-packed random
    prefix, so the suite can run against a shared, non-empty database; only
    that prefix is cleared when the test ends.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.prefix = pack((PREFIX_ROOT, uuid.uuid4().hex))
        self._dbs: list[Database] = []
        self._workers: list[Worker] = []
        self._db: Database | None = None

    @property
    def db(self) -> Database:
        if self._db is None:
            raise RuntimeError("the store is closed; call reopen()")
        return self._db

    @property
    def capabilities(self) -> Capabilities:
        return self.db.capabilities

    @property
    def limits(self) -> Limits:
        return self.db.limits

    def key(self, *items: Element) -> bytes:
        """A key under this test's prefix."""
        return pack(items, self.prefix)

    def range(self, *items: Element) -> tuple[bytes, bytes]:
        """``(begin, end)`` of every key under this test's prefix plus ``items``."""
        return range_of(items, self.prefix)

    async def connect(self) -> Database:
        """Another connection to the same store, closed when the test ends."""
        db = await connect(self.url)
        self._dbs.append(db)
        return db

    async def close_all(self) -> None:
        """Close every connection this test opened (``db`` included)."""
        dbs, self._dbs, self._db = self._dbs, [], None
        for db in dbs:
            await db.aclose()

    async def reopen(self) -> Database:
        """Close every connection, then open ``db`` afresh."""
        await self.close_all()
        self._db = await self.connect()
        return self._db

    async def spawn(self, mode: str, *args: object) -> Worker:
        """Start a worker process on this store and prefix (see
        :mod:`dgen.conformance.worker` for the modes)."""
        env = dict(os.environ)
        # The child must import what this process imports (the backend under
        # test may be importable only through pytest's sys.path additions).
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if isinstance(p, str) and p)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "dgen.conformance.worker",
            self.url,
            self.prefix.hex(),
            mode,
            *(str(a) for a in args),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        worker = Worker(proc, mode)
        self._workers.append(worker)
        return worker

    async def _teardown(self) -> None:
        for worker in self._workers:
            await worker.kill()
        if self._db is None:
            await self.reopen()
        begin, end = self.range()

        async def clear(tr: Transaction) -> None:
            tr.clear_range(begin, end)

        try:
            await self.db.run(clear)
        finally:
            await self.close_all()


async def rerun_on_conflict(scenario: Callable[[], Awaitable[T]], attempts: int = 5) -> T:
    """Run a scenario that drives transactions by hand (not through
    ``db.run``), rerunning it when it raises :class:`ConflictError`.

    The store may be shared with other clients, and any transaction may
    conflict with them, so one conflict proves nothing; a conflict on every
    attempt is the scenario's own doing and is raised.
    """
    for attempt in range(attempts):
        try:
            return await scenario()
        except ConflictError:
            if attempt == attempts - 1:
                raise
            await asyncio.sleep(0.01 * (attempt + 1))
    raise AssertionError("unreachable")


async def read_prefix(db: Database, begin: bytes, end: bytes) -> list[KeyValue]:
    """Every pair in ``[begin, end)``, read in one transaction."""

    async def read(tr: Transaction) -> list[KeyValue]:
        return await tr.get_range(begin, end)

    return await db.run(read)


async def wait_fired(watch: Watch, what: str, within: float | None = None) -> None:
    """Await ``watch``; fail the test if it has not fired after ``within``
    seconds (default :func:`wait_seconds`)."""
    timeout = within or wait_seconds()
    try:
        await asyncio.wait_for(_awaited(watch), timeout)
        return
    except TimeoutError:
        pass
    pytest.fail(f"watch on {watch.key!r} never fired ({timeout} s hang guard): {what}")


async def _awaited(watch: Watch) -> None:
    await watch


def conformance_test(*requires: str) -> Callable[[AsyncCheck], Callable[[str], None]]:
    """Make ``async def test_x(store)`` a pytest test on the ``dgen_url`` fixture.

    ``requires`` names :class:`~dgen.store.Capabilities` flags; the test is
    skipped, with the reason, when the backend does not declare one of them.
    """
    unknown = set(requires) - _CAPABILITIES
    if unknown:
        raise ValueError(f"unknown capabilities {sorted(unknown)}; known: {sorted(_CAPABILITIES)}")

    def decorate(check: AsyncCheck) -> Callable[[str], None]:
        def test(dgen_url: str) -> None:
            asyncio.run(_run(check, dgen_url, requires))

        # Copy the identity by hand: functools.wraps would set __wrapped__,
        # and pytest would then ask for the check's own parameters.
        test.__name__ = check.__name__
        test.__qualname__ = check.__qualname__
        test.__doc__ = check.__doc__
        test.__module__ = check.__module__
        test.dgen_requires = requires  # type: ignore[attr-defined]
        return test

    return decorate


async def _run(check: AsyncCheck, url: str, requires: tuple[str, ...]) -> None:
    store = ConformanceStore(url)
    await store.reopen()
    failed = True
    try:
        missing = [c for c in requires if not getattr(store.capabilities, c)]
        if missing:
            pytest.skip(
                f"{type(store.db).__name__} does not declare capability "
                f"{', '.join(missing)} (dgen.store.Capabilities)"
            )
        hung = False
        try:
            await asyncio.wait_for(check(store), TEST_TIMEOUT)
        except TimeoutError:
            hung = True
        if hung:
            pytest.fail(f"the test hung for more than {TEST_TIMEOUT} s (hang guard)")
        failed = False
    finally:
        try:
            await asyncio.wait_for(store._teardown(), TEST_TIMEOUT)
        except Exception:
            if not failed:
                raise
