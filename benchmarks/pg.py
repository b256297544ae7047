"""PostgreSQL plumbing: a throwaway cluster, per-system databases, commit counts.

``postgresql`` (the word) starts a throwaway cluster with the test suite's
helper ``tests/pgserver.py``; it is imported by putting the repository's
``tests`` directory on ``sys.path`` (nothing is copied).
"""

from __future__ import annotations

import sys
import time
from typing import Any

from benchmarks.common import REPO, with_database, without_query

# DGen's own URL options; the rest of the backend's OPTIONS are libpq's and stay.
DGEN_OPTIONS = (
    "group_commit",
    "notify",
    "pool_size",
    "schema",
    "synchronous_commit",
    "watch_poll_interval",
)


def start_throwaway() -> Any:
    """A ``pgserver.Server`` (``.url``, ``.how``, ``.close()``)."""
    tests = str(REPO / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    import pgserver  # tests/pgserver.py

    return pgserver.start_server()


def conninfo(url: str) -> str:
    """A libpq URI for psycopg: the DGen URL without DGen's own options."""
    return without_query(url, *DGEN_OPTIONS)


def admin_url(url: str) -> str:
    return with_database(url, "postgres")


def create_database(url: str, name: str) -> str | None:
    """Create database ``name`` on ``url``'s server; its URL, or None if not allowed."""
    import psycopg

    try:
        with psycopg.connect(conninfo(admin_url(url)), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.Error as exc:
        print(f"  cannot create database {name}: {exc}; sharing the URL's database", flush=True)
        return None
    return with_database(url, name)


def drop_database(url: str, name: str) -> None:
    import psycopg

    try:
        with psycopg.connect(conninfo(admin_url(url)), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    except psycopg.Error:
        pass


def xact_commits(url: str, databases: list[str] | None = None, settle: float = 1.0) -> int:
    """Sum of ``pg_stat_database.xact_commit`` for ``databases`` (default: the
    URL's own). Waits ``settle`` seconds first: backends publish their counts
    when they go idle or exit, not at each commit."""
    import psycopg

    time.sleep(settle)
    names = databases or [url.split("?")[0].rsplit("/", 1)[1]]
    with psycopg.connect(conninfo(admin_url(url)), autocommit=True) as conn:
        conn.execute("SELECT pg_stat_clear_snapshot()")
        row = conn.execute(
            "SELECT coalesce(sum(xact_commit), 0) FROM pg_stat_database WHERE datname = ANY(%s)",
            (names,),
        ).fetchone()
    assert row is not None
    return int(row[0])


def server_info(url: str) -> dict[str, Any]:
    import psycopg

    with psycopg.connect(conninfo(admin_url(url)), autocommit=True) as conn:
        out = {}
        for name in ("server_version", "synchronous_commit", "fsync", "wal_sync_method",
                     "shared_buffers", "max_connections"):  # fmt: skip
            row = conn.execute(f"SHOW {name}").fetchone()
            out[name] = row[0] if row else None
    return out
