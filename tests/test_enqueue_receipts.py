"""A cast whose commit outcome is unknown is retried safely: queued exactly once.

The store is the real memory backend with a fault injected at commit: the
commit either applies and then reports CommitUnknownError (a lost
acknowledgement) or reports it without applying (a lost request).
"""

from __future__ import annotations

import sys

import pytest

import dgen
from dgen import admin
from dgen.backends.memory import MemoryDatabase, MemoryStore, MemoryTransaction
from dgen.queue import TenantKeys
from dgen.store import CommitUnknownError, Transaction

pytestmark = pytest.mark.anyio


class FlakyTransaction(MemoryTransaction):
    def __init__(self, db: FlakyDatabase) -> None:
        super().__init__(db)
        self.faults = db.faults

    async def commit(self) -> None:
        if self.faults:
            fault = self.faults.pop(0)
            if fault == "applied":
                await super().commit()
            else:
                await self.rollback()
            raise CommitUnknownError(f"injected: commit {fault}, outcome unknown")
        await super().commit()


class FlakyDatabase(MemoryDatabase):
    def __init__(self, faults: list[str]) -> None:
        super().__init__(dgen.URL.parse("memory://flaky"), MemoryStore())
        self.faults = faults

    def create_transaction(self) -> FlakyTransaction:
        return FlakyTransaction(self)


@pytest.mark.parametrize(
    "faults", [["applied"], ["lost"], ["lost", "applied"], ["applied", "lost"], []]
)
async def test_cast_is_queued_exactly_once(faults: list[str]) -> None:
    db = FlakyDatabase(list(faults))
    handle = dgen.handle(db, "t")
    ids = await handle.cast_many(["a", "b"])
    assert not db.faults  # every injected fault was hit
    queued = await admin.list_queue(db, "t")
    assert [(m.id, m.message) for m in queued] == list(zip(ids, ["a", "b"], strict=True))


async def test_too_many_unknown_outcomes_reach_the_producer() -> None:
    db = FlakyDatabase(["lost"] * 10)
    with pytest.raises(CommitUnknownError, match="injected"):
        await dgen.handle(db, "t").cast("a")


async def test_consumers_clear_expired_receipts(monkeypatch: pytest.MonkeyPatch) -> None:
    db = FlakyDatabase([])
    keys = TenantKeys("t")

    async def receipts(tr: Transaction) -> int:
        return len(await tr.get_range(keys.receipts_begin, keys.receipts_before(2**40)))

    class Echo(dgen.DGenServer):
        def init(self, arg: object) -> int:
            return 0

        def handle_cast(self, message: object, state: int) -> dgen.NoReply:
            return dgen.NoReply(state + 1)

        def handle_call(self, request: object, caller: dgen.Caller, state: int) -> dgen.Reply:
            return dgen.Reply(state, state)

    await dgen.handle(db, "t").cast("x")
    assert await db.run(receipts) == 1
    # dgen.handle is also a function name; take the module itself.
    monkeypatch.setattr(sys.modules["dgen.handle"], "_RECEIPT_SECONDS", -5)  # already expired
    await dgen.handle(db, "t").cast("y")
    async with dgen.start(Echo(), db, "t") as server:
        assert await server.call("get") == 2
    assert await db.run(receipts) == 1  # the expired one is gone, the live one stays


def test_receipt_key_is_the_tuple_encoding() -> None:
    """The receipt key is built without re-packing the tenant prefix; it must
    be byte for byte what the tuple layer gives, placeholder offset included."""
    from dgen.keys import Versionstamp, pack_with_versionstamp
    from dgen.queue import TenantKeys

    keys = TenantKeys("tenant-é")
    for expires in (0, 1, 255, 256, 1_800_000_000, 2**40):
        for token in (b"", b"\x00", b"\x00\xff" * 8, bytes(range(16))):
            want = pack_with_versionstamp(("e", expires, token, Versionstamp()), keys.prefix)
            assert keys.receipt(expires, token) == want


def test_message_keys_are_the_tuple_encoding() -> None:
    """Queue, attempt and dead-letter keys are built from pre-packed heads;
    byte for byte what the tuple layer gives, for stamps holding 0x00/0xff."""
    from dgen.keys import Versionstamp, pack
    from dgen.queue import TenantKeys

    keys = TenantKeys("tenant\x00é")
    for stamp in (bytes(12), b"\xff" * 12, bytes(range(12)), b"\x00\xff" * 6):
        vs = Versionstamp.from_bytes(stamp)
        assert keys.message(stamp) == pack(("q", vs), keys.prefix)
        assert keys.attempts(stamp) == pack(("a", vs), keys.prefix)
        assert keys.dead_letter(stamp) == pack(("x", vs), keys.prefix)
    with pytest.raises(ValueError, match="12 bytes"):
        keys.message(b"short")
