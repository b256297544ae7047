"""The PostgreSQL backend against a real server (see tests/pgserver.py).

What the conformance suite cannot check from outside: URL handling and error
messages, the tables it creates, SQLSTATE mapping with errors provoked on the
server, commit-outcome-unknown, dead pooled connections, server restarts
(alone and under casts from several processes), ordered stamps from several
processes, and the watch safety nets (listener reconnect, fallback poll).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import random
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from pgserver import (
    PASSWORD,
    NoServer,
    Server,
    drop_schema,
    fresh_schema_url,
    role_url,
    schema_url,
    start_cluster,
)
from psycopg import sql

import dgen
from dgen import consumer
from dgen.backends import postgres
from dgen.keys import Versionstamp, pack_with_versionstamp, range_of
from dgen.store import (
    CommitUnknownError,
    ConflictError,
    Transaction,
    UnavailableError,
    decode_counter,
)
from dgen.urls import URL, URLError

pytestmark = pytest.mark.anyio

WAIT = 30.0  # hang guard only


@pytest.fixture
def server(postgres_server: Server) -> Server:
    return postgres_server


@pytest.fixture
def url(server: Server) -> Iterator[str]:
    u = fresh_schema_url(server.url)
    yield u
    drop_schema(u)


def _conninfo(url: str) -> str:
    return postgres._parse(URL.parse(url))[0]


def _schema(url: str) -> str:
    return postgres._parse(URL.parse(url))[1]


# -- URLs and connection errors ----------------------------------------------


@pytest.mark.parametrize(
    ("query", "fragment"),
    [
        ("pool_sise=3", "unknown option(s) pool_sise"),
        ("pool_size=0", "pool_size"),
        ("pool_size=many", "pool_size"),
        ("synchronous_commit=sometimes", "synchronous_commit"),
        ("schema=" + "x" * 64, "schema"),
        ("watch_poll_interval=-1", "watch_poll_interval"),
        ("notify=sometimes", "notify"),
    ],
)
async def test_bad_options_are_refused(query: str, fragment: str) -> None:
    with pytest.raises(URLError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        await dgen.connect(f"postgresql://u:{PASSWORD}@localhost/db?{query}")


async def test_unknown_option_message_lists_the_known_ones() -> None:
    with pytest.raises(URLError) as info:
        await dgen.connect(f"postgresql://u:{PASSWORD}@localhost/db?colour=red")
    message = str(info.value)
    assert "pool_size" in message and "synchronous_commit" in message
    assert PASSWORD not in message


async def test_unreachable_server_is_unavailable_without_password(tmp_path: Any) -> None:
    # A socket directory where no server listens.
    target = f"postgresql://someone:{PASSWORD}@/db?host={tmp_path}&connect_timeout=2"
    with pytest.raises(UnavailableError) as info:
        await dgen.connect(target)
    message = str(info.value)
    assert PASSWORD not in message and PASSWORD not in repr(info.value)
    assert str(tmp_path) in message  # says where it tried


async def test_wrong_password_is_unavailable_without_password(server: Server) -> None:
    cluster, own = server.cluster, None
    if cluster is None:  # an explicit server URL: the password role lives in our own cluster
        try:
            cluster = own = await asyncio.to_thread(start_cluster)
        except NoServer as exc:
            if os.environ.get("CI") == "true":
                pytest.fail(f"CI=true: cannot test password errors: {exc}")
            pytest.skip(f"needs a throwaway cluster with a password role: {exc}")
    try:
        wrong = "Wrong-Pw-" + PASSWORD[::-1]
        with pytest.raises(UnavailableError) as info:
            await dgen.connect(schema_url(cluster.password_url(wrong), "pwtest"))
        message = str(info.value)
        assert "password authentication failed" in message
        assert wrong not in message and PASSWORD not in message and "***" in message
        # The right password works, and the database's repr hides it too.
        async with dgen.connect(schema_url(cluster.password_url(PASSWORD), "pwtest")) as db:
            assert PASSWORD not in repr(db) and PASSWORD not in str(db.url)
    finally:
        if own is not None:
            await asyncio.to_thread(own.destroy)


async def test_missing_database_is_unavailable(server: Server) -> None:
    base = URL.parse(server.url)
    missing = base.render(hide_password=False).replace(base.path, "/no_such_database_here", 1)
    with pytest.raises(UnavailableError, match="no_such_database_here"):
        await dgen.connect(missing)


# -- schema -------------------------------------------------------------------


async def test_schema_is_created_with_a_version(url: str) -> None:
    async with dgen.connect(url) as db:
        await db.run(_set(b"k", b"v"))
    schema = _schema(url)
    with psycopg.connect(_conninfo(url), autocommit=True) as conn:
        tables = {
            r[0]
            for r in conn.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = %s",
                (schema,),
            )
        }
        version = conn.execute(
            f'SELECT value FROM "{schema}".dgen_meta WHERE name = %s', ("schema_version",)
        ).fetchone()
        stored = conn.execute(f'SELECT key, value FROM "{schema}".dgen_kv').fetchall()
    assert {"dgen_meta", "dgen_kv", "dgen_clock", "dgen_log"} <= tables
    assert version == (str(postgres.SCHEMA_VERSION),)
    assert stored == [(b"k", b"v")]


async def test_concurrent_first_opens_all_succeed(url: str) -> None:
    dbs = await asyncio.gather(*(dgen.connect(url) for _ in range(6)))
    try:
        await asyncio.gather(*(db.run(_add(b"n", 1)) for db in dbs))
        assert decode_counter(await dbs[0].run(_get(b"n"))) == 6
    finally:
        await asyncio.gather(*(db.aclose() for db in dbs))


async def test_newer_schema_version_is_refused(url: str) -> None:
    async with dgen.connect(url):
        pass
    with psycopg.connect(_conninfo(url), autocommit=True) as conn:
        conn.execute(f"UPDATE \"{_schema(url)}\".dgen_meta SET value = '99'")
    with pytest.raises(UnavailableError, match="newer"):
        await dgen.connect(url)


async def test_options_reach_the_server(url: str) -> None:
    async with dgen.connect(url + "&pool_size=3&synchronous_commit=off") as db:
        assert isinstance(db, postgres.PostgresDatabase)
        assert db.pool.max_size == 3
        async with db.pool.connection() as conn:
            cur = await conn.execute("SHOW synchronous_commit")
            assert await cur.fetchone() == ("off",)


# -- conflicts and errors -------------------------------------------------------


def _set(key: bytes, value: bytes) -> Any:
    async def fn(tr: Transaction) -> None:
        tr.set(key, value)

    return fn


def _add(key: bytes, delta: int) -> Any:
    async def fn(tr: Transaction) -> None:
        tr.add(key, delta)

    return fn


def _get(key: bytes) -> Any:
    async def fn(tr: Transaction) -> bytes | None:
        return await tr.get(key)

    return fn


async def test_read_then_concurrent_write_conflicts(url: str) -> None:
    async with dgen.connect(url) as db, dgen.connect(url) as db2:
        await db.run(_set(b"x", b"0"))
        tr = db.create_transaction()
        assert await tr.get(b"x") == b"0"
        await db2.run(_set(b"x", b"1"))
        tr.set(b"y", b"derived from x=0")
        with pytest.raises(ConflictError):
            await tr.commit()
        assert await db.run(_get(b"y")) is None


async def _grow_pool(db: postgres.PostgresDatabase, connections: int = 4) -> None:
    """Hold several connections at once, so that the pool has spare ones
    afterwards (a connection is parked only when the pool can spare it)."""

    async def hold(tr: Transaction) -> None:
        await tr.get(b"pool")
        await asyncio.sleep(0.05)

    await asyncio.gather(*(db.run(hold) for _ in range(connections)))
    await asyncio.sleep(0.05)  # the timer returns the parked ones


def _two_sessions(conninfo: str) -> tuple[psycopg.Connection[Any], psycopg.Connection[Any]]:
    return (
        psycopg.connect(conninfo, autocommit=True),
        psycopg.connect(conninfo, autocommit=True),
    )


async def test_sqlstate_40001_and_40p01_map_to_conflict(url: str) -> None:
    """Errors provoked on the server, mapped by the adapter's one function."""
    async with dgen.connect(url):
        pass
    conninfo, table = _conninfo(url), f'"{_schema(url)}".dgen_kv'
    a, b = _two_sessions(conninfo)
    try:
        a.execute(f"INSERT INTO {table} VALUES ('a', 'x'), ('b', 'x')")
        # 40001: a SERIALIZABLE write skew.
        for conn in (a, b):
            conn.execute("BEGIN ISOLATION LEVEL SERIALIZABLE")
            conn.execute(f"SELECT count(*) FROM {table}")
        a.execute(f"UPDATE {table} SET value = 'a' WHERE key = 'a'")
        b.execute(f"UPDATE {table} SET value = 'b' WHERE key = 'b'")
        a.execute("COMMIT")
        with pytest.raises(psycopg.errors.SerializationFailure) as skew:
            b.execute("COMMIT")
        b.execute("ROLLBACK")
        # 40P01: two sessions lock two rows in opposite orders.
        for conn in (a, b):
            conn.execute("BEGIN")
        a.execute(f"UPDATE {table} SET value = '1' WHERE key = 'a'")
        b.execute(f"UPDATE {table} SET value = '2' WHERE key = 'b'")
        errors: list[BaseException] = []

        def cross(conn: psycopg.Connection[Any], key: str) -> None:
            try:
                conn.execute(f"UPDATE {table} SET value = '3' WHERE key = %s", (key,))
            except psycopg.Error as exc:
                errors.append(exc)

        threads = [
            threading.Thread(target=cross, args=(a, "b")),
            threading.Thread(target=cross, args=(b, "a")),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT)
        a.execute("ROLLBACK")
        b.execute("ROLLBACK")
    finally:
        a.close()
        b.close()
    deadlocks = [e for e in errors if isinstance(e, psycopg.errors.DeadlockDetected)]
    assert len(deadlocks) == 1, errors
    parsed = URL.parse(url)
    for native in (skew.value, deadlocks[0]):
        mapped = postgres._map_error(native, parsed)
        assert isinstance(mapped, ConflictError) and mapped.retryable, (native, mapped)


async def test_connection_lost_during_commit_is_commit_unknown(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with dgen.connect(url) as db:
        assert isinstance(db, postgres.PostgresDatabase)

        def terminate(pid: int) -> None:
            with psycopg.connect(db.conninfo, autocommit=True) as killer:
                killer.execute("SELECT pg_terminate_backend(%s)", (pid,))

        await db.run(_set(b"earlier", b"x"))
        await _listener_pid(db)  # it hears the announcement checked below
        await _grow_pool(db)
        # Read-write: the server ends the read session between the reads and
        # the commit. The reads are done and the commit validates them against
        # the conflict log, so it goes out on another connection and commits
        # (the dead one, parked, is dropped by the next reader).
        tr = db.create_transaction()
        await tr.get(b"k")
        tr.set(b"k", b"v")
        assert isinstance(tr, postgres.PostgresTransaction) and tr._conn is not None
        terminate(tr._conn.info.backend_pid)
        await tr.commit()
        # With no room to park, the snapshot's ROLLBACK goes out alongside the
        # commit and finds the connection dead; the commit, on the committer's
        # own connection, does not depend on it.
        monkeypatch.setattr(postgres, "_PARKED_MAX", 0)
        tr = db.create_transaction()
        await tr.get(b"k")
        tr.set(b"k", b"unparked")
        assert isinstance(tr, postgres.PostgresTransaction) and tr._conn is not None
        terminate(tr._conn.info.backend_pid)
        await tr.commit()
        assert await db.run(_get(b"k")) == b"unparked"

        # Write-only: the server goes away after the connection looked alive.
        def dies_after_check(conn: Any) -> bool:
            terminate(conn.info.backend_pid)
            return True

        monkeypatch.setattr(postgres, "_looks_alive", dies_after_check)
        tr = db.create_transaction()
        tr.set(b"k", b"w")
        with pytest.raises(CommitUnknownError, match="may or may not"):
            await tr.commit()
        monkeypatch.undo()
        # With notify=after nothing announced that commit, so "*" is
        # announced instead (at the clock's version, which the earlier
        # commit made positive): watches older than it re-read their keys.
        for _ in range(200):
            if db.watches._all_changed:
                break
            await asyncio.sleep(0.01)
        assert db.watches._all_changed, "the unknown commit was never announced"

        # The pool drops the dead connections; the next transactions work.
        await db.run(_set(b"k2", b"v2"))
        assert await db.run(_get(b"k")) == b"unparked"  # the write-only commit never reached it
        assert await db.run(_get(b"k2")) == b"v2"


async def test_connection_lost_before_commit_is_retried_by_run(url: str) -> None:
    """The server ends the session between two reads: nothing was applied, so
    it is a ConflictError and db.run retries on a fresh connection."""
    async with dgen.connect(url) as db:
        assert isinstance(db, postgres.PostgresDatabase)
        await db.run(_set(b"a", b"1"))
        attempts = 0

        async def fn(tr: Transaction) -> bytes | None:
            nonlocal attempts
            attempts += 1
            await tr.get(b"a")
            if attempts == 1:
                assert isinstance(tr, postgres.PostgresTransaction) and tr._conn is not None
                with psycopg.connect(db.conninfo, autocommit=True) as killer:
                    killer.execute("SELECT pg_terminate_backend(%s)", (tr._conn.info.backend_pid,))
            value = await tr.get(b"b")
            tr.set(b"b", b"written")
            return value

        assert await db.run(fn) is None
        assert attempts == 2
        assert await db.run(_get(b"b")) == b"written"

        tr = db.create_transaction()
        await tr.get(b"a")
        assert isinstance(tr, postgres.PostgresTransaction) and tr._conn is not None
        with psycopg.connect(db.conninfo, autocommit=True) as killer:
            killer.execute("SELECT pg_terminate_backend(%s)", (tr._conn.info.backend_pid,))
        with pytest.raises(ConflictError, match="nothing was applied"):
            await tr.get(b"b")
        await tr.rollback()


async def test_a_pooled_connection_killed_while_idle_is_replaced(url: str) -> None:
    """No CommitUnknownError for a connection that died in the pool: it is
    detected before anything is sent."""
    async with dgen.connect(url + "&pool_size=1") as db:
        assert isinstance(db, postgres.PostgresDatabase)
        await db.run(_set(b"k", b"v"))
        await asyncio.sleep(0.3)  # the notifier has sent its pg_notify and is idle
        async with db.pool.connection() as conn:
            pid = conn.info.backend_pid
        with psycopg.connect(db.conninfo, autocommit=True) as killer:
            killer.execute("SELECT pg_terminate_backend(%s)", (pid,))
        await asyncio.sleep(0.2)  # the FATAL message and EOF arrive
        await db.run(_set(b"k", b"w"))  # write-only: one round trip, on a fresh connection
        assert await db.run(_get(b"k")) == b"w"


async def test_server_restart_gives_clear_errors_then_recovers() -> None:
    cluster = await asyncio.to_thread(start_cluster)
    try:
        url = schema_url(cluster.url, "restart") + "&connect_timeout=2"
        async with dgen.connect(url) as db:
            await db.run(_set(b"k", b"before"))
            await asyncio.to_thread(cluster.stop, "immediate")
            with pytest.raises(UnavailableError) as info:
                await db.run(_set(b"k", b"during"))
            assert "unavailable" in str(info.value) or "no connection" in str(info.value)
            await asyncio.to_thread(cluster.start)
            for _ in range(100):  # the pool reconnects in the background
                try:
                    await db.run(_set(b"k", b"after"))
                    break
                except UnavailableError:
                    await asyncio.sleep(0.1)
            assert await db.run(_get(b"k")) == b"after"
    finally:
        await asyncio.to_thread(cluster.destroy)


@pytest.mark.parametrize("first_after", ["read-write", "write-only"])
async def test_a_snapshot_older_than_a_server_crash_conflicts(first_after: str) -> None:
    """The conflict log is UNLOGGED, so a server crash empties it. A
    transaction that read before the crash and commits after it must not be
    validated against the emptied log (it would miss a write made before the
    crash: a lost update); it gets ConflictError and a retry sees the write.
    A transaction that reads after the crash commits, whether the first
    commit after the crash was its own or a write-only one."""
    cluster = await asyncio.to_thread(start_cluster)
    try:
        url = schema_url(cluster.url, "crash") + "&connect_timeout=10"
        async with dgen.connect(url) as db:
            await db.run(_set(b"k", b"0"))
            stale = db.create_transaction()
            assert await stale.get(b"k") == b"0"
            await db.run(_set(b"k", b"1"))  # logged: stale's read of k conflicts
            await asyncio.to_thread(cluster.stop, "immediate")  # a crash
            await asyncio.to_thread(cluster.start)
            if first_after == "write-only":
                for _ in range(100):  # the pool reconnects in the background
                    try:
                        await db.run(_set(b"other", b"x"))
                        break
                    except (UnavailableError, ConflictError):
                        await asyncio.sleep(0.1)
            stale.set(b"k", b"lost update")
            with pytest.raises(ConflictError):
                await stale.commit()

            async def increment(tr: Transaction) -> None:
                tr.set(b"k", b"%d" % (int(await tr.get(b"k") or b"0") + 1))

            await db.run(increment)
            assert await db.run(_get(b"k")) == b"2"
    finally:
        await asyncio.to_thread(cluster.destroy)


async def test_a_crash_that_lost_commits_does_not_reuse_their_versions(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a crash with synchronous_commit=off (or a failover to an
    asynchronous standby) leaves, made directly: the conflict log emptied
    and the clock 5 commits back, below the version a live snapshot read
    at. The next commit moves the clock far past every version handed out
    before, so that snapshot conflicts instead of being validated against
    commits that reuse its versions; pruning (here every 4 commits, keeping
    8) never lowers the mark again."""
    monkeypatch.setattr(postgres, "LOG_WINDOW", 8)
    monkeypatch.setattr(postgres, "_PRUNE_EVERY", 4)
    async with dgen.connect(url) as db:
        assert isinstance(db, postgres.PostgresDatabase)
        for i in range(10):
            await db.run(_set(b"k", b"%d" % i))
        stale = db.create_transaction()
        assert await stale.get(b"k") == b"9"
        assert isinstance(stale, postgres.PostgresTransaction)
        seen = stale._read_version
        schema = sql.Identifier(db.schema)
        with psycopg.connect(db.conninfo, autocommit=True) as admin:
            admin.execute(sql.SQL("TRUNCATE {}.dgen_log").format(schema))
            admin.execute(sql.SQL("UPDATE {}.dgen_clock SET version = version - 5").format(schema))
            await db.run(_set(b"k", b"after the crash"))  # it would reuse a version <= seen
            marks = []
            for i in range(12):  # three prunes
                await db.run(_set(b"other", b"%d" % i))
                row = admin.execute(
                    sql.SQL("SELECT version, pruned FROM {}.dgen_clock").format(schema)
                ).fetchone()
                assert row is not None
                marks.append(row[1])
        assert marks == sorted(marks) and marks[0] > seen, (seen, marks)
        stale.set(b"k", b"lost update")
        with pytest.raises(ConflictError, match="older than the conflict log"):
            await stale.commit()
        assert await db.run(_get(b"k")) == b"after the crash"


# -- ordered-commit keys ----------------------------------------------------------

_STAMP_WRITER = """
import asyncio, sys
import dgen
from dgen.keys import Versionstamp, pack_with_versionstamp

async def main(url, name, count):
    async with dgen.connect(url) as db:
        for i in range(count):
            async def push(tr, i=i):
                key, offset = pack_with_versionstamp(("q", Versionstamp(), name, i))
                tr.set_versionstamped_key(key, offset, b"")
                tr.add(b"pushed", 1)
            await db.run(push)

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""


async def test_stamps_from_several_processes_are_ordered_and_never_appear_behind(
    url: str,
) -> None:
    """Writers in three processes push stamped keys under one prefix while a
    tailing reader checks that no key ever shows up behind one it already saw;
    at the end every process's keys are in its own push order."""
    writers, count = 3, 60
    async with dgen.connect(url) as db:
        await db.run(_set(b"start", b""))
        procs = [
            await asyncio.create_subprocess_exec(
                sys.executable, "-c", _STAMP_WRITER, url, f"w{n}", str(count)
            )
            for n in range(writers)
        ]
        begin, end = range_of(("q",))
        seen: list[bytes] = []
        violations: list[str] = []

        async def tail() -> None:
            async def read(tr: Transaction) -> list[bytes]:
                return [k for k, _ in await tr.get_range(begin, end)]

            while True:
                keys = await db.run(read)
                if keys[: len(seen)] != seen:
                    violations.append(
                        f"a key appeared behind one already read: {keys[: len(seen)]!r}"
                    )
                seen[:] = keys
                if len(keys) == writers * count:
                    return
                await asyncio.sleep(0.005)

        await asyncio.wait_for(tail(), 90)
        codes = [await p.wait() for p in procs]
    assert codes == [0] * writers
    assert not violations, violations[0]
    by_writer: dict[str, list[int]] = {}
    stamps = []
    for key in seen:
        _, stamp, name, i = dgen.keys.unpack(key)
        assert isinstance(stamp, Versionstamp)
        stamps.append(stamp.tr_version)
        by_writer.setdefault(str(name), []).append(int(i))  # type: ignore[arg-type]
    assert len(set(stamps)) == len(stamps), "one commit, one stamp"
    assert by_writer == {f"w{n}": list(range(count)) for n in range(writers)}


async def test_stamp_is_readable_after_commit_and_follows_real_time(url: str) -> None:
    async with dgen.connect(url) as db:
        stamps = []
        for _ in range(3):

            async def fn(tr: Transaction) -> Any:
                key, offset = pack_with_versionstamp(("s", Versionstamp()))
                tr.set_versionstamped_key(key, offset, b"v")
                return tr.get_versionstamp()

            stamps.append(await (await db.run(fn)))
        assert stamps == sorted(stamps) and len(set(stamps)) == 3
        rows = await db.run(lambda tr: tr.get_range(*range_of(("s",))))
        assert [dgen.keys.unpack(k)[1].tr_version for k, _ in rows] == stamps  # type: ignore[union-attr]


# -- watches ------------------------------------------------------------------------

_SETTER = """
import asyncio, sys
import dgen

async def main(url, key, value):
    async with dgen.connect(url) as db:
        async def fn(tr):
            tr.set(key.encode(), value.encode())
        await db.run(fn)

asyncio.run(main(*sys.argv[1:]))
"""


async def _watch(db: dgen.Database, key: bytes) -> dgen.Watch:
    tr = db.create_transaction()
    await tr.get(key)
    watch = tr.watch(key)
    await tr.commit()
    return watch


@pytest.mark.parametrize("notify", ["after", "commit"])
async def test_watch_fires_on_a_commit_from_another_process(url: str, notify: str) -> None:
    # A long poll interval: the notification, not the poll, must wake it.
    url += f"&notify={notify}"
    async with dgen.connect(url + "&watch_poll_interval=600") as db:
        await db.run(_set(b"w", b"0"))
        watch = await _watch(db, b"w")
        await asyncio.sleep(0.2)
        assert not watch.done()
        done = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-c", _SETTER, url, "w", "1"], timeout=WAIT
        )
        assert done.returncode == 0
        await asyncio.wait_for(watch, WAIT)


@pytest.mark.parametrize("notify", ["after", "commit"])
async def test_watch_with_an_old_baseline_fires_from_what_the_listener_heard(
    url: str, notify: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A watch is armed without a re-read when the listener heard every commit
    since its baseline: one that heard of a later write fires at once, one
    that did not stays armed; once the history forgot the write (a short
    _HISTORY here), the watch is re-read instead, and still fires."""
    monkeypatch.setattr(postgres, "_HISTORY", 3)
    url += f"&notify={notify}&watch_poll_interval=600"
    async with dgen.connect(url) as db, dgen.connect(url) as other:
        assert isinstance(db, postgres.PostgresDatabase)
        for key in (b"a", b"b", b"c"):
            await db.run(_set(key, b"0"))
        await _listener_pid(db)

        async def stale_watch(key: bytes, then: Any) -> dgen.Watch:
            # The baseline is read, then another database object commits,
            # then this transaction arms its watch.
            tr = db.create_transaction()
            assert await tr.get(key) == b"0"
            await then()
            watch = tr.watch(key)
            await tr.commit()
            return watch

        async def heard(key: bytes, value: bytes) -> None:
            before = len(db.watches._heard)
            await other.run(_set(key, value))
            for _ in range(200):  # wait until our listener has heard it
                if len(db.watches._heard) > before or db.watches._floor:
                    return
                await asyncio.sleep(0.01)
            raise AssertionError("the listener never heard the commit")

        async def nothing() -> None:
            await other.run(_set(b"elsewhere", b"x"))

        fired = await stale_watch(b"a", lambda: heard(b"a", b"1"))
        await asyncio.wait_for(fired, WAIT)
        quiet = await stale_watch(b"b", nothing)
        await asyncio.sleep(0.2)
        assert not quiet.done(), "nothing wrote b after the baseline"
        await other.run(_set(b"b", b"1"))
        await asyncio.wait_for(quiet, WAIT)  # and a later write wakes it

        async def write_then_flood() -> None:
            await heard(b"c", b"1")
            for n in range(5):  # pushes c's entry out of the 3-entry history
                await heard(b"f%d" % n, b"x")

        forgotten = await stale_watch(b"c", write_then_flood)
        await asyncio.wait_for(forgotten, WAIT)


@pytest.mark.parametrize("notify", ["after", "commit"])
async def test_a_cleared_range_wakes_the_watches_inside_it_only(url: str, notify: str) -> None:
    """Cleared ranges are named in the notification, so a watch inside fires
    (also one armed later with an older baseline), and one outside stays armed."""
    url += f"&notify={notify}&watch_poll_interval=600"
    async with dgen.connect(url) as db, dgen.connect(url) as other:
        assert isinstance(db, postgres.PostgresDatabase)
        for key in (b"r/1", b"r/2", b"s"):
            await db.run(_set(key, b"0"))
        inside, outside = await _watch(db, b"r/1"), await _watch(db, b"s")
        stale = db.create_transaction()
        assert await stale.get(b"r/2") == b"0"

        async def clear(tr: Transaction) -> None:
            tr.clear_range(b"r/", b"r0")

        await other.run(clear)
        await asyncio.wait_for(inside, WAIT)
        for _ in range(200):  # until our listener has heard the range
            if db.watches._heard_ranges:
                break
            await asyncio.sleep(0.01)
        late = stale.watch(b"r/2")
        await stale.commit()
        await asyncio.wait_for(late, WAIT)
        await asyncio.sleep(0.2)
        assert not outside.done(), "a key outside the cleared range never changed"


async def test_fallback_poll_catches_a_change_nobody_notified(url: str) -> None:
    async with dgen.connect(url + "&watch_poll_interval=0.2") as db:
        await db.run(_set(b"w", b"0"))
        watch = await _watch(db, b"w")
        # Written behind DGen's back: no pg_notify is sent.
        with psycopg.connect(_conninfo(url), autocommit=True) as conn:
            conn.execute(f"UPDATE \"{_schema(url)}\".dgen_kv SET value = '1' WHERE key = 'w'")
        await asyncio.wait_for(watch, WAIT)


async def _listener_pid(db: dgen.Database) -> int:
    """The pid of ``db``'s listener connection, which the first watch starts,
    once it has registered."""
    assert isinstance(db, postgres.PostgresDatabase)
    if db.watches.listener_pid is None:
        (await _watch(db, b"start listening")).cancel()
    for _ in range(100):  # the listener connects in the background
        if db.watches.listener_pid is not None:
            return db.watches.listener_pid
        await asyncio.sleep(0.05)
    raise AssertionError("the listener did not register")


async def test_every_watch_fires_after_the_listener_reconnects(url: str) -> None:
    async with dgen.connect(url + "&watch_poll_interval=600") as db:
        assert isinstance(db, postgres.PostgresDatabase)
        await db.run(_set(b"a", b"0"))
        watches = [await _watch(db, b"a"), await _watch(db, b"unchanged")]
        pid = await _listener_pid(db)
        with psycopg.connect(db.conninfo, autocommit=True) as conn:
            assert conn.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone() == (True,)
        for watch in watches:
            await asyncio.wait_for(watch, WAIT)  # nothing changed: spurious, never missed
        assert db.watches.reconnects >= 1


# -- listeners: notifications only when another database object listens -----


async def _clock_listeners(db: dgen.Database) -> list[int]:
    assert isinstance(db, postgres.PostgresDatabase)
    async with await psycopg.AsyncConnection.connect(db.conninfo, autocommit=True) as conn:
        cur = await conn.execute(
            sql.SQL("SELECT listeners FROM {}.dgen_clock").format(sql.Identifier(db.schema))
        )
        row = await cur.fetchone()
    assert row is not None
    return sorted(row[0])


@contextlib.asynccontextmanager
async def _eavesdrop(db: dgen.Database) -> Any:
    """A bare connection listening on ``db``'s channel (not registered); yields
    a function that returns the payloads heard within ``seconds``."""
    assert isinstance(db, postgres.PostgresDatabase)
    conn = await psycopg.AsyncConnection.connect(db.conninfo, autocommit=True)
    await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(db.watches.channel)))

    async def heard(seconds: float) -> list[str]:
        return [n.payload async for n in conn.notifies(timeout=seconds)]

    try:
        yield heard
    finally:
        await conn.close()


async def test_commits_notify_only_while_another_database_object_listens(url: str) -> None:
    """A database object alone on its store sends no notifications (its own
    watches fire directly), nor with another open that has not watched
    anything (a producer: it does not listen, and its commits are announced
    to the first); once the second listens (its first watch), every commit
    is announced and wakes its watches (a long poll: the notification must
    do it); after the second closes, notifications stop."""
    url += "&watch_poll_interval=600"
    async with dgen.connect(url) as db:
        mine = await _listener_pid(db)
        assert await _clock_listeners(db) == [mine]
        async with _eavesdrop(db) as heard:
            await db.run(_set(b"k", b"1"))
            assert await heard(0.5) == []
            async with dgen.connect(url) as other:
                await other.run(_set(b"j", b"1"))
                assert len(await heard(0.5)) == 1
                await db.run(_set(b"k", b"1"))
                assert await heard(0.5) == []
                assert await _clock_listeners(db) == [mine]
                theirs = await _listener_pid(other)
                assert await _clock_listeners(db) == sorted([mine, theirs])
                watch = await _watch(other, b"k")
                await db.run(_set(b"k", b"2"))
                await asyncio.wait_for(watch, WAIT)
                assert len(await heard(0.5)) == 1
            assert await _clock_listeners(db) == [mine]  # unregistered on close
            await db.run(_set(b"k", b"3"))
            assert await heard(0.5) == []


async def test_a_commit_queued_before_a_listener_registers_is_not_missed(url: str) -> None:
    """A commit that takes the clock lock just before a new listener registers
    finds no other listener and sends nothing; the new object's watch, armed
    before, is re-read after the registration and fires."""
    url += "&watch_poll_interval=600"
    async with dgen.connect(url) as db:
        assert isinstance(db, postgres.PostgresDatabase)
        await db.run(_set(b"k", b"0"))
        await _listener_pid(db)
        locker = await psycopg.AsyncConnection.connect(db.conninfo)
        try:
            await locker.execute(db.sql.lock_clock)  # a transaction holding the clock row
            commit = asyncio.ensure_future(db.run(_set(b"k", b"1")))
            await _waiting_for_lock(db, "dgen_commit(")
            async with dgen.connect(url) as other:
                assert isinstance(other, postgres.PostgresDatabase)
                watch = await _watch(other, b"k")  # baseline "0": the commit waits
                await _waiting_for_lock(db, "dgen_clock WHERE id = 1 FOR UPDATE")
                await locker.rollback()
                await asyncio.wait_for(commit, WAIT)
                await asyncio.wait_for(watch, WAIT)
                assert other.watches.listener_pid is not None
        finally:
            await locker.close()


async def _waiting_for_lock(db: dgen.Database, fragment: str) -> None:
    """Until a backend waits for a lock in a statement on ``db``'s schema
    with ``fragment`` after the schema's name (other tests share the server)."""
    assert isinstance(db, postgres.PostgresDatabase)
    async with await psycopg.AsyncConnection.connect(db.conninfo, autocommit=True) as conn:
        for _ in range(int(WAIT / 0.01)):
            cur = await conn.execute(
                "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE %s",
                (f'%"{db.schema}".{fragment}%',),
            )
            if await cur.fetchone() is not None:
                return
            await asyncio.sleep(0.01)
    raise AssertionError(f"no backend waits for a lock in a statement with {fragment!r}")


async def test_a_listener_gone_without_unregistering_is_dropped_later(url: str) -> None:
    """A pid left in the list (a process killed) keeps commits announced, the
    safe side; the next listener to register drops it, its backend gone."""
    async with dgen.connect(url + "&watch_poll_interval=600") as db:
        assert isinstance(db, postgres.PostgresDatabase)
        mine = await _listener_pid(db)
        with psycopg.connect(db.conninfo, autocommit=True) as conn:
            dead = conn.execute("SELECT max(pid) + 100000 FROM pg_stat_activity").fetchone()
            assert dead is not None
            conn.execute(
                sql.SQL("UPDATE {}.dgen_clock SET listeners = listeners || %s").format(
                    sql.Identifier(db.schema)
                ),
                (dead[0],),
            )
        async with _eavesdrop(db) as heard:
            await db.run(_set(b"k", b"1"))
            assert len(await heard(0.5)) == 1
        async with dgen.connect(url) as other:
            theirs = await _listener_pid(other)
            assert await _clock_listeners(db) == sorted([mine, theirs])


@pytest.mark.parametrize("group", ["on", "off"])
async def test_an_unannounced_commit_wakes_a_watch_armed_after_it(url: str, group: str) -> None:
    """A commit that sends no notification (nobody else listens) is not heard
    by this object's listener either: it goes into the heard history, so a
    watch armed after it on an older baseline fires (found by review)."""
    async with dgen.connect(url + f"&watch_poll_interval=600&group_commit={group}") as db:
        await db.run(_set(b"k", b"0"))
        await _listener_pid(db)
        tr = db.create_transaction()
        assert await tr.get(b"k") == b"0"
        await db.run(_set(b"k", b"1"))
        watch = tr.watch(b"k")
        await tr.commit()
        await asyncio.wait_for(watch, WAIT)


async def test_closing_sends_every_pending_notification(url: str) -> None:
    """Commits made while the notifier is sending an earlier batch are sent
    too when the database closes meanwhile (the last one was lost: found by
    review). The notifier is held at the pool: pool_size=1, its one
    connection held by a reader until the close has begun."""
    async with dgen.connect(url + "&watch_poll_interval=600") as other:
        await _listener_pid(other)
        watch = await _watch(other, b"y")
        db = await dgen.connect(url + "&pool_size=1")
        holder = db.create_transaction()
        await holder.get(b"x")
        await db.run(_set(b"x", b"1"))  # announced: the notifier waits for the pool
        await asyncio.sleep(0.05)
        await db.run(_set(b"y", b"1"))

        async def release() -> None:
            await asyncio.sleep(0.2)  # the close has begun
            await holder.rollback()

        releasing = asyncio.ensure_future(release())
        await db.aclose()
        await releasing
        await asyncio.wait_for(watch, WAIT)
        # It ended by itself once done, not cancelled after the close's grace.
        assert isinstance(db, postgres.PostgresDatabase)
        notifier = db.watches._notifier
        assert notifier is not None and notifier.done() and not notifier.cancelled()


@pytest.mark.parametrize("group", ["on", "off"])
async def test_a_commit_in_flight_when_closing_is_announced(url: str, group: str) -> None:
    """Closing waits (up to its grace) for a commit being sent, with or
    without group commit, and announces it (found by review: with
    group_commit=off the commit landed after the notifier had stopped)."""
    url += "&watch_poll_interval=600"
    async with dgen.connect(url) as other:
        await _listener_pid(other)
        watch = await _watch(other, b"k")
        db = await dgen.connect(url + f"&group_commit={group}")
        assert isinstance(db, postgres.PostgresDatabase)
        locker = await psycopg.AsyncConnection.connect(db.conninfo)
        try:
            await locker.execute(db.sql.lock_clock)
            commit = asyncio.ensure_future(db.run(_set(b"k", b"1")))
            await _waiting_for_lock(db, "dgen_commit(")
            closing = asyncio.ensure_future(db.aclose())
            await asyncio.sleep(0.2)
            await locker.rollback()
            await asyncio.wait_for(commit, WAIT)
            await asyncio.wait_for(closing, WAIT)
        finally:
            await locker.close()
        await asyncio.wait_for(watch, WAIT)


async def test_a_role_that_may_not_register_still_watches(
    owner_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A role with SELECT only (it may not lock dgen_clock) cannot register
    its listener: it listens unregistered, with a warning, its watches fire
    (here through the poll), and it does not reconnect in a loop (found by
    review: 1,700 sessions in 4 s, and no watch ever fired)."""
    async with dgen.connect(owner_url) as db:
        await db.run(_set(b"k", b"0"))
        watcher_url = role_url(owner_url, "dgen_watcher", ["SELECT"])
        with caplog.at_level("WARNING", logger="dgen.backends.postgres"):
            async with dgen.connect(watcher_url + "&watch_poll_interval=0.2") as watcher:
                assert isinstance(watcher, postgres.PostgresDatabase)
                watch = await _watch(watcher, b"k")
                for _ in range(int(WAIT / 0.05)):  # the listener has started
                    if watcher.watches.heard_from is not None:
                        break
                    await asyncio.sleep(0.05)
                assert watcher.watches.heard_from is not None
                assert watcher.watches.listener_pid is None
                await db.run(_set(b"k", b"1"))
                await asyncio.wait_for(watch, WAIT)
        assert "cannot register its listener" in caplog.text


async def test_a_store_made_before_the_listeners_column_gets_it(url: str) -> None:
    """Functions older than version 5 (no listeners column) are replaced on
    open and the column added; listeners then register."""
    async with dgen.connect(url) as db:
        assert isinstance(db, postgres.PostgresDatabase)
        await db.run(_set(b"k", b"v"))
        async with await psycopg.AsyncConnection.connect(db.conninfo, autocommit=True) as conn:
            schema = sql.Identifier(db.schema)
            await conn.execute(
                sql.SQL("ALTER TABLE {}.dgen_clock DROP COLUMN listeners").format(schema)
            )
            await conn.execute(
                sql.SQL("COMMENT ON FUNCTION {}.dgen_commit_group IS 'dgen group commit 4'").format(
                    schema
                )
            )
    async with dgen.connect(url) as db:
        mine = await _listener_pid(db)
        assert await _clock_listeners(db) == [mine]
        await db.run(_set(b"k", b"w"))
        assert await db.run(_get(b"k")) == b"w"


async def test_a_store_without_the_listeners_column_still_notifies(url: str) -> None:
    """What an older store's listener meets when this role may not add the
    column: it listens unregistered, as before (every commit then notifies)."""
    async with dgen.connect(url) as db:
        assert isinstance(db, postgres.PostgresDatabase)
        await _listener_pid(db)
        async with await psycopg.AsyncConnection.connect(db.conninfo, autocommit=True) as conn:
            await conn.execute(
                sql.SQL("ALTER TABLE {}.dgen_clock DROP COLUMN listeners").format(
                    sql.Identifier(db.schema)
                )
            )
        async with dgen.connect(url + "&watch_poll_interval=600") as other:
            assert isinstance(other, postgres.PostgresDatabase)
            (await _watch(other, b"k")).cancel()  # starts the listener
            for _ in range(100):
                if other.watches.heard_from is not None:
                    break
                await asyncio.sleep(0.05)
            assert other.watches.heard_from is not None
            assert other.watches.listener_pid is None
            assert other.watches.announce(None) and other.watches.announce("")


async def test_watches_fail_when_the_database_closes(url: str) -> None:
    db = await dgen.connect(url)
    watch = await _watch(db, b"never")
    await db.aclose()
    with pytest.raises(UnavailableError):
        await watch


async def test_a_watch_armed_after_close_fails(url: str) -> None:
    """A transaction that read before the close and commits after it: its
    watch fails at once (found by review: it waited for ever)."""
    db = await dgen.connect(url)
    tr = db.create_transaction()
    await tr.get(b"k")
    await db.aclose()
    watch = tr.watch(b"k")
    await tr.commit()
    with pytest.raises(UnavailableError, match="closed"):
        await asyncio.wait_for(watch, WAIT)


async def test_local_commit_wakes_local_watch_and_counter_adds_commute(url: str) -> None:
    async with dgen.connect(url + "&watch_poll_interval=600") as db:
        watch = await _watch(db, b"n")
        await asyncio.gather(*(db.run(_add(b"n", 1)) for _ in range(20)))
        await asyncio.wait_for(watch, WAIT)
        assert decode_counter(await db.run(_get(b"n"))) == 20


# -- fault: the server stops and restarts under load ---------------------------

WORKER = os.path.join(os.path.dirname(__file__), "runtime_worker.py")

_RETRYING_PRODUCER = """
import asyncio, sys
import dgen
from dgen.store import CommitUnknownError, UnavailableError

async def main(url, tenant, name, count):
    async with dgen.connect(url) as db:
        handle = dgen.handle(db, tenant)
        i = 0
        while i < count:
            message_id = f"{name}-{i}"
            try:
                await handle.cast({"id": message_id})
            except UnavailableError as exc:
                print(f"unavailable {message_id}", flush=True)  # nothing committed: retry it
                await asyncio.sleep(0.1)
                continue
            except CommitUnknownError:
                print(f"unknown {message_id}", flush=True)  # may be applied: move on
                i += 1
                continue
            print(f"ack {message_id}", flush=True)
            i += 1
            await asyncio.sleep(0.01)
    print("done", flush=True)

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
"""


async def _lines(proc: asyncio.subprocess.Process, into: list[str]) -> None:
    assert proc.stdout is not None
    async for raw in proc.stdout:
        into.append(raw.decode().strip())


@pytest.mark.parametrize("stop_mode", ["fast", "immediate"])  # immediate: like a crash
async def test_server_restart_during_casts_loses_nothing_and_applies_nothing_twice(
    tmp_path: Any, stop_mode: str
) -> None:
    """Issue 4 item 7: stop and restart the server under a stream of casts from
    three producer processes, with two consumer processes running: nothing
    acknowledged is lost, nothing is applied twice, consumers carry on."""
    cluster = await asyncio.to_thread(start_cluster)
    spawned: list[asyncio.subprocess.Process] = []
    try:
        url = schema_url(cluster.url, "fault")  # connect_timeout 10 s: outlasts the restart
        tenant, per_producer = "fault", 60

        async def spawn(*argv: str) -> tuple[asyncio.subprocess.Process, list[str]]:
            # stderr to a file: a full pipe would block a worker logging retries.
            with open(tmp_path / f"stderr-{len(spawned)}", "w") as err:  # noqa: ASYNC230
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, *argv, stdout=asyncio.subprocess.PIPE, stderr=err
                )
            spawned.append(proc)
            lines: list[str] = []
            readers.append(asyncio.ensure_future(_lines(proc, lines)))
            return proc, lines

        readers: list[asyncio.Future[None]] = []
        consumers = [await spawn(WORKER, "consumer", url, tenant, "--batch", "4") for _ in range(2)]
        # Consumers must be running before the outage: resuming is what is tested
        # (a consumer still connecting when the server stops fails to start, clearly).
        async with asyncio.timeout(WAIT):
            while not all("ready" in lines for _, lines in consumers):  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        producers = [
            await spawn("-c", _RETRYING_PRODUCER, url, tenant, f"p{n}", str(per_producer))
            for n in range(3)
        ]
        acked = lambda: sum(ln.startswith("ack ") for _, lines in producers for ln in lines)  # noqa: E731
        async with asyncio.timeout(WAIT):
            while acked() < 30:  # noqa: ASYNC110 (counting another task's lines)
                await asyncio.sleep(0.05)
        acked_at_stop = acked()
        await asyncio.to_thread(cluster.stop, stop_mode)
        await asyncio.sleep(1.0)
        await asyncio.to_thread(cluster.start)
        async with asyncio.timeout(WAIT * 3):
            codes = [await p.wait() for p, _ in producers]
        assert codes == [0, 0, 0]
        lines = [ln for _, out in producers for ln in out]
        acks = [ln.split()[1] for ln in lines if ln.startswith("ack ")]
        unknown = [ln.split()[1] for ln in lines if ln.startswith("unknown ")]
        assert len(acks) + len(unknown) == 3 * per_producer
        # Producers either waited through the restart (connect_timeout) or got
        # a clear error and retried; either way the stream was cut in the middle.
        assert acked_at_stop < 3 * per_producer, "the server stopped after the stream ended"
        died = [n for n, (proc, _) in enumerate(consumers) if proc.returncode is not None]
        for _ in died:  # so that the data can still be checked
            await spawn(WORKER, "consumer", url, tenant, "--batch", "4")
        async with dgen.connect(url) as db:
            state = await dgen.handle(db, tenant).call("get", timeout=WAIT * 2)
        applied: list[str] = state["applied"]
        duplicates = sorted({m for m in applied if applied.count(m) > 1})
        assert not duplicates, f"applied twice: {duplicates[:10]}"
        lost = sorted(set(acks) - set(applied))
        assert not lost, f"acknowledged but lost: {lost[:10]}"
        assert set(applied) <= set(acks) | set(unknown)
        stderr = [(tmp_path / f"stderr-{n}").read_text().strip().splitlines()[-1:] for n in died]
        assert not died, f"consumers exited instead of resuming by themselves: {stderr}"
    finally:
        for proc in spawned:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
        await asyncio.to_thread(cluster.destroy)


async def test_a_dropped_transaction_gives_its_connection_back(url: str) -> None:
    import gc

    async with dgen.connect(url + "&pool_size=1&connect_timeout=5") as db:
        tr = db.create_transaction()
        await tr.get(b"k")  # holds the only pooled connection, in a snapshot
        del tr
        gc.collect()
        # With the connection leaked this would time out (UnavailableError).
        await db.run(_set(b"k", b"v"))
        assert await db.run(_get(b"k")) == b"v"


async def test_least_privileged_role_uses_a_prepared_store(server: Server) -> None:
    """docs/postgres.md's recipe: the owner creates the store, an application
    role with only USAGE and table privileges uses it, and creating a store
    without CREATE rights fails with a clear error."""
    cluster, own = server.cluster, None
    if cluster is None:
        try:
            cluster = own = await asyncio.to_thread(start_cluster)
        except NoServer as exc:
            if os.environ.get("CI") == "true":
                pytest.fail(f"CI=true: cannot test privileges: {exc}")
            pytest.skip(f"needs a throwaway cluster to create roles: {exc}")
    try:
        owner_url = fresh_schema_url(cluster.url)
        schema = _schema(owner_url)
        async with dgen.connect(owner_url) as db:
            await db.run(_set(b"seed", b"1"))
        with psycopg.connect(_conninfo(owner_url), autocommit=True) as conn:
            conn.execute(
                "DO $$ BEGIN CREATE ROLE dgen_app LOGIN; "
                "EXCEPTION WHEN duplicate_object THEN NULL; END $$"
            )
            conn.execute(f'GRANT USAGE ON SCHEMA "{schema}" TO dgen_app')
            conn.execute(
                f'GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA "{schema}" '
                "TO dgen_app"
            )
        app_url = owner_url.replace("postgresql://postgres@", "postgresql://dgen_app@", 1)
        assert app_url != owner_url
        async with dgen.connect(app_url) as db:

            async def work(tr: Transaction) -> bytes | None:
                tr.add(b"n", 1)
                key, offset = pack_with_versionstamp(("q", Versionstamp()))
                tr.set_versionstamped_key(key, offset, b"m")
                return await tr.get(b"seed")

            assert await db.run(work) == b"1"
            watch = await _watch(db, b"n")
            await db.run(_add(b"n", 1))
            await asyncio.wait_for(watch, WAIT)
        fresh = fresh_schema_url(cluster.url).replace(
            "postgresql://postgres@", "postgresql://dgen_app@", 1
        )
        with pytest.raises(UnavailableError, match="privileges DGen needs"):
            await dgen.connect(fresh)
    finally:
        if own is not None:
            await asyncio.to_thread(own.destroy)


# -- cancellation -----------------------------------------------------------------


async def test_cancelling_transactions_waiting_for_the_pool_always_cancels_them(
    url: str,
) -> None:
    """Python 3.11's asyncio.wait_for, inside psycopg_pool's getconn, returned
    the connection instead of raising when the cancel came as the wait ended:
    the task ran on (a cancelled consumer then waited on its watch forever).
    Workers queue for one connection; a trigger cancels them all a few loop
    iterations after its own transaction handed the connection on, which
    lands in that window. Every worker must end cancelled, none finish."""
    async with dgen.connect(url + "&pool_size=1") as db:
        await db.run(_set(b"k", b"v"))
        stopping = False

        async def worker() -> None:
            while not stopping:
                await db.run(_get(b"k"))

        for round_ in range(24):
            workers = [asyncio.ensure_future(worker()) for _ in range(8)]
            await asyncio.sleep(0.01)
            await db.run(_get(b"k"))  # queued behind the workers
            for _ in range(round_ % 6):
                await asyncio.sleep(0)
            for task in workers:
                task.cancel()
            _, running = await asyncio.wait(workers, timeout=WAIT)  # hang guard
            stopping = bool(running)
            if running:
                await asyncio.wait(running, timeout=WAIT)
            lost = [t for t in workers if not t.cancelled()]
            assert not lost, f"round {round_}: {len(lost)} worker(s) ignored cancel()"


async def test_commit_conflicts_log_no_pipeline_warnings(
    url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """psycopg logged "error ignored terminating <AsyncPipeline>: pipeline
    aborted" at WARNING (printed to stderr) when a conflict surfaced inside the
    commit pipeline; a conflict must reach the caller as ConflictError only."""
    caplog.set_level("WARNING", logger="psycopg")
    async with dgen.connect(url) as db:
        conflicts = 0

        async def increment() -> None:
            nonlocal conflicts
            for _ in range(15):
                tr = db.create_transaction()
                try:
                    value = await tr.get(b"n")
                    tr.set(b"n", str(int(value or b"0") + 1).encode())
                    await tr.commit()
                except ConflictError:
                    conflicts += 1
                finally:
                    await tr.rollback()

        await asyncio.wait_for(asyncio.gather(*(increment() for _ in range(12))), WAIT * 4)
    assert conflicts > 0
    ignored = [r.getMessage() for r in caplog.records if r.name.startswith("psycopg")]
    assert not ignored


async def test_concurrent_reads_go_out_as_one_statement(url: str) -> None:
    """Reads awaited together are one statement (the first batch with the
    BEGIN), sequential ones one each; a cancelled reader drops out of its
    batch and the others still get their rows."""
    async with dgen.connect(url) as db:
        assert isinstance(db, postgres.PostgresDatabase)
        assert db.capabilities.combines_reads

        async def fill(tr: Transaction) -> None:
            for i in range(5):
                tr.set(b"r%d" % i, b"v%d" % i)

        await db.run(fill)
        tr = db.create_transaction()
        before = db.read_statements
        got = await asyncio.gather(
            tr.get(b"r0"), tr.get(b"r9"), tr.get_range(b"r1", b"r4", limit=2), tr.get(b"r3")
        )
        assert got == [b"v0", None, [(b"r1", b"v1"), (b"r2", b"v2")], b"v3"]
        assert db.read_statements == before + 1
        got = await asyncio.gather(tr.get(b"r4"), tr.get_range(b"r0", b"r2", reverse=True))
        assert got == [b"v4", [(b"r1", b"v1"), (b"r0", b"v0")]]
        assert db.read_statements == before + 2
        for key in (b"r1", b"r2"):
            await tr.get(key)
        assert db.read_statements == before + 4

        dropped = asyncio.ensure_future(tr.get(b"r1"))
        kept = asyncio.ensure_future(tr.get(b"r2"))
        await asyncio.sleep(0)  # both joined one batch
        dropped.cancel()
        assert await kept == b"v2"
        assert dropped.cancelled()
        await tr.rollback()


class _Tally(dgen.DGenServer):
    def __init__(self) -> None:
        self.added = asyncio.Event()

    def init(self, arg: Any) -> Any:
        return 0

    def handle_cast(self, message: Any, state: Any) -> Any:
        if message == "lock":
            return dgen.Lock(state)
        return dgen.NoReply(state + 1, actions=[lambda _: self.added.set()])

    def handle_call(self, request: Any, caller: dgen.Caller, state: Any) -> Any:
        return dgen.Reply(state, state)

    async def handle_locked(self, kind: str, message: Any, state: Any) -> Any:
        return dgen.NoReply(state + 100)


@pytest.mark.parametrize("gather_max", [consumer._GATHER_MAX, 0])
async def test_a_consume_transaction_reads_in_one_statement_unless_many_read_at_once(
    url: str, monkeypatch: pytest.MonkeyPatch, gather_max: int
) -> None:
    """A consumer's lock, version, queue-head and push-key reads are one
    statement. Past a few consumers of one database reading at once (each of
    those reads waits for a connection as a task of its own), a consumer
    reads its lock first, one statement more, with the same outcome. A
    local caller reads nothing after its wake-up."""
    monkeypatch.setattr(consumer, "_GATHER_MAX", gather_max)
    tally = _Tally()
    async with dgen.connect(url) as db, dgen.start(tally, db, "reads") as running:
        assert isinstance(db, postgres.PostgresDatabase)
        stats = running.stats
        for i in range(7):
            if i == 2:  # past the start's wake-ups: one attempt per message
                before, attempts = db.read_statements, stats.attempts
            tally.added.clear()
            await running.cast("add")
            await asyncio.wait_for(tally.added.wait(), WAIT)
        per_attempt = (db.read_statements - before) / (stats.attempts - attempts)
        assert per_attempt == (1 if gather_max else 2)
        # A call adds the consumer's read of the reply slot; the caller reads
        # nothing (the reply comes with its watch, Watch.value).
        before, attempts = db.read_statements, stats.attempts
        for _ in range(5):
            assert await running.call("value") == 7
        per_attempt = (db.read_statements - before) / (stats.attempts - attempts)
        assert per_attempt == (2 if gather_max else 3)
        await running.cast("lock")
        assert await running.call("value") == 107


async def test_a_watch_on_a_key_already_read_reads_nothing_more(url: str) -> None:
    """The baseline of a watch on a key the transaction read is that read's
    value (one statement, not a second read at commit), and the watch still
    fires on the next change."""
    async with dgen.connect(url) as db:
        assert isinstance(db, postgres.PostgresDatabase)
        await db.run(_set(b"w", b"0"))
        tr = db.create_transaction()
        before = db.read_statements
        assert await tr.get(b"w", snapshot=True) == b"0"
        watch = tr.watch(b"w")
        tr.set(b"other", b"x")
        await tr.commit()
        assert db.read_statements == before + 1
        assert not watch.done()
        await db.run(_set(b"w", b"1"))
        await asyncio.wait_for(watch, WAIT)


async def test_a_parked_snapshot_never_reaches_the_next_transaction(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reading transaction leaves its connection parked with its snapshot
    open, to be ended by the next reader's first round trip: that reader must
    see what was committed in between, read-only or read-write."""
    monkeypatch.setattr(postgres, "_PARKED_SECONDS", 30.0)  # only readers unpark
    async with dgen.connect(url) as db, dgen.connect(url) as other:
        assert isinstance(db, postgres.PostgresDatabase)
        await _grow_pool(db)
        await db.run(_set(b"p", b"0"))
        for i in range(1, 6):
            assert await db.run(_get(b"p")) == b"%d" % (i - 1)
            assert db._parked, "the read-only transaction did not park its connection"
            await other.run(_set(b"p", b"%d" % i))

        async def bump(tr: Transaction) -> None:
            value = await tr.get(b"p")
            assert value is not None
            tr.set(b"p", b"%d" % (int(value) + 1))

        for _ in range(3):  # read-write: parked before the commit, on another connection
            await db.run(bump)
            assert db._parked
        assert await other.run(_get(b"p")) == b"8"


async def _park_one(db: postgres.PostgresDatabase) -> int:
    """Store p=0 and read it back, which parks the reading connection; its
    backend's pid."""
    await _grow_pool(db)
    await db.run(_set(b"p", b"0"))
    assert await db.run(_get(b"p")) == b"0"
    return db._parked[0].info.backend_pid


async def test_parked_connections_are_released_soon(url: str) -> None:
    """A parked connection's snapshot holds back VACUUM: it is rolled back and
    returned to the pool within moments, leaving no idle transaction."""
    async with dgen.connect(url) as db:
        assert isinstance(db, postgres.PostgresDatabase)
        pid = await _park_one(db)
        await asyncio.sleep(0.3)
        assert not db._parked
        with psycopg.connect(db.conninfo, autocommit=True) as conn:
            row = conn.execute(
                "SELECT state FROM pg_stat_activity WHERE pid = %s", (pid,)
            ).fetchone()
        assert row is not None and row[0] == "idle", f"backend {pid} is {row}"


async def test_a_parked_connection_killed_is_replaced(url: str) -> None:
    """A parked connection whose backend died is dropped and the read goes
    out on a fresh one: no error reaches the transaction."""
    async with dgen.connect(url) as db:
        assert isinstance(db, postgres.PostgresDatabase)
        pid = await _park_one(db)
        with psycopg.connect(db.conninfo, autocommit=True) as killer:
            killer.execute("SELECT pg_terminate_backend(%s)", (pid,))
        assert await db.run(_get(b"p")) == b"0"
        assert await db.run(_get(b"p")) == b"0"


async def test_abandoned_batched_reads_before_a_commit_lose_no_connection(url: str) -> None:
    """Two reads batched and then cancelled, and the transaction commits:
    the batch, still out, must end before the reading connection is parked,
    or it begins a new snapshot on the parked connection, which nobody then
    returns (found by review: the pool lost a slot and the server kept an
    open snapshot)."""
    async with dgen.connect(url + "&pool_size=3") as db:
        assert isinstance(db, postgres.PostgresDatabase)
        await db.run(_set(b"a", b"1"))
        other = db.create_transaction()
        await other.get(b"a")  # holds a connection: the commit must wait for a new one
        tr = db.create_transaction()
        await tr.get(b"a")
        assert isinstance(tr, postgres.PostgresTransaction) and tr._conn is not None
        reader_pid = tr._conn.info.backend_pid
        readers = [asyncio.ensure_future(tr.get(k)) for k in (b"x", b"y")]
        await asyncio.sleep(0)  # both in one batch
        for r in readers:
            r.cancel()
        tr.set(b"b", b"2")
        await tr.commit()
        await other.rollback()
        await asyncio.sleep(0.3)  # parked connections go back
        stats = db.pool.get_stats()
        assert stats["pool_available"] == stats["pool_size"], stats
        with psycopg.connect(db.conninfo, autocommit=True) as conn:
            row = conn.execute(
                "SELECT state FROM pg_stat_activity WHERE pid = %s", (reader_pid,)
            ).fetchone()
        assert row is None or row[0] == "idle", f"the reading backend is {row}"


async def test_transactions_cancelled_at_any_moment_leave_the_pool_whole(url: str) -> None:
    """Transactions cut short by timeouts at random moments (in reads,
    batches, commits and while handing connections back) must return every
    connection: psycopg_pool lost the ones whose putconn was cancelled."""
    async with dgen.connect(url + "&pool_size=3") as db:
        assert isinstance(db, postgres.PostgresDatabase)

        async def fill(tr: Transaction) -> None:
            for i in range(20):
                tr.set(b"k%02d" % i, b"v")

        await db.run(fill)
        rng = random.Random(7)

        async def fn(tr: Transaction) -> None:
            if rng.random() < 0.5:
                await tr.get(b"k00")
            await asyncio.gather(
                tr.get(b"k%02d" % rng.randrange(20)),
                tr.get_range(b"k00", b"k99", limit=3),
                tr.get(b"k05", snapshot=True),
            )
            if rng.random() < 0.5:
                tr.set(b"k%02d" % rng.randrange(20), b"x")

        async def worker() -> None:
            end = asyncio.get_running_loop().time() + 3.0
            while asyncio.get_running_loop().time() < end:
                with contextlib.suppress(TimeoutError, ConflictError, CommitUnknownError):
                    await asyncio.wait_for(db.run(fn), rng.uniform(0, 0.004))

        await asyncio.gather(*(worker() for _ in range(12)))
        for _ in range(3):
            gc.collect()
            await asyncio.sleep(0.2)
        stats = db.pool.get_stats()
        assert stats["pool_available"] == stats["pool_size"], stats
        assert await asyncio.wait_for(db.run(_get(b"k05")), WAIT) in (b"v", b"x")
