"""The physical limit: the bare driver's one-row write transaction rate.

SQLite: ``sqlite3`` in WAL mode with the DGen URL's ``synchronous`` setting,
``BEGIN IMMEDIATE; INSERT OR REPLACE one row; COMMIT``. PostgreSQL: psycopg
on the same server and database, ``INSERT ... ON CONFLICT DO UPDATE; COMMIT``.
Writers are threads, each with its own connection, all writing distinct keys.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path


def _threads(writers: int, count: int, open_writer: Callable[[], Callable[[int], None]]) -> float:
    """Rate of ``count`` writes split over ``writers`` threads (after they connect)."""
    per = count // writers
    barrier = threading.Barrier(writers + 1)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            write = open_writer()
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()
            return
        try:
            barrier.wait()
            for i in range(per):
                write(i)
        except BaseException as exc:
            errors.append(exc)
        finally:
            write(-1)  # close

    threads = [threading.Thread(target=work) for _ in range(writers)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise errors[0]
    return per * writers / elapsed


def sqlite_rate(path: Path, synchronous: str, writers: int, count: int) -> float:
    setup = sqlite3.connect(path, isolation_level=None)
    setup.execute("PRAGMA journal_mode=WAL")
    setup.execute("CREATE TABLE IF NOT EXISTS kv (key BLOB PRIMARY KEY, value BLOB) WITHOUT ROWID")
    setup.close()

    def open_writer() -> Callable[[int], None]:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        conn.execute(f"PRAGMA synchronous={synchronous}")
        prefix = uuid.uuid4().bytes

        def write(i: int) -> None:
            if i < 0:
                conn.close()
                return
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT OR REPLACE INTO kv VALUES (?, ?)", (prefix + i.to_bytes(4), b"v"))
            conn.execute("COMMIT")

        return write

    return _threads(writers, count, open_writer)


def pg_rate(conninfo: str, synchronous_commit: str | None, writers: int, count: int) -> float:
    import psycopg

    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS bench_raw (key bytea PRIMARY KEY, value bytea NOT NULL)"
        )

    def open_writer() -> Callable[[int], None]:
        conn = psycopg.connect(conninfo)
        if synchronous_commit:
            conn.execute(f"SET synchronous_commit = {synchronous_commit}")
            conn.commit()
        prefix = uuid.uuid4().bytes + os.getpid().to_bytes(4)

        def write(i: int) -> None:
            if i < 0:
                conn.close()
                return
            conn.execute(
                "INSERT INTO bench_raw VALUES (%s, %s) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (prefix + i.to_bytes(4), b"v"),
            )
            conn.commit()

        return write

    return _threads(writers, count, open_writer)
