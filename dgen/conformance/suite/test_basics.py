"""Keys, reads and writes inside one transaction: byte order, ranges,
read-your-writes (a seeded WriteDuringRead workload), atomicity, closed
transactions, atomic add and size limits."""

from __future__ import annotations

import math
import random
import uuid

import pytest

from dgen.conformance.support import (
    ConformanceStore,
    conformance_test,
    read_prefix,
    rerun_on_conflict,
)
from dgen.keys import Element, unpack
from dgen.store import (
    ConflictError,
    KeyTooLargeError,
    KeyValue,
    StoreError,
    Transaction,
    TransactionClosedError,
    TransactionTooLargeError,
    ValueTooLargeError,
    decode_counter,
    encode_counter,
)

# Tuple elements in increasing order, as FoundationDB's tuple layer orders them.
ORDERED_ELEMENTS: list[Element] = [
    None,
    b"",
    b"\x00",
    b"\x00\x00",
    b"\x00\xff",
    b"\x01",
    b"a",
    b"a\x00",
    b"ab",
    b"\x7f",
    b"\x80",
    b"\xff",
    b"\xff\xff",
    "",
    "\x00",
    "a",
    "a\x00b",
    "ab",
    "z",
    "\u00e9",
    "\u65e5\u672c",
    "\U0001f600",
    (),
    (None,),
    ("a",),
    ("a", None),
    ("b",),
    -(2**70),
    -(2**64),
    -(2**64) + 1,
    -(2**63),
    -65536,
    -256,
    -255,
    -1,
    0,
    1,
    255,
    256,
    65535,
    2**63,
    2**64 - 1,
    2**64,
    2**70,
    -math.inf,
    -1.5,
    -0.0,
    0.0,
    5e-324,
    1.5,
    math.inf,
    False,
    True,
    uuid.UUID(int=0),
    uuid.UUID(int=1),
    uuid.UUID(int=2**128 - 1),
]


__all__ = [
    "test_tuple_keys_read_back_in_byte_order",
    "test_point_reads_and_writes",
    "test_range_reads_with_limit_and_reverse",
    "test_write_during_read_random",
    "test_read_your_writes",
    "test_exception_in_transaction_leaves_nothing",
    "test_transaction_closed_after_commit_or_rollback",
    "test_atomic_add",
    "test_concurrent_adds_do_not_conflict",
    "test_size_limits",
]


@conformance_test()
async def test_tuple_keys_read_back_in_byte_order(store: ConformanceStore) -> None:
    """Keys of every tuple type, written in random order over several
    transactions, come back from range reads in tuple order (forward and
    reverse), and each key and value round-trips byte for byte."""
    keys = [store.key("order", e) for e in ORDERED_ELEMENTS]
    assert keys == sorted(keys), "the suite's premise: tuple order is byte order"
    order = list(range(len(keys)))
    random.Random(7).shuffle(order)
    for chunk in (order[:20], order[20:40], order[40:]):

        async def write(tr: Transaction, chunk: list[int] = chunk) -> None:
            for i in chunk:
                tr.set(keys[i], i.to_bytes(2, "big") + keys[i])

        await store.db.run(write)
    begin, end = store.range("order")
    got = await read_prefix(store.db, begin, end)
    assert [k for k, _ in got] == keys, "range read is not in byte order of the keys"
    for i, (key, value) in enumerate(got):
        assert value == i.to_bytes(2, "big") + key
        assert unpack(key, len(store.prefix)) == ("order", ORDERED_ELEMENTS[i])

    async def read_reverse(tr: Transaction) -> list[KeyValue]:
        return await tr.get_range(begin, end, reverse=True)

    assert [k for k, _ in await store.db.run(read_reverse)] == keys[::-1]


@conformance_test()
async def test_point_reads_and_writes(store: ConformanceStore) -> None:
    """set, get, overwrite and clear; an empty value is a value, not absence;
    values hold arbitrary bytes."""
    every_byte = bytes(range(256)) * 3
    k1, k2, k3 = store.key("p", 1), store.key("p", 2), store.key("p", 3)

    async def write(tr: Transaction) -> None:
        tr.set(k1, b"")
        tr.set(k2, every_byte)
        tr.set(k3, b"old")

    await store.db.run(write)

    async def read(tr: Transaction) -> list[bytes | None]:
        return [await tr.get(k) for k in (k1, k2, k3, store.key("p", 4))]

    assert await store.db.run(read) == [b"", every_byte, b"old", None]

    async def change(tr: Transaction) -> None:
        tr.set(k3, b"new")
        tr.clear(k2)
        tr.clear(store.key("p", 99))  # clearing an absent key is fine

    await store.db.run(change)
    assert await store.db.run(read) == [b"", None, b"new", None]


@conformance_test()
async def test_range_reads_with_limit_and_reverse(store: ConformanceStore) -> None:
    """get_range over committed data agrees with a sorted model for random
    bounds (on and between keys), limits and directions."""
    keys = [store.key("r", i) for i in range(0, 60, 2)]

    async def write(tr: Transaction) -> None:
        for k in keys:
            tr.set(k, k[-3:])

    await store.db.run(write)
    rng = random.Random(11)
    candidates = [
        *keys,
        *(k + b"\x00" for k in keys),
        store.key("r", 1),
        store.key("r", 100),
        store.key("r"),
        store.range("r")[0],
        store.range("r")[1],
    ]
    queries = [(store.range("r")[0], store.range("r")[1], 0, False)]
    for _ in range(150):
        queries.append(
            (
                rng.choice(candidates),
                rng.choice(candidates),
                rng.choice([0, 0, 1, 2, 5, 29, 30, 31]),
                rng.random() < 0.5,
            )
        )

    async def check(tr: Transaction) -> None:
        for begin, end, limit, reverse in queries:
            want = [(k, k[-3:]) for k in keys if begin <= k < end]
            if reverse:
                want.reverse()
            if limit:
                want = want[:limit]
            got = await tr.get_range(begin, end, limit=limit, reverse=reverse)
            assert got == want, f"get_range({begin!r}, {end!r}, limit={limit}, reverse={reverse})"

    await store.db.run(check)


def _counter_add(old: bytes | None, delta: int) -> bytes:
    return encode_counter(decode_counter(old) + delta)


async def _write_during_read(store: ConformanceStore, seed: int) -> int:
    rng = random.Random(seed)
    plain = [store.key("wdr", seed, "p", i) for i in range(8)]
    counters = [store.key("wdr", seed, "c", i) for i in range(4)]
    universe = sorted(plain + counters)
    bounds = sorted({*universe, *(k + b"\x00" for k in universe), *store.range("wdr", seed)})
    committed: dict[bytes, bytes] = {}
    log: list[str] = []
    commits = 0

    def fail(msg: str) -> None:
        pytest.fail(f"WriteDuringRead seed {seed}: {msg}\nops so far:\n" + "\n".join(log[-25:]))

    def model_range(
        view: dict[bytes, bytes], b: bytes, e: bytes, limit: int, reverse: bool
    ) -> list[KeyValue]:
        pairs = sorted((k, v) for k, v in view.items() if b <= k < e)
        if reverse:
            pairs.reverse()
        return pairs[:limit] if limit else pairs

    for t in range(4):
        tr = store.db.create_transaction()
        view = dict(committed)
        try:
            for _ in range(40):
                op = rng.randrange(7)
                if op == 0:
                    k, v = rng.choice(plain), rng.randbytes(rng.randrange(0, 12))
                    log.append(f"set {k!r} {v!r}")
                    tr.set(k, v)
                    view[k] = v
                elif op == 1:
                    k, v = rng.choice(counters), rng.randbytes(8)
                    log.append(f"set {k!r} {v!r}")
                    tr.set(k, v)
                    view[k] = v
                elif op == 2:
                    k = rng.choice(universe)
                    log.append(f"clear {k!r}")
                    tr.clear(k)
                    view.pop(k, None)
                elif op == 3:
                    b, e = sorted(rng.sample(bounds, 2))
                    log.append(f"clear_range {b!r} {e!r}")
                    tr.clear_range(b, e)
                    for k in [k for k in view if b <= k < e]:
                        del view[k]
                elif op == 4:
                    k, d = rng.choice(counters), rng.choice([1, -1, 7, 2**40, -(2**63)])
                    log.append(f"add {k!r} {d}")
                    tr.add(k, d)
                    view[k] = _counter_add(view.get(k), d)
                elif op == 5:
                    k = rng.choice(universe)
                    log.append(f"get {k!r}")
                    got = await tr.get(k)
                    if got != view.get(k):
                        fail(f"get {k!r} returned {got!r}, expected {view.get(k)!r}")
                else:
                    b, e = sorted(rng.sample(bounds, 2))
                    limit, reverse = rng.choice([0, 0, 1, 2, 3]), rng.random() < 0.5
                    log.append(f"get_range {b!r} {e!r} limit={limit} reverse={reverse}")
                    got_range = await tr.get_range(b, e, limit=limit, reverse=reverse)
                    want = model_range(view, b, e, limit, reverse)
                    if got_range != want:
                        fail(f"get_range returned {got_range!r}, expected {want!r}")
            if rng.random() < 0.75:
                log.append(f"commit transaction {t}")
                await tr.commit()
                committed = view
                commits += 1
            else:
                log.append(f"rollback transaction {t}")
                await tr.rollback()
        except ConflictError:
            # Another client of a shared store may conflict with any
            # transaction; this one then applied nothing.
            log.append(f"transaction {t} conflicted")
        finally:
            await tr.rollback()
        begin, end = store.range("wdr", seed)
        stored = dict(await read_prefix(store.db, begin, end))
        if stored != committed:
            fail(f"after transaction {t} the store holds {stored!r}, expected {committed!r}")
    return commits


@conformance_test()
async def test_write_during_read_random(store: ConformanceStore) -> None:
    """FoundationDB's WriteDuringRead: seeded random set/clear/clear_range/add
    interleaved with get and get_range (limits, reverse) inside transactions,
    checked against a dict model after every read and after every commit or
    rollback. A failure names its seed."""
    commits = 0
    for seed in range(12):
        commits += await _write_during_read(store, seed)
    assert commits >= 12, f"only {commits} of the random transactions committed"


@conformance_test()
async def test_read_your_writes(store: ConformanceStore) -> None:
    """A transaction's reads see its own sets, clears, range clears and adds,
    merged with committed data in key order."""
    k = [store.key("ryw", i) for i in range(6)]

    async def setup(tr: Transaction) -> None:
        for i in (0, 2, 4):
            tr.set(k[i], b"committed")
        tr.set(k[5], encode_counter(10))

    await store.db.run(setup)
    begin, end = store.range("ryw")

    async def check(tr: Transaction) -> None:
        tr.set(k[1], b"mine")
        assert await tr.get(k[1]) == b"mine"
        tr.clear(k[2])
        assert await tr.get(k[2]) is None
        assert [key for key, _ in await tr.get_range(begin, end)] == [k[0], k[1], k[4], k[5]]
        tr.clear_range(k[0], k[2])
        assert await tr.get_range(begin, end, limit=1) == [(k[4], b"committed")]
        tr.set(k[0], b"again")
        assert await tr.get_range(begin, end, limit=2) == [(k[0], b"again"), (k[4], b"committed")]
        assert await tr.get_range(begin, end, limit=2, reverse=True) == [
            (k[5], encode_counter(10)),
            (k[4], b"committed"),
        ]
        tr.add(k[5], 5)
        tr.add(k[3], -2)
        assert decode_counter(await tr.get(k[5])) == 15
        assert decode_counter(await tr.get(k[3])) == -2
        tr.add(k[5], 1)
        assert decode_counter(await tr.get(k[5])) == 16

    await store.db.run(check)
    stored = dict(await read_prefix(store.db, begin, end))
    assert stored == {
        k[0]: b"again",
        k[3]: encode_counter(-2),
        k[4]: b"committed",
        k[5]: encode_counter(16),
    }


class _Boom(Exception):
    pass


@conformance_test()
async def test_exception_in_transaction_leaves_nothing(store: ConformanceStore) -> None:
    """An exception inside db.run propagates and applies none of the
    transaction's writes; so do rollback and a transaction never committed."""
    keep = store.key("atom", "keep")

    async def setup(tr: Transaction) -> None:
        tr.set(keep, b"v")
        tr.set(store.key("atom", "n"), encode_counter(1))

    await store.db.run(setup)
    begin, end = store.range("atom")
    before = await read_prefix(store.db, begin, end)

    async def fail_midway(tr: Transaction) -> None:
        for i in range(20):
            tr.set(store.key("atom", "new", i), b"x")
        tr.clear(keep)
        tr.add(store.key("atom", "n"), 5)
        tr.clear_range(begin, end)
        tr.set(store.key("atom", "after"), b"y")
        raise _Boom

    with pytest.raises(_Boom):
        await store.db.run(fail_midway)
    assert await read_prefix(store.db, begin, end) == before

    tr = store.db.create_transaction()
    tr.set(store.key("atom", "rolled-back"), b"x")
    tr.clear(keep)
    await tr.rollback()
    await tr.rollback()  # a second rollback is harmless

    abandoned = store.db.create_transaction()
    abandoned.set(store.key("atom", "abandoned"), b"x")
    del abandoned
    assert await read_prefix(store.db, begin, end) == before


@conformance_test()
async def test_transaction_closed_after_commit_or_rollback(store: ConformanceStore) -> None:
    """Using a transaction after commit or rollback raises TransactionClosedError."""
    for finish in ("commit", "rollback"):

        async def finished(finish: str = finish) -> Transaction:
            tr = store.db.create_transaction()
            tr.set(store.key("closed", finish), b"x")
            if finish == "commit":
                await tr.commit()
            else:
                await tr.rollback()
            return tr

        tr = await rerun_on_conflict(finished)
        with pytest.raises(TransactionClosedError):
            await tr.get(store.key("closed", finish))
        with pytest.raises(TransactionClosedError):
            await tr.get_range(*store.range("closed"))
        with pytest.raises(TransactionClosedError):
            tr.set(store.key("closed", "later"), b"x")
        with pytest.raises(TransactionClosedError):
            await tr.commit()
    assert [k for k, _ in await read_prefix(store.db, *store.range("closed"))] == [
        store.key("closed", "commit")
    ]


@conformance_test()
async def test_atomic_add(store: ConformanceStore) -> None:
    """add works on absent keys and existing counters, with negative deltas
    and 64-bit wrap-around."""
    a, b, c = store.key("add", "a"), store.key("add", "b"), store.key("add", "c")

    async def setup(tr: Transaction) -> None:
        tr.set(b, encode_counter(41))
        tr.set(c, encode_counter(2**63 - 1))

    await store.db.run(setup)

    async def adds(tr: Transaction) -> None:
        tr.add(a, 3)
        tr.add(a, -10)
        tr.add(b, 1)
        tr.add(c, 1)

    await store.db.run(adds)

    async def read(tr: Transaction) -> list[bytes | None]:
        return [await tr.get(k) for k in (a, b, c)]

    assert await store.db.run(read) == [
        encode_counter(-7),
        encode_counter(42),
        encode_counter(-(2**63)),
    ]


@conformance_test()
async def test_concurrent_adds_do_not_conflict(store: ConformanceStore) -> None:
    """Two open transactions that both add to a key (without reading it)
    both commit: add is not a read."""
    attempt = 0

    async def scenario() -> bytes:
        nonlocal attempt
        attempt += 1
        counter, other = store.key("adds", "counter", attempt), store.key("adds", "other")
        tr1 = store.db.create_transaction()
        tr2 = store.db.create_transaction()
        try:
            await tr1.get(other)
            await tr2.get(other)
            tr1.add(counter, 1)
            tr2.add(counter, 2)
            await tr1.commit()
            await tr2.commit()
        finally:
            await tr1.rollback()
            await tr2.rollback()
        return counter

    counter = await rerun_on_conflict(scenario)

    async def read(tr: Transaction) -> bytes | None:
        return await tr.get(counter)

    assert decode_counter(await store.db.run(read)) == 3


@conformance_test()
async def test_size_limits(store: ConformanceStore) -> None:
    """Keys and values exactly at the declared limits are stored; one byte
    more raises KeyTooLargeError / ValueTooLargeError when written; writes
    over max_transaction_size raise TransactionTooLargeError and apply
    nothing."""
    limits = store.limits
    base = len(store.key("big", b""))
    big_key = store.key("big", b"k" * (limits.max_key_size - base))
    assert len(big_key) == limits.max_key_size
    big_value = b"v" * limits.max_value_size

    async def write(tr: Transaction) -> None:
        tr.set(big_key, big_value)

    await store.db.run(write)

    async def read(tr: Transaction) -> bytes | None:
        return await tr.get(big_key)

    assert await store.db.run(read) == big_value

    tr = store.db.create_transaction()
    try:
        with pytest.raises(KeyTooLargeError):
            tr.set(store.key("big", b"k" * (limits.max_key_size - base + 1)), b"")
        with pytest.raises(ValueTooLargeError):
            tr.set(store.key("big", "value"), big_value + b"v")
    finally:
        await tr.rollback()

    if limits.max_transaction_size > 64_000_000:
        return  # too large to exceed quickly; the other limits were checked
    begin, end = store.range("huge")
    tr = store.db.create_transaction()
    try:
        with pytest.raises(TransactionTooLargeError):
            written = 0
            i = 0
            while written <= limits.max_transaction_size:
                tr.set(store.key("huge", i), big_value)
                written += len(big_value)
                i += 1
            await tr.commit()
    finally:
        await tr.rollback()
    assert await read_prefix(store.db, begin, end) == []
    assert issubclass(TransactionTooLargeError, StoreError)
