"""The runtime across real OS processes: consumers in several processes,
SIGKILL at random moments, locks of killed consumers.

Runs on every backend with ``Capabilities.cross_process``; workers are
``tests/runtime_worker.py`` subprocesses started with ``sys.executable``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import dgen
from dgen.queue import TenantKeys
from dgen.store import Database, Transaction

pytestmark = pytest.mark.anyio

WORKER = str(Path(__file__).with_name("runtime_worker.py"))
WAIT = 60.0  # hang guard only


class Proc:
    """A worker subprocess whose stdout lines are collected as they come."""

    def __init__(self, proc: asyncio.subprocess.Process, args: tuple[str, ...]) -> None:
        self.proc = proc
        self.args = args
        self.lines: list[str] = []
        self._new_line = asyncio.Event()
        self._reader = asyncio.ensure_future(self._read())

    @classmethod
    async def spawn(cls, *args: str) -> Proc:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            WORKER,
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        return cls(proc, args)

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            self.lines.append(raw.decode().rstrip("\n"))
            self._new_line.set()
        self._new_line.set()

    async def wait_for_line(self, text: str) -> None:
        async with asyncio.timeout(WAIT):
            while text not in self.lines:
                if self.proc.returncode is not None or self._reader.done():
                    await self.proc.wait()
                    stderr = await self.proc.stderr.read() if self.proc.stderr else b""
                    raise AssertionError(
                        f"worker {self.args} exited ({self.proc.returncode}) before "
                        f"printing {text!r}:\n{stderr.decode()}"
                    )
                self._new_line.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.5):
                        await self._new_line.wait()

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()
        await self._reader

    async def finish(self) -> None:
        """Wait for a clean exit; fail with its stderr otherwise."""
        async with asyncio.timeout(WAIT):
            code = await self.proc.wait()
            await self._reader
        if code != 0:
            stderr = await self.proc.stderr.read() if self.proc.stderr else b""
            raise AssertionError(f"worker {self.args} failed ({code}):\n{stderr.decode()}")


@pytest.fixture
async def procs() -> AsyncIterator[list[Proc]]:
    started: list[Proc] = []
    try:
        yield started
    finally:
        for p in started:
            await p.kill()


@pytest.fixture
async def db(store_url: str) -> AsyncIterator[Database]:
    async with dgen.connect(store_url) as database:
        if not database.capabilities.cross_process:
            pytest.skip(f"{store_url.split(':')[0]} cannot be shared between OS processes")
        yield database


async def until(condition: Any) -> None:
    """Wait until ``condition()`` holds (a hang guard bounds it)."""
    async with asyncio.timeout(WAIT):
        while not condition():  # noqa: ASYNC110 (polling a counter of another task)
            await asyncio.sleep(0.05)


async def start_worker(procs: list[Proc], *args: str, ready: bool = True) -> Proc:
    proc = await Proc.spawn(*args)
    procs.append(proc)
    if ready:
        await proc.wait_for_line("ready")
    return proc


async def test_chaos_three_producers_two_consumers_killed_at_random(
    store_url: str, db: Database, procs: list[Proc]
) -> None:
    tenant = "chaos"
    seed = os.environ.get("DGEN_CHAOS_SEED", str(time.time_ns()))
    print(f"chaos seed {seed} (replay with DGEN_CHAOS_SEED={seed})")
    rng = random.Random(seed)
    per_producer = 120
    consumer_args = ("consumer", store_url, tenant, "--server", "ledger", "--batch", "4")
    consumers = [await start_worker(procs, *consumer_args) for _ in range(2)]
    producers = [
        await start_worker(
            procs,
            *("producer", store_url, tenant, "--name", f"p{i}", "--count", str(per_producer)),
            *("--pause", "0.02"),
        )
        for i in range(3)
    ]
    kills = 0
    async with asyncio.timeout(WAIT * 2):
        # Kill while the producers run, and at least 8 times in all (mid-backlog).
        while kills < 8 or not all("done" in p.lines for p in producers):
            await asyncio.sleep(rng.uniform(0.02, 0.4))
            victim = rng.randrange(len(consumers))
            await consumers[victim].kill()
            kills += 1
            consumers[victim] = await start_worker(procs, *consumer_args, ready=False)
        for p in producers:
            await p.finish()
    acked = [line.split()[1] for p in producers for line in p.lines if line.startswith("ack ")]
    assert len(acked) == 3 * per_producer

    # FIFO: this call is consumed after every cast, so it sees all of them.
    state = await dgen.handle(db, tenant).call("get", timeout=WAIT)
    applied: list[str] = state["applied"]
    duplicates = {m for m in applied if applied.count(m) > 1}
    assert not duplicates, f"applied twice: {sorted(duplicates)[:10]}"
    assert sorted(applied) == sorted(acked)
    for i in range(3):
        mine = [int(m.split("-")[1]) for m in applied if m.startswith(f"p{i}-")]
        assert mine == sorted(mine), f"producer p{i}'s casts were applied out of order"
    print(f"chaos: {kills} SIGKILLs, {len(set(state['pids']))} consumer processes did work")


async def test_consumers_in_two_processes_see_each_others_writes(
    store_url: str, db: Database, procs: list[Proc]
) -> None:
    tenant = "pair"
    for _ in range(2):
        await start_worker(procs, "consumer", store_url, tenant, "--batch", "1")
    handle = dgen.handle(db, tenant)
    sent: list[str] = []
    switches = 0
    async with asyncio.timeout(WAIT):
        # Until each consumer has taken over from the other at least twice: each
        # switch means the new consumer's cached state was stale and must not be used.
        while switches < 4 or len(sent) < 50:
            for _ in range(5):
                sent.append(f"m-{len(sent)}")
                await handle.cast({"id": sent[-1]})
            state = await handle.call("get", timeout=WAIT)
            assert state["applied"] == sent
            pids = state["pids"]
            switches = sum(1 for a, b in itertools.pairwise(pids) if a != b)
    assert len(set(pids)) == 2


class Rescuer(dgen.DGenServer):
    def __init__(self) -> None:
        self.runs: list[Any] = []

    def handle_cast(self, message: Any, state: Any) -> Any:
        return dgen.NoReply([*state, message])

    def handle_call(self, request: Any, caller: dgen.Caller, state: Any) -> Any:
        return dgen.Reply(state, state)

    def handle_locked(self, kind: str, message: Any, state: Any) -> Any:
        self.runs.append(message)
        return dgen.NoReply([*state, f"recovered {message}"])


async def test_a_lock_held_in_another_process_is_waited_for_then_recovered_after_sigkill(
    store_url: str, db: Database, procs: list[Proc]
) -> None:
    tenant = "locked"
    worker = await start_worker(
        procs, "consumer", store_url, tenant, "--server", "hanging-lock", "--lease", "1"
    )
    await dgen.handle(db, tenant).cast("do it")
    await dgen.handle(db, tenant).cast("after")
    await worker.wait_for_line("in-locked")

    async def locked(tr: Transaction) -> bool:
        return await tr.get(TenantKeys(tenant).lock) is not None

    rescuer = Rescuer()
    async with dgen.start(rescuer, db, tenant, lease=1) as server:
        # While the worker lives it renews its 1 s lease (each renewal wakes us):
        # we keep waiting well past the first lease and take nothing over.
        await until(lambda: server.stats.lock_waits >= 5)
        assert rescuer.runs == []
        assert server.stats.lock_takeovers == 0
        assert server.stats.messages == 0
        assert await db.run(locked)

        await worker.kill()
        assert await server.call("get", timeout=WAIT) == ["recovered do it", "after"]
        assert server.stats.lock_takeovers == 1
    assert rescuer.runs == ["do it"]
    assert not await db.run(locked)


def test_the_quickstart_demo_runs_and_the_count_matches() -> None:
    import subprocess

    done = subprocess.run(
        [sys.executable, "-m", "dgen", "demo", "--casts", "120", "--kill-at", "30", "--more", "20"],
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SIGKILL child" in done.stdout
    assert "final count 140 == acknowledged casts 140" in done.stdout
