"""Group commit in the PostgreSQL backend, against a real server.

Groups are made to form deterministically, without timing: a second session
holds a row lock that the commit statement in flight needs, so the commits
that arrive meanwhile queue behind it (``db.committer.queued`` counts them)
and go out as one ``dgen_commit_group`` statement when the lock is released.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import psycopg
import pytest
from pgserver import Server, drop_schema, fresh_schema_url, role_url
from psycopg import sql

import dgen
from dgen.backends import postgres
from dgen.keys import Versionstamp, pack, pack_with_versionstamp, range_of
from dgen.store import (
    CommitUnknownError,
    ConflictError,
    StoreError,
    Transaction,
    decode_counter,
    encode_counter,
)
from dgen.urls import URL, URLError

pytestmark = pytest.mark.anyio

WAIT = 30.0  # hang guard only


@pytest.fixture
def url(postgres_server: Server) -> Iterator[str]:
    u = fresh_schema_url(postgres_server.url)
    yield u
    drop_schema(u)


def _schema(url: str) -> str:
    return postgres._parse(URL.parse(url))[1]


async def _until(condition: Callable[[], bool], what: str) -> None:
    for _ in range(int(WAIT / 0.005)):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"timed out waiting until {what}")


@contextlib.asynccontextmanager
async def _row_locked(db: postgres.PostgresDatabase, key: bytes) -> AsyncIterator[None]:
    """Hold a lock on ``key``'s row (which must exist) from another session:
    a commit writing ``key`` waits for it while holding the clock lock."""
    conn = await psycopg.AsyncConnection.connect(db.conninfo, autocommit=True)
    try:
        await conn.execute("BEGIN")
        q = sql.SQL("SELECT 1 FROM {}.dgen_kv WHERE key = %s FOR UPDATE").format(
            sql.Identifier(db.schema)
        )
        cur = await conn.execute(q, (key,))
        assert await cur.fetchone() is not None, f"{key!r} must exist to be locked"
        yield
    finally:
        await conn.execute("ROLLBACK")
        await conn.close()


async def _backend_waiting(db: postgres.PostgresDatabase, statement: str) -> int:
    """The pid of the backend running ``statement`` and waiting for a lock."""
    async with await psycopg.AsyncConnection.connect(db.conninfo, autocommit=True) as conn:
        for _ in range(int(WAIT / 0.01)):
            cur = await conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND query LIKE %s AND pid <> pg_backend_pid()",
                (f"%{statement}(%",),
            )
            row = await cur.fetchone()
            if row is not None:
                return int(row[0])
            await asyncio.sleep(0.01)
    raise AssertionError(f"no backend waits in {statement}")


async def _terminate(db: postgres.PostgresDatabase, pid: int) -> None:
    async with await psycopg.AsyncConnection.connect(db.conninfo, autocommit=True) as conn:
        await conn.execute("SELECT pg_terminate_backend(%s)", (pid,))


def _set(key: bytes, value: bytes) -> Callable[[Transaction], Awaitable[None]]:
    async def body(tr: Transaction) -> None:
        tr.set(key, value)

    return body


def _blind_writes(db: dgen.Database, *keys: bytes) -> list[Transaction]:
    """One uncommitted transaction per key, each setting it to b"v"."""
    trs = []
    for key in keys:
        tr = db.create_transaction()
        tr.set(key, b"v")
        trs.append(tr)
    return trs


async def _get(db: dgen.Database, key: bytes) -> bytes | None:
    async def body(tr: Transaction) -> bytes | None:
        return await tr.get(key)

    return await db.run(body)


class _Queue:
    """Starts commits one at a time behind a blocked statement, in a known order."""

    def __init__(self, db: postgres.PostgresDatabase) -> None:
        self.db = db
        self.tasks: list[asyncio.Task[Any]] = []
        c = db.committer
        self._start = (c.statements, c.groups, c.grouped)

    def counts(self) -> tuple[int, int, int]:
        """Statements, groups and grouped members since this was made."""
        c = self.db.committer
        s, g, m = self._start
        return c.statements - s, c.groups - g, c.grouped - m

    async def blocker(self, key: bytes) -> asyncio.Task[Any]:
        """A commit writing ``key`` (locked): the statement in flight."""
        before = self.db.committer.statements
        task = asyncio.create_task(self.db.run(_set(key, b"blocker")))
        await _until(lambda: self.db.committer.statements > before, "the blocker was sent")
        return task

    async def add(self, tr: Transaction) -> asyncio.Task[None]:
        """Commit ``tr`` and wait until it queued."""
        before = self.db.committer.queued
        task = asyncio.create_task(tr.commit())
        await _until(lambda: self.db.committer.queued > before, "the commit queued")
        self.tasks.append(task)
        return task


# -- groups form, and commit correctly -------------------------------------------


@pytest.mark.parametrize("notify", ["after", "commit"])
async def test_commits_queued_behind_one_in_flight_go_out_as_one_group(
    url: str, notify: str
) -> None:
    """Five commits queued behind a blocked one: one group statement, five
    distinct versionstamps in queue order, all data applied, and watches in
    another database object fire from the group's notifications (the poll is
    too slow to be the cause)."""
    async with (
        dgen.connect(url + f"&notify={notify}") as db,
        dgen.connect(url + "&watch_poll_interval=600") as other,
    ):
        assert isinstance(db, postgres.PostgresDatabase) and db.committer.enabled
        await db.run(_set(b"lock", b"0"))

        async def arm(tr: Transaction) -> dgen.Watch:
            await tr.get(b"w3")
            return tr.watch(b"w3")

        watch = await other.run(arm)
        q = _Queue(db)
        stamps: list[asyncio.Future[bytes]] = []
        async with _row_locked(db, b"lock"):
            blocked = await q.blocker(b"lock")
            for i in range(5):
                tr = db.create_transaction()
                tr.set(f"w{i}".encode(), b"v")
                key, offset = pack_with_versionstamp(("q", Versionstamp(user_version=i)))
                tr.set_versionstamped_key(key, offset, str(i).encode())
                stamps.append(tr.get_versionstamp())
                await q.add(tr)
            assert q.counts()[0] == 1
        await asyncio.wait_for(asyncio.gather(blocked, *q.tasks), WAIT)
        assert q.counts() == (2, 1, 5)
        values = [await s for s in stamps]
        assert values == sorted(values) and len(set(values)) == 5
        # One version each, consecutive: v, v+1, ... in commit (queue) order.
        versions = [int.from_bytes(s[:8], "big") for s in values]
        assert versions == list(range(versions[0], versions[0] + 5))

        async def scan(tr: Transaction) -> list[tuple[bytes, bytes]]:
            return await tr.get_range(*range_of(("q",)))

        queued = await db.run(scan)
        assert [v for _, v in queued] == [b"0", b"1", b"2", b"3", b"4"]
        assert [k for k, _ in queued] == [
            pack(("q", Versionstamp(s, i))) for i, s in enumerate(values)
        ]
        for i in range(5):
            assert await _get(db, f"w{i}".encode()) == b"v"
        # The server's own word: the five members' rows were written by one
        # transaction, and the blocker's by another.
        async with await psycopg.AsyncConnection.connect(db.conninfo, autocommit=True) as conn:
            q_xmin = sql.SQL(
                "SELECT count(DISTINCT xmin::text) FROM {}.dgen_kv WHERE key = ANY(%s)"
            )
            keys = [f"w{i}".encode() for i in range(5)]
            cur = await conn.execute(q_xmin.format(sql.Identifier(db.schema)), (keys,))
            assert await cur.fetchone() == (1,)
            cur = await conn.execute(q_xmin.format(sql.Identifier(db.schema)), ([*keys, b"lock"],))
            assert await cur.fetchone() == (2,)
        await asyncio.wait_for(watch, WAIT)


async def test_a_conflict_inside_a_group_fails_that_member_only(url: str) -> None:
    """Two members of one group read and write the same key: the first
    commits, the second gets ConflictError (it sees the first's log rows from
    the same statement); an unrelated member behind them commits too."""
    async with dgen.connect(url) as db:
        assert isinstance(db, postgres.PostgresDatabase)
        await db.run(_set(b"lock", b"0"))
        await db.run(_set(b"n", encode_counter(0)))
        q = _Queue(db)
        members = []
        for _ in range(2):
            tr = db.create_transaction()
            n = decode_counter(await tr.get(b"n"))
            tr.set(b"n", encode_counter(n + 1))
            members.append(tr)
        other = db.create_transaction()
        assert await other.get(b"elsewhere") is None
        other.set(b"elsewhere", b"x")
        async with _row_locked(db, b"lock"):
            blocked = await q.blocker(b"lock")
            first, second = [await q.add(tr) for tr in members]
            third = await q.add(other)
        await asyncio.wait_for(blocked, WAIT)
        done = await asyncio.wait_for(
            asyncio.gather(first, second, third, return_exceptions=True), WAIT
        )
        assert done[0] is None and done[2] is None, done
        assert isinstance(done[1], ConflictError), done
        assert q.counts() == (2, 1, 3)
        assert decode_counter(await _get(db, b"n")) == 1
        assert await _get(db, b"elsewhere") == b"x"


async def test_a_member_that_read_a_range_an_earlier_member_cleared_conflicts(url: str) -> None:
    async with dgen.connect(url) as db:
        assert isinstance(db, postgres.PostgresDatabase)
        await db.run(_set(b"lock", b"0"))
        await db.run(_set(b"r/2", b"x"))
        q = _Queue(db)
        clearer = db.create_transaction()
        clearer.clear_range(b"r/", b"r0")
        reader = db.create_transaction()
        assert len(await reader.get_range(b"r/", b"r0")) == 1
        reader.set(b"seen", b"1")
        async with _row_locked(db, b"lock"):
            blocked = await q.blocker(b"lock")
            t1 = await q.add(clearer)
            t2 = await q.add(reader)
        done = await asyncio.wait_for(asyncio.gather(blocked, t1, t2, return_exceptions=True), WAIT)
        assert done[1] is None and isinstance(done[2], ConflictError), done
        assert await _get(db, b"seen") is None and await _get(db, b"r/2") is None


async def test_concurrent_increments_lose_nothing(url: str) -> None:
    """Many tasks do read-modify-write increments, on two shared keys and one
    key each, through db.run (which retries conflicts): nothing is lost."""
    tasks, rounds = 24, 8
    async with dgen.connect(url) as db:
        assert isinstance(db, postgres.PostgresDatabase)

        async def worker(i: int) -> None:
            for r in range(rounds):
                shared, own = f"shared{(i + r) % 2}".encode(), f"own{i}".encode()

                async def body(tr: Transaction, shared: bytes = shared, own: bytes = own) -> None:
                    a = decode_counter(await tr.get(shared))
                    b = decode_counter(await tr.get(own))
                    tr.set(shared, encode_counter(a + 1))
                    tr.set(own, encode_counter(b + 1))

                await db.run(body)

        await asyncio.wait_for(asyncio.gather(*(worker(i) for i in range(tasks))), 100)
        shared = [decode_counter(await _get(db, f"shared{j}".encode())) for j in range(2)]
        assert sum(shared) == tasks * rounds and shared[0] == shared[1]
        for i in range(tasks):
            assert decode_counter(await _get(db, f"own{i}".encode())) == rounds


# -- errors -------------------------------------------------------------------


async def _commit_behind_blocker(
    db: postgres.PostgresDatabase, q: _Queue, trs: list[Transaction]
) -> list[Any]:
    """Commit ``trs`` queued, in order, behind a blocked commit of b"lock"
    (which must exist); the blocker's outcome, then theirs (exceptions
    returned)."""
    async with _row_locked(db, b"lock"):
        blocked = await q.blocker(b"lock")
        for tr in trs:
            await q.add(tr)
    return await asyncio.wait_for(asyncio.gather(blocked, *q.tasks, return_exceptions=True), WAIT)


@pytest.mark.parametrize("last", ["set", "clear", "none"])
async def test_a_watch_fired_by_a_group_carries_the_value_the_group_left(
    url: str, last: str
) -> None:
    """Two members of one group write a watched key: the watch fires with
    the value the statement left (Watch.value) or None (not known), never
    with a value a later member replaced."""
    async with dgen.connect(url) as db:
        assert isinstance(db, postgres.PostgresDatabase)
        await db.run(_set(b"lock", b"0"))
        await db.run(_set(b"w", b"v0"))

        async def arm(tr: Transaction) -> dgen.Watch:
            await tr.get(b"w")
            return tr.watch(b"w")

        watch = await db.run(arm)
        first = db.create_transaction()
        first.set(b"w", b"v1")
        second = db.create_transaction()
        if last == "set":
            second.set(b"w", b"v2")
        elif last == "clear":
            second.clear_range(b"v", b"x")
        else:
            second.set(b"elsewhere", b"x")
        q = _Queue(db)
        done = await _commit_behind_blocker(db, q, [first, second])
        assert done == [None, None, None]
        assert q.counts() == (2, 1, 2)
        await asyncio.wait_for(_fired(watch), WAIT)
        now = await _get(db, b"w")
        assert now == {"set": b"v2", "clear": None, "none": b"v1"}[last]
        assert watch.value in (None, now), watch.value


async def _fired(watch: dgen.Watch) -> None:
    await watch


async def _on_insert(db: postgres.PostgresDatabase, key: bytes, action: str) -> None:
    """A trigger that runs the PL/pgSQL ``action`` when ``key`` is inserted
    into the store."""
    schema = sql.Identifier(db.schema)
    name = sql.Identifier(f"on_{key.hex()}")
    async with await psycopg.AsyncConnection.connect(db.conninfo, autocommit=True) as conn:
        await conn.execute(
            sql.SQL(
                "CREATE FUNCTION {s}.{n}() RETURNS trigger LANGUAGE plpgsql AS $$ "
                "BEGIN IF NEW.key = {k}::bytea THEN {a}; END IF; RETURN NEW; END $$"
            ).format(s=schema, n=name, k=sql.Literal(key), a=sql.SQL(action))
        )
        await conn.execute(
            sql.SQL(
                "CREATE TRIGGER {n} BEFORE INSERT ON {s}.dgen_kv "
                "FOR EACH ROW EXECUTE FUNCTION {s}.{n}()"
            ).format(s=schema, n=name)
        )


async def test_a_failing_member_is_retried_alone_and_fails_alone(url: str) -> None:
    """A member whose write fails on the server (a trigger refuses its key)
    fails the group statement; each member is then committed alone, so the
    others commit and only it gets the error."""
    async with dgen.connect(url) as db:
        assert isinstance(db, postgres.PostgresDatabase)
        await db.run(_set(b"lock", b"0"))
        await _on_insert(db, b"poison", "RAISE EXCEPTION 'poisoned key'")
        q = _Queue(db)
        trs = _blind_writes(db, b"good1", b"poison", b"good2")
        done = await _commit_behind_blocker(db, q, trs)
        assert done[0] is None and done[1] is None and done[3] is None, done
        error = done[2]
        assert isinstance(error, StoreError) and "poisoned key" in str(error), done
        assert not isinstance(error, ConflictError | CommitUnknownError)
        # blocker, the group, then each of its three members alone
        assert q.counts() == (5, 1, 3)
        assert await _get(db, b"good1") == b"v" and await _get(db, b"good2") == b"v"
        assert await _get(db, b"poison") is None


@contextlib.asynccontextmanager
async def _group_waiting_for_lock2(
    db: postgres.PostgresDatabase, *keys: bytes
) -> AsyncIterator[tuple[_Queue, int]]:
    """Commits of ``keys`` queued behind a blocker, now out as one group
    statement that waits for the row lock on b"lock2" (held until the block
    ends); yields their _Queue and that statement's backend pid."""
    await db.run(_set(b"lock", b"0"))
    await db.run(_set(b"lock2", b"0"))
    q = _Queue(db)
    async with _row_locked(db, b"lock2"):
        async with _row_locked(db, b"lock"):
            blocked = await q.blocker(b"lock")
            for key in keys:
                tr = db.create_transaction()
                tr.set(key, b"v")
                tr.set(b"lock2", key)  # the group then waits for lock2
                await q.add(tr)
        await asyncio.wait_for(blocked, WAIT)
        yield q, await _backend_waiting(db, "dgen_commit_group")


async def test_a_connection_lost_while_members_are_retried_alone_is_replaced(url: str) -> None:
    """After a failed group its members are committed one by one on the
    committer's connection; a member whose statement kills that connection
    gets CommitUnknownError, and the members after it go out on a new one
    (nothing had been sent for them) and commit."""
    async with dgen.connect(url) as db:
        assert isinstance(db, postgres.PostgresDatabase)
        await db.run(_set(b"lock", b"0"))
        await _on_insert(db, b"poison", "RAISE EXCEPTION 'poisoned key'")
        await _on_insert(db, b"die", "PERFORM pg_terminate_backend(pg_backend_pid())")
        q = _Queue(db)
        trs = _blind_writes(db, b"poison", b"die", b"good")
        done = await _commit_behind_blocker(db, q, trs)
        assert done[0] is None and "poisoned key" in str(done[1]), done
        assert isinstance(done[2], CommitUnknownError), done
        assert done[3] is None, done
        assert await _get(db, b"good") == b"v" and await _get(db, b"die") is None


async def test_a_lost_connection_gives_every_member_commit_unknown(url: str) -> None:
    async with dgen.connect(url) as db:
        assert isinstance(db, postgres.PostgresDatabase)
        async with _group_waiting_for_lock2(db, b"a", b"b", b"c") as (q, pid):
            await _terminate(db, pid)
            done = await asyncio.wait_for(asyncio.gather(*q.tasks, return_exceptions=True), WAIT)
        assert all(isinstance(d, CommitUnknownError) for d in done), done
        assert q.counts() == (2, 1, 3)
        # None was applied (the session died waiting); the store works on.
        for key in (b"a", b"b", b"c"):
            assert await _get(db, key) is None
        await db.run(_set(b"after", b"1"))
        assert await _get(db, b"after") == b"1"


async def test_the_committers_lost_connection_is_replaced(url: str) -> None:
    """The committer's own connection is terminated while idle (a server
    restart would do the same): the next commit connects anew, sends
    nothing on the dead one, and commits."""
    async with dgen.connect(url) as db:
        assert isinstance(db, postgres.PostgresDatabase)
        await db.run(_set(b"a", b"1"))
        pid = db.committer.backend_pid
        assert pid is not None and db.committer.connects == 1
        async with await psycopg.AsyncConnection.connect(db.conninfo, autocommit=True) as conn:
            await conn.execute("SELECT pg_terminate_backend(%s, 10000)", (pid,))
        conn = db.committer._conn
        assert conn is not None
        await _until(lambda: not postgres._looks_alive(conn), "the session died")
        await db.run(_set(b"b", b"2"))
        assert db.committer.connects == 2 and db.committer.backend_pid != pid
        assert await _get(db, b"a") == b"1" and await _get(db, b"b") == b"2"


async def test_a_committer_that_cannot_connect_applies_nothing(url: str) -> None:
    """With its connection gone and the server unreachable, commits fail
    after connect_timeout with UnavailableError (nothing was sent, so not
    CommitUnknownError); once the server answers again they commit."""
    async with dgen.connect(url + "&connect_timeout=1") as db:
        assert isinstance(db, postgres.PostgresDatabase)
        await db.run(_set(b"a", b"1"))
        conninfo = db.conninfo
        pid = db.committer.backend_pid
        # Unreachable from now on (nothing listens on port 1), for new
        # connections of the committer only.
        db.conninfo = psycopg.conninfo.make_conninfo(conninfo, host="127.0.0.1", port="1")
        async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
            await conn.execute("SELECT pg_terminate_backend(%s, 10000)", (pid,))
        dead = db.committer._conn
        assert dead is not None
        await _until(lambda: not postgres._looks_alive(dead), "the session died")
        results = await asyncio.wait_for(
            asyncio.gather(
                *(t.commit() for t in _blind_writes(db, b"x", b"y")), return_exceptions=True
            ),
            WAIT,
        )
        for error in results:
            assert isinstance(error, dgen.UnavailableError), results
            assert "nothing was applied" in str(error) and "connect_timeout" in str(error)
        db.conninfo = conninfo
        await db.run(_set(b"b", b"2"))
        assert await _get(db, b"x") is None and await _get(db, b"y") is None
        assert await _get(db, b"b") == b"2"


async def test_commits_need_no_pooled_connection(url: str) -> None:
    """With the one pooled connection held by a transaction that read, a
    write-only transaction still commits (the committer has its own
    connection), and so does the reader, which gives its connection back
    before its commit is sent."""
    async with dgen.connect(url + "&pool_size=1&connect_timeout=2") as db:
        assert isinstance(db, postgres.PostgresDatabase)
        reader = db.create_transaction()
        assert await reader.get(b"k") is None  # holds the only connection
        writer = db.create_transaction()
        writer.set(b"w", b"1")
        await asyncio.wait_for(writer.commit(), WAIT)
        reader.set(b"k", b"r")
        await asyncio.wait_for(reader.commit(), WAIT)
        assert await _get(db, b"w") == b"1" and await _get(db, b"k") == b"r"


async def test_cancelled_members_do_not_break_their_group(url: str) -> None:
    """A member cancelled while queued is never sent; one cancelled while
    its group's statement waits on a lock returns at once, and the statement
    runs on: the others get their results."""
    async with dgen.connect(url) as db:
        assert isinstance(db, postgres.PostgresDatabase)
        await db.run(_set(b"lock", b"0"))
        await db.run(_set(b"lock2", encode_counter(0)))
        q = _Queue(db)
        trs = []
        for key in (b"lead", b"dropped", b"follow"):
            tr = db.create_transaction()
            tr.set(key, b"v")
            tr.add(b"lock2", 1)  # the group waits for lock2
            trs.append(tr)
        async with _row_locked(db, b"lock2"):
            async with _row_locked(db, b"lock"):
                blocked = await q.blocker(b"lock")
                lead, dropped, follow = [await q.add(tr) for tr in trs]
                dropped.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await dropped
                assert db.committer.queued == 2
            await asyncio.wait_for(blocked, WAIT)
            await _backend_waiting(db, "dgen_commit_group")
            lead.cancel()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(lead, WAIT)
            assert not follow.done()
        await asyncio.wait_for(follow, WAIT)
        assert q.counts() == (2, 1, 2)
        assert await _get(db, b"dropped") is None
        assert await _get(db, b"follow") == b"v"
        assert await _get(db, b"lead") == b"v"  # it was sent: cancelled too late
        assert decode_counter(await _get(db, b"lock2")) == 2
        await db.run(_set(b"after", b"1"))


# -- closing ----------------------------------------------------------------------


async def test_closing_with_a_lone_commit_stuck_fails_it_as_unknown_and_sends_no_more(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """aclose waits for the commits being sent, then gives up: the lone
    commit still out (blocked on a row lock) gets CommitUnknownError, the
    commits queued behind it UnavailableError, and nothing is sent on a new
    connection after the close."""
    monkeypatch.setattr(postgres, "_CLOSE_GRACE", 0.3)
    db = await dgen.connect(url)
    assert isinstance(db, postgres.PostgresDatabase)
    await db.run(_set(b"lock", b"0"))
    q = _Queue(db)
    async with _row_locked(db, b"lock"):
        blocked = await q.blocker(b"lock")
        for tr in _blind_writes(db, b"a", b"b"):
            await q.add(tr)
        await asyncio.wait_for(db.aclose(), WAIT)
        done = await asyncio.wait_for(
            asyncio.gather(blocked, *q.tasks, return_exceptions=True), WAIT
        )
    assert isinstance(done[0], CommitUnknownError), done
    assert all(isinstance(d, dgen.UnavailableError) for d in done[1:]), done
    await asyncio.sleep(0.2)
    assert db.committer.connects == 1 and db.committer.backend_pid is None
    async with dgen.connect(url) as check:
        assert await _get(check, b"a") is None and await _get(check, b"b") is None


async def test_closing_with_a_group_stuck_fails_its_members_as_unknown(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A group statement still out when aclose gives up may have been
    applied: its members get CommitUnknownError, not UnavailableError."""
    monkeypatch.setattr(postgres, "_CLOSE_GRACE", 0.3)
    db = await dgen.connect(url)
    assert isinstance(db, postgres.PostgresDatabase)
    async with _group_waiting_for_lock2(db, b"a", b"b") as (q, _):
        await asyncio.wait_for(db.aclose(), WAIT)
        done = await asyncio.wait_for(asyncio.gather(*q.tasks, return_exceptions=True), WAIT)
    assert all(isinstance(d, CommitUnknownError) for d in done), done


async def test_a_transaction_that_read_and_commits_after_close_gives_its_connection_back(
    url: str,
) -> None:
    """Committing once the database is closing fails before the reading
    connection is handed away, so the transaction's end rolls it back and
    returns it (a closed pool closes it), instead of leaving it idle in a
    transaction."""
    db = await dgen.connect(url)
    assert isinstance(db, postgres.PostgresDatabase)
    tr = db.create_transaction()
    await tr.get(b"k")
    assert isinstance(tr, postgres.PostgresTransaction) and tr._conn is not None
    reader = tr._conn
    tr.set(b"k", b"v")
    closing = asyncio.create_task(db.aclose())
    await asyncio.sleep(0)  # the database is closing
    with pytest.raises(dgen.UnavailableError, match="closed"):
        await tr.commit()
    await asyncio.wait_for(closing, WAIT)
    assert reader.closed or reader.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    async with dgen.connect(url) as check:
        assert await _get(check, b"k") is None


# -- the option and the schema -------------------------------------------------


async def test_group_commit_off_sends_every_commit_alone(url: str) -> None:
    async with dgen.connect(url + "&group_commit=off") as db:
        assert isinstance(db, postgres.PostgresDatabase) and not db.committer.enabled
        await db.run(_set(b"lock", b"0"))
        q = _Queue(db)
        async with _row_locked(db, b"lock"):
            tasks = [asyncio.create_task(db.run(_set(b"lock", b"%d" % i))) for i in range(4)]
            await _until(lambda: q.counts()[0] == 4, "all four were sent")
            assert db.committer.queued == 0
        await asyncio.wait_for(asyncio.gather(*tasks), WAIT)
        assert q.counts() == (4, 0, 0)


async def test_bad_group_commit_option_is_refused() -> None:
    with pytest.raises(URLError, match=r"group_commit='maybe'.*on or off"):
        await dgen.connect("postgresql://u@/db?group_commit=maybe")


async def _drop_group_function(db: postgres.PostgresDatabase) -> None:
    """Make the store look like one made before dgen_commit_group existed."""
    async with await psycopg.AsyncConnection.connect(db.conninfo, autocommit=True) as conn:
        await conn.execute(
            sql.SQL("DROP FUNCTION {}.{}").format(
                sql.Identifier(db.schema), sql.SQL(postgres._GROUP_SIGNATURE)
            )
        )


async def test_a_store_made_before_group_commit_gets_the_function(url: str) -> None:
    """An older DGen's store has no dgen_commit_group: opening it adds it;
    an older version of it is replaced."""
    async with dgen.connect(url) as db:
        assert isinstance(db, postgres.PostgresDatabase)
        await db.run(_set(b"k", b"v"))
        await _drop_group_function(db)
    async with dgen.connect(url) as db:
        assert isinstance(db, postgres.PostgresDatabase) and db.committer.enabled
        async with await psycopg.AsyncConnection.connect(db.conninfo, autocommit=True) as conn:
            cur = await conn.execute(db.sql.has_group)
            assert await cur.fetchone() == (postgres._GROUP_VERSION,)
            # An older body of the function (another comment) is replaced too.
            await conn.execute(
                sql.SQL("COMMENT ON FUNCTION {}.dgen_commit_group IS 'older'").format(
                    sql.Identifier(db.schema)
                )
            )
    async with dgen.connect(url) as db:
        assert isinstance(db, postgres.PostgresDatabase) and db.committer.enabled
        async with await psycopg.AsyncConnection.connect(db.conninfo, autocommit=True) as conn:
            cur = await conn.execute(db.sql.has_group)
            assert await cur.fetchone() == (postgres._GROUP_VERSION,)
        await db.run(_set(b"lock", b"0"))
        q = _Queue(db)
        async with _row_locked(db, b"lock"):
            blocked = await q.blocker(b"lock")
            for key in (b"a", b"b"):
                tr = db.create_transaction()
                tr.set(key, b"v")
                await q.add(tr)
        await asyncio.wait_for(asyncio.gather(blocked, *q.tasks), WAIT)
        assert q.counts() == (2, 1, 2)
        assert await _get(db, b"a") == b"v" and await _get(db, b"k") == b"v"


async def test_a_newer_dgens_commit_functions_are_not_replaced(url: str) -> None:
    """Functions marked by a newer DGen stay as they are when this one opens
    the store (older bodies are replaced, newer ones never downgraded)."""
    async with dgen.connect(url) as db:
        assert isinstance(db, postgres.PostgresDatabase)
        newer = "dgen group commit 99"
        async with await psycopg.AsyncConnection.connect(db.conninfo, autocommit=True) as conn:
            await conn.execute(
                sql.SQL("COMMENT ON FUNCTION {}.dgen_commit_group IS {}").format(
                    sql.Identifier(db.schema), sql.Literal(newer)
                )
            )
    async with dgen.connect(url) as db:
        assert isinstance(db, postgres.PostgresDatabase) and db.committer.enabled
        async with await psycopg.AsyncConnection.connect(db.conninfo, autocommit=True) as conn:
            cur = await conn.execute(db.sql.has_group)
            assert await cur.fetchone() == (newer,)
        await db.run(_set(b"k", b"v"))
    assert postgres._function_version(newer) == 99
    assert postgres._function_version("older") == postgres._function_version(None) == 0


async def test_a_role_that_may_not_create_the_function_commits_without_groups(
    owner_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An application role without CREATE on an older store's schema: group
    commit stays off, with a warning, and commits work as before."""
    async with dgen.connect(owner_url) as db:
        assert isinstance(db, postgres.PostgresDatabase)
        await db.run(_set(b"seed", b"1"))
        await _drop_group_function(db)
    app_url = role_url(owner_url, "dgen_app", ["SELECT", "INSERT", "UPDATE", "DELETE"])
    with caplog.at_level("WARNING", logger="dgen.backends.postgres"):
        async with dgen.connect(app_url) as db:
            assert isinstance(db, postgres.PostgresDatabase)
            assert not db.committer.enabled
            await asyncio.gather(*(db.run(_set(b"k%d" % i, b"v")) for i in range(8)))
            assert await _get(db, b"k7") == b"v"
            assert db.committer.groups == 0
    assert "open the store once as its owner" in caplog.text


async def _seqscan_settings(conn: psycopg.AsyncConnection[Any], schema: str) -> dict[str, Any]:
    cur = await conn.execute(
        "SELECT p.proname, p.proconfig FROM pg_proc p JOIN pg_namespace n "
        "ON n.oid = p.pronamespace WHERE n.nspname = %s "
        "AND p.proname IN ('dgen_commit', 'dgen_commit_group')",
        (schema,),
    )
    return {name: config for name, config in await cur.fetchall()}


async def test_commit_functions_never_scan_the_whole_conflict_log(url: str) -> None:
    """Without statistics on dgen_log the planner would scan all of it on
    every commit; both functions carry enable_seqscan=off, and a store made
    before that setting gets it when opened."""
    want = {name: ["enable_seqscan=off"] for name in ("dgen_commit", "dgen_commit_group")}
    async with dgen.connect(url) as db:
        assert isinstance(db, postgres.PostgresDatabase)
        async with await psycopg.AsyncConnection.connect(db.conninfo, autocommit=True) as conn:
            assert await _seqscan_settings(conn, db.schema) == want
            # What an older DGen's store looks like: no setting, an older comment.
            for name in want:
                await conn.execute(
                    sql.SQL("ALTER FUNCTION {}.{} RESET ALL").format(
                        sql.Identifier(db.schema), sql.Identifier(name)
                    )
                )
            await conn.execute(
                sql.SQL("COMMENT ON FUNCTION {}.dgen_commit_group IS 'dgen group commit 1'").format(
                    sql.Identifier(db.schema)
                )
            )
            assert await _seqscan_settings(conn, db.schema) == dict.fromkeys(want)
    async with dgen.connect(url) as db:
        assert isinstance(db, postgres.PostgresDatabase)
        async with await psycopg.AsyncConnection.connect(db.conninfo, autocommit=True) as conn:
            assert await _seqscan_settings(conn, db.schema) == want
        await db.run(_set(b"k", b"v"))


class _Countdown(dgen.DGenServer):
    """Counts casts; sets ``done`` (shared) when the last of all arrives."""

    def __init__(self, left: list[int], done: asyncio.Event) -> None:
        self.left = left
        self.done = done

    def init(self, arg: Any) -> int:
        return 0

    def handle_cast(self, message: Any, state: int) -> dgen.NoReply:
        self.left[0] -= 1
        if self.left[0] == 0:
            self.done.set()
        return dgen.NoReply(state + 1)


async def test_many_consumers_on_a_small_pool_drain_their_queues(url: str) -> None:
    """Far more consumers than pooled connections, all committing at once:
    every message is consumed. A version whose queued commits waited for a
    pooled connection, while the pool's connections were held by commits
    queued behind them, deadlocked here until PoolTimeout."""
    tenants, per = 150, 2
    async with dgen.connect(url + "&pool_size=3") as db:
        left, done = [tenants * per], asyncio.Event()
        for i in range(tenants):
            await dgen.handle(db, f"t{i}").cast_many(range(per))
        async with contextlib.AsyncExitStack() as stack:
            for i in range(tenants):
                await stack.enter_async_context(
                    dgen.start(_Countdown(left, done), db, f"t{i}", batch_size=16)
                )
            await asyncio.wait_for(done.wait(), WAIT)
        assert left[0] == 0
