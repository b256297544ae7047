"""Benchmark child processes: ``python -m benchmarks.worker ROLE JSON``.

Each prints one JSON line ``{"ready": ...}`` when set up, waits for a line on
stdin (the go signal) unless the role times itself, does its work and prints
one JSON line ``{"result": ...}``. Times are ``time.time()`` so the parent can
compare them across processes on this machine.

Roles: ``produce`` (cast a count of messages), ``consume`` (serve one tenant
until its counter reaches a target, or forever), ``tenants`` (initialise,
fill and drain many tenants in this process; reports peak RSS).
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import sys
import threading
import time
import traceback
from typing import Any

import dgen
from dgen.consumer import Consumer


class Counter(dgen.DGenServer):
    """A durable counter: each cast adds one; a call returns the count.

    ``on_target(count)`` is run as an after-commit action when the count
    reaches ``target``: the commit of the last message is observed, not its
    handling.
    """

    def __init__(self, target: int | None = None, on_target: Any = None) -> None:
        self.target = target
        self.on_target = on_target

    def init(self, arg: Any) -> int:
        return 0

    def handle_cast(self, message: Any, state: int) -> dgen.NoReply:
        state += 1
        if state == self.target and self.on_target is not None:
            return dgen.NoReply(state, actions=[self.on_target])
        return dgen.NoReply(state)

    def handle_call(self, request: Any, caller: Any, state: int) -> dgen.Reply:
        return dgen.Reply(state, state)


def emit(**fields: Any) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


async def go_signal() -> None:
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)


def rss_kb(field: str = "VmHWM") -> int:
    """Peak (VmHWM) or current (VmRSS) resident set of this process, in KiB.

    Not ``getrusage().ru_maxrss``: Linux carries the parent's peak over a
    fork+exec into the child's, so a child of a big parent would report it.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


async def produce(cfg: dict[str, Any]) -> None:
    async with dgen.connect(cfg["url"]) as db:
        handle = dgen.handle(db, cfg["tenant"])
        await handle.cast(0)  # warm the connection; the parent counts it
        emit(ready=True)
        await go_signal()
        start = time.time()
        for i in range(cfg["count"]):
            await handle.cast(i)
        emit(result={"start": start, "end": time.time()})


async def consume(cfg: dict[str, Any]) -> None:
    done = asyncio.Event()
    finished: dict[str, float] = {}

    def reached(state: int) -> None:
        finished["end"] = time.time()
        done.set()

    async with dgen.connect(cfg["url"]) as db:
        server = Counter(cfg.get("target"), reached)
        consumer = Consumer(server, db, cfg["tenant"], batch_size=cfg.get("batch_size", 16))
        await consumer.initialise()
        emit(ready=True)
        await go_signal()
        start = time.time()
        task = asyncio.ensure_future(consumer.run())
        waiter = asyncio.ensure_future(done.wait())
        await asyncio.wait([task, waiter], return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()  # a crash: raise it
        s = consumer.stats
        emit(
            result={
                "start": start,
                "end": finished["end"],
                "transactions": s.transactions,
                "attempts": s.attempts,
                "messages": s.messages,
            }
        )
        # The other consumer may still be running; stay until killed.
        await task


async def tenants(cfg: dict[str, Any]) -> None:
    """``cfg['tenants']`` counters in one process, each filled with
    ``per_tenant`` messages before the consumers start; reports the rate of
    draining them all and the peak RSS."""
    count, per = cfg["tenants"], cfg["per_tenant"]
    remaining = count
    all_done = asyncio.Event()

    def one_done(state: int) -> None:
        nonlocal remaining
        remaining -= 1
        if remaining == 0:
            all_done.set()

    async with dgen.connect(cfg["url"]) as db:
        rss_connected = rss_kb("VmRSS")
        prefix = cfg["prefix"]
        consumers = [
            Consumer(Counter(per, one_done), db, f"{prefix}-{i}", batch_size=cfg["batch_size"])
            for i in range(count)
        ]
        for c in consumers:
            await c.initialise()
        for i in range(count):
            await dgen.handle(db, f"{prefix}-{i}").cast_many(range(per))
        emit(ready=True)
        start = time.perf_counter()
        tasks = [asyncio.ensure_future(c.run()) for c in consumers]
        waiter = asyncio.ensure_future(all_done.wait())
        await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
        elapsed = time.perf_counter() - start
        for t in tasks:
            if t.done():
                t.result()
        transactions = sum(c.stats.transactions for c in consumers)
        # Report before tearing down: cancelling a thousand consumers is not
        # what is measured.
        emit(
            result={
                "rate": count * per / elapsed,
                "elapsed": elapsed,
                "transactions": transactions,
                "rss_connected_kb": rss_connected,
                "rss_peak_kb": rss_kb(),
            }
        )
        for t in tasks:
            t.cancel()
        _, stuck = await asyncio.wait(tasks, timeout=10)
        if stuck:
            print(f"{len(stuck)} consumer task(s) did not finish cancelling", file=sys.stderr)
            sys.stderr.flush()
            os._exit(0)


ROLES = {"produce": produce, "consume": consume, "tenants": tenants}


def _hang_guard(role: str, seconds: float) -> None:
    """Leave after ``seconds`` whatever the event loop is doing (a stalled
    store can keep a cancelled loop from ever finishing)."""

    def expire() -> None:
        emit(error=f"{role}: no result within {seconds} s (hang guard)")
        os._exit(2)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()


def main() -> None:
    role, raw = sys.argv[1], sys.argv[2]
    cfg = json.loads(raw)
    _hang_guard(role, cfg.get("timeout", 240))
    try:
        asyncio.run(ROLES[role](cfg))
    except BaseException as exc:
        # Report and leave at once: closing a store under crashed consumers may hang.
        traceback.print_exc()
        emit(error=f"{role}: {type(exc).__name__}: {exc}")
        sys.stderr.flush()
        os._exit(1)


if __name__ == "__main__":
    main()
