"""The DGenServer runtime on every backend (in one process).

Cross-process behaviour (several OS processes, SIGKILL) is in
test_server_processes.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

import dgen
from dgen import codec
from dgen.layout import StateLayout
from dgen.queue import TenantKeys, read_blob, write_blob
from dgen.store import Database, Transaction

pytestmark = pytest.mark.anyio

WAIT = 30.0  # hang guard for things that must happen


@pytest.fixture
async def db(store_url: str) -> AsyncIterator[Database]:
    async with dgen.connect(store_url) as database:
        yield database


# -- helpers reading the raw store ------------------------------------------------


async def stored_state(db: Database, tenant: str) -> Any:
    layout = StateLayout(TenantKeys(tenant).state, db.limits.max_value_size)

    async def read(tr: Transaction) -> Any:
        found, state, _ = await layout.read(tr)
        return state if found else None

    return await db.run(read)


async def queue_length(db: Database, tenant: str) -> int:
    keys = TenantKeys(tenant)

    async def read(tr: Transaction) -> int:
        rows = await tr.get_range(keys.queue_begin, keys.queue_end)
        return sum(1 for key, _ in rows if len(key) == len(rows[0][0]))

    return await db.run(read)


async def reply_slots(db: Database, tenant: str) -> list[bytes]:
    keys = TenantKeys(tenant)

    async def read(tr: Transaction) -> list[bytes]:
        return [k for k, _ in await tr.get_range(keys.replies_begin, keys.replies_end)]

    return await db.run(read)


async def is_locked(db: Database, tenant: str) -> bool:
    async def read(tr: Transaction) -> bool:
        return await tr.get(TenantKeys(tenant).lock) is not None

    return await db.run(read)


async def eventually(check: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


# -- servers ----------------------------------------------------------------------------


class Counter(dgen.DGenServer):
    """A sync-handler counter: init counts how often it ran."""

    def __init__(self) -> None:
        self.inits = 0

    def init(self, arg: Any) -> Any:
        self.inits += 1
        return 0 if arg is None else arg

    def handle_call(self, request: Any, caller: dgen.Caller, state: Any) -> Any:
        if request == "value":
            return dgen.Reply(state, state)
        if request == "incr":
            return dgen.Reply(state + 1, state + 1)
        if request == "blob":
            return dgen.Reply(b"r" * 250_000, state)
        if request == "stop":
            return dgen.Stop(state, reason="asked", reply="bye")
        raise AssertionError(f"unexpected call {request!r}")

    def handle_cast(self, message: Any, state: Any) -> Any:
        if message == "stop":
            return dgen.Stop(state, reason="cast stop")
        return dgen.NoReply(state + message)


class AsyncCounter(Counter):
    """The same counter with async handlers."""

    async def init(self, arg: Any) -> Any:
        await asyncio.sleep(0)
        return super().init(arg)

    async def handle_call(self, request: Any, caller: dgen.Caller, state: Any) -> Any:
        await asyncio.sleep(0)
        return super().handle_call(request, caller, state)

    async def handle_cast(self, message: Any, state: Any) -> Any:
        await asyncio.sleep(0)
        return super().handle_cast(message, state)


@dataclasses.dataclass
class Doc:
    title: str
    body: bytes
    tags: list[str]


class Store(dgen.DGenServer):
    """Holds any value; ``("set", v)`` replaces it, a call returns it."""

    def init(self, arg: Any) -> Any:
        return arg

    def handle_cast(self, message: Any, state: Any) -> Any:
        if message == "keep a lock":
            return dgen.NoReply({"lock": threading.Lock()})  # not storable
        return dgen.NoReply(message[1])

    def handle_call(self, request: Any, caller: dgen.Caller, state: Any) -> Any:
        return dgen.Reply(state, state)


@pytest.fixture(params=[Counter, AsyncCounter], ids=["sync", "async"])
def counter(request: pytest.FixtureRequest) -> Counter:
    cls: type[Counter] = request.param
    return cls()


# -- basics -------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 16])
async def test_hundred_casts_then_a_call_answers_hundred(
    db: Database, counter: Counter, batch_size: int
) -> None:
    async with dgen.start(counter, db, "c", batch_size=batch_size) as server:
        for _ in range(100):
            await server.cast(1)
        assert await server.call("value") == 100
    assert await stored_state(db, "c") == 100


async def test_three_handles_on_one_tenant_see_the_same_value(db: Database) -> None:
    async with dgen.start(Counter(), db, "shared") as server:
        handles = [dgen.handle(db, "shared") for _ in range(3)]
        for i, h in enumerate(handles):
            await h.cast(i + 1)
        values = [await h.call("value") for h in handles]
        assert values == [6, 6, 6]
        assert await server.call("value") == 6


async def test_two_tenants_are_independent(db: Database) -> None:
    async with (
        dgen.start(Counter(), db, "a") as a,
        dgen.start(Counter(), db, "b", arg=1000) as b,
    ):
        await a.cast(5)
        await b.cast(7)
        await a.cast(5)
        assert await a.call("value") == 10
        assert await b.call("value") == 1007


async def test_cast_returns_message_ids_in_queue_order(db: Database) -> None:
    h = dgen.handle(db, "ids")
    first = await h.cast(1)
    more = await h.cast_many([2, 3, 4])
    ids = [first, *more]
    assert len(set(ids)) == 4
    assert ids == sorted(ids)
    assert await queue_length(db, "ids") == 4
    async with dgen.start(Counter(), db, "ids") as server:
        assert await server.call("value") == 10


async def test_reply_and_state_of_250_kb(db: Database) -> None:
    doc = Doc("big", bytes(range(256)) * 1000, [f"t{i}" for i in range(1000)])
    assert len(codec.encode(doc)) > 250_000
    async with dgen.start(Store(), db, "big", arg=None) as server:
        await server.cast(("set", doc))
        assert await server.call("get") == doc
    assert await stored_state(db, "big") == doc
    async with dgen.start(Store(), db, "big") as server:
        assert await server.call("get") == doc
    async with dgen.start(Counter(), db, "big-reply") as server:
        assert await server.call("blob") == b"r" * 250_000


async def test_large_message_is_chunked(db: Database) -> None:
    payload = "x" * 300_000
    async with dgen.start(Store(), db, "big-msg") as server:
        await server.cast(("set", payload))
        await server.cast(("set", payload + "y"))
        assert await server.call("get") == payload + "y"


async def test_init_does_not_run_when_state_exists(db: Database) -> None:
    first = Counter()
    async with dgen.start(first, db, "t", arg=40) as server:
        await server.cast(2)
        assert await server.call("value") == 42
    second = Counter()
    async with dgen.start(second, db, "t", arg=0) as server:
        assert await server.call("value") == 42
    assert (first.inits, second.inits) == (1, 0)


async def test_reset_reinitialises(db: Database) -> None:
    async with dgen.start(Counter(), db, "t", arg=5) as server:
        await server.cast(10)
        assert await server.call("value") == 15
    again = Counter()
    async with dgen.start(again, db, "t", arg=7, reset=True) as server:
        assert await server.call("value") == 7
    assert again.inits == 1


async def test_url_string_opens_and_closes_the_database(store_url: str) -> None:
    if store_url.startswith("memory"):
        pytest.skip("a private memory:// store does not outlive its connection")
    async with dgen.start(Counter(), store_url, "u") as server:
        await server.cast(3)
        assert await server.call("value") == 3
    async with dgen.start(Counter(), store_url, "u") as server:
        assert await server.call("value") == 3


# -- encoding refusals ------------------------------------------------------------------


async def test_unencodable_cast_and_call_are_refused_before_any_write(db: Database) -> None:
    h = dgen.handle(db, "enc")
    lock = threading.Lock()
    with pytest.raises(dgen.UnencodableError, match="lock"):
        await h.cast({"lock": lock})
    with pytest.raises(TypeError, match="function"):
        await h.call(lambda: 1)
    with pytest.raises(dgen.UnencodableError):
        await h.cast_many([1, object()])
    assert await queue_length(db, "enc") == 0
    assert await reply_slots(db, "enc") == []


async def test_unencodable_state_from_a_handler_crashes_and_writes_nothing(db: Database) -> None:
    async with dgen.start(Store(), db, "enc", arg="ok") as server:
        await server.call("get")
    await dgen.handle(db, "enc").cast("keep a lock")
    with pytest.raises(dgen.UnencodableError, match=r"_thread\.lock") as info:
        async with dgen.start(Store(), db, "enc"):
            await asyncio.sleep(WAIT)
    assert "new state of tenant 'enc'" in "".join(info.value.__notes__)
    assert await stored_state(db, "enc") == "ok"
    assert await queue_length(db, "enc") == 1


# -- actions ------------------------------------------------------------------------------


class Acting(dgen.DGenServer):
    """Every result carries an action that records (state, stored state)."""

    def __init__(self, db: Database, tenant: str) -> None:
        self.db = db
        self.tenant = tenant
        self.seen: list[tuple[str, Any, Any]] = []

    def _action(self, label: str) -> Any:
        async def action(state: Any) -> None:
            self.seen.append((label, state, await stored_state(self.db, self.tenant)))

        return action

    def init(self, arg: Any) -> Any:
        return 0

    def handle_cast(self, message: Any, state: Any) -> Any:
        if message == "fail":
            return dgen.NoReply(state + 100, actions=[self._boom, self._action("after-fail")])
        if message == "stop":
            return dgen.Stop(state + 1000, "done", actions=[self._action("stop")])
        return dgen.NoReply(state + message, actions=[self._action(f"cast {message}")])

    def handle_call(self, request: Any, caller: dgen.Caller, state: Any) -> Any:
        return dgen.Reply(state, state + 10, actions=[self._action("call")])

    def _boom(self, state: Any) -> None:
        raise RuntimeError("action failed")


@pytest.mark.parametrize("batch_size", [1, 16])
async def test_actions_run_after_commit_with_the_committed_state(
    db: Database, batch_size: int
) -> None:
    server = Acting(db, "act")
    async with dgen.start(server, db, "act", batch_size=batch_size) as running:
        await running.cast(1)
        await running.cast(2)
        assert await running.call("x") == 3
        await running.cast("stop")
        assert await asyncio.wait_for(running.wait_stopped(), WAIT) == "done"
    labels = [label for label, _, _ in server.seen]
    assert labels == ["cast 1", "cast 2", "call", "stop"]
    # Each action saw its handler's state, and that state was already committed
    # (with batching, a later message of the same transaction may be too).
    assert [state for _, state, _ in server.seen] == [1, 3, 13, 1013]
    for _, state, stored in server.seen:
        assert stored >= state
    assert server.seen[-1][2] == 1013


async def test_a_failing_action_is_logged_and_loses_nothing(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    server = Acting(db, "act")
    with caplog.at_level(logging.ERROR, logger="dgen"):
        async with dgen.start(server, db, "act") as running:
            message_id = await running.cast("fail")
            await running.cast(1)
            assert await running.call("x") == 101
            # The reply arrives at commit; the batch's actions run after it.

            async def acted() -> bool:
                return any(label == "call" for label, _, _ in server.seen)

            await eventually(acted, "the call's action")
            assert running.stats.action_failures == 1
    assert [label for label, _, _ in server.seen][:2] == ["after-fail", "cast 1"]
    assert await stored_state(db, "act") == 111
    failures = [r for r in caplog.records if "action" in r.getMessage()]
    assert len(failures) == 1
    assert "'act'" in failures[0].getMessage() and message_id in failures[0].getMessage()
    assert failures[0].exc_info is not None


# -- stop and crash --------------------------------------------------------------------


async def test_stop_commits_runs_actions_and_ends_the_consumer(db: Database) -> None:
    async with dgen.start(Counter(), db, "s") as server:
        await server.cast(5)
        assert await server.call("stop") == "bye"
        assert await asyncio.wait_for(server.wait_stopped(), WAIT) == "asked"
        await server.cast(1)  # queued, nobody consumes it
        assert await queue_length(db, "s") == 1
    assert await stored_state(db, "s") == 5
    async with dgen.start(Counter(), db, "s") as server:
        assert await server.call("value") == 6


class Fragile(dgen.DGenServer):
    def __init__(self, broken: bool) -> None:
        self.broken = broken
        self.attempts = 0

    def init(self, arg: Any) -> Any:
        return []

    def handle_cast(self, message: Any, state: Any) -> Any:
        if message == "poison" and self.broken:
            self.attempts += 1
            state.append("half-done")  # mutated in place, must not leak into the cache
            raise ValueError("cannot handle poison")
        state.append(message)
        return dgen.NoReply(state)

    def handle_call(self, request: Any, caller: dgen.Caller, state: Any) -> Any:
        return dgen.Reply(state, state)


@pytest.mark.parametrize("batch_size", [1, 16])
async def test_a_crashing_handler_leaves_the_message_at_the_head(
    db: Database, batch_size: int
) -> None:
    async with dgen.start(Fragile(broken=False), db, "f") as server:
        await server.cast("a")
        assert await server.call("get") == ["a"]
    handle = dgen.handle(db, "f")
    await handle.cast_many(["before", "poison", "b"])
    fragile = Fragile(broken=True)
    with pytest.raises(ValueError, match="cannot handle poison") as info:
        async with dgen.start(fragile, db, "f", batch_size=batch_size):
            await asyncio.sleep(WAIT)
    assert any("tenant 'f'" in note for note in info.value.__notes__)
    assert fragile.attempts >= 1
    # The message before the poison one committed (also when they shared a
    # batch), without the poison message's half-done mutation.
    assert await stored_state(db, "f") == ["a", "before"]
    assert await queue_length(db, "f") == 2
    # Restart with a fixed server: the message is retried, in order.
    async with dgen.start(Fragile(broken=False), db, "f", batch_size=batch_size) as server:
        assert await server.call("get") == ["a", "before", "poison", "b"]


async def test_a_wrong_result_type_is_a_clear_crash(db: Database) -> None:
    class Sloppy(Counter):
        def handle_cast(self, message: Any, state: Any) -> Any:
            return state + 1  # forgot NoReply

    await dgen.handle(db, "w").cast(1)
    with pytest.raises(TypeError, match=r"handle_cast of Sloppy returned int; expected one of"):
        async with dgen.start(Sloppy(), db, "w"):
            await asyncio.sleep(WAIT)


# -- cache --------------------------------------------------------------------------------


async def test_fifty_alternating_casts_and_calls(db: Database, counter: Counter) -> None:
    async with dgen.start(counter, db, "alt") as server:
        for i in range(1, 51):
            await server.cast(1)
            assert await server.call("value") == i
        assert server.stats.state_reads == 0
        # Every consume transaction after init used the cache (at least one per call).
        assert server.stats.cache_hits >= max(server.stats.transactions - 1, 50)


async def test_cache_is_filled_at_start_from_stored_state(db: Database) -> None:
    async with dgen.start(Counter(), db, "warm") as server:
        await server.cast(9)
        await server.call("value")
    async with dgen.start(Counter(), db, "warm") as server:
        assert server.stats.state_reads == 1  # read once, at start
        for _ in range(5):
            await server.cast(1)
            await server.call("value")
        assert await server.call("value") == 14
        assert server.stats.state_reads == 1
        # Every consume after the start read only the version key.
        assert server.stats.cache_hits >= max(server.stats.transactions - 1, 5)


async def test_two_consumers_in_one_process_never_read_stale_state(
    db: Database,
) -> None:
    async with (
        dgen.start(Counter(), db, "two", batch_size=1) as a,
        dgen.start(Counter(), db, "two", batch_size=1) as b,
    ):
        for _ in range(40):
            await a.cast(1)
            await b.cast(1)
        assert await a.call("value") == 80
        assert a.stats.messages + b.stats.messages == 81


# -- calls: timeouts and reply slots ----------------------------------------------------


async def test_a_call_times_out_its_message_is_applied_and_no_slot_remains(
    db: Database,
) -> None:
    h = dgen.handle(db, "slow")
    with pytest.raises(dgen.CallTimeoutError) as info:
        await h.call("incr", timeout=0.3)
    assert isinstance(info.value, TimeoutError) and isinstance(info.value, dgen.DGenError)
    assert "'slow'" in str(info.value)
    assert await reply_slots(db, "slow") == []
    assert await queue_length(db, "slow") == 1
    async with dgen.start(Counter(), db, "slow", arg=0) as server:
        assert await server.call("value") == 1  # the timed-out increment was applied
    assert await reply_slots(db, "slow") == []


async def test_orphaned_reply_slots_are_collected(db: Database) -> None:
    keys = TenantKeys("gc")
    dead_caller = keys.reply_slot(int(time.time()) - 3600, b"dead")
    live_caller = keys.reply_slot(int(time.time()) + 3600, b"live")

    async def plant(tr: Transaction) -> None:
        tr.set(dead_caller, b"")
        tr.set(live_caller, b"")

    await db.run(plant)
    async with dgen.start(Counter(), db, "gc"):

        async def collected() -> bool:
            return await reply_slots(db, "gc") == [live_caller]

        await eventually(collected, "the orphaned slot to be collected")


async def test_removed_reply_slot_gives_a_clear_error(db: Database) -> None:
    h = dgen.handle(db, "lost")
    call = asyncio.ensure_future(h.call("value", timeout=WAIT))

    async def slot_exists() -> bool:
        return len(await reply_slots(db, "lost")) == 1

    await eventually(slot_exists, "the reply slot")
    (slot,) = await reply_slots(db, "lost")

    async def remove(tr: Transaction) -> None:
        tr.clear(slot)

    await db.run(remove)
    with pytest.raises(dgen.ReplyLostError, match="'lost'"):
        await asyncio.wait_for(call, WAIT)


# -- locks ---------------------------------------------------------------------------------


class Gate(dgen.DGenServer):
    """``("lock", x)`` locks; ``handle_locked`` waits for ``release`` then appends."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.entered = asyncio.Event()
        self.locked_runs = 0

    def init(self, arg: Any) -> Any:
        return []

    def handle_cast(self, message: Any, state: Any) -> Any:
        if isinstance(message, tuple) and message[0] == "lock":
            return dgen.Lock([*state, f"locking {message[1]}"])
        return dgen.NoReply([*state, message])

    def handle_call(self, request: Any, caller: dgen.Caller, state: Any) -> Any:
        if request == "get":
            return dgen.Reply(state, state)
        return dgen.Lock([*state, "call locking"])

    async def handle_locked(self, kind: str, message: Any, state: Any) -> Any:
        self.locked_runs += 1
        self.entered.set()
        await self.release.wait()
        if kind == "call":
            return dgen.Reply(f"locked result for {message}", [*state, "call locked"])
        return dgen.NoReply([*state, f"locked {message[1]}"])


async def test_lock_via_cast_then_casts_during_the_lock_run_after_in_order(
    db: Database,
) -> None:
    gate = Gate()
    async with dgen.start(gate, db, "lk") as server:
        await server.cast(("lock", 1))
        await asyncio.wait_for(gate.entered.wait(), WAIT)
        for m in ["a", "b", "c"]:
            await server.cast(m)
        assert await is_locked(db, "lk")
        assert await queue_length(db, "lk") == 3
        assert await stored_state(db, "lk") == ["locking 1"]
        gate.release.set()
        assert await server.call("get") == ["locking 1", "locked 1", "a", "b", "c"]
        assert not await is_locked(db, "lk")
        assert server.stats.messages == 5  # the locked cast, a, b, c and the call


async def test_lock_via_call_replies_with_the_locked_result(db: Database) -> None:
    gate = Gate()
    gate.release.set()
    async with dgen.start(gate, db, "lkc") as server:
        assert await server.call("please") == "locked result for please"
        assert await server.call("get") == ["call locking", "call locked"]


async def test_a_second_consumer_waits_for_the_lock(db: Database) -> None:
    first, second = Gate(), Gate()
    second.release.set()
    async with dgen.start(first, db, "lk2") as a:
        await a.cast(("lock", 1))
        await asyncio.wait_for(first.entered.wait(), WAIT)
        async with dgen.start(second, db, "lk2") as b:
            await b.cast("x")

            async def b_saw_the_lock() -> bool:
                return b.stats.lock_waits >= 1

            await eventually(b_saw_the_lock, "the second consumer to look")
            await asyncio.sleep(0.2)
            assert b.stats.messages == 0
            assert await queue_length(db, "lk2") == 1
            first.release.set()
            assert await b.call("get") == ["locking 1", "locked 1", "x"]
        assert second.locked_runs == 0


async def test_the_locked_result_survives_a_restart(db: Database) -> None:
    gate = Gate()
    gate.release.set()
    async with dgen.start(gate, db, "lkr") as server:
        await server.cast(("lock", 7))
        assert await server.call("get") == ["locking 7", "locked 7"]
    async with dgen.start(Gate(), db, "lkr") as server:
        assert await server.call("get") == ["locking 7", "locked 7"]
    assert not await is_locked(db, "lkr")


async def test_a_consumer_stopped_inside_handle_locked_hands_the_lock_over(db: Database) -> None:
    # The scope ends while handle_locked runs: the lease is ended at once, so the
    # next consumer need not wait for it (60 s here, far beyond the call's 5 s).
    # A consumer that dies instead (SIGKILL) is in test_server_processes.py.
    class Died(Exception):
        pass

    doomed = Gate()
    with pytest.raises(Died):
        async with dgen.start(doomed, db, "lkd", lease=60) as server:
            await server.cast(("lock", 1))
            await server.cast("after")
            await asyncio.wait_for(doomed.entered.wait(), WAIT)
            raise Died
    assert await is_locked(db, "lkd")
    rescuer = Gate()
    rescuer.release.set()
    async with dgen.start(rescuer, db, "lkd", lease=60) as server:
        assert await server.call("get") == ["locking 1", "locked 1", "after"]
        assert server.stats.lock_takeovers == 1
    assert rescuer.locked_runs == 1
    assert not await is_locked(db, "lkd")


async def test_a_consumer_that_lost_its_lock_does_not_commit(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="dgen")
    slow = Gate()
    async with dgen.start(slow, db, "fence", lease=30) as server:
        await server.cast(("lock", 1))
        await asyncio.wait_for(slow.entered.wait(), WAIT)
        # Another consumer takes the lock over (simulated: rewrite the owner).
        keys = TenantKeys("fence")

        async def steal(tr: Transaction) -> None:
            record = codec.decode((await read_blob(tr, keys.lock)) or b"")
            record["owner"] = b"someone else"
            write_blob(tr, keys.lock, codec.encode(record), db.limits.max_value_size)

        await db.run(steal)
        slow.release.set()

        async def gave_up() -> bool:
            return any("discarding" in r.getMessage() for r in caplog.records)

        await eventually(gave_up, "the consumer to discard its locked result")
        assert await is_locked(db, "fence")
        assert await stored_state(db, "fence") == ["locking 1"]


# -- incremental state writes --------------------------------------------------------


class Fields(dgen.DGenServer):
    def init(self, arg: Any) -> Any:
        return {f"field{i}": "x" * 100 for i in range(200)}

    def handle_cast(self, message: Any, state: Any) -> Any:
        name, value = message
        state[name] = value
        return dgen.NoReply(state)

    def handle_call(self, request: Any, caller: dgen.Caller, state: Any) -> Any:
        return dgen.Reply(state[request], state)


async def test_a_one_field_change_writes_one_key_and_no_change_writes_none(
    db: Database,
) -> None:
    keys = TenantKeys("fields")

    async def token(tr: Transaction) -> bytes | None:
        return await tr.get(keys.version)

    async with dgen.start(Fields(), db, "fields", batch_size=1) as server:
        before = server.stats.state_keys_written
        version = await db.run(token)
        await server.cast(("field7", "changed"))
        assert await server.call("field7") == "changed"
        assert server.stats.state_keys_written - before == 1
        changed_version = await db.run(token)
        assert changed_version != version
        await server.cast(("field7", "changed"))  # same value: nothing to write
        assert await server.call("field7") == "changed"
        assert server.stats.state_keys_written - before == 1
        assert await db.run(token) == changed_version
    state = await stored_state(db, "fields")
    assert state["field7"] == "changed" and len(state) == 200


async def test_stop_from_handle_locked_releases_the_lock_and_ends_the_consumer(
    db: Database,
) -> None:
    class StopsWhenLocked(Gate):
        async def handle_locked(self, kind: str, message: Any, state: Any) -> Any:
            return dgen.Stop([*state, "stopped"], reason="locked stop", reply="last words")

    async with dgen.start(StopsWhenLocked(), db, "lks") as server:
        assert await server.call("please") == "last words"
        assert await asyncio.wait_for(server.wait_stopped(), WAIT) == "locked stop"
    assert not await is_locked(db, "lks")
    assert await stored_state(db, "lks") == ["call locking", "stopped"]


async def test_serve_runs_in_your_own_task_group_until_stop(db: Database) -> None:
    async with asyncio.TaskGroup() as group:
        consumer = group.create_task(dgen.serve(Counter(), db, "served", arg=1))
        h = dgen.handle(db, "served")
        await h.cast(2)
        assert await h.call("value") == 3
        await h.cast("stop")
    assert consumer.result() == "cast stop"


async def test_a_cancelled_call_removes_its_reply_slot(db: Database) -> None:
    call = asyncio.ensure_future(dgen.handle(db, "cancel").call("value", timeout=WAIT))

    async def slot_exists() -> bool:
        return len(await reply_slots(db, "cancel")) == 1

    await eventually(slot_exists, "the reply slot")
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert await reply_slots(db, "cancel") == []
    assert await queue_length(db, "cancel") == 1  # the request itself stays queued
