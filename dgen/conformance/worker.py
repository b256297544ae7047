"""A separate OS process for the conformance suite's cross-process tests.

Run as ``python -m dgen.conformance.worker URL PREFIX_HEX MODE ARGS...``.
It opens ``URL`` with :func:`dgen.connect`, writes only under the raw key
prefix ``bytes.fromhex(PREFIX_HEX)`` and reports progress on stdout, one
line per event, flushed at once. Modes that take part in a race print
``ready`` and wait for a ``go`` line on stdin, so that several workers start
writing together.

Before connecting it imports the modules named, comma-separated, in
``DGEN_CONFORMANCE_WORKER_IMPORTS``: a test harness that registers a backend
at run time (not through the ``dgen.backends`` entry point) registers it in
the workers that way.

Modes:

``append WRITER TXS PER_TX``
    ``TXS`` transactions, each writing ``PER_TX`` ordered-commit keys
    ``("log", <stamp, user version i>)`` with value ``pack((WRITER, tx, i))``;
    prints ``done``.
``add NAME COUNT``
    ``COUNT`` transactions, each adding 1 to the counter ``("counter", NAME)``;
    prints ``done``.
``set NAME HEXVALUE``
    one transaction setting ``(NAME,)``; prints ``committed``.
``sideband COUNT``
    sets ``("sideband",)`` to ``pack((i,))`` for i = 1..COUNT, one transaction
    each, printing ``i`` after each commit.
``crash-writer``
    transactions i = 0, 1, ... each writing ``("a", i)`` and ``("b", i)``,
    printing ``i`` after each commit, until killed.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import random
import sys

from dgen.keys import Versionstamp, pack, pack_with_versionstamp
from dgen.store import Database, Transaction
from dgen.urls import connect

__all__ = ["main"]


def _say(line: object) -> None:
    print(line, flush=True)


async def _start_signal() -> None:
    _say("ready")
    line = await asyncio.to_thread(sys.stdin.readline)
    if line.strip() != "go":
        raise SystemExit(f"expected 'go' on stdin, got {line!r}")


async def _append(db: Database, prefix: bytes, writer: str, txs: int, per_tx: int) -> None:
    await _start_signal()
    rng = random.Random()
    for t in range(txs):

        async def write(tr: Transaction, t: int = t) -> None:
            for i in range(per_tx):
                key, offset = pack_with_versionstamp(("log", Versionstamp(user_version=i)), prefix)
                tr.set_versionstamped_key(key, offset, pack((writer, t, i)))
            # Hold the transaction open a little so that commits interleave.
            await asyncio.sleep(rng.random() * 0.002)

        await db.run(write)
    _say("done")


async def _add(db: Database, prefix: bytes, name: str, count: int) -> None:
    await _start_signal()
    key = pack(("counter", name), prefix)

    async def add(tr: Transaction) -> None:
        tr.add(key, 1)

    for _ in range(count):
        await db.run(add)
    _say("done")


async def _set(db: Database, prefix: bytes, name: str, value: bytes) -> None:
    async def write(tr: Transaction) -> None:
        tr.set(pack((name,), prefix), value)

    await db.run(write)
    _say("committed")


async def _sideband(db: Database, prefix: bytes, count: int) -> None:
    key = pack(("sideband",), prefix)
    for i in range(1, count + 1):

        async def write(tr: Transaction, i: int = i) -> None:
            tr.set(key, pack((i,)))

        await db.run(write)
        _say(i)


async def _crash_writer(db: Database, prefix: bytes) -> None:
    payload = bytes(range(256)) * 4
    for i in range(1_000_000):

        async def write(tr: Transaction, i: int = i) -> None:
            tr.set(pack(("a", i), prefix), payload)
            tr.set(pack(("b", i), prefix), pack((i,)))

        await db.run(write)
        _say(i)


async def _main(argv: list[str]) -> None:
    url, prefix_hex, mode, *args = argv
    prefix = bytes.fromhex(prefix_hex)
    async with connect(url) as db:
        if mode == "append":
            await _append(db, prefix, args[0], int(args[1]), int(args[2]))
        elif mode == "add":
            await _add(db, prefix, args[0], int(args[1]))
        elif mode == "set":
            await _set(db, prefix, args[0], bytes.fromhex(args[1]))
        elif mode == "sideband":
            await _sideband(db, prefix, int(args[0]))
        elif mode == "crash-writer":
            await _crash_writer(db, prefix)
        else:
            raise SystemExit(f"unknown worker mode {mode!r}")


def main(argv: list[str] | None = None) -> None:
    """Entry point; ``argv`` defaults to ``sys.argv[1:]``."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 3:
        raise SystemExit("usage: python -m dgen.conformance.worker URL PREFIX_HEX MODE [ARGS...]")
    for name in os.environ.get("DGEN_CONFORMANCE_WORKER_IMPORTS", "").split(","):
        if name.strip():
            importlib.import_module(name.strip())
    asyncio.run(_main(argv))


if __name__ == "__main__":
    main()
