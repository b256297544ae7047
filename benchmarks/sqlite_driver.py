"""Why the SQLite adapter does not use aiosqlite: one-key write transactions/s.

Run: python benchmarks/sqlite_driver.py [N]. Prints each rate and its ratio
to bare sqlite3 measured in the same run (synchronous=NORMAL, WAL), median
of three rounds. The commit is the adapter's statement sequence: BEGIN
IMMEDIATE, read the commit counter, write the row, bump the counter, COMMIT.
"""

from __future__ import annotations

import asyncio
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiosqlite

import dgen

SCHEMA = [
    "CREATE TABLE IF NOT EXISTS kv (key BLOB PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    "INSERT OR IGNORE INTO meta VALUES ('v', 0)",
]


def bare(path: Path, n: int) -> float:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    for stmt in SCHEMA:
        conn.execute(stmt)
    start = time.perf_counter()
    for i in range(n):
        conn.execute("BEGIN IMMEDIATE")
        v = conn.execute("SELECT value FROM meta WHERE name='v'").fetchone()[0]
        conn.execute("INSERT OR REPLACE INTO kv VALUES (?, ?)", (b"k%d" % i, b"v"))
        conn.execute("UPDATE meta SET value=? WHERE name='v'", (v + 1,))
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - start
    conn.close()
    return n / elapsed


async def with_aiosqlite(path: Path, n: int) -> float:
    async with aiosqlite.connect(path, isolation_level=None) as conn:
        await conn.execute("PRAGMA journal_mode=WAL")
        await conn.execute("PRAGMA synchronous=NORMAL")
        for stmt in SCHEMA:
            await conn.execute(stmt)
        start = time.perf_counter()
        for i in range(n):
            await conn.execute("BEGIN IMMEDIATE")
            cur = await conn.execute("SELECT value FROM meta WHERE name='v'")
            v = (await cur.fetchone())[0]  # type: ignore[index]
            await conn.execute("INSERT OR REPLACE INTO kv VALUES (?, ?)", (b"k%d" % i, b"v"))
            await conn.execute("UPDATE meta SET value=? WHERE name='v'", (v + 1,))
            await conn.execute("COMMIT")
        return n / (time.perf_counter() - start)


async def with_dgen(path: Path, n: int) -> float:
    async with dgen.connect(f"sqlite:///{path}?synchronous=normal") as db:
        start = time.perf_counter()
        for i in range(n):
            tr = db.create_transaction()
            tr.set(b"k%d" % i, b"v")
            await tr.commit()
        return n / (time.perf_counter() - start)


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
    rates: dict[str, list[float]] = {"sqlite3 (bare)": [], "aiosqlite": [], "dgen sqlite://": []}
    for _ in range(3):
        with tempfile.TemporaryDirectory() as tmp:
            rates["sqlite3 (bare)"].append(bare(Path(tmp) / "a.db", n))
            rates["aiosqlite"].append(asyncio.run(with_aiosqlite(Path(tmp) / "b.db", n)))
            rates["dgen sqlite://"].append(asyncio.run(with_dgen(Path(tmp) / "c.db", n)))
    base = statistics.median(rates["sqlite3 (bare)"])
    for name, values in rates.items():
        median = statistics.median(values)
        print(f"{name:16} {median:9.0f} commits/s  {median / base:5.2f} x bare")


if __name__ == "__main__":
    main()
