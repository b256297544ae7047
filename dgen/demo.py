"""The quickstart demo: a durable counter survives SIGKILL.

``python -m dgen demo`` (or ``python -m dgen.demo``) runs it on the embedded
SQLite default, in a temporary directory:

1. a child process runs the counter's consumer and prints the count as it
   commits;
2. this process casts increments; each cast returns only once the message is
   durably queued, so every returned cast is *acknowledged*;
3. mid-stream, the child is killed with SIGKILL; more casts are acknowledged
   while no consumer runs at all;
4. a new child starts and continues from the stored count; a final ``call``
   (queued behind every cast) shows the count equals the acknowledged casts:
   nothing lost, nothing applied twice.

Exit status 0 when the count matches, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

import dgen

__all__ = ["Counter", "main"]

TENANT = "counter"


class Counter(dgen.DGenServer):
    """Counts casts of ``1``; ``call("value")`` answers the count."""

    def init(self, arg: Any) -> Any:
        return 0

    def handle_cast(self, message: Any, state: Any) -> Any:
        count = state + message
        return dgen.NoReply(count, actions=[self._show])

    def handle_call(self, request: Any, caller: dgen.Caller, state: Any) -> Any:
        if request == "stop":
            return dgen.Stop(state, reply=state)
        return dgen.Reply(state, state)

    @staticmethod
    def _show(count: Any) -> None:
        # An after-commit action: runs once per committed message.
        print(f"count {count}", flush=True)


async def _child(url: str) -> None:
    async with dgen.start(Counter(), url, TENANT, batch_size=1) as server:
        print("ready", flush=True)
        await server.wait_stopped()


class _Child:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.count: int | None = None
        self.first: int | None = None
        self.ready = asyncio.Event()
        self.counted = asyncio.Condition()
        self.reader = asyncio.ensure_future(self._read())

    @classmethod
    async def spawn(cls, url: str) -> _Child:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "dgen.demo", "--child", url, stdout=asyncio.subprocess.PIPE
        )
        return cls(proc)

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            line = raw.decode().strip()
            if line == "ready":
                self.ready.set()
            elif line.startswith("count "):
                self.count = int(line.split()[1])
                if self.first is None:
                    self.first = self.count
                    print(f"  child {self.proc.pid}: first commit, count = {self.count}")
                elif self.count % 50 == 0:
                    print(f"  child {self.proc.pid}: count = {self.count}")
                async with self.counted:
                    self.counted.notify_all()

    async def wait_count(self, at_least: int) -> None:
        async with self.counted:
            await self.counted.wait_for(lambda: (self.count or 0) >= at_least)


async def _parent(directory: Path, total: int, kill_at: int, more: int) -> int:
    url = f"sqlite:///{directory / 'counter.db'}"
    print(f"DGen demo: a durable counter on {url}")
    async with dgen.connect(url) as db:
        counter = dgen.handle(db, TENANT)
        child = await _Child.spawn(url)
        await asyncio.wait_for(child.ready.wait(), 30)
        print(f"child {child.proc.pid} consumes the queue and prints the count as it commits")
        print(f"parent casts {total} increments; each returns once durably queued")

        acknowledged = 0

        async def produce(n: int) -> None:
            nonlocal acknowledged
            for _ in range(n):
                await counter.cast(1)
                acknowledged += 1

        producer = asyncio.ensure_future(produce(total))
        await asyncio.wait_for(child.wait_count(kill_at), 60)
        os.kill(child.proc.pid, signal.SIGKILL)
        await child.proc.wait()
        print(
            f"SIGKILL child {child.proc.pid} after it reported count {child.count}, "
            f"mid-stream (casts acknowledged so far: {acknowledged})"
        )
        await producer
        await produce(more)
        print(f"{acknowledged} casts acknowledged in all; no consumer is running, they wait queued")

        child = await _Child.spawn(url)
        await asyncio.wait_for(child.ready.wait(), 30)
        print(f"new child {child.proc.pid} starts and continues from the stored count")
        value = await counter.call("stop", timeout=60)  # queued behind every cast
        await asyncio.wait_for(child.proc.wait(), 30)
        await child.reader
    ok = value == acknowledged
    verdict = "nothing lost, nothing applied twice" if ok else "MISMATCH"
    print(f"final count {value} == acknowledged casts {acknowledged}: {verdict}")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    """Run the demo (see the module docs); returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m dgen demo",
        description="A durable counter survives SIGKILL: the count continues exactly "
        "from the acknowledged casts.",
    )
    parser.add_argument("--casts", type=int, default=300, help="casts before the kill phase ends")
    parser.add_argument("--kill-at", type=int, default=80, help="kill the child at this count")
    parser.add_argument("--more", type=int, default=50, help="casts while no consumer runs")
    parser.add_argument("--child", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        asyncio.run(_child(args.child))
        return 0
    if not 0 < args.kill_at < args.casts:
        parser.error("--kill-at must be between 0 and --casts")
    with tempfile.TemporaryDirectory(prefix="dgen-demo-") as tmp:
        return asyncio.run(_parent(Path(tmp), args.casts, args.kill_at, args.more))


if __name__ == "__main__":
    sys.exit(main())
