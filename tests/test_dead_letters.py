"""Poison messages: attempts counted across restarts (and SIGKILLs), dead
letters, retry, delete and purge through :mod:`dgen.admin`.

In-process tests run on every backend in tests/conftest.py's BACKENDS; the
SIGKILL test runs consumers as real OS processes on every backend with
``Capabilities.cross_process``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import textwrap
from collections.abc import AsyncIterator
from typing import Any

import pytest

import dgen
from dgen import admin
from dgen.queue import TenantKeys
from dgen.store import Database, Transaction

pytestmark = pytest.mark.anyio

WAIT = 60.0  # hang guard only


@pytest.fixture
async def db(store_url: str) -> AsyncIterator[Database]:
    async with dgen.connect(store_url) as database:
        yield database


class Poisoned(dgen.DGenServer):
    """Appends messages to a list; ``"poison..."`` messages raise while broken."""

    runs: dict[str, int]

    def __init__(self, max_attempts: int | None = 3, broken: bool = True) -> None:
        self.max_attempts = max_attempts
        self.broken = broken
        self.runs = {}
        self.dead: list[tuple[str, Any, dgen.ErrorInfo]] = []

    def init(self, arg: Any) -> Any:
        return {"seen": [], "dead": []}

    def _handle(self, message: Any, state: Any) -> None:
        if isinstance(message, str) and message.startswith("poison") and self.broken:
            self.runs[message] = self.runs.get(message, 0) + 1
            state["seen"].append("half-done")  # must never be committed
            raise ValueError(f"cannot handle {message}")
        state["seen"].append(message)

    def handle_cast(self, message: Any, state: Any) -> Any:
        self._handle(message, state)
        return dgen.NoReply(state)

    def handle_call(self, request: Any, caller: dgen.Caller, state: Any) -> Any:
        if request == "get":
            return dgen.Reply(state, state)
        self._handle(request, state)
        return dgen.Reply("done", state)

    def handle_dead_letter(self, kind: str, message: Any, error: dgen.ErrorInfo, state: Any) -> Any:
        self.dead.append((kind, message, error))
        state["dead"].append(message)
        return dgen.NoReply(state)


async def crash_until_dead_lettered(
    db: Database, server: Poisoned, tenant: str, restarts: int, **options: Any
) -> int:
    """Start consumers until one survives its first call; returns the crashes."""
    for crashes in range(restarts):
        try:
            async with dgen.start(server, db, tenant, **options) as running:
                await running.call("get", timeout=WAIT)
                return crashes
        except ValueError:
            continue
    raise AssertionError(f"still crashing after {restarts} restarts")


async def attempt_keys(db: Database, tenant: str) -> list[bytes]:
    keys = TenantKeys(tenant)

    async def read(tr: Transaction) -> list[bytes]:
        return [k for k, _ in await tr.get_range(keys.attempts_begin, keys.attempts_end)]

    return await db.run(read)


async def state_of(db: Database, tenant: str) -> Any:
    info = await admin.inspect_tenant(db, tenant, full_state=True)
    return info.state


@pytest.mark.parametrize("batch_size", [1, 16])
async def test_a_poison_message_is_retried_max_attempts_times_then_dead_lettered(
    db: Database, batch_size: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dgen")
    ids = await dgen.handle(db, "p").cast_many(["a", "poison", "b"])
    server = Poisoned(max_attempts=3)
    crashes = await crash_until_dead_lettered(db, server, "p", 10, batch_size=batch_size)
    # Two attempts crash the consumer; the third dead-letters the message and
    # the consumer carries on with the queue behind it.
    assert crashes == 2
    assert server.runs == {"poison": 3}
    state = await state_of(db, "p")
    assert state == {"seen": ["a", "b"], "dead": ["poison"]}
    (dead,) = await admin.list_dead_letters(db, "p")
    assert (dead.id, dead.kind, dead.message) == (ids[1], "cast", "poison")
    assert (dead.error.type, dead.error.message, dead.error.attempts) == (
        "ValueError",
        "cannot handle poison",
        3,
    )
    assert "raise ValueError" in dead.error.traceback
    assert [(kind, message) for kind, message, _ in server.dead] == [("cast", "poison")]
    assert await admin.list_queue(db, "p") == []
    assert await attempt_keys(db, "p") == []
    # One structured line per crash and per dead letter, with tenant and message id.
    events = [
        (r.dgen_event, r.tenant, r.message_id)  # type: ignore[attr-defined]
        for r in caplog.records
        if hasattr(r, "dgen_event")
    ]
    assert events == [("crash", "p", ids[1])] * 2 + [("dead_letter", "p", ids[1])]


async def test_a_caller_of_a_dead_lettered_call_gets_a_clear_error(db: Database) -> None:
    server = Poisoned(max_attempts=1)
    async with dgen.start(server, db, "c") as running:
        with pytest.raises(dgen.DeadLetteredError, match="moved to the dead letters") as info:
            await running.call("poison", timeout=WAIT)
        assert "cannot handle poison" in str(info.value)
        assert await reply_slots(db, "c") == []  # the caller removed its slot
        # The consumer did not crash: later messages are handled.
        await running.cast("after")
        assert (await running.call("get", timeout=WAIT))["seen"] == ["after"]
        assert running.stats.dead_letters == 1
    (dead,) = await admin.list_dead_letters(db, "c")
    assert (dead.kind, dead.message, dead.error.attempts) == ("call", "poison", 1)


async def test_max_attempts_none_crashes_every_time_and_never_dead_letters(
    db: Database,
) -> None:
    await dgen.handle(db, "n").cast("poison")
    server = Poisoned(max_attempts=None)
    for _ in range(4):
        with pytest.raises(ValueError, match="cannot handle poison"):
            async with dgen.start(server, db, "n"):
                await asyncio.sleep(WAIT)
    assert server.runs == {"poison": 4}
    assert await admin.list_dead_letters(db, "n") == []
    assert len(await admin.list_queue(db, "n")) == 1
    assert await attempt_keys(db, "n") == []


async def test_attempt_records_are_cleared_when_the_message_completes(db: Database) -> None:
    await dgen.handle(db, "r").cast_many(["poison", "x"])
    server = Poisoned(max_attempts=5)
    for _ in range(2):
        with pytest.raises(ValueError):
            async with dgen.start(server, db, "r"):
                await asyncio.sleep(WAIT)
    (queued, _) = await admin.list_queue(db, "r")
    assert (queued.message, queued.attempts) == ("poison", 2)
    assert queued.last_error == "ValueError: cannot handle poison"
    assert len(await attempt_keys(db, "r")) == 1
    server.broken = False
    async with dgen.start(server, db, "r") as running:
        assert (await running.call("get", timeout=WAIT))["seen"] == ["poison", "x"]
    assert await attempt_keys(db, "r") == []
    assert await admin.list_dead_letters(db, "r") == []


class Hanging(dgen.DGenServer):
    """``"poison"`` raises, or hangs until its consumer is stopped."""

    max_attempts = 3

    def __init__(self) -> None:
        self.hang = False
        self.entered = asyncio.Event()
        self.runs = 0

    def init(self, arg: Any) -> Any:
        return []

    async def handle_cast(self, message: Any, state: Any) -> Any:
        if message == "poison":
            self.runs += 1
            if not self.hang:
                raise ValueError("poison raised")
            self.entered.set()
            await asyncio.sleep(3600)
        return dgen.NoReply([*state, message])

    def handle_call(self, request: Any, caller: dgen.Caller, state: Any) -> Any:
        return dgen.Reply(state, state)


async def test_attempts_that_raised_and_attempts_interrupted_count_together(
    db: Database,
) -> None:
    await dgen.handle(db, "mixed").cast_many(["poison", "after"])
    server = Hanging()
    with pytest.raises(ValueError, match="poison raised"):
        async with dgen.start(server, db, "mixed"):
            await asyncio.sleep(WAIT)
    server.hang = True
    for _ in range(2):  # stopped inside the handler: nothing counts these but the next start
        server.entered.clear()
        async with dgen.start(server, db, "mixed"):
            await asyncio.wait_for(server.entered.wait(), WAIT)
    async with dgen.start(server, db, "mixed") as running:
        assert await running.call("get", timeout=WAIT) == ["after"]
    assert server.runs == 3
    (dead,) = await admin.list_dead_letters(db, "mixed")
    # The last failure that raised, with every attempt counted.
    assert (dead.error.type, dead.error.message, dead.error.attempts) == (
        "ValueError",
        "poison raised",
        3,
    )


async def test_a_failing_dead_letter_callback_still_dead_letters(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    class BadCallback(Poisoned):
        def handle_dead_letter(self, kind: str, message: Any, error: Any, state: Any) -> Any:
            state["dead"].append("half-done")  # must not be committed
            raise RuntimeError("callback broke")

    caplog.set_level(logging.ERROR, logger="dgen")
    server = BadCallback(max_attempts=1)
    async with dgen.start(server, db, "cb") as running:
        with pytest.raises(dgen.DeadLetteredError):
            await running.call("poison", timeout=WAIT)
        assert await running.call("get", timeout=WAIT) == {"seen": [], "dead": []}
    assert len(await admin.list_dead_letters(db, "cb")) == 1
    assert any("handle_dead_letter failed" in r.getMessage() for r in caplog.records)


async def test_retry_puts_a_dead_letter_back_at_the_head(db: Database) -> None:
    handle = dgen.handle(db, "rt")
    server = Poisoned(max_attempts=1)
    async with dgen.start(server, db, "rt") as running:
        poison_id, _ = await handle.cast_many(["poison", "b"])
        assert (await running.call("get", timeout=WAIT))["seen"] == ["b"]
    # Queued after the poison message was dead-lettered, while no consumer runs.
    await handle.cast_many(["c", "d"])
    assert await admin.retry_dead_letters(db, "rt", [poison_id]) == [poison_id]
    assert await admin.list_dead_letters(db, "rt") == []
    queued = await admin.list_queue(db, "rt")
    assert (queued[0].id, queued[0].attempts) == (poison_id, 0)
    assert [m.message for m in queued] == ["poison", "c", "d"]
    server.broken = False
    async with dgen.start(server, db, "rt") as running:
        seen = (await running.call("get", timeout=WAIT))["seen"]
    assert seen == ["b", "poison", "c", "d"]


async def test_retry_of_a_still_poisonous_message_dead_letters_it_again(db: Database) -> None:
    server = Poisoned(max_attempts=1)
    async with dgen.start(server, db, "again") as running:
        await running.cast("poison")
        await running.cast("x")
        await running.call("get", timeout=WAIT)
        (dead,) = await admin.list_dead_letters(db, "again")
        await admin.retry_dead_letters(db, "again")  # every dead letter
        await running.cast("y")
        assert (await running.call("get", timeout=WAIT))["seen"] == ["x", "y"]
    (again,) = await admin.list_dead_letters(db, "again")
    assert again.id == dead.id
    assert server.runs == {"poison": 2}


async def test_delete_removes_exactly_the_named_message_and_its_caller_gets_an_error(
    db: Database,
) -> None:
    handle = dgen.handle(db, "del")
    x, y = await handle.cast_many(["x", "y"])
    caller = asyncio.ensure_future(handle.call("z", timeout=WAIT))
    async with asyncio.timeout(WAIT):
        while len(queued := await admin.list_queue(db, "del")) < 3:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    z = queued[2]
    assert (z.kind, z.message, z.caller_waiting) == ("call", "z", True)
    removed = await admin.delete_message(db, "del", z.id)
    assert removed.id == z.id
    with pytest.raises(dgen.MessageDeletedError, match="deleted by an operator"):
        await caller
    assert await reply_slots(db, "del") == []  # the caller removed its slot
    await admin.delete_message(db, "del", y)
    assert [m.id for m in await admin.list_queue(db, "del")] == [x]
    with pytest.raises(admin.MessageNotFoundError, match=y):
        await admin.delete_message(db, "del", y)
    with pytest.raises(ValueError, match="not a message id"):
        await admin.delete_message(db, "del", "xyz")
    with pytest.raises(admin.TenantNotFoundError, match="'nobody'"):
        await admin.delete_message(db, "nobody", x)
    async with dgen.start(Poisoned(), db, "del") as running:
        assert (await running.call("get", timeout=WAIT))["seen"] == ["x"]


async def test_purge_removes_exactly_what_it_names(db: Database) -> None:
    server = Poisoned(max_attempts=1)
    async with dgen.start(server, db, "pg") as running:
        ids = await running.cast_many(["poison1", "poison2", "poison3", "ok"])
        await running.call("get", timeout=WAIT)
    assert [d.id for d in await admin.list_dead_letters(db, "pg")] == ids[:3]
    # All or none: an unknown id purges nothing.
    unknown = "00" * 12
    with pytest.raises(admin.MessageNotFoundError, match=unknown):
        await admin.purge_dead_letters(db, "pg", [ids[0], unknown])
    assert len(await admin.list_dead_letters(db, "pg")) == 3
    assert await admin.purge_dead_letters(db, "pg", [ids[1]]) == [ids[1]]
    assert [d.id for d in await admin.list_dead_letters(db, "pg")] == [ids[0], ids[2]]
    assert await admin.purge_dead_letters(db, "pg") == [ids[0], ids[2]]
    assert await admin.list_dead_letters(db, "pg") == []
    assert (await state_of(db, "pg"))["seen"] == ["ok"]


async def test_tenant_names_skip_scan_finds_every_tenant(db: Database) -> None:
    names = ["a", "a\x00b", "a b", "b", "ü-tenant", "z" * 200]
    for name in names[:-1]:
        await dgen.handle(db, name).cast(1)
    async with dgen.start(Poisoned(), db, names[-1]) as running:
        await running.call("get", timeout=WAIT)

    async def foreign(tr: Transaction) -> None:
        tr.set(b"\x02dgen-other\x00", b"x")  # someone else's key next to ours
        tr.set(b"zzz", b"x")

    await db.run(foreign)
    assert await admin.tenant_names(db) == sorted(names, key=lambda n: n.encode())
    summaries = {s.tenant: s for s in await admin.list_tenants(db)}
    assert summaries["a\x00b"].queue_length == 1
    assert not summaries["a"].has_state
    assert summaries[names[-1]].has_state and summaries[names[-1]].queue_length == 0


# -- consumers killed inside the handler (real OS processes) ------------------------------

WORKER = textwrap.dedent(
    """
    import asyncio, sys, time
    import dgen

    class Killable(dgen.DGenServer):
        max_attempts = 3

        def init(self, arg):
            return []

        def handle_cast(self, message, state):
            if message == "poison":
                print("in-handler", flush=True)
                time.sleep(3600)  # the parent SIGKILLs this process here
            state.append(message)
            return dgen.NoReply(state)

        def handle_call(self, request, caller, state):
            return dgen.Reply(state, state)

    async def main(url, tenant):
        async with dgen.start(Killable(), url, tenant):
            print("ready", flush=True)
            await asyncio.Event().wait()

    asyncio.run(main(sys.argv[1], sys.argv[2]))
    """
)


@pytest.fixture
async def process_url(store_url: str) -> str:
    async with dgen.connect(store_url) as database:
        if not database.capabilities.cross_process:
            pytest.skip(f"{store_url.split(':')[0]} cannot be shared between OS processes")
    return store_url


async def next_event(proc: asyncio.subprocess.Process, db: Database, tenant: str) -> str:
    """``"entered"`` when the worker is inside the poison handler, ``"dead"``
    once the message has been dead-lettered."""
    assert proc.stdout is not None
    line = asyncio.ensure_future(proc.stdout.readline())
    try:
        while True:
            done, _ = await asyncio.wait({line}, timeout=0.1)
            if done:
                text = line.result().decode()
                if text == "in-handler\n":
                    return "entered"
                if not text:
                    stderr = await proc.stderr.read() if proc.stderr else b""
                    raise AssertionError(f"worker exited:\n{stderr.decode()}")
                line = asyncio.ensure_future(proc.stdout.readline())
            elif await admin.list_dead_letters(db, tenant):
                return "dead"
    finally:
        line.cancel()


async def test_a_message_that_kills_its_consumer_is_dead_lettered_after_restarts(
    process_url: str,
) -> None:
    tenant = "killer"
    async with dgen.connect(process_url) as db:
        await dgen.handle(db, tenant).cast_many(["a", "poison", "b"])
        entered = 0
        async with asyncio.timeout(WAIT * 2):
            while True:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-c",
                    WORKER,
                    process_url,
                    tenant,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                )
                try:
                    if await next_event(proc, db, tenant) == "entered":
                        entered += 1
                        continue  # SIGKILL inside the handler (finally), then restart
                    # This consumer dead-lettered the message at start: the queue proceeds.
                    while await admin.list_queue(db, tenant):  # noqa: ASYNC110
                        await asyncio.sleep(0.05)
                    break
                finally:
                    with contextlib.suppress(ProcessLookupError):
                        proc.send_signal(signal.SIGKILL)
                    await proc.wait()
        # The first attempt ran in a consumer that was already warm (it had just
        # committed "a"), so nothing counted it; each restart counted one.
        assert entered == 3 + 1
        (dead,) = await admin.list_dead_letters(db, tenant)
        assert (dead.message, dead.error.type, dead.error.attempts) == ("poison", "Interrupted", 3)
        assert await state_of(db, tenant) == ["a", "b"]
        assert await attempt_keys(db, tenant) == []


# -- operator log lines ---------------------------------------------------------------------


class Locking(dgen.DGenServer):
    """Casts lock; ``handle_locked`` waits for ``release``; "fail" has a failing action."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    def init(self, arg: Any) -> Any:
        return 0

    def handle_cast(self, message: Any, state: Any) -> Any:
        if message == "fail":
            return dgen.NoReply(state, actions=[self._boom])
        return dgen.Lock(state)

    async def handle_locked(self, kind: str, message: Any, state: Any) -> Any:
        self.entered.set()
        await self.release.wait()
        return dgen.NoReply(state + 1)

    def handle_call(self, request: Any, caller: dgen.Caller, state: Any) -> Any:
        return dgen.Reply(state, state)

    @staticmethod
    def _boom(state: Any) -> None:
        raise RuntimeError("action broke")


async def test_takeovers_and_action_failures_log_tenant_and_message_id(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="dgen")
    first = Locking()
    async with dgen.start(first, db, "logs", lease=60) as running:
        locked_id = await running.cast("lock")
        await asyncio.wait_for(first.entered.wait(), WAIT)
    # Stopped inside handle_locked: the next consumer takes the lock over.
    second = Locking()
    second.release.set()
    async with dgen.start(second, db, "logs", lease=60) as running:
        failing_id = await running.cast("fail")
        assert await running.call("get", timeout=WAIT) == 1
        assert running.stats.lock_takeovers == 1 and running.stats.action_failures == 1
    events = {
        r.dgen_event: r  # type: ignore[attr-defined]
        for r in caplog.records
        if hasattr(r, "dgen_event")
    }
    takeover, action = events["lock_takeover"], events["action_failure"]
    assert (takeover.tenant, takeover.message_id) == ("logs", locked_id)  # type: ignore[attr-defined]
    assert (action.tenant, action.message_id) == ("logs", failing_id)  # type: ignore[attr-defined]
    assert takeover.levelno == logging.WARNING and action.levelno == logging.ERROR
    assert locked_id in takeover.getMessage() and "'logs'" in takeover.getMessage()


# -- poison in handle_locked ----------------------------------------------------------------


class LockedPoison(dgen.DGenServer):
    """Calls and casts lock; ``handle_locked`` raises, or hangs when ``hang``."""

    max_attempts = 2

    def __init__(self, hang: bool = False) -> None:
        self.hang = hang
        self.entered = asyncio.Event()
        self.locked_runs = 0

    def init(self, arg: Any) -> Any:
        return []

    def handle_cast(self, message: Any, state: Any) -> Any:
        if message == "lock":
            return dgen.Lock([*state, "locking"])
        return dgen.NoReply([*state, message])

    def handle_call(self, request: Any, caller: dgen.Caller, state: Any) -> Any:
        if request == "get":
            return dgen.Reply(state, state)
        return dgen.Lock([*state, "locking call"])

    async def handle_locked(self, kind: str, message: Any, state: Any) -> Any:
        self.locked_runs += 1
        self.entered.set()
        if self.hang:
            await asyncio.sleep(3600)
        raise OSError("the payment API is down")


async def test_a_failing_handle_locked_is_dead_lettered_and_its_caller_told(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="dgen")
    server = LockedPoison()
    caller = asyncio.ensure_future(dgen.handle(db, "lp").call("pay", timeout=WAIT))
    with pytest.raises(OSError, match="payment API"):
        async with dgen.start(server, db, "lp", lease=0.2) as running:
            await asyncio.sleep(WAIT)
    await dgen.handle(db, "lp").cast("after")
    # The next consumer takes the lock over after its lease, runs handle_locked
    # again, and at max_attempts dead-letters the message instead of crashing.
    async with dgen.start(server, db, "lp", lease=0.2) as running:
        with pytest.raises(dgen.DeadLetteredError, match="payment API"):
            await caller
        assert await running.call("get", timeout=WAIT) == ["locking call", "after"]
    assert server.locked_runs == 2
    (dead,) = await admin.list_dead_letters(db, "lp")
    assert (dead.kind, dead.message, dead.error.type, dead.error.attempts) == (
        "call",
        "pay",
        "OSError",
        2,
    )
    assert (await admin.inspect_tenant(db, "lp")).lock is None
    events = [r.dgen_event for r in caplog.records if hasattr(r, "dgen_event")]  # type: ignore[attr-defined]
    assert events == ["crash", "dead_letter"]


async def test_a_handle_locked_interrupted_max_attempts_times_is_dead_lettered(
    db: Database,
) -> None:
    server = LockedPoison(hang=True)
    await dgen.handle(db, "li").cast_many(["lock", "after"])
    for _ in range(2):  # stopped inside handle_locked: the takeover counts it
        server.entered.clear()
        async with dgen.start(server, db, "li"):
            await asyncio.wait_for(server.entered.wait(), WAIT)
    async with dgen.start(server, db, "li") as running:
        assert await running.call("get", timeout=WAIT) == ["locking", "after"]
    assert server.locked_runs == 2
    (dead,) = await admin.list_dead_letters(db, "li")
    assert (dead.message, dead.error.type, dead.error.attempts) == ("lock", "Interrupted", 2)
    # Retry re-queues the whole message: handle_cast locks again.
    server.hang = False
    await admin.retry_dead_letters(db, "li")
    assert [m.message for m in await admin.list_queue(db, "li")] == ["lock"]


async def reply_slots(db: Database, tenant: str) -> list[bytes]:
    keys = TenantKeys(tenant)

    async def read(tr: Transaction) -> list[bytes]:
        return [k for k, _ in await tr.get_range(keys.replies_begin, keys.replies_end)]

    return await db.run(read)
