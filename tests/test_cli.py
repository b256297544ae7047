"""The ``dgen`` command, run as a real subprocess (``sys.executable -m dgen``)
against stores another process can open: every backend in BACKENDS with
``Capabilities.cross_process`` (SQLite files; PostgreSQL once listed)."""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import socket
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import dgen
from dgen import admin
from dgen.store import Database

pytestmark = pytest.mark.anyio

WAIT = 60.0  # hang guard only
ROOT = Path(__file__).resolve().parent.parent


async def run_dgen(*args: str, cwd: Path | None = None) -> tuple[int, str, str]:
    """``python -m dgen ARGS``: (exit status, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "dgen",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "DGEN_DEBUG": ""},
        cwd=cwd,
    )
    async with asyncio.timeout(120):  # hang guard
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def ok(*args: str, cwd: Path | None = None) -> str:
    code, out, err = await run_dgen(*args, cwd=cwd)
    assert code == 0, f"dgen {' '.join(args)} exited {code}: {err}"
    assert "Traceback" not in err
    return out


def rows(table: str) -> list[list[str]]:
    """A table's lines split on runs of two or more spaces (header first)."""
    import re

    return [re.split(r"\s{2,}", line.strip()) for line in table.strip().splitlines()]


@pytest.fixture
async def url(store_url: str) -> str:
    async with dgen.connect(store_url) as database:
        if not database.capabilities.cross_process:
            pytest.skip(f"{store_url.split(':')[0]} cannot be shared between OS processes")
    return store_url


@pytest.fixture
async def db(url: str) -> AsyncIterator[Database]:
    async with dgen.connect(url) as database:
        yield database


class Shop(dgen.DGenServer):
    """A list of items; ``"poison..."`` fails (dead-lettered at once)."""

    max_attempts = 1

    def init(self, arg: Any) -> Any:
        return {"items": [], "owner": "ada"}

    def handle_cast(self, message: Any, state: Any) -> Any:
        if isinstance(message, str) and message.startswith("poison"):
            raise ValueError(f"cannot handle {message}")
        state["items"].append(message)
        return dgen.NoReply(state)

    def handle_call(self, request: Any, caller: dgen.Caller, state: Any) -> Any:
        return dgen.Reply(state, state)


async def populate(db: Database) -> dict[str, list[str]]:
    """orders: state, two dead letters, two queued messages; idle: one queued
    message and no state."""
    async with dgen.start(Shop(), db, "orders") as running:
        dead = await running.cast_many(["apple", "poison-1", "pear", "poison-2"])
        await running.call("get", timeout=WAIT)
    queued = await dgen.handle(db, "orders").cast_many(["plum", {"sku": 7}])
    idle = await dgen.handle(db, "idle").cast_many(["hello"])
    return {"dead": [dead[1], dead[3]], "queued": queued, "idle": idle}


# -- help -----------------------------------------------------------------------------------

COMMANDS = [
    [],
    ["tenants"],
    ["inspect"],
    ["queue"],
    ["queue", "list"],
    ["queue", "delete"],
    ["dead-letters"],
    ["dead-letters", "list"],
    ["dead-letters", "retry"],
    ["dead-letters", "purge"],
    ["conformance"],
    ["demo"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "dgen")
async def test_every_subcommand_has_help(command: list[str]) -> None:
    out = await ok(*command, "--help")
    assert out.startswith("usage: ")
    if command and command != ["demo"]:
        assert f"dgen {' '.join(command)}" in out.splitlines()[0]
    if command[:1] not in (["demo"],):
        assert "exit status: 0 ok, 1 not found or failed, 2 usage error" in " ".join(out.split())


def test_the_console_script_is_declared() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '[project.scripts]\ndgen = "dgen.cli:main"' in pyproject


# -- reading --------------------------------------------------------------------------------


async def test_tenants_table_and_json(url: str, db: Database) -> None:
    await populate(db)
    table = rows(await ok("tenants", url))
    assert table == [
        ["TENANT", "QUEUED", "LOCK", "DEAD LETTERS", "STATE"],
        ["idle", "1", "-", "0", "no"],
        ["orders", "2", "-", "2", "yes"],
    ]
    data = json.loads(await ok("tenants", url, "--json"))
    assert data == [
        {
            "tenant": "idle",
            "has_state": False,
            "queue_length": 1,
            "locked": False,
            "lock_expired": False,
            "dead_letters": 0,
        },
        {
            "tenant": "orders",
            "has_state": True,
            "queue_length": 2,
            "locked": False,
            "lock_expired": False,
            "dead_letters": 2,
        },
    ]


async def test_inspect_table_json_and_full_state(url: str, db: Database) -> None:
    ids = await populate(db)
    text = await ok("inspect", url, "orders")
    assert "state         dict with 2 key(s) ('items', 'owner')" in text
    assert "queue         2 message(s)" in text
    assert f"head          {ids['queued'][0]} cast 'plum'" in text
    assert "lock          -" in text
    assert "dead letters  2" in text
    assert f"{ids['dead'][0]} cast after 1 attempt(s): ValueError: cannot handle poison-1" in text
    assert "'apple'" not in text  # the full state only with --full
    full = await ok("inspect", url, "orders", "--full")
    assert "{'items': ['apple', 'pear'], 'owner': 'ada'}" in full
    data = json.loads(await ok("inspect", url, "orders", "--json", "--full"))
    assert data["state"] == {"items": ["apple", "pear"], "owner": "ada"}
    assert data["queue_length"] == 2
    assert data["head"]["id"] == ids["queued"][0]
    assert data["lock"] is None
    assert [d["id"] for d in data["dead_letters"]] == ids["dead"]
    assert "state" not in json.loads(await ok("inspect", url, "orders", "--json"))
    idle = json.loads(await ok("inspect", url, "idle", "--json"))
    assert (idle["has_state"], idle["queue_length"]) == (False, 1)


async def test_import_decodes_the_dataclasses_of_a_module(
    url: str, db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"cli_items_{uuid.uuid4().hex}"
    (tmp_path / f"{name}.py").write_text(
        "from dataclasses import dataclass\n\n@dataclass\nclass Item:\n    sku: int\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    item = importlib.import_module(name).Item
    await dgen.handle(db, "dc").cast(item(7))
    (plain,) = json.loads(await ok("queue", "list", url, "dc", "--json", cwd=tmp_path))
    assert plain["message"] is None and f"module '{name}' is not imported" in plain["decode_error"]
    out = await ok("queue", "list", url, "dc", "--json", "--import", name, cwd=tmp_path)
    assert json.loads(out)[0]["message"] == {"sku": 7}
    table = await ok("queue", "list", url, "dc", "--import", name, cwd=tmp_path)
    assert "Item(sku=7)" in table
    code, _, err = await run_dgen("queue", "list", url, "dc", "--import", "no_such_module_x")
    assert code == 2 and "--import no_such_module_x: ModuleNotFoundError" in err


class Gate(dgen.DGenServer):
    """Every cast locks; ``handle_locked`` waits for ``release``."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    def init(self, arg: Any) -> Any:
        return []

    def handle_cast(self, message: Any, state: Any) -> Any:
        return dgen.Lock([*state, message])

    async def handle_locked(self, kind: str, message: Any, state: Any) -> Any:
        self.entered.set()
        await self.release.wait()
        return dgen.NoReply([*state, f"locked {message}"])

    def handle_call(self, request: Any, caller: dgen.Caller, state: Any) -> Any:
        return dgen.Reply(state, state)


async def test_reading_a_locked_tenant_shows_the_holder_and_does_not_stop_it(
    url: str, db: Database
) -> None:
    gate = Gate()
    async with dgen.start(gate, db, "locked", lease=60) as running:
        message_id = await running.cast("job")
        await asyncio.wait_for(gate.entered.wait(), WAIT)
        await running.cast("next")
        assert rows(await ok("tenants", url))[1] == ["locked", "1", "locked", "0", "yes"]
        text = await ok("inspect", url, "locked")
        holder = f"{socket.gethostname()}:{os.getpid()}"
        assert f"lock          held by {holder} for message {message_id} (cast)" in text
        data = json.loads(await ok("inspect", url, "locked", "--json"))
        assert data["lock"]["holder"] == holder
        assert data["lock"]["expired"] is False and data["lock"]["age"] >= 0
        assert [
            m["message"] for m in json.loads(await ok("queue", "list", url, "locked", "--json"))
        ] == ["next"]
        gate.release.set()
        state = await running.call("get", timeout=WAIT)
        # "next" locked again: wait for that lock too, then it is all committed.
        assert state[:2] == ["job", "locked job"]


async def test_queue_list_table_and_json(url: str, db: Database) -> None:
    ids = await populate(db)
    table = rows(await ok("queue", "list", url, "orders"))
    assert table[0] == ["ID", "KIND", "SIZE", "ATTEMPTS", "CALLER", "MESSAGE"]
    assert [(r[0], r[1], r[3], r[4], r[5]) for r in table[1:]] == [
        (ids["queued"][0], "cast", "0", "-", "'plum'"),
        (ids["queued"][1], "cast", "0", "-", "{'sku': 7}"),
    ]
    data = json.loads(await ok("queue", "list", url, "orders", "--json"))
    assert [(m["id"], m["message"]) for m in data] == [
        (ids["queued"][0], "plum"),
        (ids["queued"][1], {"sku": 7}),
    ]
    limited = json.loads(await ok("queue", "list", url, "orders", "--json", "--limit", "1"))
    assert [m["id"] for m in limited] == ids["queued"][:1]


async def test_queue_delete_removes_one_message_and_its_caller_gets_an_error(
    url: str, db: Database
) -> None:
    ids = await populate(db)
    handle = dgen.handle(db, "orders")
    caller = asyncio.ensure_future(handle.call("wanted", timeout=WAIT))
    async with asyncio.timeout(WAIT):
        while len(queued := await admin.list_queue(db, "orders")) < 3:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    call_id = queued[2].id
    listing = rows(await ok("queue", "list", url, "orders"))
    assert listing[3][:2] == [call_id, "call"] and listing[3][4] == "waiting"
    out = await ok("queue", "delete", url, "orders", call_id)
    assert out.strip() == (
        f"deleted call message {call_id}: 'wanted' (its waiting caller gets MessageDeletedError)"
    )
    with pytest.raises(dgen.MessageDeletedError, match="deleted by an operator"):
        await caller
    data = json.loads(await ok("queue", "delete", url, "orders", ids["queued"][0], "--json"))
    assert data["deleted"]["id"] == ids["queued"][0]
    assert data["deleted"]["message"] == "plum"
    assert [m.id for m in await admin.list_queue(db, "orders")] == ids["queued"][1:]


async def test_dead_letters_list_retry_and_purge(url: str, db: Database) -> None:
    ids = await populate(db)
    first, second = ids["dead"]
    table = rows(await ok("dead-letters", "list", url, "orders"))
    assert table[0] == ["ID", "KIND", "ATTEMPTS", "DEAD SINCE", "ERROR", "MESSAGE"]
    assert [(r[0], r[2], r[4], r[5]) for r in table[1:]] == [
        (first, "1", "ValueError: cannot handle poison-1", "'poison-1'"),
        (second, "1", "ValueError: cannot handle poison-2", "'poison-2'"),
    ]
    with_tb = await ok("dead-letters", "list", url, "orders", "--traceback")
    assert f"--- {first} ---" in with_tb and "raise ValueError" in with_tb
    data = json.loads(await ok("dead-letters", "list", url, "orders", "--json"))
    assert [(d["id"], d["message"], d["error"]["type"]) for d in data] == [
        (first, "poison-1", "ValueError"),
        (second, "poison-2", "ValueError"),
    ]
    assert "cannot handle poison-2" in data[1]["error"]["traceback"]

    out = await ok("dead-letters", "retry", url, "orders", second)
    assert out.strip() == f"retried {second} (back at the head of the queue)"
    queue = json.loads(await ok("queue", "list", url, "orders", "--json"))
    assert [m["id"] for m in queue] == [second, *ids["queued"]]  # at the head
    assert [d.id for d in await admin.list_dead_letters(db, "orders")] == [first]

    assert json.loads(await ok("dead-letters", "purge", url, "orders", "--all", "--json")) == {
        "purged": [first]
    }
    assert await admin.list_dead_letters(db, "orders") == []
    assert (await ok("dead-letters", "purge", url, "orders", "--all")).strip() == (
        "tenant 'orders' has no dead letters; nothing purged"
    )
    assert len(await admin.list_queue(db, "orders")) == 3  # purge touched no queued message


# -- conformance and demo -------------------------------------------------------------------


async def test_conformance_shows_progress_and_exits_zero(url: str) -> None:
    selection = "test_point_reads_and_writes or test_atomic_add"
    out = await ok("conformance", url, "-k", selection)
    assert "[1/2] PASS  test_" in out and "[2/2] PASS  test_" in out
    assert "2 passed, 0 failed, 0 skipped" in out
    code, out, err = await run_dgen("conformance", url, "-k", selection, "--json")
    assert code == 0, err
    data = json.loads(out)
    assert sorted(data["passed"]) == ["test_atomic_add", "test_point_reads_and_writes"]
    assert data["ok"] is True and data["failed"] == {}
    assert "[2/2] PASS" in err  # progress goes to stderr with --json


async def test_conformance_failure_is_exit_one(url: str) -> None:
    code, _, err = await run_dgen("conformance", url, "-k", "no_such_test_anywhere")
    assert code == 1
    assert "no conformance tests ran" in err
    assert "Traceback" not in err


async def test_demo_runs() -> None:
    code, out, err = await run_dgen("demo", "--casts", "30", "--kill-at", "10", "--more", "5")
    assert code == 0, err
    assert "nothing lost, nothing applied twice" in out


# -- bad input ----------------------------------------------------------------------------


async def test_bad_input_gives_one_clear_line_and_a_nonzero_exit(
    url: str, db: Database, tmp_path: Path
) -> None:
    ids = await populate(db)
    unknown_id = "00" * 12
    cases: list[tuple[list[str], int, str]] = [
        (["inspect", url, "nobody"], 1, "no tenant 'nobody' in this store"),
        (["queue", "list", url, "nobody"], 1, "no tenant 'nobody'"),
        (["dead-letters", "list", url, "nobody"], 1, "no tenant 'nobody'"),
        (["queue", "delete", url, "orders", unknown_id], 1, f"no queued message {unknown_id}"),
        (["queue", "delete", url, "orders", ids["dead"][0]], 1, "no queued message"),
        (["dead-letters", "retry", url, "orders", unknown_id], 1, f"no dead letter {unknown_id}"),
        (["dead-letters", "purge", url, "orders", ids["queued"][0]], 1, "no dead letter"),
        (["queue", "delete", url, "orders", "not-an-id"], 2, "not a message id: 'not-an-id'"),
        (["dead-letters", "retry", url, "orders"], 2, "name the dead letters by MESSAGE_ID"),
        (["tenants", "not a url"], 2, "not a backend URL"),
        (["tenants", "nosuch://x"], 2, "no DGen backend for scheme 'nosuch'"),
        (["tenants", "memory://x"], 2, "memory:// stores live inside one process"),
        (["tenants", f"sqlite:///{tmp_path}/missing.db"], 3, "no SQLite database at"),
        (["tenants", "postgresql://dgen@127.0.0.1:1/none"], 3, "unavailable"),
        (["conformance", "not a url"], 2, "not a backend URL"),
    ]
    for args, expected, text in cases:
        code, out, err = await run_dgen(*args)
        assert (code, out) == (expected, ""), (args, code, out, err)
        assert err.startswith("dgen: ") and text in err, (args, err)
        assert len(err.strip().splitlines()) == 1, (args, err)
        assert "Traceback" not in err
    # The store is exactly as before: bad input changed nothing.
    assert [m.id for m in await admin.list_queue(db, "orders")] == ids["queued"]
    assert not (tmp_path / "missing.db").exists()


async def test_usage_errors_exit_two(url: str) -> None:
    for args in (
        ["nope"],
        ["queue"],
        ["inspect", url],
        ["queue", "list", url, "t", "--limit", "x"],
    ):
        code, _, err = await run_dgen(*args)
        assert code == 2, (args, code, err)
        assert "usage: dgen" in err and "Traceback" not in err
