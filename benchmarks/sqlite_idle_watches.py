"""What idle watches cost a committing SQLite process.

Run: python benchmarks/sqlite_idle_watches.py [N_WATCHES ...] (default 0,
1000, 10000). One database object arms N watches on keys nobody writes
(idle tenants' consumers, say), then commits one-key transactions in a loop
in the same process. Prints the commit rate per N, median of three rounds,
and its ratio to N=0 measured in the same run. Each run uses a fresh file in
a temporary directory with the default options (synchronous=full).
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import dgen
from dgen.store import Transaction, Watch

COMMITS = 1500


async def rate(directory: Path, watched: int) -> float:
    path = directory / f"w{watched}.db"
    async with dgen.connect(f"sqlite:///{path}") as db:
        watches: list[Watch] = []
        for i in range(watched):

            async def arm(tr: Transaction, key: bytes = b"idle%06d" % i) -> Watch:
                await tr.get(key)
                return tr.watch(key)

            watches.append(await db.run(arm))

        async def put(tr: Transaction) -> None:
            tr.set(b"busy", b"x")

        rounds = []
        for _ in range(3):
            started = time.perf_counter()
            for _ in range(COMMITS):
                await db.run(put)
            rounds.append(COMMITS / (time.perf_counter() - started))
        for watch in watches:
            watch.cancel()
        return statistics.median(rounds)


async def main(counts: list[int]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        base = await rate(Path(tmp), 0)
        print(f"{0:>7} idle watches: {base:8,.0f} commits/s  1.00x")
        for n in counts:
            if n:
                r = await rate(Path(tmp), n)
                print(f"{n:>7,} idle watches: {r:8,.0f} commits/s  {r / base:.2f}x")


if __name__ == "__main__":
    asyncio.run(main([int(a) for a in sys.argv[1:]] or [1000, 10000]))
