"""``sqlite:///relative.db`` and ``sqlite:////absolute.db``: the embedded default.

Transactions are optimistic, as in FoundationDB. Reads run in a deferred
SQLite transaction (WAL gives it a consistent snapshot) and are recorded.
Commit takes the write lock with ``BEGIN IMMEDIATE``; if the commit counter
moved since the snapshot, it replays the recorded reads and raises
:class:`ConflictError` if any result differs. Writes are then applied and the
counter is incremented in the same SQLite transaction, so the counter is a
commit-ordered stamp: one writer at a time means stamp order is commit order
and visibility order. Commits that queue while one is written are written
together by a committer task, one fsync for the group, each validated and
stamped as if alone (group commit).

Watches: a thread per database checks ``PRAGMA data_version``, which changes
when any other connection (this process or another) commits, and then
re-reads the watched keys. Commits of other processes wake it through Unix
datagram sockets in ``<file>-dgenwake/`` (a hint); it also polls while
watches exist, which is what correctness rests on. Local commits fire their
watches directly.

Each connection lives on its own thread, and a whole commit (group) is one
hop to the writer connection's thread; see docs/sqlite.md for why we do not
use aiosqlite.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import os
import re
import secrets
import selectors
import socket
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from dgen.backends.base import ADD, BufferedTransaction, WriteBuffer
from dgen.store import (
    Capabilities,
    CommitUnknownError,
    ConflictError,
    Database,
    KeyValue,
    Limits,
    StoreError,
    UnavailableError,
    ValueTooLargeError,
    Watch,
    decode_counter,
    encode_counter,
)
from dgen.urls import URL, URLError

__all__ = ["SQLiteDatabase", "open_database"]

T = TypeVar("T")
SCHEMA_VERSION = 1
_SYNCHRONOUS = ("off", "normal", "full", "extra")
_OPTIONS = ("synchronous", "busy_timeout", "poll_interval", "pool_size", "commit", "wake")
_COMMIT_MODES = ("thread", "inline")
_BUSY = {5, 6, 517, 261, 262}  # BUSY, LOCKED, BUSY_SNAPSHOT, BUSY_RECOVERY, LOCKED_SHAREDCACHE
_GET = "SELECT value FROM dgen_kv WHERE key = ?"
_VERSION = "SELECT value FROM dgen_meta WHERE name = 'commit_version'"
_WAKE_MODES = ("socket", "off")
_WATCHER_LINGER = 1.0  # seconds the watcher polls on after its last watch ended
_WAKE_NAME = re.compile(r"[0-9]{1,10}-[0-9a-f]{8}")  # pid-random: a wake socket's file name
_WAKE_NAME_MAX = 19
_SUN_PATH_MAX = 107  # bytes of a socket path (sun_path holds 108 with the NUL)
_WAKE_REFRESH = 0.005  # seconds a committing process trusts its listing of the wake sockets


def _range_sql(limit: int, reverse: bool) -> str:
    order = "DESC" if reverse else "ASC"
    sql = f"SELECT key, value FROM dgen_kv WHERE key >= ? AND key < ? ORDER BY key {order}"
    return sql + (f" LIMIT {int(limit)}" if limit else "")


def _map_error(exc: sqlite3.Error, path: Path, committing: bool = False) -> StoreError:
    """The one place SQLite errors become DGen errors."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code in _BUSY or (code is None and "locked" in str(exc)):
        return ConflictError(f"SQLite store {path} is busy: {exc}")
    if code == 26:  # SQLITE_NOTADB
        return UnavailableError(f"{path} exists but is not an SQLite database")
    if code == 18:  # SQLITE_TOOBIG
        return ValueTooLargeError(f"SQLite refused a value as too big: {exc}")
    if committing and code is not None and code & 0xFF == 10:  # SQLITE_IOERR during COMMIT
        return CommitUnknownError(f"I/O error while committing to {path}: {exc}")
    return UnavailableError(f"SQLite store {path} failed: {exc}")


class _Busy(Exception):
    """Another connection holds the write lock; retry on the thread, waiting."""


# Bytes of WAL file kept after a checkpoint restarts it (PRAGMA journal_size_limit).
WAL_SIZE_LIMIT = 16 << 20


class _Connection:
    """One sqlite3 connection and the thread that runs its blocking calls.

    Reads and non-syncing commits run inline on the event loop: they take
    microseconds, less than a hop to a thread (about 65 us here). Anything
    that may wait (another process's write lock, an fsync at COMMIT under
    synchronous=full or extra) runs on the connection's own thread.
    """

    def __init__(self, path: Path, synchronous: str, busy_timeout: float) -> None:
        self.path = path
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="dgen-sqlite")
        self._sql: sqlite3.Connection | None = None
        self._setup = (synchronous, busy_timeout)

    def open(self) -> sqlite3.Connection:
        """The connection; the first call (made on the thread by the pool, as
        switching to WAL may wait for other processes) opens it."""
        if self._sql is None:
            sql = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=self._setup[1]
            )
            try:
                mode = sql.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if mode != "wal":
                    raise UnavailableError(f"cannot switch {self.path} to WAL mode (got {mode!r})")
                sql.execute(f"PRAGMA synchronous={self._setup[0]}")
                # A WAL that grew during a burst (or behind a long reader) is cut
                # back to this size once a checkpoint lets it restart.
                sql.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
                # Inline calls on the event loop must never sleep in the busy handler.
                sql.execute("PRAGMA busy_timeout=0")
            except BaseException:
                sql.close()
                raise
            self._sql = sql
        return self._sql

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` on the connection's thread, with the busy timeout set."""
        return await self.submit(fn)

    def submit(self, fn: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        """Start ``fn`` on the connection's thread; its future (cancelling
        the future does not stop ``fn``)."""

        def call() -> T:
            sql = self.open()
            sql.execute(f"PRAGMA busy_timeout={int(self._setup[1] * 1000)}")
            try:
                return fn(sql)
            finally:
                sql.execute("PRAGMA busy_timeout=0")

        return asyncio.get_running_loop().run_in_executor(self._executor, call)

    def close(self) -> None:
        def _close() -> None:
            if self._sql is not None:
                self._sql.close()
                self._sql = None

        self._executor.submit(_close).result()
        self._executor.shutdown(wait=True)


class SQLiteTransaction(BufferedTransaction):
    def __init__(self, db: SQLiteDatabase) -> None:
        super().__init__(db.limits)
        self._db = db
        self._conn: _Connection | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self._read_version: int | None = None
        # Every read of committed data, replayed at commit to detect conflicts.
        self._reads: list[tuple[tuple[Any, ...], Any]] = []
        # Conflict ranges added without a read: read at commit, on the snapshot.
        self._unread: list[tuple[bytes, bytes]] = []

    async def _snapshot(self) -> _Connection:
        if self._conn is None:
            conn = await self._db._acquire()

            try:
                sql = conn.open()
                sql.execute("BEGIN")
                self._read_version = int(sql.execute(_VERSION).fetchone()[0])
            except sqlite3.Error as exc:
                self._db._give_back(conn, broken=True)
                raise _map_error(exc, self._db.path) from None
            self._conn = conn
            # A transaction dropped without commit or rollback must not keep its
            # connection (and its WAL snapshot, which blocks checkpoints) forever.
            self._finalizer = weakref.finalize(self, self._db._reclaim, conn)
        return self._conn

    async def _query(self, args: tuple[Any, ...], record: bool = True) -> Any:
        conn = await self._snapshot()
        try:
            result = _execute_read(conn.open(), args)
        except sqlite3.Error as exc:
            raise _map_error(exc, self._db.path) from None
        if record:
            self._reads.append((args, result))
        return result

    async def _read(self, key: bytes) -> bytes | None:
        result: bytes | None = await self._query(("get", key))
        return result

    async def _read_range(
        self, begin: bytes, end: bytes, limit: int, reverse: bool
    ) -> list[KeyValue]:
        result: list[KeyValue] = await self._query(("range", begin, end, limit, reverse))
        return result

    async def _read_snapshot(self, key: bytes) -> bytes | None:
        result: bytes | None = await self._query(("get", key), record=False)
        return result

    async def _read_range_snapshot(
        self, begin: bytes, end: bytes, limit: int, reverse: bool
    ) -> list[KeyValue]:
        result: list[KeyValue] = await self._query(
            ("range", begin, end, limit, reverse), record=False
        )
        return result

    def add_read_conflict_range(self, begin: bytes, end: bytes) -> None:
        super().add_read_conflict_range(begin, end)
        if begin < end:
            self._unread.append((begin, end))

    async def _snapshot_get(self, key: bytes) -> object:
        conn = await self._snapshot()
        try:
            return _execute_read(conn.open(), ("get", key))
        except sqlite3.Error as exc:
            raise _map_error(exc, self._db.path) from None

    async def _apply(self) -> bytes | None:
        buf = self.buffer
        if buf.is_empty():
            return None
        # Validation replays reads, so an added conflict range needs its snapshot
        # contents (a snapshot starts here if nothing was read before: FoundationDB
        # also takes its read version lazily).
        for begin, end in self._unread:
            await self._query(("range", begin, end, 0, False))
        # Validation replays the reads on the writer, so the snapshot is done
        # with: end it before the commit. A snapshot open across the commit
        # kept every checkpoint from finishing, and the WAL grew without end
        # under steady load (137 MB after 12,000 messages), each COMMIT's
        # fsync slower as the file grew (300 us instead of 120).
        await self._release()
        db = self._db
        if db._closed:
            raise UnavailableError(f"{db!r} is closed")
        member = _Member(buf, self._read_version, self._reads, asyncio.get_running_loop())
        writer = db._commit_here()
        if writer is not None:
            # Nothing queued: commit right here on the event loop, no task.
            try:
                outcomes, written = db._write_group(writer.open(), [member], False)
            except _Busy:
                pass  # another process writes: the committer waits on the thread
            else:
                db._finish([member], outcomes, written)
                return member.outcome.result()
        elif (writer := db._write_here()) is not None:
            # Nothing queued or being written: this task hands the commit to
            # the writer's thread itself (a committer task costs two event-loop
            # turns); commits arriving meanwhile queue behind it.
            try:
                outcomes, written = await db._write_on_thread(writer, [member])
            except asyncio.CancelledError:
                # The write goes on and _write_on_thread gives the member its
                # outcome, which nobody reads now.
                member.outcome.add_done_callback(_retrieve)
                raise
            except BaseException as exc:
                member.fail(exc)
            else:
                db._finish([member], outcomes, written)
            return member.outcome.result()
        db._pending.append(member)
        if db._committer is None:
            db._committer = asyncio.ensure_future(db._drain())
        try:
            # Awaited directly (no shield hop): resumed before the watches the
            # commit fires, so its caller sees the outcome first.
            return await member.outcome
        except asyncio.CancelledError:
            member.abandon(db._pending)
            raise

    def _register_watch(self, watch: Watch, baseline: object) -> None:
        self._db._add_watch(watch, baseline)

    async def _release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._finalizer is not None:
            self._finalizer.detach()
        try:
            sql = conn.open()
            if sql.in_transaction:
                sql.execute("ROLLBACK")
        except sqlite3.Error:
            self._db._give_back(conn, broken=True)
        else:
            self._db._give_back(conn)


class _Member:
    """A transaction's writes waiting to be committed, and their outcome."""

    __slots__ = ("buf", "outcome", "read_version", "reads")

    def __init__(
        self,
        buf: WriteBuffer,
        read_version: int | None,
        reads: list[tuple[tuple[Any, ...], Any]],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.buf = buf
        self.read_version = read_version
        self.reads = reads
        self.outcome: asyncio.Future[bytes] = loop.create_future()

    def conflicts(self, sql: sqlite3.Connection, version: int) -> bool:
        """Whether a read replayed now (at commit version ``version``) differs."""
        if self.read_version is None or version == self.read_version:
            return False
        return any(_execute_read(sql, args) != result for args, result in self.reads)

    def fail(self, exc: BaseException) -> None:
        if self.outcome.done():
            return
        if isinstance(exc, asyncio.CancelledError):
            self.outcome.cancel()
        else:
            self.outcome.set_exception(exc)

    def abandon(self, pending: list[_Member]) -> None:
        """Its transaction was cancelled: commit it no more if not yet taken
        (otherwise its group's outcome is left unread, on purpose)."""
        if self in pending:
            pending.remove(self)
        self.outcome.add_done_callback(_retrieve)


def _fail_all(group: list[_Member], exc: BaseException) -> None:
    for m in group:
        m.fail(exc)


def _cancelled_committer() -> ConflictError:
    # Never written, so the caller may retry (db.run does).
    return ConflictError("the store's committer was cancelled before this commit")


def _retrieve(future: asyncio.Future[bytes]) -> None:
    if not future.cancelled():
        future.exception()


def _write(sql: sqlite3.Connection, buf: WriteBuffer, stamp: bytes) -> _Written:
    """Apply ``buf`` (clears first) with ``stamp``; what it wrote."""
    for begin, end in buf.cleared:
        sql.execute("DELETE FROM dgen_kv WHERE key >= ? AND key < ?", (begin, end))
    puts: list[tuple[bytes, bytes]] = []
    deletes: list[tuple[bytes]] = []
    for key, op in buf.points.items():
        if op.kind == ADD:
            row = sql.execute(_GET, (key,)).fetchone()
            base = decode_counter(row[0] if row else None)
            puts.append((key, encode_counter(base + op.delta)))
            continue
        value = op.apply(None)
        if value is None:
            deletes.append((key,))
        else:
            puts.append((key, value))
    for key, offset, value in buf.stamped:
        puts.append((key[:offset] + stamp + key[offset + 10 :], value))
    sql.executemany("DELETE FROM dgen_kv WHERE key = ?", deletes)
    sql.executemany("INSERT OR REPLACE INTO dgen_kv (key, value) VALUES (?, ?)", puts)
    return buf.cleared, deletes, puts


# What one commit wrote: ranges cleared, keys deleted, keys and values put.
_Written = tuple[list[tuple[bytes, bytes]], list[tuple[bytes]], list[tuple[bytes, bytes]]]
# What writing a group gives: each member's stamp or error, and what the
# members that committed wrote, in order.
_Outcomes = tuple[list[bytes | BaseException], list[_Written]]


# The watcher's IN lists come in these sizes (padded by repeating a key), so
# its connection caches a few prepared statements, not one per count.
_IN_SIZES = (1, 8, 64, 500)


def _new_values(watched: frozenset[bytes], written: list[_Written]) -> dict[bytes, bytes | None]:
    """The committed values of the watched keys that commits wrote (each
    commit's clears first, as it applied them; later commits win)."""
    if not watched:
        return {}
    changed: dict[bytes, bytes | None] = {}
    for cleared, deletes, puts in written:
        for begin, end in cleared:
            changed.update((key, None) for key in watched if begin <= key < end)
        changed.update((key, None) for (key,) in deletes if key in watched)
        changed.update((key, value) for key, value in puts if key in watched)
    return changed


def _execute_read(sql: sqlite3.Connection, args: tuple[Any, ...]) -> Any:
    if args[0] == "get":
        row = sql.execute(_GET, (args[1],)).fetchone()
        return row[0] if row else None
    _, begin, end, limit, reverse = args
    return sql.execute(_range_sql(limit, reverse), (begin, end)).fetchall()


class _WakeChannel:
    """Wake-ups across processes: a latency hint, never relied on.

    A database object whose watcher runs binds a Unix datagram socket in
    ``<database file>-dgenwake/``; each commit sends one byte to every other
    socket there, so their watchers look at once instead of at their next
    poll. A datagram that is lost, refused or never sent only means that
    watcher finds the change when it polls. Sockets left by killed processes
    refuse datagrams; the first sender to meet one removes it.
    """

    def __init__(self, path: Path) -> None:
        self.directory = os.path.abspath(path) + "-dgenwake"
        self.db_path = path
        self.name: str | None = None  # this object's socket, skipped by its own sends
        self.receiver: socket.socket | None = None
        self._sender: socket.socket | None = None
        self._peers: list[str] = []
        self._peers_fd: int | None = None  # keeps the /proc/self/fd prefix of _peers valid
        self._fd_lock = threading.Lock()  # each descriptor is closed once, by its owner
        self._closed = False
        self._refresh_at = 0.0

    def _open(self) -> tuple[str, int | None]:
        """How to address the directory's sockets now. A socket path is
        limited to 107 bytes; Linux reaches a longer directory through a
        descriptor of it, as /proc/self/fd/N (the caller closes it)."""
        if len(self.directory.encode()) + 1 + _WAKE_NAME_MAX <= _SUN_PATH_MAX:
            return self.directory, None
        fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        if not os.path.isdir(f"/proc/self/fd/{fd}"):
            os.close(fd)
            raise OSError(f"{self.directory} is too long for a socket path")
        return f"/proc/self/fd/{fd}", fd

    def bind(self) -> socket.socket | None:
        """This object's receiving socket, or None (the watcher then polls only)."""
        if self.receiver is not None:
            return self.receiver
        name = f"{os.getpid()}-{secrets.token_hex(4)}"
        for _ in range(2):  # a closing process may remove the directory between the steps
            sock = fd = None
            try:
                mode = _wake_mode(os.stat(self.db_path).st_mode)
                try:
                    os.mkdir(self.directory, mode)
                    os.chmod(self.directory, mode)  # mkdir's mode is masked by the umask
                except FileExistsError:
                    pass
                prefix, fd = self._open()
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                sock.setblocking(False)
                sock.bind(f"{prefix}/{name}")
                os.chmod(f"{prefix}/{name}", mode & 0o666)
            except OSError:
                if sock is not None:
                    sock.close()
                continue
            finally:
                if fd is not None:
                    os.close(fd)
            self.name, self.receiver = name, sock
            self._sweep()
            return sock
        return None

    def _sweep(self) -> None:
        """Remove the sockets of processes that died without closing."""
        with (
            contextlib.suppress(OSError),
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as probe,
        ):
            prefix, fd = self._open()
            try:
                for name in os.listdir(self.directory):
                    if name == self.name or not _WAKE_NAME.fullmatch(name):
                        continue
                    try:
                        probe.connect(f"{prefix}/{name}")  # sends nothing
                    except ConnectionRefusedError:
                        os.unlink(f"{prefix}/{name}")
                    except OSError:
                        pass
            finally:
                if fd is not None:
                    os.close(fd)

    def unbind(self) -> None:
        """Close and remove this object's socket, and the directory if it was the last."""
        sock, name = self.receiver, self.name
        self.receiver = self.name = None
        if sock is None or name is None:
            return
        sock.close()
        with contextlib.suppress(OSError):
            prefix, fd = self._open()
            try:
                os.unlink(f"{prefix}/{name}")
            finally:
                if fd is not None:
                    os.close(fd)
        self._sweep()
        with contextlib.suppress(OSError):
            os.rmdir(self.directory)  # fails while live sockets remain

    def notify(self) -> None:
        """Wake every other watcher of this file; called after each writing
        commit (one at a time), so it must be cheap and never block or raise:
        the commit is durable already."""
        with contextlib.suppress(OSError):  # e.g. closed meanwhile by aclose
            self._notify()

    def _notify(self) -> None:
        now = time.monotonic()
        if now >= self._refresh_at:
            self._refresh(now)
        if not self._peers:
            return
        if self._sender is None:
            self._sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._sender.setblocking(False)
        sender = self._sender
        failed = []
        for address in self._peers:
            try:
                sender.sendto(b"\0", address)
            except BlockingIOError:
                pass  # its queue is full: that watcher has wake-ups pending already
            except ConnectionRefusedError:
                # Nobody bound to it: the socket of a killed process.
                with contextlib.suppress(OSError):
                    os.unlink(address)
                failed.append(address)
            except OSError:
                failed.append(address)  # gone, or not ours to write; until the next listing
        if failed:
            self._peers = [address for address in self._peers if address not in failed]

    def _refresh(self, now: float) -> None:
        # Listing every few milliseconds at most keeps the commit path at one
        # clock read when nobody listens, and still finds a new watcher soon.
        self._refresh_at = now + _WAKE_REFRESH
        own, peers, fd = self.name, [], None
        try:
            names = [n for n in os.listdir(self.directory) if n != own and _WAKE_NAME.fullmatch(n)]
            if names:
                prefix, fd = self._open()
                peers = [f"{prefix}/{n}" for n in names]
        except OSError:
            pass
        with self._fd_lock:
            if self._closed:
                old, peers = fd, []
            else:
                old, self._peers_fd = self._peers_fd, fd
        self._peers = peers
        if old is not None:
            os.close(old)

    def close(self) -> None:
        self.unbind()
        if self._sender is not None:
            self._sender.close()
            self._sender = None
        with self._fd_lock:
            fd, self._peers_fd, self._closed = self._peers_fd, None, True
        self._peers = []
        if fd is not None:
            os.close(fd)


def _wake_mode(db_mode: int) -> int:
    """The wake directory's permissions: the owner's, plus the group's and
    others' where they may write the database file too."""
    mode = 0o700
    if db_mode & 0o020:
        mode |= 0o070
    if db_mode & 0o002:
        mode |= 0o007
    return mode


def _drain(sock: socket.socket | None) -> bool:
    """Read every pending datagram; whether there was one."""
    got = False
    while sock is not None:
        try:
            if not sock.recv(64):
                return True  # the other end closed (a poke pair at shutdown)
        except OSError:  # BlockingIOError: empty
            break
        got = True
    return got


def _read_keys(sql: sqlite3.Connection, keys: list[bytes]) -> dict[bytes, bytes | None]:
    values: dict[bytes, bytes | None] = dict.fromkeys(keys)
    for i in range(0, len(keys), _IN_SIZES[-1]):
        chunk = keys[i : i + _IN_SIZES[-1]]
        size = next(n for n in _IN_SIZES if n >= len(chunk))
        chunk += chunk[-1:] * (size - len(chunk))
        query = f"SELECT key, value FROM dgen_kv WHERE key IN ({','.join('?' * size)})"
        values.update(sql.execute(query, chunk).fetchall())
    return values


class _Watcher(threading.Thread):
    """Checks ``PRAGMA data_version`` and reports watched keys' values
    when another connection committed (this object's own commits, told by
    commit version, fire its watches on the loop).

    While watches exist it checks every ``poll_interval``, whenever another
    process's commit sends it a wake-up datagram, and when this object pokes
    it (a new watch that fired at once, or whose key could not be read on
    the loop). Without watches it goes on polling for
    ``_WATCHER_LINGER`` seconds (watches come and go all the time: a call
    arms two), then sleeps (``idle``) until a new watch pokes it.
    """

    def __init__(
        self, db: SQLiteDatabase, loop: asyncio.AbstractEventLoop, wake: _WakeChannel | None
    ) -> None:
        super().__init__(name="dgen-sqlite-watch", daemon=True)
        self.db = db
        self.loop = loop
        self.stopping = False
        self.idle = False  # asleep until poked (set before the last look for watches)
        self._poke_r, self._poke_w = socket.socketpair()
        self._poke_r.setblocking(False)
        self._poke_w.setblocking(False)
        # Bound here, before the watch's transaction returns, so a process
        # told "watching" by this one can already wake it.
        self.wake = wake
        self.wake_socket = wake.bind() if wake is not None else None

    def poke(self) -> None:
        """Make the watcher look now (any thread): it reads the keys handed
        to it (``_fresh``), and every watched key if another connection
        committed since its last look."""
        with contextlib.suppress(OSError):  # full: a poke is pending anyway
            self._poke_w.send(b"\0")

    def run(self) -> None:
        db = self.db
        sql: sqlite3.Connection | None = None
        seen: int | None = None  # data_version at the last look
        seen_version: int | None = None  # the store's commit version then
        idle, watching = selectors.DefaultSelector(), selectors.DefaultSelector()
        idle.register(self._poke_r, selectors.EVENT_READ)
        watching.register(self._poke_r, selectors.EVENT_READ)
        if self.wake_socket is not None:
            watching.register(self.wake_socket, selectors.EVENT_READ)
        unwatched_since: float | None = None
        try:
            while not self.stopping:
                taken: set[bytes] = set()
                forced = _drain(self._poke_r)
                _drain(self.wake_socket)
                if not db._watched_keys:
                    now = time.monotonic()
                    unwatched_since = unwatched_since or now
                    if now - unwatched_since < _WATCHER_LINGER:
                        watching.select(db.poll_interval)
                        continue
                    # Idle first, then the last look: a watch added after
                    # that look finds the flag set and pokes (_add_watch).
                    self.idle = True
                    if not db._watched_keys:
                        idle.select()
                    self.idle = False
                    continue
                unwatched_since = None
                try:
                    if sql is None:
                        sql = sqlite3.connect(
                            db.path, isolation_level=None, timeout=db.busy_timeout
                        )
                    version = sql.execute("PRAGMA data_version").fetchone()[0]
                    if forced or version != seen:
                        changed = version != seen
                        if changed:
                            # (fetchall: no read snapshot left open)
                            now = int(sql.execute(_VERSION).fetchall()[0][0])
                            if seen_version is not None and db._own_commits_only(seen_version, now):
                                # Every commit since the last look was this
                                # object's: they fired its watches on the loop.
                                changed = False
                            seen_version = now
                        generation, fresh = db._take_fresh()
                        taken = fresh
                        # Changed: all of them (fresh too, a counted watch may not
                        # be in _watched_keys yet). Else only watches armed since
                        # the last read: nothing else changed meanwhile, or only
                        # through this object (data_version counts every commit).
                        keys = list(fresh.union(db._watched_keys) if changed else fresh)
                        seen = version
                        if keys:
                            values = _read_keys(sql, keys)
                            self.loop.call_soon_threadsafe(db._deliver, generation, values)
                except sqlite3.Error:
                    # Transient (busy, file replaced): reconnect and treat as changed,
                    # the keys taken for this read included (some may not be in
                    # _watched_keys yet).
                    db._give_fresh(taken)
                    if sql is not None:
                        sql.close()
                    sql, seen, seen_version = None, None, None
                except RuntimeError:
                    break  # the event loop is closed
                watching.select(db.poll_interval)
        finally:
            idle.close()
            watching.close()
            if sql is not None:
                sql.close()
            if self.wake is not None:
                self.wake.unbind()
            self._poke_r.close()
            self._poke_w.close()


class SQLiteDatabase(Database):
    limits = Limits()
    capabilities = Capabilities(durable=True, cross_process=True, watches_cross_process=True)

    def __init__(
        self,
        url: URL,
        path: Path,
        synchronous: str,
        busy_timeout: float,
        poll_interval: float,
        pool_size: int,
        commit: str = "thread",
        wake: str = "socket",
    ) -> None:
        self.url = url
        self.path = path
        self.synchronous = synchronous
        # Commits that cannot fsync run on the loop; with commit=inline, all
        # do (a busy write lock still sends them to the connection's thread).
        self.inline_commits = commit == "inline" or synchronous in ("off", "normal")
        self.busy_timeout = busy_timeout
        self.poll_interval = poll_interval
        self.pool_size = pool_size
        self._idle: list[_Connection] = []
        self._pool_slots = asyncio.Semaphore(pool_size)
        # Commits waiting for the committer task, which writes them as one group
        # on its own connection (outside the pool: queued members hold slots).
        self._pending: list[_Member] = []
        self._committer: asyncio.Future[None] | None = None
        self._last_group = 0  # members of the last group written
        self._writer: _Connection | None = None
        self._writing: asyncio.Future[_Outcomes] | None = None  # the write on its thread
        self._committed_here = False
        self.commit_groups = 0
        """Group commits so far: SQLite transactions that carried 2 or more."""
        self.grouped_commits = 0
        """Transactions committed in those groups."""
        self._watches: dict[bytes, list[tuple[Watch, object, int]]] = {}
        self._watched_keys: frozenset[bytes] = frozenset()
        self._watch_generation = 0
        # Keys of watches armed since the watcher last took them (and the
        # generation then), shared with the watcher thread under the lock.
        self._fresh: set[bytes] = set()
        self._fresh_lock = threading.Lock()
        self._watcher: _Watcher | None = None
        self._checker: sqlite3.Connection | None = None  # reads newly watched keys
        # Version ranges this object committed, newest last, for the watcher
        # to tell them from other connections' commits (_own_commits_only).
        self._own_versions: collections.deque[tuple[int, int]] = collections.deque(maxlen=1024)
        self._unchecked: set[bytes] = set()  # armed this event-loop turn (_check_armed)
        # Unix only: the wake-up sockets live in the file system.
        self._wake = _WakeChannel(path) if wake == "socket" and os.name == "posix" else None
        self._closed = False

    def __repr__(self) -> str:
        return f"<SQLiteDatabase {self.path} synchronous={self.synchronous}>"

    def create_transaction(self) -> SQLiteTransaction:
        if self._closed:
            raise UnavailableError(f"{self!r} is closed")
        return SQLiteTransaction(self)

    async def _acquire(self) -> _Connection:
        await self._pool_slots.acquire()
        if self._idle:
            return self._idle.pop()
        try:
            return await self._open_connection()
        except BaseException:
            self._pool_slots.release()
            raise

    async def _open_connection(self) -> _Connection:
        conn = _Connection(self.path, self.synchronous, self.busy_timeout)
        try:
            await conn.run(lambda sql: None)  # open it on its thread
        except BaseException as exc:
            conn.close()
            if isinstance(exc, sqlite3.Error):
                raise _map_error(exc, self.path) from None
            raise
        return conn

    def _give_back(self, conn: _Connection, broken: bool = False) -> None:
        if broken or self._closed:
            conn.close()
        else:
            self._idle.append(conn)
        self._pool_slots.release()

    def _reclaim(self, conn: _Connection) -> None:
        try:
            sql = conn.open()
            if sql.in_transaction:
                sql.execute("ROLLBACK")
            self._give_back(conn)
        except Exception:
            self._give_back(conn, broken=True)

    # -- commits -----------------------------------------------------------

    def _write_here(self) -> _Connection | None:
        """The writer, if a commit may hand itself to the writer's thread from
        its caller's task: not with inline commits (it runs inline instead),
        nor while commits are concurrent (the last group had several members:
        they group better through the committer), queued, or being written."""
        if self.inline_commits or self._last_group > 1 or not self._writer_idle():
            return None
        return self._writer

    def _writer_idle(self) -> bool:
        """No committer task, nothing queued, no write on the writer's thread."""
        return (
            self._committer is None
            and not self._pending
            and (self._writing is None or self._writing.done())
        )

    def _commit_here(self) -> _Connection | None:
        """The writer, if this commit may run in its caller's task: with inline
        commits, the first commit of a loop iteration does; later ones in the
        same iteration (concurrent producers) queue for the committer, which
        writes them as one group."""
        if not self.inline_commits or self._committed_here or not self._writer_idle():
            return None
        if self._writer is not None:
            self._committed_here = True
            asyncio.get_running_loop().call_soon(self._next_iteration)
        return self._writer

    def _next_iteration(self) -> None:
        self._committed_here = False

    async def _drain(self) -> None:
        """The committer task: commit what queued, group by group, until nothing is left."""
        try:
            while self._pending:
                if self._writing is not None and not self._writing.done():
                    # A write is out (a lone commit's, or a cancelled
                    # committer's): what queues meanwhile goes as one group.
                    await asyncio.wait([self._writing])
                    if not self._pending:
                        break  # all cancelled meanwhile: no empty write
                group, self._pending = self._pending, []
                await self._commit_group(group)
                # One turn for the members just answered: a producer's next
                # commit then joins the next group instead of being written
                # alone ahead of it (groups stay whole).
                await asyncio.sleep(0)
        finally:
            self._committer = None
            # Left only if this task was cancelled (a shutdown cancelling every task?).
            queued, self._pending = self._pending, []
            _fail_all(queued, _cancelled_committer())

    async def _commit_group(self, group: list[_Member]) -> None:
        """Commit the transactions that queued while the previous commit ran,
        in one SQLite transaction and one fsync, in order.

        Each is validated against the data as the members before it left it
        and gets its own commit version, so the order and the conflicts are
        those of committing them one after another; a member that conflicts
        gets its ConflictError and the others commit.
        """
        if self._closed:
            _fail_all(group, UnavailableError(f"{self!r} is closed"))
            return
        on_thread = False
        try:
            if self._writing is not None and not self._writing.done():
                # A cancelled committer's write still runs on the writer's thread.
                await asyncio.wait([self._writing])
            if self._writer is None:
                self._writer = await self._open_connection()
            writer = self._writer
            if self.inline_commits:
                try:
                    outcomes, written = self._write_group(writer.open(), group, False)
                except _Busy:
                    on_thread = True
                    outcomes, written = await self._write_on_thread(writer, group)
            else:
                on_thread = True
                outcomes, written = await self._write_on_thread(writer, group)
        except asyncio.CancelledError:
            if not on_thread:  # (otherwise the write ends for them: _write_on_thread)
                _fail_all(group, _cancelled_committer())
            raise
        except BaseException as exc:  # the members get it (this is a task of its own)
            _fail_all(group, exc)
            return
        self._finish(group, outcomes, written)

    async def _write_on_thread(self, writer: _Connection, group: list[_Member]) -> _Outcomes:
        """Write ``group`` on the writer's thread. Shielded: if the committer is
        cancelled meanwhile the write goes on, and its members get its outcome."""
        write = writer.submit(lambda sql: self._write_group(sql, group, True))
        self._writing = write
        try:
            return await asyncio.shield(write)
        except asyncio.CancelledError:
            if write.done():
                self._finish_write(group, write)
            else:
                write.add_done_callback(functools.partial(self._finish_write, group))
            raise

    def _finish_write(self, group: list[_Member], write: asyncio.Future[_Outcomes]) -> None:
        if write.cancelled():
            # Only a loop shutting down cancels it; the thread may have committed.
            _fail_all(group, CommitUnknownError("the store was shut down during this commit"))
        elif (exc := write.exception()) is not None:
            _fail_all(group, exc)
        else:
            self._finish(group, *write.result())

    def _finish(
        self,
        group: list[_Member],
        outcomes: list[bytes | BaseException],
        written: list[_Written],
    ) -> None:
        self._last_group = len(group)
        if len(group) > 1:
            self.commit_groups += 1
            self.grouped_commits += len(group)
        for m, outcome in zip(group, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                m.fail(outcome)
            elif not m.outcome.done():
                m.outcome.set_result(outcome)
        # Then this process's watches on keys these commits wrote fire, without
        # the watcher thread's hop (after the members: they resume first).
        # Watched as of now, on the loop: a watch armed before this line is
        # seen here, one armed after it reads its key after COMMIT (_add_watch).
        self._deliver_local(_new_values(self._watched_keys, written))

    def _write_group(
        self, sql: sqlite3.Connection, group: list[_Member], may_wait: bool
    ) -> _Outcomes:
        """(connection's thread, or inline) Write ``group`` in one transaction."""
        if sql.in_transaction:
            sql.execute("ROLLBACK")
        try:
            sql.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            if not may_wait and getattr(exc, "sqlite_errorcode", None) in _BUSY:
                raise _Busy from None
            raise _map_error(exc, self.path) from None
        outcomes: list[bytes | BaseException] = []
        written: list[_Written] = []
        try:
            version = int(sql.execute(_VERSION).fetchone()[0])
            first = version + 1
            for m in group:
                if m.conflicts(sql, version):
                    outcomes.append(
                        ConflictError("a key read by this transaction was changed by another")
                    )
                    continue
                version += 1
                stamp = version.to_bytes(8, "big") + b"\x00\x00"
                written.append(_write(sql, m.buf, stamp))
                outcomes.append(stamp)
            sql.execute("UPDATE dgen_meta SET value = ? WHERE name = 'commit_version'", (version,))
        except BaseException as exc:
            if sql.in_transaction:  # (SQLite ends it itself on some errors, e.g. SQLITE_FULL)
                sql.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error) and len(group) > 1:
                # One member's writes failed (too big, ...): commit them one by
                # one so the error reaches that member only.
                return self._write_alone(sql, group)
            if isinstance(exc, sqlite3.Error):
                raise _map_error(exc, self.path) from None
            raise
        try:
            sql.execute("COMMIT")
        except sqlite3.Error as exc:
            if sql.in_transaction:
                sql.execute("ROLLBACK")
            raise _map_error(exc, self.path, committing=True) from None
        if version >= first:
            # After COMMIT only: versions of a group that failed are handed
            # out again, to another process's commit maybe.
            self._own_versions.append((first, version))
        if self._wake is not None:
            self._wake.notify()  # from here: no hop back to the loop before other processes look
        return outcomes, written

    def _own_commits_only(self, after: int, upto: int) -> bool:
        """(watcher thread) Whether commit versions ``after`` (exclusive) to
        ``upto`` exist and were all this object's (their watches fired on
        the loop, so the watcher need not re-read). False when unsure."""
        own = self._own_versions
        while own and own[0][1] <= after:
            own.popleft()  # (only this thread removes; the writer appends)
        need = after + 1
        for first, last in list(own):
            if first > need:
                return False
            need = max(need, last + 1)
            if need > upto:
                return True
        return False

    def _write_alone(self, sql: sqlite3.Connection, group: list[_Member]) -> _Outcomes:
        outcomes: list[bytes | BaseException] = []
        written: list[_Written] = []
        for m in group:
            try:
                (outcome,), more = self._write_group(sql, [m], True)
            except StoreError as exc:
                outcomes.append(exc)
            else:
                outcomes.append(outcome)
                written += more
        return outcomes, written

    # -- watches -----------------------------------------------------------

    def _add_watch(self, watch: Watch, baseline: object) -> None:
        if self._closed:
            # A transaction that read before the close commits after it: its
            # watch would wait for ever (and start a watcher thread anew).
            watch._fail(UnavailableError(f"{self.url} was closed"))
            return
        key = watch.key
        with self._fresh_lock:
            self._watch_generation += 1
            born = self._watch_generation
        # Registered before the key is read: a commit after that read finds
        # the key watched (this process's commits deliver it, the watcher
        # sees other processes' through data_version).
        self._watches.setdefault(key, []).append((watch, baseline, born))
        self._watched_keys = frozenset(self._watches)
        if self._watcher is None or not self._watcher.is_alive():
            self._watcher = _Watcher(self, asyncio.get_running_loop(), self._wake)
            self._watcher.start()
        elif self._watcher.idle:
            self._watcher.poke()  # it sleeps without watches: other processes' commits
        # A commit since the baseline fires it at once: the keys armed in this
        # event-loop turn are read together at its end, on the loop (a WAL
        # reader does not wait for writers), rather than by waking the
        # watcher's thread (that cost a call about 0.1 ms of wake-ups).
        if not self._unchecked:
            asyncio.get_running_loop().call_soon(self._check_armed)
        self._unchecked.add(key)

    def _check_armed(self) -> None:
        """Read the keys armed since the last check; fire the watches whose
        baseline differs (any commit since, of any process)."""
        keys, self._unchecked = list(self._unchecked), set()
        if self._closed:
            return  # (closing failed the watches)
        try:
            if self._checker is None:
                # (not tied to this thread: closing may come from another loop's)
                self._checker = sqlite3.connect(
                    self.path, isolation_level=None, check_same_thread=False
                )
                self._checker.execute("PRAGMA busy_timeout=0")
            # (_read_keys fetches all: no read snapshot stays open to hold
            # back checkpoints.)
            values = _read_keys(self._checker, keys)
        except sqlite3.Error:
            checker, self._checker = self._checker, None
            if checker is not None:
                with contextlib.suppress(sqlite3.Error):
                    checker.close()
            with self._fresh_lock:
                self._fresh.update(keys)
            self._poke_watcher()  # the watcher reads them
            return
        if self._deliver_local(values):
            # Something committed since a baseline, maybe another process,
            # whose writes the watcher has not looked for yet: let it look.
            self._poke_watcher()

    def _take_fresh(self) -> tuple[int, set[bytes]]:
        """(watcher thread) The current watch generation and the keys armed
        since the last call: a watch armed later has a higher generation and
        its key lands in the next set."""
        with self._fresh_lock:
            fresh, self._fresh = self._fresh, set()
            return self._watch_generation, fresh

    def _give_fresh(self, keys: set[bytes]) -> None:
        """(watcher thread) Put back keys taken for a read that failed."""
        with self._fresh_lock:
            self._fresh |= keys

    def _poke_watcher(self) -> None:
        if self._watcher is not None and self._watches:
            self._watcher.poke()

    def _deliver_local(self, changed: dict[bytes, bytes | None]) -> bool:
        """Fire the watches on keys whose value is now ``changed``'s (written
        by a commit of this object, or read after arming); whether any fired."""
        fired = False
        for key, value in changed.items():
            entries = self._watches.get(key)
            if entries is None:
                continue
            keep = []
            for entry in entries:
                watch, baseline, _ = entry
                if watch.done():
                    continue
                if value != baseline:
                    watch._fire(value)
                    fired = True
                else:
                    keep.append(entry)
            if keep:
                self._watches[key] = keep
            else:
                del self._watches[key]
                self._watched_keys = frozenset(self._watches)
        return fired

    def _deliver(self, generation: int, values: dict[bytes, bytes | None]) -> None:
        for key in list(self._watches):
            keep = []
            for watch, baseline, born in self._watches[key]:
                if watch.done():
                    continue
                if born <= generation and key in values and values[key] != baseline:
                    watch._fire(values[key])
                else:
                    keep.append((watch, baseline, born))
            if keep:
                self._watches[key] = keep
            else:
                del self._watches[key]
        self._watched_keys = frozenset(self._watches)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            # Commits already queued end first (their members are waiting).
            for task in (self._committer, self._writing):
                if task is not None and not task.done():
                    await asyncio.wait([task])
        finally:
            await self._close_all()

    async def _close_all(self) -> None:
        checker, self._checker = self._checker, None
        if checker is not None:
            with contextlib.suppress(sqlite3.Error):
                checker.close()
        writer, self._writer = self._writer, None
        if writer is not None:
            if self._writing is not None and not self._writing.done():
                # (aclose was cancelled while a write waits on the thread: do
                # not block the loop on it; close after it)
                self._writing.add_done_callback(lambda _: writer.close())
            else:
                writer.close()
        if self._watcher is not None:
            self._watcher.stopping = True
            self._watcher.poke()
            await asyncio.get_running_loop().run_in_executor(None, self._watcher.join)
        if self._wake is not None:
            self._wake.close()
        for entries in self._watches.values():
            for watch, _, _ in entries:
                watch._fail(UnavailableError(f"{self!r} was closed"))
        self._watches.clear()
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def _path_from_url(url: URL) -> Path:
    if url.host:
        raise URLError(
            f"{url}: SQLite URLs have no host; write sqlite:///relative/path.db "
            "or sqlite:////absolute/path.db"
        )
    raw = url.path[1:] if url.path.startswith("/") else url.path
    if not raw or raw == ":memory:":
        raise URLError(f"{url}: no database file given; for a store in memory use memory://")
    return Path(raw)


def _check_file(path: Path, url: URL) -> None:
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        hint = ""
        if not path.is_absolute():
            hint = (
                f" (sqlite:///{path} is relative to the current directory "
                f"{os.getcwd()}; use four slashes, sqlite:////{path}, for an absolute path)"
            )
        raise UnavailableError(f"directory {directory} does not exist{hint}")
    if path.is_dir():
        raise UnavailableError(f"{path} is a directory, not a database file")
    # Never open the file from Python to check its header: closing any
    # descriptor of it drops every POSIX lock this process holds on it,
    # including those of live SQLite connections (another process may then
    # checkpoint and delete the WAL under them). SQLite reports a foreign
    # file itself (SQLITE_NOTADB), mapped in _map_error.
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        raise UnavailableError(
            f"{path} is not readable and writable by this process; DGen needs write "
            "access to commit (check the file's permissions and owner)"
        )
    if not os.access(directory, os.W_OK | os.X_OK):
        raise UnavailableError(
            f"directory {directory} is not writable; SQLite needs to create {path.name}-wal "
            "and -shm files beside the database"
        )


def _setup_schema(sql: sqlite3.Connection, path: Path) -> None:
    sql.execute("BEGIN IMMEDIATE")
    try:
        tables = {
            row[0] for row in sql.execute("SELECT name FROM sqlite_master WHERE type='table'")
        }
        if tables and "dgen_meta" not in tables:
            raise UnavailableError(
                f"{path} is an SQLite database but not a DGen store (it holds tables "
                f"{', '.join(sorted(tables))}); give DGen a file of its own"
            )
        if "dgen_meta" in tables:
            row = sql.execute("SELECT value FROM dgen_meta WHERE name='schema_version'").fetchone()
            found = int(row[0]) if row else 0
            if found > SCHEMA_VERSION:
                raise UnavailableError(
                    f"{path} was written by a newer DGen (schema {found}, this one knows "
                    f"{SCHEMA_VERSION}); upgrade dgen"
                )
        sql.execute(
            "CREATE TABLE IF NOT EXISTS dgen_kv (key BLOB PRIMARY KEY, value BLOB NOT NULL) "
            "WITHOUT ROWID"
        )
        sql.execute(
            "CREATE TABLE IF NOT EXISTS dgen_meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL)"
        )
        sql.execute(
            "INSERT OR IGNORE INTO dgen_meta VALUES ('schema_version', ?), ('commit_version', 0)",
            (SCHEMA_VERSION,),
        )
        sql.execute("COMMIT")
    except BaseException:
        if sql.in_transaction:
            sql.execute("ROLLBACK")
        raise


def _number(url: URL, name: str, default: float, low: float) -> float:
    raw = url.options.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise URLError(f"option {name}={raw!r} in {url} is not a number") from None
    if value < low:
        raise URLError(f"option {name}={raw!r} in {url} must be at least {low}")
    return value


async def open_database(url: URL) -> SQLiteDatabase:
    """Open (creating if needed) the SQLite store a ``sqlite://`` URL names.

    Options: ``synchronous`` (off, normal, full [default], extra),
    ``busy_timeout`` seconds to wait for another process's write lock (30),
    ``poll_interval`` seconds between cross-process watch checks (0.002),
    ``pool_size`` connections per database (8), ``commit``: ``thread``
    (default) runs a syncing commit on the connection's thread; ``inline``
    runs it on the event loop, which saves a thread hop per commit but
    stalls the loop for the fsync (docs/sqlite.md); ``wake``: ``socket``
    (default) lets commits wake other processes' watchers at once through
    Unix sockets beside the file, ``off`` leaves them to the poll.
    """
    options = url.check_options(_OPTIONS)
    synchronous = options.get("synchronous", "full").lower()
    if synchronous not in _SYNCHRONOUS:
        raise URLError(
            f"option synchronous={synchronous!r} in {url} is not one of {', '.join(_SYNCHRONOUS)}"
        )
    busy_timeout = _number(url, "busy_timeout", 30.0, 0.0)
    poll_interval = _number(url, "poll_interval", 0.002, 0.0001)
    pool_size = int(_number(url, "pool_size", 8, 1))
    commit = options.get("commit", "thread").lower()
    if commit not in _COMMIT_MODES:
        raise URLError(
            f"option commit={commit!r} in {url} is not one of {', '.join(_COMMIT_MODES)}"
        )
    path = _path_from_url(url)
    _check_file(path, url)
    wake = options.get("wake", "socket").lower()
    if wake not in _WAKE_MODES:
        raise URLError(f"option wake={wake!r} in {url} is not one of {', '.join(_WAKE_MODES)}")
    db = SQLiteDatabase(
        url, path, synchronous, busy_timeout, poll_interval, pool_size, commit, wake
    )
    conn = await db._acquire()
    try:
        await conn.run(lambda sql: _setup_schema(sql, path))
    except sqlite3.Error as exc:
        db._give_back(conn, broken=True)
        raise _map_error(exc, path) from None
    except BaseException:
        db._give_back(conn, broken=True)
        raise
    db._give_back(conn)
    return db
