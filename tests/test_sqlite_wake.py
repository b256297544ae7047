"""SQLite wake-up sockets: a commit in one OS process wakes the watchers of
the others at once; the poll stays the fallback.

Every URL here that tests a wake-up has ``poll_interval=60``: the poll alone
would notice another process's commit only after a minute, so a watch that
fires within the 20 s hang guard was woken by the socket. No assertion is
about time.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

import dgen
from dgen.store import Transaction

pytestmark = pytest.mark.anyio

GUARD = 20.0  # seconds: a hang guard, never a measurement
DEAF = "poll_interval=60"


async def arm_settled(db: dgen.Database, url: str, key: bytes) -> dgen.Watch:
    """A watch on ``key`` that only a change made after this returns can fire.

    A second watch in the same transaction has a baseline that is already
    stale (another database object changed it after this transaction read
    it), so it fires at the watcher thread's first look, which covers ``key``
    too. From then on only a wake-up (or the 60 s poll) can notice a change:
    a watch cannot fire merely because its watcher started after the change.
    """
    tr = db.create_transaction()
    marker = b"marker-" + key
    old = await tr.get(marker)
    async with dgen.connect(url.split("?")[0] + "?wake=off") as aux:
        other = aux.create_transaction()
        other.set(marker, (old or b"") + b"+")
        await other.commit()
    watch = tr.watch(key)
    settled = tr.watch(marker)
    await tr.commit()
    await asyncio.wait_for(settled, GUARD)
    return watch


async def child_main(url: str, role: str, key_text: str, guard: str) -> None:
    """A child process's part. Roles: watch (arm a settled watch on the key,
    report whether it fired within ``guard`` seconds), write (set the key
    once), echo (copy every new value of "ping" to "pong" until "stop")."""
    key = key_text.encode()
    async with dgen.connect(url) as db:
        if role == "watch":
            watch = await arm_settled(db, url, key)
            print("armed", flush=True)
            try:
                await asyncio.wait_for(watch, float(guard))
                print("fired", flush=True)
            except TimeoutError:
                print("not fired", flush=True)
        elif role == "write":
            tr = db.create_transaction()
            tr.set(key, b"written")
            await tr.commit()
            print("written", flush=True)
        elif role == "echo":
            while True:
                tr = db.create_transaction()
                ping = await tr.get(b"ping")
                if ping == b"stop":
                    break
                if ping is not None and await tr.get(b"pong") != ping:
                    tr.set(b"pong", ping)
                watch = tr.watch(b"ping")
                await tr.commit()
                print("armed", flush=True)
                await watch


CHILD = (
    "import asyncio, sys; sys.path.insert(0, sys.argv[1]); import test_sqlite_wake as t; "
    "asyncio.run(t.child_main(*sys.argv[2:]))"
)


class Child:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def line(self) -> str:
        assert self.proc.stdout is not None
        raw = await asyncio.wait_for(self.proc.stdout.readline(), GUARD + 10)
        if not raw:
            assert self.proc.stderr is not None
            err = await self.proc.stderr.read()
            raise AssertionError(f"child exited without a line: {err.decode()}")
        return raw.decode().strip()


@asynccontextmanager
async def child(url: str, role: str, key: str = "k", guard: float = GUARD) -> AsyncIterator[Child]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CHILD,
        str(Path(__file__).parent),
        url,
        role,
        key,
        str(guard),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        yield Child(proc)
        await asyncio.wait_for(proc.wait(), GUARD)  # each role ends by itself
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def put(db: dgen.Database, key: bytes, value: bytes) -> None:
    async def body(tr: Transaction) -> None:
        tr.set(key, value)

    await db.run(body)


async def arm(db: dgen.Database, key: bytes) -> dgen.Watch:
    tr = db.create_transaction()
    watch = tr.watch(key)
    await tr.commit()
    return watch


def wake_dir(db_file: Path) -> Path:
    return db_file.with_name(db_file.name + "-dgenwake")


def sockets(db_file: Path) -> list[str]:
    try:
        return sorted(os.listdir(wake_dir(db_file)))
    except FileNotFoundError:
        return []


async def test_commit_in_this_process_wakes_a_watch_in_another(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'w.db'}?{DEAF}"
    async with dgen.connect(url) as db:
        await put(db, b"setup", b"")  # the file exists before the child opens it
        async with child(url, "watch") as watcher:
            assert await watcher.line() == "armed"
            assert len(sockets(tmp_path / "w.db")) == 1  # the child's
            await put(db, b"k", b"new")
            assert await watcher.line() == "fired"


async def test_commit_in_another_process_wakes_a_watch_here(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'w.db'}?{DEAF}"
    async with dgen.connect(url) as db:
        watch = await arm_settled(db, url, b"k")
        async with child(url, "write") as writer:
            assert await writer.line() == "written"
        await asyncio.wait_for(watch, GUARD)


async def test_ping_pong_between_processes_is_woken_every_time(tmp_path: Path) -> None:
    """Twenty round trips, each needing a wake-up in both directions (as a
    call across processes does)."""
    url = f"sqlite:///{tmp_path / 'w.db'}?{DEAF}"
    async with dgen.connect(url) as db:
        await arm(db, b"unused")  # binds this process's socket before the child starts
        async with child(url, "echo") as echo:
            assert await echo.line() == "armed"
            for i in range(20):
                value = str(i).encode()
                tr = db.create_transaction()
                tr.set(b"ping", value)
                pong = tr.watch(b"pong")
                await tr.commit()
                await asyncio.wait_for(pong, GUARD)

                async def read(tr: Transaction) -> bytes | None:
                    return await tr.get(b"pong")

                assert await db.run(read) == value
            await put(db, b"ping", b"stop")
            await asyncio.wait_for(echo.proc.wait(), GUARD)
            assert echo.proc.returncode == 0


async def test_long_directory_is_reached_through_a_descriptor(tmp_path: Path) -> None:
    # A socket path holds at most 107 bytes; this one would need more.
    directory = tmp_path / ("d" * 110)
    directory.mkdir()
    db_file = directory / "w.db"
    assert len(str(wake_dir(db_file))) > 108
    url = f"sqlite:///{db_file}?{DEAF}"
    async with dgen.connect(url) as db:
        await put(db, b"setup", b"")
        async with child(url, "watch") as watcher:
            assert await watcher.line() == "armed"
            assert len(sockets(db_file)) == 1
            await put(db, b"k", b"new")
            assert await watcher.line() == "fired"


async def test_socket_of_a_killed_process_is_removed(tmp_path: Path) -> None:
    """A SIGKILLed watcher leaves its socket; the next commit (in a process
    with no socket of its own, so no sweep of its own) removes it, and still
    wakes the live watcher (this process)."""
    db_file = tmp_path / "w.db"
    url = f"sqlite:///{db_file}?{DEAF}"
    async with dgen.connect(url) as db:
        watch = await arm_settled(db, url, b"k")
        (live,) = sockets(db_file)
        async with child(url, "watch", key="other") as doomed:
            assert await doomed.line() == "armed"
            (stale,) = set(sockets(db_file)) - {live}
            doomed.proc.send_signal(signal.SIGKILL)
            await doomed.proc.wait()
        assert sockets(db_file) == sorted([live, stale])  # SIGKILL left one behind
        async with child(url, "write") as writer:
            assert await writer.line() == "written"  # committed although one socket refuses
        await asyncio.wait_for(watch, GUARD)  # the live one was still woken
        assert sockets(db_file) == [live]
    assert not wake_dir(db_file).exists()  # the last to close removes it


async def test_watcher_starting_removes_sockets_of_killed_processes(tmp_path: Path) -> None:
    db_file = tmp_path / "w.db"
    url = f"sqlite:///{db_file}?{DEAF}"
    async with dgen.connect(url) as db:
        await put(db, b"setup", b"")
        async with child(url, "watch") as doomed:
            assert await doomed.line() == "armed"
            (stale,) = sockets(db_file)
            doomed.proc.send_signal(signal.SIGKILL)
            await doomed.proc.wait()
        watch = await arm(db, b"k")
        assert stale not in sockets(db_file)
        assert len(sockets(db_file)) == 1  # this process's own
        watch.cancel()


async def test_sockets_and_directory_are_removed_on_close(tmp_path: Path) -> None:
    db_file = tmp_path / "w.db"
    async with dgen.connect(f"sqlite:///{db_file}") as db:
        await arm(db, b"k")
        (name,) = sockets(db_file)
        path = wake_dir(db_file) / name
        assert stat.S_ISSOCK(path.stat().st_mode)
        # Only the owner may use it, as only the owner may write the database.
        assert stat.S_IMODE(wake_dir(db_file).stat().st_mode) == 0o700
        async with dgen.connect(f"sqlite:///{db_file}") as other:
            await arm(other, b"k")
            assert len(sockets(db_file)) == 2
        assert sockets(db_file) == [name]
    assert not wake_dir(db_file).exists()


async def test_wake_directory_follows_a_group_writable_database(tmp_path: Path) -> None:
    db_file = tmp_path / "w.db"
    async with dgen.connect(f"sqlite:///{db_file}") as db:
        await put(db, b"setup", b"")
    db_file.chmod(0o664)
    async with dgen.connect(f"sqlite:///{db_file}") as db:
        await arm(db, b"k")
        assert stat.S_IMODE(wake_dir(db_file).stat().st_mode) == 0o770
        (name,) = sockets(db_file)
        assert stat.S_IMODE((wake_dir(db_file) / name).stat().st_mode) == 0o660


def _block_with_file(db_file: Path) -> None:
    wake_dir(db_file).write_text("not a directory")


def _block_with_read_only_directory(db_file: Path) -> None:
    wake_dir(db_file).mkdir()
    if os.geteuid() == 0:  # permission bits do not stop root; the immutable flag does
        subprocess.run(["chattr", "+i", str(wake_dir(db_file))], check=True)
    else:
        wake_dir(db_file).chmod(0o500)


def _unblock(db_file: Path) -> None:
    if wake_dir(db_file).is_dir() and os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(wake_dir(db_file))], check=True)
    elif wake_dir(db_file).is_dir():
        wake_dir(db_file).chmod(0o700)


@pytest.mark.parametrize("block", [_block_with_file, _block_with_read_only_directory])
async def test_unusable_wake_directory_falls_back_to_polling(tmp_path: Path, block: object) -> None:
    """Control: where no socket can be bound, watches across processes still
    fire, found by the poll (short here), and commits still succeed."""
    db_file = tmp_path / "w.db"
    url = f"sqlite:///{db_file}?poll_interval=0.05"
    async with dgen.connect(url) as db:
        await put(db, b"setup", b"")
        assert callable(block)
        block(db_file)
        try:
            async with child(url, "watch") as watcher:
                assert await watcher.line() == "armed"
                assert not wake_dir(db_file).is_dir() or sockets(db_file) == []
                await put(db, b"k", b"new")
                assert await watcher.line() == "fired"
            watch = await arm_settled(db, url, b"k2")
            async with child(url, "write", key="k2") as writer:
                assert await writer.line() == "written"
            await asyncio.wait_for(watch, GUARD)
        finally:
            _unblock(db_file)


async def test_wake_off_binds_nothing(tmp_path: Path) -> None:
    """wake=off: no directory, no socket; with a long poll the child's watch
    does not fire within its (short) wait, the control for the tests above."""
    db_file = tmp_path / "w.db"
    url = f"sqlite:///{db_file}?{DEAF}&wake=off"
    async with dgen.connect(url) as db:
        await put(db, b"setup", b"")
        async with child(url, "watch", guard=1.0) as watcher:
            assert await watcher.line() == "armed"
            await put(db, b"k", b"new")
            assert await watcher.line() == "not fired"
    assert not wake_dir(db_file).exists()


async def test_bad_wake_option(tmp_path: Path) -> None:
    with pytest.raises(dgen.URLError, match=r"wake='sometimes'.* not one of socket, off"):
        await dgen.connect(f"sqlite:///{tmp_path}/x.db?wake=sometimes")


async def test_a_foreign_datagram_is_only_a_wake_up(tmp_path: Path) -> None:
    """Anything written to a watcher's socket makes it look, nothing more: a
    watch on an unchanged key does not fire; one on a changed key does."""
    db_file = tmp_path / "w.db"
    url = f"sqlite:///{db_file}?{DEAF}"
    async with dgen.connect(url) as db:
        unchanged = await arm(db, b"same")
        changed = await arm_settled(db, url, b"k")
        async with dgen.connect(url + "&wake=off") as writer:  # sends no wake-up itself
            await put(writer, b"k", b"new")
        (name,) = sockets(db_file)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(b"anything at all", str(wake_dir(db_file) / name))
        await asyncio.wait_for(changed, GUARD)
        assert not unchanged.done()
        unchanged.cancel()
