"""SQLite-specific behaviour: URL forms, options and clear errors for bad input."""

from __future__ import annotations

import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import dgen
from dgen.conformance import run_suite, suite
from dgen.store import Transaction

pytestmark = pytest.mark.anyio


async def put(db: dgen.Database, key: bytes, value: bytes) -> None:
    async def body(tr: Transaction) -> None:
        tr.set(key, value)

    await db.run(body)


async def get(db: dgen.Database, key: bytes) -> bytes | None:
    async def body(tr: Transaction) -> bytes | None:
        return await tr.get(key)

    return await db.run(body)


async def test_absolute_and_relative_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with dgen.connect(f"sqlite:///{tmp_path}/abs.db") as db:
        await put(db, b"k", b"v")
    assert (tmp_path / "abs.db").exists()
    monkeypatch.chdir(tmp_path)
    async with dgen.connect("sqlite:///rel.db") as db:
        await put(db, b"k", b"v")
    assert (tmp_path / "rel.db").exists()


async def test_data_survives_reopen(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/x.db"
    async with dgen.connect(url) as db:
        await put(db, b"k", b"v1")
    async with dgen.connect(url) as db:
        assert await get(db, b"k") == b"v1"


async def test_missing_directory_explains_slashes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(dgen.UnavailableError, match="does not exist"):
        await dgen.connect(f"sqlite:///{tmp_path}/nope/x.db")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(dgen.UnavailableError, match="four slashes"):
        await dgen.connect("sqlite:///tmp/x.db")


async def test_not_a_database(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello, this is not SQLite\n" * 10)
    with pytest.raises(dgen.UnavailableError, match="not an SQLite database"):
        await dgen.connect(f"sqlite:///{tmp_path}/notes.txt")


async def test_foreign_sqlite_database(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY)")
    with pytest.raises(dgen.UnavailableError, match=r"not a DGen store.*users"):
        await dgen.connect(f"sqlite:///{path}")


async def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(dgen.UnavailableError, match="is a directory"):
        await dgen.connect(f"sqlite:///{tmp_path}")


@pytest.fixture
def read_only_file(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "ro.db"
    sqlite3.connect(path).close()
    if os.geteuid() == 0:
        # Permission bits do not stop root; the immutable flag does.
        subprocess.run(["chattr", "+i", str(path)], check=True)
        try:
            yield path
        finally:
            subprocess.run(["chattr", "-i", str(path)], check=True)
    else:
        path.chmod(0o444)
        yield path


async def test_read_only_file(read_only_file: Path) -> None:
    with pytest.raises(dgen.UnavailableError, match="not readable and writable"):
        await dgen.connect(f"sqlite:///{read_only_file}")


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("synchronous=sometimes", "not one of off, normal, full, extra"),
        ("busy_timeout=soon", "not a number"),
        ("pool_size=0", "at least 1"),
        ("journal=delete", r"unknown option\(s\) journal"),
        ("commit=later", "commit='later'.* not one of thread, inline"),
    ],
)
async def test_bad_options(tmp_path: Path, query: str, message: str) -> None:
    with pytest.raises(dgen.URLError, match=message):
        await dgen.connect(f"sqlite:///{tmp_path}/x.db?{query}")


@pytest.mark.parametrize("level", ["off", "normal", "full", "extra"])
async def test_synchronous_levels(tmp_path: Path, level: str) -> None:
    async with dgen.connect(f"sqlite:///{tmp_path}/x.db?synchronous={level}") as db:
        await put(db, b"k", level.encode())
        assert await get(db, b"k") == level.encode()
        assert getattr(db, "synchronous", None) == level


def test_inline_commits_pass_the_conformance_suite(tmp_path: Path) -> None:
    # commit=inline fsyncs on the event loop instead of the connection's
    # thread: the same contract (SIGKILL durability included) must hold.
    result = run_suite(f"sqlite:///{tmp_path}/inline.db?commit=inline", out=None)
    assert result.ok, result.failed
    assert sorted(result.passed) == sorted(suite.__all__)  # nothing skipped


async def test_no_file_given() -> None:
    with pytest.raises(dgen.URLError, match="memory://"):
        await dgen.connect("sqlite://")


async def test_two_connections_conflict_and_retry(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/x.db"
    async with dgen.connect(url) as a, dgen.connect(url) as b:
        await put(a, b"n", b"0")
        tr1, tr2 = a.create_transaction(), b.create_transaction()
        v1, v2 = await tr1.get(b"n"), await tr2.get(b"n")
        assert v1 == v2 == b"0"
        tr1.set(b"n", b"1")
        tr2.set(b"n", b"1")
        await tr1.commit()
        with pytest.raises(dgen.ConflictError):
            await tr2.commit()
        assert await get(b, b"n") == b"1"


async def test_unrelated_writes_do_not_conflict(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/x.db"
    async with dgen.connect(url) as a, dgen.connect(url) as b:
        tr1, tr2 = a.create_transaction(), b.create_transaction()
        assert await tr1.get(b"x") is None
        assert await tr2.get(b"y") is None
        tr1.set(b"x", b"1")
        tr2.set(b"y", b"1")
        await tr1.commit()
        await tr2.commit()  # its reads are unchanged, so it commits
        assert (await get(a, b"x"), await get(a, b"y")) == (b"1", b"1")
