"""Incremental state layout: round trips, minimal diffs, list order, on real stores."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dgen
from dgen import keys
from dgen.codec import DecodeError, UnencodableError
from dgen.layout import Flat, StateLayout, between, diff
from dgen.store import Transaction

PREFIX = keys.pack(("dgen", "tenant", "s"))


@dataclasses.dataclass
class Point:
    x: int
    y: float
    label: str = "p"


@dataclasses.dataclass
class Item:
    id: str
    qty: int
    tags: tuple[str, ...] = ()


def layout(limit: int = 100_000) -> StateLayout:
    return StateLayout(PREFIX, limit)


def round_trip(state: Any, limit: int = 100_000) -> Any:
    lay = layout(limit)
    flat = lay.flatten(state)
    rebuilt, again = lay.rebuild(sorted(flat.entries.items()))
    assert again.entries == flat.entries
    return rebuilt


@pytest.mark.parametrize(
    "state",
    [
        0,
        None,
        "text",
        (1, 2, (3,)),
        [1, 2, 3],
        [],
        {},
        {"a": 1, "b": (1, 2), "c": [1, "x"], "d": {"e": None}},
        {1: "int keys are a leaf"},
        Point(1, 2.5),
        [{"id": "a", "n": 1}, {"id": "b", "n": 2}],
        [Item("a", 1, ("x",)), Item("b", 2)],
        [{"id": "a"}, {"id": "a"}],  # duplicate ids: stored as one leaf
        [{"id": 1}],  # non-str id: a leaf
        {
            "rooms": [
                {"id": "r1", "members": {"ann": {"since": 3}}, "log": [{"id": "m1", "t": "hi"}]}
            ]
        },
    ],
)
def test_round_trip_keeps_value_and_types(state: Any) -> None:
    rebuilt = round_trip(state)
    assert rebuilt == state
    assert type(rebuilt) is type(state)


def test_int_stays_int_and_tuple_stays_tuple() -> None:
    rebuilt = round_trip({"n": 1, "t": (1,), "f": 1.0, "b": True})
    assert [type(rebuilt[k]) for k in "ntfb"] == [int, tuple, float, bool]


def test_large_leaf_is_chunked_under_the_value_limit() -> None:
    blob = random.Random(1).randbytes(250_000)
    lay = layout(100_000)
    flat = lay.flatten({"blob": blob})
    assert max(len(v) for v in flat.entries.values()) <= 100_000
    assert len(flat.entries) >= 4  # marker + three chunks
    assert round_trip({"blob": blob}) == {"blob": blob}


def changes(old: Any, new: Any) -> tuple[dict[bytes, bytes], list[bytes], Flat]:
    lay = layout()
    before = lay.flatten(old)
    after = lay.flatten(new, before)
    result = diff(before, after)
    applied = dict(before.entries)
    for key in result.clears:
        del applied[key]
    applied.update(result.sets)
    assert applied == after.entries
    assert lay.rebuild(sorted(applied.items()))[0] == new
    return result.sets, result.clears, after


def big_map() -> dict[str, Any]:
    return {f"field{i}": i for i in range(200)}


def test_no_change_writes_nothing() -> None:
    sets, clears, _ = changes(big_map(), big_map())
    assert (sets, clears) == ({}, [])


def test_one_field_change_writes_one_key() -> None:
    new = big_map()
    new["field7"] = "changed"
    sets, clears, _ = changes(big_map(), new)
    assert len(sets) == 1 and not clears


def test_add_remove_update_together() -> None:
    new = big_map()
    new["added"] = 1
    del new["field3"]
    new["field4"] = -4
    sets, clears, _ = changes(big_map(), new)
    assert len(sets) == 2 and len(clears) == 1


def test_nested_change_touches_only_the_leaf() -> None:
    old = {"a": {"b": {"c": 1, "d": 2}}, "e": 3}
    sets, clears, _ = changes(old, {"a": {"b": {"c": 1, "d": 5}}, "e": 3})
    assert len(sets) == 1 and not clears


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ({"a": 1}, [{"id": "x"}]),
        ([{"id": "x"}], 5),
        (5, {"a": 1}),
        (Point(1, 2.0), {"x": 1, "y": 2.0}),
        ({"a": [{"id": "x"}]}, {"a": "scalar"}),
    ],
)
def test_change_of_shape_rewrites_the_subtree(old: Any, new: Any) -> None:
    changes(old, new)  # asserts the applied diff rebuilds ``new``


def items(*ids: str) -> list[dict[str, Any]]:
    return [{"id": i, "v": i.upper()} for i in ids]


def test_list_update_remove_add() -> None:
    base = items(*"abcde")
    updated = items(*"abcde")
    updated[2]["v"] = "changed"
    sets, clears, _ = changes(base, updated)
    assert len(sets) == 1 and not clears
    _, clears, _ = changes(base, items(*"abde"))
    assert clears  # the item's keys and its index
    for new in (items(*"xabcde"), items(*"abxcde"), items(*"abcdex")):
        sets, clears, _ = changes(base, new)
        assert not clears
        # The new item: its index, its marker and its fields; nobody else moves.
        assert len(sets) == 1 + 1 + 2


def test_reorder_is_persisted_and_cheap() -> None:
    base = items(*"abcdefgh")
    moved = items(*"abcdefgh")
    moved.insert(1, moved.pop(6))  # move g after a
    sets, clears, _ = changes(base, moved)
    assert len(sets) == 1 and len(clears) == 1  # only g's index changes


def test_insert_between_reordered_items() -> None:
    lay = layout()
    flat = lay.flatten(items(*"abcd"))
    reordered = items(*"dcba")
    flat2 = lay.flatten(reordered, flat)
    inserted = items(*"dcba")
    inserted.insert(2, {"id": "n", "v": "N"})
    flat3 = lay.flatten(inserted, flat2)
    assert lay.rebuild(sorted(flat3.entries.items()))[0] == inserted


def test_many_successive_diffs_keep_indexes_short() -> None:
    rng = random.Random(7)
    lay = layout()
    state = items(*[f"i{n}" for n in range(50)])
    flat = lay.flatten(state)
    stored = dict(flat.entries)
    for step in range(300):
        state = [dict(item) for item in state]
        op = rng.random()
        if op < 0.3 and state:
            state.insert(rng.randrange(len(state) + 1), state.pop(rng.randrange(len(state))))
        elif op < 0.6:
            state.insert(rng.randrange(len(state) + 1), {"id": f"n{step}", "v": step})
        elif op < 0.8 and len(state) > 1:
            state.pop(rng.randrange(len(state)))
        elif state:
            state[rng.randrange(len(state))]["v"] = -step
        new = lay.flatten(state, flat)
        change = diff(flat, new)
        for key in change.clears:
            del stored[key]
        stored.update(change.sets)
        flat = new
        assert lay.rebuild(sorted(stored.items()))[0] == state
    assert max(len(f) for f in flat.indexes[()].values()) < 40


def test_between() -> None:
    assert between(None, None) > b""
    a = between(None, None)
    b = between(a, None)
    c = between(a, b)
    assert a < c < b
    assert between(None, b"\x01") < b"\x01"
    with pytest.raises(ValueError):
        between(b"b", b"a")


def test_dataclass_schema_evolution_and_missing_class() -> None:
    lay = layout()
    flat = lay.flatten(Point(1, 2.0))
    # A stored state without the ``label`` field (written by an older class).
    older = {k: v for k, v in flat.entries.items() if b"label" not in k}
    assert lay.rebuild(sorted(older.items()))[0] == Point(1, 2.0, "p")
    damaged = {k: v for k, v in flat.entries.items() if b"\x02x\x00" not in k}
    with pytest.raises(DecodeError, match="no field 'x'"):
        lay.rebuild(sorted(damaged.items()))


# -- through real transactions on every backend ------------------------------

leaf = st.none() | st.integers() | st.text(max_size=5) | st.tuples(st.integers())
names = st.sampled_from(["a", "b", "c", "d"])
states = st.recursive(
    leaf,
    lambda inner: (
        st.dictionaries(names, inner, max_size=3)
        | st.lists(
            st.fixed_dictionaries({"id": names, "v": inner}),
            max_size=4,
            unique_by=lambda d: d["id"],
        )
    ),
    max_leaves=10,
)


async def write_and_read(url: str, sequence: list[Any]) -> None:
    # A fresh prefix per example: hypothesis reuses the function-scoped store.
    lay = StateLayout(keys.pack(("dgen", uuid.uuid4().hex, "s")), 100_000)
    async with dgen.connect(url) as db:
        flat: Flat | None = None
        for state in sequence:
            new = lay.flatten(state, flat)
            change = diff(flat, new)

            async def write(tr: Transaction, change: Any = change) -> None:
                change.apply(tr)

            await db.run(write)
            flat = new

            async def read(tr: Transaction) -> Any:
                return await lay.read(tr)

            found, got, _ = await db.run(read)
            assert found and got == state


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(sequence=st.lists(states, min_size=1, max_size=6))
def test_read_back_equals_last_state_written(store_url: str, sequence: list[Any]) -> None:
    asyncio.run(write_and_read(store_url, sequence))


def test_unencodable_value_is_located() -> None:
    state = {"rooms": [{"id": "r1", "log": {"sock": object()}}]}
    with pytest.raises(UnencodableError, match=r"state\['rooms'\]\[id='r1'\]\['log'\]\['sock'\]"):
        layout().flatten(state)
