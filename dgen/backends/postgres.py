"""``postgresql://``: the backend for several processes or machines sharing one server.

FoundationDB's optimistic concurrency, done by DGen over psycopg 3 and
psycopg_pool, because PostgreSQL's SERIALIZABLE tracks reads per index page
and aborts transactions FoundationDB commits (docs/postgres.md):

* reads run on a REPEATABLE READ snapshot that also reads the store's commit
  counter ``dgen_clock.version``; read ranges are recorded exactly;
* commit calls ``dgen_commit`` in a READ COMMITTED transaction: it increments
  the counter (the row lock serializes the store's commits until COMMIT),
  raises SQLSTATE 40001 if ``dgen_log`` holds a write newer than the snapshot
  inside a read range, applies the writes and logs their ranges;
* the counter is the commit stamp: ordered-commit keys follow commit order;
* group commit: commits that arrive while another of the same database
  object is in flight queue and go out together as one ``dgen_commit_group``
  statement (one round trip, one clock lock, one WAL flush); each member gets
  its own version and is validated against the log including the earlier
  members' rows; a conflicted member gets NULL and writes nothing;
* watches: every commit is announced with its version and key hashes, by
  default in one coalesced ``pg_notify`` per batch after commit, and only
  if another database object's listener is registered (``notify=commit``:
  always, inside the commit statement, which takes PostgreSQL's
  cluster-wide notify lock); a listener fires the watches older than the
  announced version, arms new watches without a re-read when it has heard
  every commit since their baseline, fires all of them after a reconnect;
  and a fallback poll re-reads every watched key.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import hashlib
import logging
import select
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from typing import Any, TypeVar

import psycopg
import psycopg.errors
import psycopg_pool
from psycopg import sql

from dgen.backends.base import ADD, CLEAR, UNKNOWN, BufferedTransaction
from dgen.store import (
    Capabilities,
    CommitUnknownError,
    ConflictError,
    Database,
    KeyValue,
    Limits,
    StoreError,
    TransactionClosedError,
    UnavailableError,
    Watch,
)
from dgen.urls import URL, URLError

__all__ = ["SCHEMA_VERSION", "PostgresDatabase", "open_database"]

log = logging.getLogger(__name__)
T = TypeVar("T")

SCHEMA_VERSION = 1
"""Version of the tables this module creates; stored in ``dgen_meta``."""

OPTIONS = (
    "application_name",
    "connect_timeout",
    "group_commit",
    "host",
    "notify",
    "pool_size",
    "port",
    "schema",
    "sslmode",
    "synchronous_commit",
    "watch_poll_interval",
)
_SYNC_LEVELS = ("on", "off", "local", "remote_write", "remote_apply")
_NOTIFY_MODES = ("commit", "after")
_NOTIFY_LIMIT = 7900  # pg_notify payloads must stay under 8000 bytes
_ALL = "*"
_HISTORY = 20_000  # key writes the listener remembers (see _Watches.add)
_RANGE_HISTORY = 256  # cleared ranges it remembers

# PostgreSQL B-tree entries are limited to about 2700 bytes, and every key is
# a primary-key entry: a smaller key limit than FoundationDB's 10,000 bytes.
LIMITS = Limits(max_key_size=2048)


# -- errors -------------------------------------------------------------------


def _map_error(
    exc: BaseException,
    url: URL,
    *,
    committing: bool = False,
    conn: psycopg.AsyncConnection[Any] | None = None,
) -> StoreError:
    """The one place psycopg's failures become DGen's errors.

    ``committing``: the failure hit the round trip that ends in COMMIT.
    ``conn``: the transaction's connection, if it had one; losing it before
    commit applied nothing, so that is a retryable conflict, and the retry
    waits up to ``connect_timeout`` for the server (a restart) before
    :class:`UnavailableError`.
    """
    if isinstance(exc, StoreError):
        return exc
    if isinstance(exc, psycopg.errors.SerializationFailure | psycopg.errors.DeadlockDetected):
        return ConflictError(f"PostgreSQL: {_clean(exc, url)}")
    where = url.render(hide_password=True)
    if isinstance(exc, psycopg_pool.PoolTimeout):
        return UnavailableError(f"no connection to {where} became available: {_clean(exc, url)}")
    if isinstance(exc, psycopg.OperationalError | OSError):
        if committing:
            return CommitUnknownError(
                f"the connection to {where} failed during COMMIT, so the transaction may or "
                f"may not have been applied: {_clean(exc, url)}"
            )
        if conn is not None and conn.broken:
            return ConflictError(
                f"lost the connection to {where} before commit; nothing was applied and a "
                f"new transaction may retry: {_clean(exc, url)}"
            )
        return UnavailableError(f"PostgreSQL at {where} is unavailable: {_clean(exc, url)}")
    if isinstance(exc, psycopg.errors.InsufficientPrivilege):
        return UnavailableError(
            f"PostgreSQL at {where} refused access ({_clean(exc, url)}); "
            "docs/postgres.md lists the privileges DGen needs"
        )
    return StoreError(f"PostgreSQL at {where}: {_clean(exc, url)}")


def _clean(exc: BaseException, url: URL) -> str:
    text = str(exc).strip() or type(exc).__name__
    if url.password:
        text = text.replace(url.password, "***")
    return text


@contextlib.contextmanager
def _errors(url: URL, conn: psycopg.AsyncConnection[Any] | None = None) -> Iterator[None]:
    try:
        yield
    except (psycopg.Error, psycopg_pool.PoolTimeout, OSError) as exc:
        raise _map_error(exc, url, conn=conn) from exc


# -- SQL ----------------------------------------------------------------------

# The commit functions run with enable_seqscan off: without statistics on
# dgen_log (autovacuum analyses it a minute or more after it grows), the
# planner guesses a third of the log is newer than the snapshot and scans all
# of it, 5 ms per commit with 100,000 commits logged; the version index finds
# the few newer rows in microseconds.
_DDL = """
CREATE TABLE IF NOT EXISTS {s}.dgen_meta (name text PRIMARY KEY, value text NOT NULL);
CREATE TABLE IF NOT EXISTS {s}.dgen_kv (key bytea PRIMARY KEY, value bytea NOT NULL);
CREATE TABLE IF NOT EXISTS {s}.dgen_clock (
    id int PRIMARY KEY CHECK (id = 1),
    version bigint NOT NULL,
    pruned bigint NOT NULL
);
INSERT INTO {s}.dgen_clock VALUES (1, 0, 0) ON CONFLICT DO NOTHING;
-- Unlogged: saves WAL on every commit; a crash empties it (see the sentinel
-- in dgen_commit).
CREATE UNLOGGED TABLE IF NOT EXISTS {s}.dgen_log (
    version bigint NOT NULL,
    rbegin bytea NOT NULL,
    rend bytea NOT NULL
);
CREATE INDEX IF NOT EXISTS dgen_log_version ON {s}.dgen_log (version);
INSERT INTO {s}.dgen_log SELECT -1, '\\x', '\\x'
    WHERE NOT EXISTS (SELECT 1 FROM {s}.dgen_log WHERE version = -1);
CREATE OR REPLACE FUNCTION {s}.dgen_add(old bytea, delta numeric) RETURNS bytea
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    v numeric := 0;
    r bytea := '\\x0000000000000000';
BEGIN
    -- 8-byte little-endian counter, as FoundationDB's ADD: wraps at 2^64.
    IF old IS NOT NULL AND length(old) > 0 THEN
        FOR i IN REVERSE least(length(old), 8) - 1 .. 0 LOOP
            v := v * 256 + get_byte(old, i);
        END LOOP;
    END IF;
    v := mod(v + delta, 18446744073709551616);
    FOR i IN 0 .. 7 LOOP
        r := set_byte(r, i, mod(v, 256)::int);
        v := div(v, 256);
    END LOOP;
    RETURN r;
END $$;
INSERT INTO {s}.dgen_meta VALUES ('schema_version', '1') ON CONFLICT DO NOTHING;
"""

# dgen_log is UNLOGGED: a server crash (or a failover to a standby) empties
# it, losing the entries that transactions still open, whose snapshots
# predate the crash, must be validated against. A sentinel row (version -1,
# an empty range that overlaps nothing; inserted with the tables) marks a log
# that survived. A commit that finds it missing moves the clock forward by
# _CRASH_GAP and ``pruned`` up to just below its own version, so every older
# snapshot gets a ConflictError (it is retried), and puts the sentinel back.
# The gap: a crash that lost commits (synchronous_commit=off, a failover to an
# asynchronous standby) restarts the clock below versions already handed out,
# and those must neither pass the check nor be reused. Every commit checks
# (one index probe), so the first commit after a crash, even a write-only
# one, repairs it. Pruning keeps the sentinel and never lowers ``pruned``.
_CRASH_GAP = 1 << 32
_SENTINEL_CHECK = """
    IF NOT EXISTS (SELECT 1 FROM {s}.dgen_log WHERE version = -1) THEN
        UPDATE {s}.dgen_clock SET version = version + {gap}, pruned = version + {gap} - {n}
            WHERE id = 1 RETURNING {returning};
        INSERT INTO {s}.dgen_log VALUES (-1, '\\x', '\\x');
    END IF;"""


def _sentinel_check(n: str, returning: str) -> str:
    return _SENTINEL_CHECK.format(s="{s}", gap=_CRASH_GAP, n=n, returning=returning)


_COMMIT_DDL = (
    """
-- The backend pids of the listening connections (see _Watches.announce);
-- added with version 5 of the functions, so older stores get it on open.
ALTER TABLE {s}.dgen_clock ADD COLUMN IF NOT EXISTS listeners int[] NOT NULL DEFAULT '{{}}';
CREATE OR REPLACE FUNCTION {s}.dgen_commit(
    read_version bigint, rb bytea[], re bytea[],
    cb bytea[], ce bytea[], ck bytea[], sk bytea[], sv bytea[],
    ak bytea[], ad numeric[], tk bytea[], toff int[], tv bytea[],
    log_window bigint, prune_every bigint
) RETURNS bigint LANGUAGE plpgsql SET enable_seqscan = off AS $$
DECLARE
    v bigint;
    p bigint;
    stamp bytea;
    conflict boolean;
    l int[];
BEGIN
    -- The clock row's lock serializes committers of this store until COMMIT.
    UPDATE {s}.dgen_clock SET version = version + 1 WHERE id = 1
        RETURNING version, pruned, listeners INTO v, p, l;
    PERFORM set_config('dgen.listeners', l::text, true);  -- see _Watches.announce
{crash_check}
    IF cardinality(rb) > 0 THEN
        IF read_version < p THEN
            -- Too old to validate: NULL, not an error, so that a crash
            -- repair above is kept (an error would undo it, and every
            -- retry would repair and conflict again). No version is used.
            UPDATE {s}.dgen_clock SET version = version - 1 WHERE id = 1;
            RETURN NULL;
        END IF;
        -- EXECUTE plans for this read_version; a cached generic plan
        -- would scan the whole log.
        EXECUTE format(
            'SELECT EXISTS (SELECT 1 FROM %I.dgen_log AS l '
            'JOIN unnest($1, $2) AS r(b, e) ON l.rbegin < r.e AND l.rend > r.b '
            'WHERE l.version > $3)', {sl})
            INTO conflict USING rb, re, read_version;
        IF conflict THEN
            RAISE EXCEPTION 'dgen: a key this transaction read was changed by another'
                USING ERRCODE = '40001';
        END IF;
    END IF;
    -- Statements with nothing to do are skipped: each costs an executor
    -- start (a one-key write, synchronous_commit off: 195 -> 135 us).
    IF cardinality(cb) > 0 THEN
        DELETE FROM {s}.dgen_kv AS kv USING unnest(cb, ce) AS r(b, e)
            WHERE kv.key >= r.b AND kv.key < r.e;
        INSERT INTO {s}.dgen_log SELECT v, b, e FROM unnest(cb, ce) AS r(b, e);
    END IF;
    IF cardinality(ck) > 0 THEN
        DELETE FROM {s}.dgen_kv WHERE key = ANY(ck);
    END IF;
    IF cardinality(sk) > 0 THEN
        INSERT INTO {s}.dgen_kv SELECT * FROM unnest(sk, sv)
            ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value;
    END IF;
    FOR i IN 1 .. coalesce(cardinality(ak), 0) LOOP
        INSERT INTO {s}.dgen_kv VALUES (ak[i], {s}.dgen_add(NULL, ad[i]))
            ON CONFLICT (key) DO UPDATE SET value = {s}.dgen_add({s}.dgen_kv.value, ad[i]);
    END LOOP;
    IF cardinality(ck || sk || ak) > 0 THEN
        INSERT INTO {s}.dgen_log SELECT v, k, k || '\\x00'::bytea FROM unnest(ck || sk || ak) AS k;
    END IF;
    IF cardinality(tk) > 0 THEN
        stamp := int8send(v) || '\\x0000'::bytea;
        INSERT INTO {s}.dgen_kv
            SELECT overlay(k PLACING stamp FROM o + 1 FOR 10), val
            FROM unnest(tk, toff, tv) AS t(k, o, val)
            ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value;
        INSERT INTO {s}.dgen_log SELECT v, f, f || '\\x00'::bytea FROM (
            SELECT overlay(k PLACING stamp FROM o + 1 FOR 10) FROM unnest(tk, toff) AS t(k, o)
        ) AS s(f);
    END IF;
    IF v % prune_every = 0 AND v > log_window THEN
        EXECUTE format('DELETE FROM %I.dgen_log WHERE version BETWEEN 0 AND $1', {sl})
            USING v - log_window;
        UPDATE {s}.dgen_clock SET pruned = greatest(pruned, v - log_window) WHERE id = 1;
    END IF;
    RETURN v;
END $$;
"""
).replace("{crash_check}", _sentinel_check("1", "version, pruned INTO v, p"))

# Group commit: the commits of several transactions in one statement, so one
# clock-lock acquisition and one WAL flush. Added alongside dgen_commit (an
# older DGen sharing the store keeps using that; both take the clock lock), so
# the table layout and ``schema_version`` are unchanged; a store made by an
# older DGen gets it on open (_prepare_schema). Per-member arrays are passed
# flattened, with per-member counts (PostgreSQL arrays must be rectangular);
# a NULL count array means all zero. Returns each member's version, NULL for a
# member whose reads conflict (it writes nothing; the others go on).
_GROUP_SIGNATURE = (
    "dgen_commit_group(bigint[], int[], bytea[], bytea[], int[], bytea[], bytea[], int[], "
    "bytea[], int[], bytea[], bytea[], int[], bytea[], numeric[], int[], bytea[], int[], "
    "bytea[], bigint, bigint, text, text[])"
)
_GROUP_DDL = """
CREATE OR REPLACE FUNCTION {s}.dgen_commit_group(
    rv bigint[], nr int[], rb bytea[], re bytea[], nc int[], cb bytea[], ce bytea[],
    nk int[], ck bytea[], ns int[], sk bytea[], sv bytea[], na int[], ak bytea[], ad numeric[],
    nt int[], tk bytea[], toff int[], tv bytea[],
    log_window bigint, prune_every bigint, channel text, hashes text[]
) RETURNS bigint[] LANGUAGE plpgsql SET enable_seqscan = off AS $$
DECLARE
    n int := cardinality(rv);
    v0 bigint;
    v bigint;
    p bigint;
    result bigint[] := ARRAY[]::bigint[];
    o_r int := 0; o_c int := 0; o_k int := 0; o_s int := 0; o_a int := 0; o_t int := 0;
    c_r int; c_c int; c_k int; c_s int; c_a int; c_t int;
    m_cb bytea[]; m_ce bytea[]; m_ck bytea[]; m_sk bytea[]; m_sv bytea[];
    m_ak bytea[]; m_ad numeric[]; m_tk bytea[]; m_to int[]; m_tv bytea[];
    stamp bytea;
    conflict boolean;
    l int[];
BEGIN
    -- One clock-row lock for the whole group, held until COMMIT; the members
    -- that commit get the versions v0 + 1, v0 + 2, ... in order.
    UPDATE {s}.dgen_clock SET version = version + n WHERE id = 1
        RETURNING version - n, pruned, listeners INTO v0, p, l;
    PERFORM set_config('dgen.listeners', l::text, true);
{crash_check}
    v := v0;
    FOR i IN 1 .. n LOOP
        c_r := coalesce(nr[i], 0); c_c := coalesce(nc[i], 0); c_k := coalesce(nk[i], 0);
        c_s := coalesce(ns[i], 0); c_a := coalesce(na[i], 0); c_t := coalesce(nt[i], 0);
        conflict := false;
        IF c_r > 0 THEN
            IF rv[i] < p THEN
                conflict := true;  -- stayed open while more than log_window commits landed
            ELSE
                -- Each statement sees the log rows of the earlier members of
                -- this group, so a conflict inside the group is caught too.
                EXECUTE format(
                    'SELECT EXISTS (SELECT 1 FROM %I.dgen_log AS l '
                    'JOIN unnest($1, $2) AS r(b, e) ON l.rbegin < r.e AND l.rend > r.b '
                    'WHERE l.version > $3)', {sl})
                    INTO conflict
                    USING rb[o_r + 1 : o_r + c_r], re[o_r + 1 : o_r + c_r], rv[i];
            END IF;
        END IF;
        IF conflict THEN
            result := array_append(result, NULL::bigint);
        ELSE
            v := v + 1;
            m_cb := cb[o_c + 1 : o_c + c_c]; m_ce := ce[o_c + 1 : o_c + c_c];
            m_ck := ck[o_k + 1 : o_k + c_k];
            m_sk := sk[o_s + 1 : o_s + c_s]; m_sv := sv[o_s + 1 : o_s + c_s];
            m_ak := ak[o_a + 1 : o_a + c_a]; m_ad := ad[o_a + 1 : o_a + c_a];
            m_tk := tk[o_t + 1 : o_t + c_t]; m_to := toff[o_t + 1 : o_t + c_t];
            m_tv := tv[o_t + 1 : o_t + c_t];
            -- Statements with nothing to do are skipped: each costs an
            -- executor start per member.
            IF c_c > 0 THEN
                DELETE FROM {s}.dgen_kv AS kv USING unnest(m_cb, m_ce) AS r(b, e)
                    WHERE kv.key >= r.b AND kv.key < r.e;
            END IF;
            IF c_k > 0 THEN
                DELETE FROM {s}.dgen_kv WHERE key = ANY(m_ck);
            END IF;
            IF c_s > 0 THEN
                INSERT INTO {s}.dgen_kv SELECT * FROM unnest(m_sk, m_sv)
                    ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value;
            END IF;
            FOR j IN 1 .. c_a LOOP
                INSERT INTO {s}.dgen_kv VALUES (m_ak[j], {s}.dgen_add(NULL, m_ad[j]))
                    ON CONFLICT (key) DO UPDATE
                    SET value = {s}.dgen_add({s}.dgen_kv.value, m_ad[j]);
            END LOOP;
            stamp := int8send(v) || '\\x0000'::bytea;
            IF c_t > 0 THEN
                INSERT INTO {s}.dgen_kv
                    SELECT overlay(k PLACING stamp FROM o + 1 FOR 10), val
                    FROM unnest(m_tk, m_to, m_tv) AS t(k, o, val)
                    ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value;
            END IF;
            INSERT INTO {s}.dgen_log
                SELECT v, b, e FROM unnest(m_cb, m_ce) AS r(b, e)
                UNION ALL
                SELECT v, k, k || '\\x00'::bytea FROM unnest(m_ck || m_sk || m_ak) AS k
                UNION ALL
                SELECT v, f, f || '\\x00'::bytea FROM (
                    SELECT overlay(k PLACING stamp FROM o + 1 FOR 10)
                    FROM unnest(m_tk, m_to) AS t(k, o)
                ) AS s(f);
            IF channel IS NOT NULL THEN
                -- notify=commit: one notification per member, as a lone commit sends.
                PERFORM pg_notify(channel, v || hashes[i] || CASE WHEN hashes[i] = ' *' THEN ''
                    ELSE coalesce((SELECT string_agg(' ' || left(encode(sha256(
                        overlay(t.k PLACING stamp FROM t.o + 1 FOR 10)), 'hex'), 12), '')
                    FROM unnest(m_tk, m_to) AS t(k, o)), '') END);
            END IF;
            result := array_append(result, v);
        END IF;
        o_r := o_r + c_r; o_c := o_c + c_c; o_k := o_k + c_k;
        o_s := o_s + c_s; o_a := o_a + c_a; o_t := o_t + c_t;
    END LOOP;
    IF v < v0 + n THEN
        UPDATE {s}.dgen_clock SET version = v WHERE id = 1;  -- no gaps for conflicted members
    END IF;
    IF v / prune_every > v0 / prune_every AND v > log_window THEN
        EXECUTE format('DELETE FROM %I.dgen_log WHERE version BETWEEN 0 AND $1', {sl})
            USING v - log_window;
        UPDATE {s}.dgen_clock SET pruned = greatest(pruned, v - log_window) WHERE id = 1;
    END IF;
    RETURN result;
END $$;
COMMENT ON FUNCTION {s}.dgen_commit_group IS 'dgen group commit 6';
""".replace("{crash_check}", _sentinel_check("n", "version - n, pruned INTO v0, p"))
# The COMMENT above: a changed body of either commit function bumps it (2:
# enable_seqscan off; 4: the crash sentinel; 5: the listeners column; 6:
# dgen_commit skips empty statements), and opening a store replaces older
# bodies of both (never newer ones: see _function_version).
_GROUP_VERSION = "dgen group commit 6"


def _function_version(comment: str | None) -> int:
    """The body version in a commit function's comment; 0 if none or unknown."""
    prefix = "dgen group commit "
    if comment is None or not comment.startswith(prefix):
        return 0
    number = comment[len(prefix) :]
    return int(number) if number.isdigit() else 0


LOG_WINDOW = 100_000
"""Commits the conflict log remembers. A transaction that stays open while
more commits than this land gets a ConflictError (FDB: transaction_too_old)."""
_PRUNE_EVERY = 1024


class _SQL:
    """The statements, with the schema name quoted in once."""

    def __init__(self, schema: str) -> None:
        s = sql.Identifier(schema)

        def q(text: str) -> str:
            return sql.SQL(text).format(s=s, sl=sql.Literal(schema)).as_string()

        self.ddl = q(_DDL + _COMMIT_DDL + _GROUP_DDL)
        self.group_ddl = q(_COMMIT_DDL + _GROUP_DDL)
        # The group function's version (its comment); NULL if it is missing.
        self.has_group = q(
            "SELECT obj_description(to_regprocedure(quote_ident({sl}) || '."
            + _GROUP_SIGNATURE
            + "'), 'pg_proc')"
        )
        self.version = q("SELECT value FROM {s}.dgen_meta WHERE name = 'schema_version'")
        self.clock = q("SELECT version FROM {s}.dgen_clock WHERE id = 1")
        # One round trip: a snapshot and the commit version it reflects.
        self.begin_read = q(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; "
            "SELECT version, pruned FROM {s}.dgen_clock WHERE id = 1"
        )
        # The commit and its notification in one statement, so one implicit
        # transaction: listeners hear of exactly the commits that happened.
        # The payload is "<version> <key hashes>"; the hashes of
        # ordered-commit keys need the version, so the server computes them.
        self.commit = q(
            "SELECT c.v, pg_notify(%(channel)s::text, c.v || %(hashes)s::text || coalesce(("
            "SELECT string_agg(' ' || left(encode(sha256(overlay(t.k PLACING int8send(c.v)"
            " || '\\x0000'::bytea FROM t.o + 1 FOR 10)), 'hex'), 12), '')"
            " FROM unnest(%(hk)b::bytea[], %(ho)b::int[]) AS t(k, o)), ''))"
            " FROM (SELECT {s}.dgen_commit(%(rv)b::bigint, %(rb)b::bytea[], %(re)b::bytea[],"
            " %(cb)b::bytea[], %(ce)b::bytea[], %(ck)b::bytea[], %(sk)b::bytea[],"
            " %(sv)b::bytea[], %(ak)b::bytea[], %(ad)s::numeric[], %(tk)b::bytea[],"
            " %(to)b::int[], %(tv)b::bytea[], %(lw)b::bigint, %(pe)b::bigint) AS v) AS c"
            " WHERE c.v IS NOT NULL"
        )
        # notify=after: the commit, and the listeners it found (the function
        # sets dgen.listeners; the subquery runs first); a background task
        # notifies if one of them is another's (_Watches.announce).
        listeners = "current_setting('dgen.listeners', true)"
        call = self.commit[self.commit.index(" FROM (SELECT ") : -len(" WHERE c.v IS NOT NULL")]
        self.commit_only = f"SELECT c.v, {listeners}{call}"
        # Group commit: notifications (notify=commit) are sent by the function.
        self.commit_group = q(
            f"SELECT c.g, {listeners} FROM (SELECT "
            "{s}.dgen_commit_group(%(rv)b::bigint[], %(nr)b::int[], %(rb)b::bytea[],"
            " %(re)b::bytea[], %(nc)b::int[], %(cb)b::bytea[], %(ce)b::bytea[], %(nk)b::int[],"
            " %(ck)b::bytea[], %(ns)b::int[], %(sk)b::bytea[], %(sv)b::bytea[], %(na)b::int[],"
            " %(ak)b::bytea[], %(ad)s::numeric[], %(nt)b::int[], %(tk)b::bytea[], %(to)b::int[],"
            " %(tv)b::bytea[], %(lw)b::bigint, %(pe)b::bigint, %(channel)s::text,"
            " %(hashes)s::text[]) AS g) AS c"
        )
        # A listener registers its connection's pid under the clock lock (the
        # first statement), dropping pids whose backend is gone; it hears
        # every commit after the version returned.
        self.lock_clock = q("SELECT 1 FROM {s}.dgen_clock WHERE id = 1 FOR UPDATE")
        self.register = q(
            "UPDATE {s}.dgen_clock SET listeners = ARRAY(SELECT p FROM unnest(listeners) AS p"
            " WHERE p <> pg_backend_pid() AND p IN (SELECT pid FROM pg_stat_activity))"
            " || pg_backend_pid() WHERE id = 1 RETURNING version"
        )
        self.unregister = q(
            "UPDATE {s}.dgen_clock SET listeners = array_remove(listeners, %s) WHERE id = 1"
        )
        self.get = q("SELECT value FROM {s}.dgen_kv WHERE key = %s")
        self.get_many = q("SELECT key, value FROM {s}.dgen_kv WHERE key = ANY(%s)")
        rng = "SELECT key, value FROM {s}.dgen_kv WHERE key >= %s AND key < %s ORDER BY key"
        self.range = q(rng)
        self.range_limit = q(rng + " LIMIT %s")
        self.range_rev = q(rng + " DESC")
        self.range_rev_limit = q(rng + " DESC LIMIT %s")


def _merge(ranges: Iterable[tuple[bytes, bytes]]) -> tuple[list[bytes], list[bytes]]:
    begins: list[bytes] = []
    ends: list[bytes] = []
    for b, e in sorted(ranges):
        if ends and b <= ends[-1]:
            ends[-1] = max(ends[-1], e)
        else:
            begins.append(b)
            ends.append(e)
    return begins, ends


# -- transactions -------------------------------------------------------------


def _looks_alive(conn: psycopg.AsyncConnection[Any]) -> bool:
    """False if an idle pooled connection has received anything: the EOF or
    the FATAL message of a server that went away. Costs no round trip."""
    try:
        ready, _, _ = select.select([conn.pgconn.socket], [], [], 0)
    except (psycopg.Error, OSError, ValueError):
        return False
    return not ready


async def _getconn(pool: psycopg_pool.AsyncConnectionPool[Any]) -> psycopg.AsyncConnection[Any]:
    """``pool.getconn()``, except that a cancellation is never lost.

    psycopg_pool waits for a free connection with ``asyncio.wait_for``, which
    on Python 3.11 returns the result instead of raising when the task is
    cancelled just as the wait completes (CPython gh-86296, fixed in 3.12).
    The task would run on, marked as cancelling: a cancelled consumer then
    waited forever on its watch. A cancel request that arrived during the
    wait and did not surface is raised here, the connection returned first.
    """
    task = asyncio.current_task()
    before = task.cancelling() if task is not None else 0
    conn: psycopg.AsyncConnection[Any] = await pool.getconn()
    if task is not None and task.cancelling() > before:
        await _putconn(pool, conn)
        raise asyncio.CancelledError
    return conn


async def _putconn(
    pool: psycopg_pool.AsyncConnectionPool[Any], conn: psycopg.AsyncConnection[Any]
) -> None:
    """``pool.putconn(conn)`` that a cancellation cannot cut short: cancelled
    half way, psycopg_pool loses the connection and keeps counting it, so
    the pool shrinks for good (found by a cancellation stress test).

    Shielded (a task of its own) only when it may suspend: handing the
    connection to a waiting request, or resetting it. Otherwise it runs to
    the end at once, and the connection is back in the pool for the caller's
    next transaction (shielding every return cost 14% of one task's
    write-only commit rate: the next checkout found the pool empty).
    """
    if (
        conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        and not pool.get_stats().get("requests_waiting", 0)
    ):
        await pool.putconn(conn)
    else:
        await asyncio.shield(pool.putconn(conn))


@contextlib.asynccontextmanager
async def _pooled(
    pool: psycopg_pool.AsyncConnectionPool[Any],
) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """``pool.connection()`` through :func:`_getconn`, for autocommit statements."""
    conn = await _getconn(pool)
    try:
        yield conn
    finally:
        await _putconn(pool, conn)


async def _assume_alive(conn: psycopg.AsyncConnection[Any], prefix: str) -> None:
    """A first step for :meth:`PostgresTransaction._checkout` that sends nothing
    (never given a parked connection, so there is no ``prefix`` to send)."""


# A read waiting to be sent: its statement, parameters and reader's future.
_Read = tuple[str, tuple[Any, ...], "asyncio.Future[list[Any]] | None"]


def _literal(conn: psycopg.AsyncConnection[Any], reads: list[tuple[str, tuple[Any, ...]]]) -> str:
    """``reads`` as one string of statements, parameters as literals."""
    mogrify = psycopg.AsyncClientCursor(conn).mogrify
    return "; ".join(mogrify(query, params) for query, params in reads)


async def _results(cur: psycopg.AsyncCursor[Any], count: int) -> list[list[Any]]:
    """The rows of the next ``count`` result sets of ``cur``, the current one first."""
    out = [await cur.fetchall()]
    while len(out) < count:
        if not cur.nextset():
            raise StoreError(f"PostgreSQL returned {len(out)} results for {count} reads")
        out.append(await cur.fetchall())
    return out


class PostgresTransaction(BufferedTransaction):
    """Reads on a REPEATABLE READ snapshot; at commit, a READ COMMITTED
    transaction that holds the store's clock row validates the read ranges
    against the conflict log and applies the buffer (see docs/postgres.md)."""

    def __init__(self, db: PostgresDatabase) -> None:
        super().__init__(db.limits)
        self._db = db
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._open_tx = False
        self._read_version = 0
        self._watch_version: int | None = None  # the version watch baselines are at
        # Reads waiting for this event-loop turn to end, the tasks sending
        # batches, and the first batch while it begins the snapshot (_fetch).
        self._batch: list[_Read] | None = None
        self._serving: set[asyncio.Task[None]] = set()
        self._beginning: asyncio.Future[None] | None = None
        # Set once commit or rollback begins: a batch still to be sent (its
        # readers gone) must not take a connection after that.
        self._ending = False

    async def _checkout(
        self,
        first: Callable[[psycopg.AsyncConnection[Any], str], Awaitable[T]],
        parked: psycopg.AsyncConnection[Any] | None = None,
    ) -> T:
        """Take a connection and run ``first(conn, prefix)`` (its first round
        trip): ``parked`` if given (see :meth:`PostgresDatabase.park`), with
        ``prefix`` "ROLLBACK; " to end its old snapshot in that round trip,
        else a pooled one, with "".

        A connection may have died with a server restart (in the pool or
        parked); nothing has happened yet when the first round trip fails, so
        try fresh ones.
        """
        db = self._db
        for attempt in range(db.pool_size + 1):
            prefix = ""
            if parked is not None:
                conn, parked, prefix = parked, None, "ROLLBACK; "
            else:
                with _errors(db.url):
                    conn = await _getconn(db.pool)
                if not _looks_alive(conn) and attempt < db.pool_size:
                    await conn.close()
                    await _putconn(db.pool, conn)  # the pool drops it
                    continue
            self._conn, self._open_tx = conn, True
            try:
                return await first(conn, prefix)
            except psycopg.OperationalError as exc:
                if attempt == db.pool_size or not conn.closed:
                    raise _map_error(exc, db.url) from exc
                self._conn, self._open_tx = None, False
                await _putconn(db.pool, conn)
            except psycopg.Error as exc:
                raise _map_error(exc, db.url) from exc
        raise AssertionError("unreachable")

    async def _fetch(self, query: str, params: tuple[Any, ...]) -> list[Any]:
        """The rows of one read.

        Reads issued concurrently on this transaction (``asyncio.gather``)
        join the first one, which waits one event-loop turn for them; they go
        out as one statement string, one round trip, sent by a task of their
        own so that a cancelled reader only drops out. A lone read gives up
        that turn and is sent by its reader.
        """
        loop = self._db.loop
        batch = self._batch
        if batch is not None:
            future: asyncio.Future[list[Any]] = loop.create_future()
            batch.append((query, params, future))
            return await future
        batch = self._batch = [(query, params, None)]
        try:
            await asyncio.sleep(0)  # this turn's other reads join the batch
        except asyncio.CancelledError:
            if len(batch) > 1:
                self._serve(batch[1:])
            raise
        finally:
            self._batch = None
        if len(batch) == 1:
            return (await self._send_reads([(query, params)]))[0]
        mine: asyncio.Future[list[Any]] = loop.create_future()
        batch[0] = (query, params, mine)
        self._serve(batch)
        return await mine

    def _serve(self, batch: list[_Read]) -> None:
        """Send ``batch`` from a task; each reader waits for its future."""

        async def serve() -> None:
            try:
                results = await self._send_reads([(q, p) for q, p, _ in batch])
            except BaseException as exc:
                for _, _, future in batch:
                    if future is not None and not future.done():
                        if isinstance(exc, Exception):
                            future.set_exception(exc)
                        else:
                            future.cancel()
                if not isinstance(exc, Exception):
                    raise
                return
            for (_, _, future), rows in zip(batch, results, strict=True):
                if future is not None and not future.done():  # else its reader left
                    future.set_result(rows)

        task = asyncio.ensure_future(serve())
        self._serving.add(task)
        task.add_done_callback(self._serving.discard)

    async def _send_reads(self, reads: list[tuple[str, tuple[Any, ...]]]) -> list[list[Any]]:
        """Each read's rows; one round trip. The first reads of a transaction
        also begin its snapshot and read its version."""
        db = self._db
        if self._ending:
            raise TransactionClosedError("this transaction is committing or ended: no more reads")
        while self._conn is None and self._beginning is not None:
            await asyncio.shield(self._beginning)  # another batch is beginning the snapshot
        if self._conn is None:
            self._beginning = db.loop.create_future()
            try:
                # On a parked connection if there is one, ending its old
                # snapshot in the same round trip; else on a pooled one.
                rows = await self._checkout(
                    lambda conn, prefix: self._begin_with(conn, reads, prefix), db.unpark()
                )
            finally:
                self._beginning.set_result(None)
                self._beginning = None
            self._watch_version = self._read_version
            return rows
        conn = self._conn
        db.read_statements += 1
        with _errors(db.url, conn):
            if len(reads) == 1:
                query, params = reads[0]
                cur = await conn.execute(query, params, binary=True)
                return [await cur.fetchall()]
            # Several statements in one string (the simple protocol has no
            # parameters, so they are sent as literals).
            cur = await conn.execute(_literal(conn, reads), prepare=False)
            return await _results(cur, len(reads))

    async def _begin_with(
        self,
        conn: psycopg.AsyncConnection[Any],
        reads: list[tuple[str, tuple[Any, ...]]],
        prefix: str,
    ) -> list[list[Any]]:
        """Begin the snapshot (after ``prefix``), read its version and run
        ``reads``, one round trip."""
        self._db.read_statements += 1
        cur = await conn.execute(prefix + self._db.sql.begin_read + "; " + _literal(conn, reads))
        while cur.description is None:  # skip BEGIN's result
            if not cur.nextset():
                raise StoreError("PostgreSQL returned no commit version")
        row = await cur.fetchone()
        if row is None or not cur.nextset():
            raise StoreError("PostgreSQL returned no commit version")
        self._read_version = int(row[0])
        return await _results(cur, len(reads))

    async def _read(self, key: bytes) -> bytes | None:
        rows = await self._fetch(self._db.sql.get, (key,))
        return bytes(rows[0][0]) if rows else None

    async def _read_range(
        self, begin: bytes, end: bytes, limit: int, reverse: bool
    ) -> list[KeyValue]:
        q = self._db.sql
        if limit:
            query = q.range_rev_limit if reverse else q.range_limit
            params: tuple[Any, ...] = (begin, end, limit)
        else:
            query = q.range_rev if reverse else q.range
            params = (begin, end)
        rows = await self._fetch(query, params)
        return [(bytes(k), bytes(v)) for k, v in rows]

    async def _apply(self) -> bytes | None:
        buf = self.buffer
        if buf.is_empty():
            return None  # a snapshot read needs no validation (as in FoundationDB)
        await self._settle_reads()
        db = self._db
        if db.closed:
            # Before the reader is handed away: _release gives it back.
            raise UnavailableError(f"{db.url} was closed; nothing was applied")
        clears: list[bytes] = []
        set_keys: list[bytes] = []
        set_values: list[bytes] = []
        add_keys: list[bytes] = []
        add_deltas: list[int] = []
        for key, op in buf.points.items():
            if op.kind == CLEAR:
                clears.append(key)
            elif op.kind == ADD:
                add_keys.append(key)
                add_deltas.append(op.delta % (1 << 64))
            else:
                set_keys.append(key)
                set_values.append(op.value)
        read = self._conn is not None
        begins, ends = _merge(self.read_ranges) if read else ([], [])
        cleared = list(buf.cleared)
        written = [*clears, *set_keys, *add_keys]
        watches = db.watches
        stamped = buf.stamped  # each key once (Buffer.set_stamped): one INSERT
        raw: dict[str, list[Any]] = {
            "rb": begins, "re": ends,
            "cb": [b for b, _ in cleared], "ce": [e for _, e in cleared],
            "ck": clears, "sk": set_keys, "sv": set_values, "ak": add_keys, "ad": add_deltas,
            "tk": [k for k, _, _ in stamped], "to": [o for _, o, _ in stamped],
            "tv": [v for _, _, v in stamped],
        }  # fmt: skip
        # An empty array is sent as NULL, which every use in dgen_commit
        # treats as empty (unnest, ANY, ||, cardinality): dumping empty
        # arrays was a fifth of the Python time of a one-key commit.
        params: dict[str, Any] = {k: v or None for k, v in raw.items()}
        params.update(rv=self._read_version, lw=LOG_WINDOW, pe=_PRUNE_EVERY)
        hashes: str | None = None
        if watches.in_commit:
            params["channel"] = watches.channel
            tokens = _tokens(written, cleared, _NOTIFY_LIMIT - 24 - 13 * len(stamped))
            if tokens is None:
                hashes, params["hk"], params["ho"] = " " + _ALL, None, None
            else:
                hashes = "".join(" " + t for t in tokens)
                params["hk"], params["ho"] = params["tk"], params["to"]
            params["hashes"] = hashes

        # One statement, which runs as its own transaction (sessions default
        # to READ COMMITTED): it validates, applies, commits and (by default)
        # notifies; with group commit, possibly for other transactions too.
        reader = self._conn
        conn: psycopg.AsyncConnection[Any] | None = None
        if db.committer.enabled:
            # The committer has its own connection: end the snapshot in the
            # next reader's first round trip (parked), or else alongside the
            # commit (the snapshot holds no locks).
            if reader is not None:
                self._conn, self._open_tx = None, False
                if not db.park(reader):
                    db.release_later(reader, open_tx=True)
        elif not read:
            await self._checkout(_assume_alive)  # write-only: no snapshot to end
            conn = self._conn
        elif reader is not None and db.park(reader):
            # Its snapshot ends in the next reader's first round trip; the
            # commit goes out on a clean connection, one round trip sooner.
            self._conn, self._open_tx = None, False
            await self._checkout(_assume_alive)
            conn = self._conn
        else:
            # Not pipelined with the commit: psycopg's pipeline costs more
            # time than the round trip it saves (docs/postgres.md).
            assert reader is not None
            with _errors(db.url, reader):
                await reader.execute("ROLLBACK", prepare=False)  # nothing applied yet
            conn = reader
        self._open_tx = False
        member = _Member(
            conn, params, raw, self._read_version, hashes, written, cleared, stamped, buf.size
        )
        version = await db.committer.commit(member)
        if not read:
            self._watch_version = version  # the baselines came from the buffer
        return version.to_bytes(8, "big") + b"\x00\x00"

    def _register_watch(self, watch: Watch, baseline: object) -> None:
        self._db.watches.add(watch, baseline, self._watch_version)

    def __del__(self) -> None:
        # Dropped without commit or rollback: give the connection back, or it
        # stays checked out with an open snapshot that holds back VACUUM.
        if self._conn is None:
            return
        loop = self._db.loop
        with contextlib.suppress(RuntimeError):  # the loop is closed
            loop.call_soon_threadsafe(self._db.release_later, self._conn, self._open_tx)

    async def _settle_reads(self) -> None:
        """The transaction is ending: refuse batches of reads not sent yet and
        wait for those in flight (their readers may have left). Else such a
        batch could begin a snapshot on a connection parked meanwhile and
        lose it."""
        self._ending = True
        if self._serving:
            await asyncio.wait(self._serving)

    async def _release(self) -> None:
        await self._settle_reads()
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._open_tx and self._db.park(conn):
            self._open_tx = False
            return  # its snapshot ends in the next reader's first round trip
        try:
            if self._open_tx and not conn.closed:
                with contextlib.suppress(psycopg.Error):
                    await conn.execute("ROLLBACK", prepare=False)
        finally:
            self._open_tx = False
            await _putconn(self._db.pool, conn)


# Read connections kept for the next reader to end their snapshot (park).
_PARKED_MAX = 2
_PARKED_SECONDS = 0.01

# -- group commit -------------------------------------------------------------

_GROUP_MAX_MEMBERS = 64
_CLOSE_GRACE = 5.0  # seconds closing waits for the commits being sent
_TOO_OLD = (
    f"older than the conflict log: it stayed open while more than {LOG_WINDOW:,} commits "
    "landed, or the server crashed since it began"
)
_GROUP_MAX_BYTES = 1 << 20  # buffered writes of one group statement


class _Member:
    """One transaction's commit, ready to send alone or in a group."""

    __slots__ = (
        "cleared", "conn", "hashes", "params", "raw", "read_version", "result", "size",
        "stamped", "written",
    )  # fmt: skip

    def __init__(
        self,
        conn: psycopg.AsyncConnection[Any] | None,
        params: dict[str, Any],
        raw: dict[str, list[Any]],
        read_version: int,
        hashes: str | None,
        written: list[bytes],
        cleared: list[tuple[bytes, bytes]],
        stamped: list[tuple[bytes, int, bytes]],
        size: int,
    ) -> None:
        self.conn = conn  # group_commit=off: the transaction's own connection
        self.params = params  # for a lone dgen_commit
        self.raw = raw  # the same arrays, for concatenation into a group
        self.read_version = read_version
        self.hashes = hashes  # notify=commit: the payload's hashes
        self.written = written
        self.cleared = cleared
        self.stamped = stamped
        self.size = size + sum(len(b) + len(e) for b, e in zip(raw["rb"], raw["re"], strict=True))
        self.result: asyncio.Future[int] | None = None  # set when queued


def _final_sets(members: list[_Member]) -> list[tuple[list[bytes], list[bytes]]]:
    """For each member of a group applied in this order, the keys it set
    that no later member wrote or cleared, and their values: the values a
    fired watch may carry (Watch.value)."""
    out: list[tuple[list[bytes], list[bytes]]] = []
    later: set[bytes] = set()
    ranges: list[tuple[bytes, bytes]] = []
    for member in reversed(members):
        keys: list[bytes] = []
        values: list[bytes] = []
        for key, value in zip(member.raw["sk"], member.raw["sv"], strict=True):
            if key not in later and not any(b <= key < e for b, e in ranges):
                keys.append(key)
                values.append(value)
        out.append((keys, values))
        later.update(member.written)
        ranges.extend(member.cleared)
    out.reverse()
    return out


class _GroupCommit:
    """Sends a database object's commits, grouping concurrent ones.

    Commit statements go out one at a time (a lone one from its committing
    task, queued ones from the committer's task), on a connection of the
    committer's own outside the pool (as SQLite's writer thread has its
    own): a transaction needs no pooled connection to commit, so a
    write-only one never takes one and one that read gives its connection
    back before its commit is sent. A commit that finds no statement in
    flight goes out at once, alone (``dgen_commit``, as without grouping).
    Commits arriving while one is in flight queue, and go out together as the
    next statement (``dgen_commit_group``): one round trip, one clock-lock
    acquisition, one WAL flush. With ``group_commit=off`` every commit goes
    out at once, alone, on its transaction's pooled connection.

    Counters, for tests and benchmarks: ``statements`` (commit statements
    sent), ``groups`` (of them, with more than one member), ``grouped``
    (members sent in groups), ``connects`` (connections the committer made).
    """

    def __init__(self, db: PostgresDatabase, enabled: bool) -> None:
        self.db = db
        self.enabled = enabled
        self._queue: collections.deque[_Member] = collections.deque()
        self._busy = False  # a statement is being sent, or the task runs
        self._alone = 0  # group_commit=off: commits being sent on their own connections
        self._closed = False
        self._task: asyncio.Task[None] | None = None
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self.statements = 0
        self.groups = 0
        self.grouped = 0
        self.connects = 0

    @property
    def queued(self) -> int:
        """Commits waiting for the statement in flight to finish."""
        return len(self._queue)

    @property
    def backend_pid(self) -> int | None:
        """The server process of the committer's connection, if it has one."""
        conn = self._conn
        return None if conn is None or conn.closed else conn.info.backend_pid

    async def commit(self, member: _Member) -> int:
        """Commit ``member``; its version, or the error of its commit.

        Cancelled while queued, it is never sent. Cancelled while its
        statement is in flight, it may or may not have been applied, as for
        any cancelled commit: a group's statement (the committer's task
        sends it) runs on, so the others in it still get their results; a
        lone commit sent by its own task is cancelled on the server too."""
        if not self.enabled:
            assert member.conn is not None
            self._alone += 1
            try:
                return self._unwrap((await self._send([member], member.conn))[0])
            finally:
                self._alone -= 1
        if self.db.closed:
            raise UnavailableError(f"{self.db.url} was closed")
        if not self._busy:
            # Nothing in flight: send it from this task, at once (a task of
            # the committer's would cost two event-loop turns per commit).
            self._busy = True
            try:
                outcome = (await self._send([member], await self._connection()))[0]
            finally:
                if self._queue and not self._closed:
                    self._start()
                else:
                    self._busy = False
                    self._fail_queued()
            return self._unwrap(outcome)
        member.result = self.db.loop.create_future()
        self._queue.append(member)
        try:
            return await member.result
        except asyncio.CancelledError:
            if member in self._queue:
                self._queue.remove(member)  # never sent
            elif member.result.done() and not member.result.cancelled():
                member.result.exception()  # retrieved
            raise

    def _unwrap(self, outcome: int | StoreError) -> int:
        if isinstance(outcome, StoreError):
            raise outcome
        return outcome

    def _start(self) -> None:
        """Send the queued commits from the committer's task."""
        self._task = asyncio.create_task(self._run(), name="dgen-postgres-committer")

    def _take(self) -> list[_Member]:
        """The next statement's members: the queue's head, within the limits."""
        batch: list[_Member] = []
        size = 0
        queue = self._queue
        while queue and len(batch) < _GROUP_MAX_MEMBERS:
            if batch and size + queue[0].size > _GROUP_MAX_BYTES:
                break
            member = queue.popleft()
            batch.append(member)
            size += member.size
        return batch

    async def _run(self) -> None:
        """Send statements until the queue is empty."""
        sent: list[_Member] = []  # members whose statement is out
        try:
            while batch := self._take():
                members = [m for m in batch if m.result is not None and not m.result.done()]
                if not members:
                    continue  # all cancelled meanwhile
                try:
                    conn = await self._connection()
                except StoreError as exc:
                    outcomes: list[int | StoreError] = [exc]
                    for _ in members[1:]:  # one exception object per waiting task
                        outcomes.append(UnavailableError(str(exc)))
                else:
                    sent = members
                    outcomes = await self._send(members, conn)
                    sent = []
                for member, outcome in zip(members, outcomes, strict=True):
                    future = member.result
                    assert future is not None
                    if future.done():
                        continue  # its committer left
                    if isinstance(outcome, StoreError):
                        future.set_exception(outcome)
                    else:
                        future.set_result(outcome)
                if not self._queue:
                    # One turn for the members just answered: a producer's
                    # next commit then joins the next group instead of
                    # going out alone ahead of it.
                    await asyncio.sleep(0)
        finally:
            self._task, self._busy = None, False
            # Only if cancelled (closing): the statement out may have been
            # applied; nobody will send what is left.
            for member in sent:
                if member.result is not None and not member.result.done():
                    member.result.set_exception(
                        CommitUnknownError(
                            f"{self.db.url} was closed while this commit was being sent; "
                            "it may or may not have been applied"
                        )
                    )
            self._fail_queued()

    def _fail_queued(self) -> None:
        """Closed: the queued commits will not be sent."""
        for member in self._queue:
            if member.result is not None and not member.result.done():
                member.result.set_exception(
                    UnavailableError(f"{self.db.url} was closed; nothing was applied")
                )
        self._queue.clear()

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        """The committer's connection, connecting anew if it was lost (a
        server restart; checked without a round trip, as a pooled one is).

        Connecting is retried for ``connect_timeout``, as the pool waits for
        a connection; nothing has been sent, so the error is not
        CommitUnknownError."""
        conn = self._conn
        if conn is not None:
            if not conn.closed and _looks_alive(conn):
                return conn
            self._conn = None
            await conn.close()
        db = self.db
        if self._closed:
            raise UnavailableError(f"{db.url} was closed; nothing was applied")
        deadline = db.loop.time() + db.timeout
        delay = 0.05
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(db.conninfo, autocommit=True)
            except (psycopg.Error, OSError) as exc:
                if db.loop.time() + delay > deadline or self._closed:
                    raise UnavailableError(
                        f"PostgreSQL at {db.url.render(hide_password=True)} is unavailable: "
                        f"the committer could not connect for {db.timeout:g} s "
                        f"(connect_timeout); nothing was applied: {_clean(exc, db.url)}"
                    ) from exc
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            self.connects += 1
            self._conn = conn
            return conn

    async def _send(
        self, members: list[_Member], conn: psycopg.AsyncConnection[Any]
    ) -> list[int | StoreError]:
        """Send one commit statement for ``members``; each one's version or error."""
        db = self.db
        self.statements += 1
        if len(members) > 1:
            self.groups += 1
            self.grouped += len(members)
            params = self._group_params(members)
            try:
                cur = await conn.execute(db.sql.commit_group, params, prepare=True)
                row = await cur.fetchone()
            except asyncio.CancelledError:
                db.watches.unknown_commit()  # closing: it may have been applied, unannounced
                raise
            except psycopg.OperationalError as exc:
                db.watches.unknown_commit()
                errors: list[int | StoreError] = []
                for _ in members:  # one exception object per waiting task
                    error = _map_error(exc, db.url, committing=True)
                    error.__cause__ = exc
                    errors.append(error)
                return errors
            except psycopg.Error as exc:
                # Not a conflict (those come back as NULL): maybe one member's
                # fault, so each one alone, that it cannot fail the others.
                log.debug("group commit failed, committing one by one: %s", _clean(exc, db.url))
                outcomes: list[int | StoreError] = []
                for member in members:
                    if member.result is not None and member.result.done():
                        outcomes.append(ConflictError("cancelled"))  # nobody waits for it
                        continue
                    try:
                        # A connection lost on an earlier member is replaced:
                        # nothing was sent for this one.
                        conn = await self._connection()
                    except StoreError as unavailable:
                        outcomes.append(unavailable)
                        continue
                    outcomes += await self._send([member], conn)
                return outcomes
            assert row is not None
            outcomes = []
            applied = [m for m, v in zip(members, row[0], strict=True) if v is not None]
            finals = iter(_final_sets(applied))
            for member, version in zip(members, row[0], strict=True):
                if version is None:
                    outcomes.append(
                        ConflictError(
                            "PostgreSQL: dgen: a key this transaction read was changed by "
                            "another, or its snapshot is too old to check (" + _TOO_OLD + ")"
                        )
                    )
                else:
                    self._committed(member, int(version), row[1], next(finals))
                    outcomes.append(int(version))
            return outcomes
        member = members[0]
        statement = db.sql.commit if db.watches.in_commit else db.sql.commit_only
        try:
            cur = await conn.execute(statement, member.params, prepare=True)
            row = await cur.fetchone()
        except asyncio.CancelledError:
            db.watches.unknown_commit()  # it may have been applied, unannounced
            raise
        except psycopg.Error as exc:
            lost = isinstance(exc, psycopg.OperationalError)
            if lost:
                db.watches.unknown_commit()
            error = _map_error(exc, db.url, committing=lost)
            error.__cause__ = exc
            return [error]
        if row is None or row[0] is None:  # dgen_commit's NULL: too old to validate
            return [ConflictError(f"PostgreSQL: dgen: this transaction's snapshot is {_TOO_OLD}")]
        version = int(row[0])
        self._committed(member, version, row[1])
        return [version]

    def _committed(
        self,
        member: _Member,
        version: int,
        listeners: str | None,
        sets: tuple[list[bytes], list[bytes]] | None = None,
    ) -> None:
        """Tell the watches what ``member`` wrote; ``sets``: the keys it set
        whose value is still its own after the statement (default: all)."""
        stamp = version.to_bytes(8, "big") + b"\x00\x00"
        written = member.written + [k[:o] + stamp + k[o + 10 :] for k, o, _ in member.stamped]
        if sets is None:
            sets = (member.raw["sk"], member.raw["sv"])
        self.db.watches.committed(version, written, member.cleared, listeners, sets)

    def _group_params(self, members: list[_Member]) -> dict[str, Any]:
        params: dict[str, Any] = {"rv": [m.read_version for m in members]}
        for key, count in (("rb", "nr"), ("cb", "nc"), ("ck", "nk"), ("sk", "ns"),
                           ("ak", "na"), ("tk", "nt")):  # fmt: skip
            counts = [len(m.raw[key]) for m in members]
            params[count] = counts if any(counts) else None
        for key in ("rb", "re", "cb", "ce", "ck", "sk", "sv", "ak", "ad", "tk", "to", "tv"):
            params[key] = [x for m in members for x in m.raw[key]] or None
        params.update(lw=LOG_WINDOW, pe=_PRUNE_EVERY, channel=None, hashes=None)
        if self.db.watches.in_commit:
            params["channel"] = self.db.watches.channel
            params["hashes"] = [m.hashes for m in members]
        return params

    async def close(self) -> None:
        """Send what is queued (for at most :data:`_CLOSE_GRACE` seconds),
        then close the connection: a statement still out gets
        CommitUnknownError, commits still queued UnavailableError. With
        group_commit=off, wait as long for commits being sent on their own
        connections, so that the notifier, stopped next, announces them."""
        loop = self.db.loop
        deadline = loop.time() + _CLOSE_GRACE
        while (self._busy or self._alone) and loop.time() < deadline:
            if self._task is not None:
                await asyncio.wait([self._task], timeout=deadline - loop.time())
            else:
                await asyncio.sleep(0.01)  # a lone commit in flight
        self._closed = True
        task = self._task
        if task is not None:
            task.cancel()  # see _run's finally
            await asyncio.wait([task])
        if self._conn is not None:
            await self._conn.close()
            self._conn = None


# -- watches ------------------------------------------------------------------


def _tokens(
    keys: Iterable[bytes], cleared: list[tuple[bytes, bytes]], budget: int
) -> list[str] | None:
    """A notification's words for written ``keys`` (hashes) and ``cleared``
    ranges (``~begin~end`` in hex); None if they need more than ``budget``
    characters (the notification then says ``*``)."""
    tokens = [_key_hash(k) for k in keys]
    tokens += [f"~{b.hex()}~{e.hex()}" for b, e in cleared]
    if sum(len(t) + 1 for t in tokens) > budget:
        return None
    return tokens


def _key_hash(key: bytes) -> str:
    # The server computes the same for ordered-commit keys (left(encode(sha256(k)...))).
    return hashlib.sha256(key).hexdigest()[:12]


class _Watches:
    """Watches of one database object: notifier, listener and fallback poll."""

    def __init__(self, db: PostgresDatabase, poll_interval: float, notify: str) -> None:
        self.db = db
        self.poll_interval = poll_interval
        self.in_commit = notify == "commit"
        # notify=after: hashes written by local commits not yet notified, and
        # the newest of their versions (a batch is announced at that version,
        # which can only make a watch fire spuriously).
        self._outbox: set[str] = set()
        self._outbox_size = 0
        self._outbox_version = 0
        self._outbox_ready = asyncio.Event()
        digest = hashlib.blake2b(db.schema.encode(), digest_size=8).hexdigest()
        self.channel = f"dgen_{digest}"
        # key -> (watch, baseline, the version the baseline is at or None)
        self.waiting: dict[bytes, list[tuple[Watch, object, int | None]]] = {}
        self._sorted: list[bytes] = []  # the keys of ``waiting``, for cleared ranges
        self.hashes: dict[str, bytes] = {}
        # What the listener heard: key hash -> the last commit version that
        # wrote it, for the last _HISTORY writes. Every commit made after
        # ``heard_from`` has been heard or is yet to arrive, so a watch whose
        # baseline is at a version v >= heard_from (and >= ``_floor``, below
        # which entries were forgotten) needs no re-read: it fires if a write
        # after v was heard, and otherwise when one arrives.
        self.heard_from: int | None = None
        self._changed: dict[str, int] = {}
        self._all_changed = 0  # the last "*" (writes too many to name)
        self._heard: collections.deque[tuple[int, str]] = collections.deque()
        self._heard_ranges: collections.deque[tuple[int, bytes, bytes]] = collections.deque()
        self._floor = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._checks: set[asyncio.Task[None]] = set()
        self.reconnects = 0
        self._stopping = False
        # The listener's backend pid, while it is registered (see announce).
        self._own: str | None = None
        self._listener: asyncio.Task[None] | None = None
        self._warned = False
        self._notifier: asyncio.Task[None] | None = None

    def start(self) -> None:
        if not self.in_commit:
            self._notifier = asyncio.create_task(self._notify(), name="dgen-postgres-notifier")
            self._tasks.append(self._notifier)

    def _start_listening(self) -> None:
        # On the first watch, not on open: a database object that never
        # watches (a producer) neither registers nor receives notifications,
        # so other objects' commits need not announce themselves to it.
        if self._listener is None and not self._stopping:
            self._listener = asyncio.create_task(self._listen(), name="dgen-postgres-listener")
            self._tasks.append(self._listener)

    async def stop(self) -> None:
        # Python 3.11's wait_for (used inside psycopg_pool) can swallow a
        # cancellation, so do not trust one cancel: flag, cancel again, bound.
        self._stopping = True
        if self._notifier is not None:
            # The notifier sends what is pending, then ends: a process that
            # commits and exits at once still wakes the others.
            self._outbox_ready.set()
            await asyncio.wait([self._notifier], timeout=2.0)
        await self._unregister()
        tasks = [*self._tasks, *self._checks]
        for _ in range(100):
            pending = [t for t in tasks if not t.done()]
            if not pending:
                break
            for task in pending:
                task.cancel()
            await asyncio.wait(pending, timeout=0.1)
        for task in tasks:
            if task.done() and not task.cancelled():
                task.exception()  # retrieved: a failed check was already logged
        error = UnavailableError("the database was closed")
        for entries in self.waiting.values():
            for watch, _, _ in entries:
                watch._fail(error)
        self.waiting.clear()
        self._sorted.clear()

    def add(self, watch: Watch, baseline: object, version: int | None) -> None:
        """Arm ``watch``, whose ``baseline`` is the value at commit ``version``
        (None: not known)."""
        if baseline is UNKNOWN:
            watch._fire()
            return
        if self._stopping:
            # A transaction that read before the close commits after it: its
            # watch would wait for ever.
            watch._fail(UnavailableError("the database was closed"))
            return
        self._start_listening()
        key = watch.key
        digest = _key_hash(key)
        if key not in self.waiting:
            bisect.insort(self._sorted, key)
        self.waiting.setdefault(key, []).append((watch, baseline, version))
        self.hashes[digest] = key
        heard_from = self.heard_from
        if version is None or heard_from is None or version < max(heard_from, self._floor):
            self._spawn_check([key])  # it may have changed since the snapshot
        elif (
            self._changed.get(digest, -1) > version
            or self._all_changed > version
            or any(v > version and b <= key < e for v, b, e in self._heard_ranges)
        ):
            self._fire(key)  # a write after the baseline was heard

    @property
    def listener_pid(self) -> int | None:
        """The backend pid of the listener connection, once it is registered."""
        return None if self._own is None else int(self._own)

    def announce(self, listeners: str | None) -> bool:
        """Whether a local commit that found ``listeners`` needs a notification.

        Every listener connection registers its backend pid in
        ``dgen_clock.listeners`` under the clock-row lock (``_register``) and
        is sent every commit made after that. A commit reads the list under
        the same lock (the commit functions leave it in ``dgen.listeners``):
        if it holds no pid but this object's own listener's, nobody else can
        be watching, and local watches fire directly, so the notification
        (a statement and a server transaction) is skipped. Unknown (older
        commit functions): sent. With notify=commit the commit sent it.
        """
        if self.in_commit:
            return False
        if not listeners:
            return True
        pids = listeners[1:-1]  # "{1,2}"
        return bool(pids) and pids != self._own

    def committed(
        self,
        version: int,
        keys: list[bytes],
        cleared: list[tuple[bytes, bytes]],
        listeners: str | None = None,
        sets: tuple[list[bytes], list[bytes]] = ([], []),
    ) -> None:
        """Local commit ``version`` wrote ``keys`` and cleared the ranges ``cleared``.

        Their watches fire without a re-read: a watch may fire spuriously
        (the same value written again), never late; those on keys the commit
        set (``sets``: keys and values) carry the value. ``listeners``: the
        registered listeners the commit found (see :meth:`announce`).
        """
        if self.announce(listeners):
            if _ALL not in self._outbox:
                tokens = _tokens(keys, cleared, _NOTIFY_LIMIT - 24 - self._outbox_size)
                if tokens is None:
                    self._outbox = {_ALL}
                else:
                    self._outbox.update(tokens)
                    self._outbox_size += sum(len(t) + 1 for t in tokens)
            self._outbox_version = max(self._outbox_version, version)
            self._outbox_ready.set()
        elif not self.in_commit and self._listener is not None:
            # Unannounced, so this object's listener will not hear it either:
            # into the history here, for a watch armed later on an older
            # baseline (see add). Without a listener task, a registration
            # comes after this commit, so its watches re-read instead.
            self._hear(version, [_key_hash(k) for k in keys])
            for begin, end in cleared:
                self._hear_range(version, begin, end)
        if not self.waiting:
            return
        values: dict[bytes, bytes] | None = None
        for key in keys:
            if key in self.waiting:
                if values is None:
                    values = dict(zip(*sets, strict=True))
                self._fire(key, version, values.get(key))
        for begin, end in cleared:
            for key in self._within(begin, end):
                self._fire(key, version)

    def unknown_commit(self) -> None:
        """A local commit may have been applied without being announced (its
        connection was lost): with notify=after, announce "*" at the clock's
        version once it can be read, so watches older than that re-read."""
        if self.in_commit or self._stopping:
            return  # with notify=commit the notification is part of the commit

        async def announce() -> None:
            try:
                version = await self._clock()
            except (psycopg.Error, psycopg_pool.PoolTimeout, OSError) as exc:
                # The server is away: the listener reconnects and fires all.
                log.debug("no clock after an unknown commit: %s", _clean(exc, self.db.url))
                return
            self._outbox = {_ALL}
            self._outbox_version = max(self._outbox_version, version)
            self._outbox_ready.set()

        task = asyncio.create_task(announce())
        self._checks.add(task)
        task.add_done_callback(self._checks.discard)

    def _fire(self, key: bytes, version: int | None = None, value: bytes | None = None) -> None:
        """Fire the watches of ``key`` whose baseline is older than a write
        at ``version`` (None: all of them); ``value``: what that write set,
        if known."""
        entries = self.waiting.get(key)
        if entries is None:
            return
        keep = []
        for entry in entries:
            watch, _, since = entry
            if version is None or since is None or since < version:
                watch._fire(value)
            elif not watch.done():
                keep.append(entry)
        if keep:
            self.waiting[key] = keep
        else:
            self._drop(key)

    def _drop(self, key: bytes) -> None:
        """Forget ``key``: no watch waits on it any more."""
        del self.waiting[key]
        self.hashes.pop(_key_hash(key), None)
        i = bisect.bisect_left(self._sorted, key)
        if i < len(self._sorted) and self._sorted[i] == key:
            del self._sorted[i]

    def _within(self, begin: bytes, end: bytes) -> list[bytes]:
        """The watched keys in [begin, end)."""
        keys = self._sorted
        return keys[bisect.bisect_left(keys, begin) : bisect.bisect_left(keys, end)]

    def _hear(self, version: int, hashes: list[str]) -> None:
        changed = self._changed
        for h in hashes:
            if changed.get(h, -1) < version:
                changed[h] = version
            self._heard.append((version, h))
        while len(self._heard) > _HISTORY:
            old, h = self._heard.popleft()
            if changed.get(h) == old:
                del changed[h]
            self._floor = max(self._floor, old)

    def _hear_range(self, version: int, begin: bytes, end: bytes) -> None:
        self._heard_ranges.append((version, begin, end))
        while len(self._heard_ranges) > _RANGE_HISTORY:
            self._floor = max(self._floor, self._heard_ranges.popleft()[0])

    def fire_all(self) -> None:
        for entries in self.waiting.values():
            for watch, _, _ in entries:
                watch._fire()
        self.waiting.clear()
        self._sorted.clear()
        self.hashes.clear()

    def _spawn_check(self, keys: Iterable[bytes] | None) -> None:
        task = asyncio.create_task(self.check(keys))
        self._checks.add(task)
        task.add_done_callback(self._checks.discard)

    async def check(self, keys: Iterable[bytes] | None = None) -> None:
        """Re-read watched ``keys`` (all if None); fire those that changed."""
        wanted = list(self.waiting if keys is None else {k for k in keys if k in self.waiting})
        if not wanted:
            return
        try:
            async with _pooled(self.db.pool) as conn:
                cur = await conn.execute(self.db.sql.get_many, (wanted,), binary=True)
                current = {bytes(k): bytes(v) for k, v in await cur.fetchall()}
        except (psycopg.Error, psycopg_pool.PoolTimeout, OSError) as exc:
            log.debug("watch check failed, the next poll retries: %s", _clean(exc, self.db.url))
            return
        for key in wanted:
            keep: list[tuple[Watch, object, int | None]] = []
            for watch, baseline, since in self.waiting.get(key, []):
                if watch.done():
                    continue
                if baseline != current.get(key):
                    watch._fire(current.get(key))
                else:
                    keep.append((watch, baseline, since))
            if keep:
                self.waiting[key] = keep
            elif key in self.waiting:
                self._drop(key)

    async def _notify(self) -> None:
        while True:
            if self._stopping and not self._outbox:
                return  # closing: everything committed before has been sent
            await self._outbox_ready.wait()
            self._outbox_ready.clear()
            batch, self._outbox, self._outbox_size = self._outbox, set(), 0
            if batch:
                payload = f"{self._outbox_version} {' '.join(sorted(batch))}"
                try:
                    async with _pooled(self.db.pool) as conn:
                        await conn.execute("SELECT pg_notify(%s, %s)", (self.channel, payload))
                except (psycopg.Error, psycopg_pool.PoolTimeout, OSError) as exc:
                    # Listeners that missed it reconnect (and fire) or poll.
                    log.debug("pg_notify failed: %s", _clean(exc, self.db.url))

    async def _listen(self) -> None:
        delay, connected_once = 0.05, False
        while not self._stopping:
            try:
                conn = await psycopg.AsyncConnection.connect(self.db.conninfo, autocommit=True)
            except (psycopg.Error, OSError):
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            try:
                await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
                # Every commit after this version notifies us.
                since = await self._register(conn)
                if connected_once:
                    # Notifications sent while we were away are lost.
                    self.reconnects += 1
                    self.fire_all()
                else:
                    # Watches armed before: re-read at a snapshot after since.
                    await self.check(None)
                connected_once = True
                self.heard_from = since
                delay = 0.05  # (not before: a failure that repeats must back off)
                while not self._stopping:
                    async for note in conn.notifies(timeout=self.poll_interval):
                        self._on_note(note.payload)
                    await self.check(None)
            except (psycopg.Error, psycopg_pool.PoolTimeout, OSError) as exc:
                log.debug("listener lost its connection: %s", _clean(exc, self.db.url))
                connected_once = True
            finally:
                self.heard_from = None
                self._own = None
                await conn.close()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def _register(self, conn: psycopg.AsyncConnection[Any]) -> int:
        """Register ``conn``, which listens already (see :meth:`announce`);
        the version after which every commit notifies it."""
        try:
            async with conn.transaction():
                # Lock first: the list of live backends is read after it, so a
                # listener registering meanwhile is not dropped as dead.
                await conn.execute(self.db.sql.lock_clock)
                cur = await conn.execute(self.db.sql.register)
                row = await cur.fetchone()
        except psycopg.errors.UndefinedColumn:
            # Functions older than version 5 that this role may not replace:
            # every commit notifies. A commit not visible to a snapshot taken
            # after LISTEN committed is after this version.
            return await self._clock()
        except (psycopg.errors.InsufficientPrivilege, psycopg.errors.ReadOnlySqlTransaction) as exc:
            # A role that may not write dgen_clock cannot commit either, but
            # may watch: unregistered, a commit made while no registered
            # listener is open is not announced, and only the poll sees it.
            if not self._warned:
                self._warned = True
                log.warning(
                    "this role cannot register its listener on schema %r (%s); its "
                    "watches may wait up to watch_poll_interval (%g s) for changes: "
                    "grant it UPDATE on dgen_clock (docs/postgres.md)",
                    self.db.schema,
                    str(exc).strip(),
                    self.poll_interval,
                )
            return await self._clock()
        assert row is not None
        self._own = str(conn.info.backend_pid)
        return int(row[0])

    async def _unregister(self) -> None:
        # Best effort: a pid left behind only costs notifications until the
        # next listener to register drops it (its backend is gone by then).
        own = self._own
        if own is None:
            return
        try:
            async with asyncio.timeout(1.0), _pooled(self.db.pool) as conn:
                await conn.execute(self.db.sql.unregister, (int(own),))
        except (psycopg.Error, psycopg_pool.PoolTimeout, OSError, TimeoutError) as exc:
            log.debug("could not unregister the listener: %s", _clean(exc, self.db.url))

    async def _clock(self) -> int:
        async with _pooled(self.db.pool) as conn:
            cur = await conn.execute(self.db.sql.clock)
            row = await cur.fetchone()
        assert row is not None
        return int(row[0])

    def _on_note(self, payload: str) -> None:
        # "<version> <hashes>": see _SQL.commit. Anything else (another
        # program, or an older DGen) is left to the poll.
        text, _, rest = payload.partition(" ")
        try:
            version = int(text)
        except ValueError:
            return
        words = rest.split()
        if _ALL in words:
            self._all_changed = max(self._all_changed, version)
            older = [
                key
                for key, entries in self.waiting.items()
                if any(since is None or since < version for _, _, since in entries)
            ]
            if older:
                self._spawn_check(older)
            return
        hashes = [w for w in words if not w.startswith("~")]
        self._hear(version, hashes)
        for word in words:
            if word.startswith("~"):
                _, begin, end = word.split("~")
                b, e = bytes.fromhex(begin), bytes.fromhex(end)
                self._hear_range(version, b, e)
                for inside in self._within(b, e):
                    self._fire(inside, version)
        if self.waiting:
            for h in hashes:
                key = self.hashes.get(h)
                if key is not None:
                    self._fire(key, version)


# -- the database -------------------------------------------------------------


class PostgresDatabase(Database):
    limits = LIMITS
    capabilities = Capabilities(
        durable=True, cross_process=True, watches_cross_process=True, combines_reads=True
    )

    def __init__(
        self,
        url: URL,
        conninfo: str,
        schema: str,
        pool: psycopg_pool.AsyncConnectionPool[Any],
        pool_size: int,
        poll_interval: float,
        notify: str = "after",
        group_commit: bool = True,
        timeout: float = 10.0,
    ) -> None:
        self.url = url
        self.timeout = timeout  # connect_timeout: waiting for a connection
        self.conninfo = conninfo
        self.schema = schema
        self.sql = _SQL(schema)
        self.pool = pool
        self.pool_size = pool_size
        self.watches = _Watches(self, poll_interval, notify)
        self.committer = _GroupCommit(self, group_commit)
        self.loop = asyncio.get_running_loop()
        self._releases: set[asyncio.Task[None]] = set()
        self._closed = False
        self.read_statements = 0  # statements sent for reads (tests, benchmarks)
        # Connections whose read-only snapshot is done with (see park).
        self._parked: list[psycopg.AsyncConnection[Any]] = []
        self._unpark_timer: asyncio.TimerHandle | None = None

    def release_later(self, conn: psycopg.AsyncConnection[Any], open_tx: bool) -> None:
        """Return ``conn`` to the pool from a task of its own, ending its
        transaction first if ``open_tx``: the connection of a transaction that
        was garbage-collected, or of one whose commit the committer sends."""

        async def release() -> None:
            try:
                if open_tx and not conn.closed:
                    with contextlib.suppress(psycopg.Error):
                        await conn.execute("ROLLBACK", prepare=False)
            finally:
                await _putconn(self.pool, conn)

        if not self._closed:
            task = asyncio.ensure_future(release())
            self._releases.add(task)
            task.add_done_callback(self._releases.discard)

    def park(self, conn: psycopg.AsyncConnection[Any]) -> bool:
        """Keep ``conn``, idle in a read-only snapshot that is done with, for
        the next transaction that reads: it sends ``ROLLBACK`` with its
        ``BEGIN``, which saves a round trip per reading transaction. At most
        :data:`_PARKED_MAX` are kept, for at most :data:`_PARKED_SECONDS` (an
        open snapshot holds back VACUUM), and only while the pool has a
        connection to spare; True if kept."""
        if (
            self._closed
            or len(self._parked) >= _PARKED_MAX
            or conn.closed
            or conn.info.transaction_status != psycopg.pq.TransactionStatus.INTRANS
        ):
            return False
        # Never at the pool's expense: a transaction waiting for a connection
        # (or the commit that follows) would wait for the timer.
        stats = self.pool.get_stats()
        if stats.get("requests_waiting", 0) or (
            not stats.get("pool_available", 0)
            and stats.get("pool_size", 0) >= stats.get("pool_max", 0)
        ):
            return False
        self._parked.append(conn)
        if self._unpark_timer is None:
            self._unpark_timer = self.loop.call_later(_PARKED_SECONDS, self._release_parked)
        return True

    def unpark(self) -> psycopg.AsyncConnection[Any] | None:
        """A parked connection (its snapshot still open), or None."""
        return self._parked.pop() if self._parked else None

    def _release_parked(self) -> None:
        self._unpark_timer = None
        parked, self._parked = self._parked, []
        for conn in parked:
            self.release_later(conn, open_tx=True)

    @property
    def closed(self) -> bool:
        return self._closed

    def create_transaction(self) -> PostgresTransaction:
        if self._closed:
            raise UnavailableError(f"{self.url} was closed")
        return PostgresTransaction(self)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._release_parked()
        if self._unpark_timer is not None:
            self._unpark_timer.cancel()
            self._unpark_timer = None
        self._closed = True
        await self.committer.close()
        await self.watches.stop()
        if self._releases:
            await asyncio.wait(self._releases, timeout=5.0)
        await self.pool.close()

    def __repr__(self) -> str:
        return f"<PostgresDatabase {self.url}>"


def _parse(url: URL) -> tuple[str, str, int, float, int, str, bool]:
    """conninfo, schema, pool size, poll interval, connect timeout, notify
    mode and group commit from the URL."""
    options = url.check_options(OPTIONS)

    def number(name: str, default: str, kind: type[int] | type[float]) -> Any:
        text = options.get(name, default)
        try:
            value = kind(text)
        except ValueError:
            value = 0
        if value <= 0:
            raise URLError(f"option {name}={text!r} in {url} must be a positive number")
        return value

    pool_size = number("pool_size", "10", int)
    poll = number("watch_poll_interval", "1.0", float)
    timeout = number("connect_timeout", "10", int)
    schema = options.get("schema", "dgen")
    if not schema or len(schema.encode()) > 63:
        raise URLError(f"option schema={schema!r} in {url} must be 1 to 63 bytes")
    notify = options.get("notify", "after")
    if notify not in _NOTIFY_MODES:
        raise URLError(
            f"option notify={notify!r} in {url} must be one of {', '.join(_NOTIFY_MODES)}"
        )
    group = options.get("group_commit", "on")
    if group not in ("on", "off"):
        raise URLError(f"option group_commit={group!r} in {url} must be on or off")
    sync = options.get("synchronous_commit", "on")
    if sync not in _SYNC_LEVELS:
        raise URLError(
            f"option synchronous_commit={sync!r} in {url} must be one of {', '.join(_SYNC_LEVELS)}"
        )
    dbname = url.path.lstrip("/")
    if "/" in dbname:
        raise URLError(f"the database name in {url} may not contain '/'")
    params: dict[str, Any] = {
        "dbname": dbname or None,
        "user": url.username,
        "password": url.password,
        "host": options.get("host", url.host),
        "port": options.get("port", url.port),
        "sslmode": options.get("sslmode"),
        "application_name": options.get("application_name", "dgen"),
        "connect_timeout": timeout,
        # JIT compiling costs tens of milliseconds and never pays off for
        # DGen's one-row statements.
        "options": (
            f"-c synchronous_commit={sync} -c jit=off "
            "-c default_transaction_isolation=read\\ committed"
        ),
    }
    conninfo = psycopg.conninfo.make_conninfo(
        **{k: str(v) for k, v in params.items() if v is not None}
    )
    return conninfo, schema, pool_size, poll, timeout, notify, group == "on"


async def _prepare_schema(conn: psycopg.AsyncConnection[Any], q: _SQL, schema: str) -> bool:
    """Create the tables on first use, or check their version; add
    ``dgen_commit_group`` to a store made by an older DGen. False if it is
    missing and this role may not create it (group commit then stays off)."""
    try:
        cur = await conn.execute(q.version)
        row = await cur.fetchone()
    except (psycopg.errors.UndefinedTable, psycopg.errors.InvalidSchemaName):
        row = None
    if row is None:
        async with conn.transaction():
            # Concurrent first opens: CREATE ... IF NOT EXISTS alone can still
            # collide in the catalogs, so take a lock named after the schema.
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"dgen:{schema}",))
            exists = await conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,))
            if await exists.fetchone() is None:
                await conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
            await conn.execute(q.ddl)
            cur = await conn.execute(q.version)
            row = await cur.fetchone()
    version = int(row[0]) if row is not None else 0
    if version > SCHEMA_VERSION:
        raise UnavailableError(
            f"schema {schema!r} has DGen table version {version}, newer than this DGen "
            f"understands ({SCHEMA_VERSION}); upgrade DGen"
        )
    # Later versions migrate here, one step at a time, under the same lock.
    cur = await conn.execute(q.has_group)
    found = await cur.fetchone()
    old = found[0] if found is not None else None
    mine = _function_version(_GROUP_VERSION)
    if _function_version(old) >= mine:
        return True  # ours, or a newer DGen's, which must not be replaced by older bodies
    try:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"dgen:{schema}",))
            cur = await conn.execute(q.has_group)
            found = await cur.fetchone()
            if found is None or _function_version(found[0]) < mine:
                await conn.execute(q.group_ddl)
    except psycopg.errors.InsufficientPrivilege as exc:
        if old is not None:
            # An older body of the functions: they commit correctly, but
            # without the crash sentinel (_SENTINEL_CHECK).
            log.warning(
                "schema %r has older DGen commit functions (%s) and this role may not "
                "replace them (%s); open the store once as its owner: until then a "
                "transaction open across a server crash can commit a lost update",
                schema,
                old,
                str(exc).strip(),
            )
            return True
        log.warning(
            "group commit is off for schema %r: it has no dgen_commit_group and this role "
            "may not create it (%s); open the store once as its owner",
            schema,
            str(exc).strip(),
        )
        return False
    return True


async def open_database(url: URL) -> PostgresDatabase:
    """Connect, create or check the schema, and open the pool."""
    conninfo, schema, pool_size, poll, timeout, notify, group = _parse(url)
    q = _SQL(schema)
    try:
        conn = await psycopg.AsyncConnection.connect(conninfo, autocommit=True)
    except (psycopg.Error, OSError) as exc:
        raise _map_error(exc, url) from None
    try:
        with _errors(url):
            group = await _prepare_schema(conn, q, schema) and group
    finally:
        await conn.close()
    pool: psycopg_pool.AsyncConnectionPool[Any] = psycopg_pool.AsyncConnectionPool(
        conninfo,
        min_size=1,
        max_size=pool_size,
        kwargs={"autocommit": True},
        open=False,
        name=f"dgen-{schema}",
        timeout=float(timeout),  # waiting for a free or fresh connection
    )
    try:
        with _errors(url):
            await pool.open(wait=True, timeout=float(timeout))
    except BaseException:
        await pool.close()
        raise
    db = PostgresDatabase(
        url, conninfo, schema, pool, pool_size, poll, notify, group, float(timeout)
    )
    db.watches.start()
    return db
