"""Subprocess worker for the runtime's cross-process tests.

Run as ``python tests/runtime_worker.py ROLE URL TENANT [options]``. It prints
one line per event on stdout (flushed), so the parent can follow it, and is
SIGKILLed by the parent where a test needs a crash.

Roles:
- ``consumer``: run a consumer for one of the servers below until killed.
- ``producer``: cast ``--count`` messages ``{"id": "<name>-<i>"}`` and print
  ``ack <id>`` after each cast returns, pausing up to ``--pause`` seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
from typing import Any

import dgen


class Ledger(dgen.DGenServer):
    """Records every message id applied, in order, and who applied it."""

    def init(self, arg: Any) -> Any:
        return {"applied": [], "pids": []}

    def handle_cast(self, message: Any, state: Any) -> Any:
        state["applied"].append(message["id"])
        state["pids"].append(os.getpid())
        return dgen.NoReply(state)

    def handle_call(self, request: Any, caller: dgen.Caller, state: Any) -> Any:
        return dgen.Reply(state, state)


class HangingLock(dgen.DGenServer):
    """Locks on every cast; ``handle_locked`` announces itself and never returns."""

    def init(self, arg: Any) -> Any:
        return []

    def handle_cast(self, message: Any, state: Any) -> Any:
        return dgen.Lock(state)

    async def handle_locked(self, kind: str, message: Any, state: Any) -> Any:
        print("in-locked", flush=True)
        await asyncio.sleep(3600)
        return dgen.NoReply(state)

    def handle_call(self, request: Any, caller: dgen.Caller, state: Any) -> Any:
        return dgen.Reply(state, state)


SERVERS = {"ledger": Ledger, "hanging-lock": HangingLock}


async def consume(args: argparse.Namespace) -> None:
    server = SERVERS[args.server]()
    async with dgen.start(server, args.url, args.tenant, batch_size=args.batch, lease=args.lease):
        print("ready", flush=True)
        await asyncio.Event().wait()


async def produce(args: argparse.Namespace) -> None:
    async with dgen.connect(args.url) as db:
        handle = dgen.handle(db, args.tenant)
        print("ready", flush=True)
        for i in range(args.count):
            message_id = f"{args.name}-{i}"
            await handle.cast({"id": message_id})
            print(f"ack {message_id}", flush=True)
            if args.pause:
                await asyncio.sleep(random.uniform(0, args.pause))
    print("done", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["consumer", "producer"])
    parser.add_argument("url")
    parser.add_argument("tenant")
    parser.add_argument("--server", default="ledger", choices=sorted(SERVERS))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lease", type=float, default=30.0)
    parser.add_argument("--name", default="p")
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--pause", type=float, default=0.0, help="max random pause between casts")
    args = parser.parse_args()
    asyncio.run(consume(args) if args.role == "consumer" else produce(args))


if __name__ == "__main__":
    sys.exit(main())
