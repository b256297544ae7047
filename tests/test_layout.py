"""Incremental state layout: round trips, minimal diffs, list order, on real stores."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import datetime
import random
import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dgen
from dgen import codec, keys
from dgen.codec import DecodeError, UnencodableError
from dgen.layout import Flat, StateLayout, _list_ids, between, diff
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
    assert after.entries == reference(lay, new, before.indexes)
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


# -- incremental flatten: cost follows the change, never misses one -----------
#
# flatten(state, previous) skips what it can prove unchanged. These tests
# compare it with a plain reference that lays out every key from scratch
# (the pre-shadow algorithm, keeping the previous list indexes), so any change
# the shortcut misses shows up as a differing key.


def reference(lay: StateLayout, state: Any, indexes: dict[Any, dict[str, bytes]]) -> dict:
    entries: dict[bytes, bytes] = {}

    def key(path: tuple[Any, ...]) -> bytes:
        return lay.prefix + keys.pack(path)

    def node(path: tuple[Any, ...], value: Any) -> None:
        if type(value) is dict and all(type(k) is str for k in value):
            entries[key((*path, "m"))] = b""
            for name, child in value.items():
                node((*path, "f", name), child)
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            cls = type(value)
            entries[key((*path, "d"))] = codec.encode((cls.__module__, cls.__qualname__))
            for f in dataclasses.fields(value):
                node((*path, "f", f.name), getattr(value, f.name))
        elif type(value) is list and (ids := _list_ids(value)) is not None:
            entries[key((*path, "l"))] = b""
            fracs = StateLayout._indexes(ids, indexes.get(path, {}))
            for ident, item in zip(ids, value, strict=True):
                entries[key((*path, "o", fracs[ident]))] = ident.encode()
                node((*path, "i", ident), item)
        else:
            data = codec.encode(value)
            for n, start in enumerate(range(0, max(len(data), 1), lay.chunk_size)):
                entries[key((*path, "v", n))] = data[start : start + lay.chunk_size]

    node((), state)
    return entries


def step(lay: StateLayout, state: Any, previous: Flat, stored: dict[bytes, bytes]) -> Flat:
    """Flatten ``state`` over ``previous``; check it against the reference, the
    diff against a full comparison, and that the stored keys rebuild ``state``."""
    new = lay.flatten(state, previous)
    assert new.entries == reference(lay, state, previous.indexes)
    change = diff(previous, new)
    assert change.sets == {k: v for k, v in new.entries.items() if previous.entries.get(k) != v}, (
        "diff's sets differ from a full comparison"
    )
    assert sorted(change.clears) == sorted(k for k in previous.entries if k not in new.entries)
    for k in change.clears:
        del stored[k]
    stored.update(change.sets)
    assert stored == new.entries
    assert lay.rebuild(sorted(stored.items()))[0] == state
    return new


def start(state: Any, limit: int = 100_000) -> tuple[StateLayout, Flat, dict[bytes, bytes]]:
    lay = layout(limit)
    flat = lay.flatten(state)
    return lay, flat, dict(flat.entries)


def test_in_place_change_of_a_nested_list_in_a_dict_is_written() -> None:
    state: dict[str, Any] = {"room": {"log": [1, 2], "n": 0}, "other": "x"}
    lay, flat, stored = start(state)
    state["room"]["log"].append(3)  # same dict, same list object
    flat = step(lay, state, flat, stored)
    assert lay.rebuild(sorted(stored.items()))[0]["room"]["log"] == [1, 2, 3]
    state["room"]["log"][0] = 10
    flat = step(lay, state, flat, stored)
    state["room"]["log"].clear()
    step(lay, state, flat, stored)


def test_in_place_change_inside_a_tuple_is_written() -> None:
    # A tuple is immutable but what it holds need not be: identity proves nothing.
    inner = [1]
    state = {"t": (inner, "x")}
    lay, flat, stored = start(state)
    inner.append(2)
    step(lay, state, flat, stored)
    assert lay.rebuild(sorted(stored.items()))[0]["t"] == ([1, 2], "x")


@pytest.mark.parametrize(
    ("before", "after"),
    [
        (1, 1.0),
        (1, True),
        (0, False),
        (0.0, -0.0),
        ((1,), (1.0,)),
        ("ab", "".join(["a", "b"])),
        (None, ()),
    ],
)
def test_equal_but_different_value_is_written(before: Any, after: Any) -> None:
    assert before == after or before is None
    state: dict[str, Any] = {"x": before, "items": [{"id": "a", "v": before}]}
    lay, flat, stored = start(state)
    state["x"] = after
    flat = step(lay, state, flat, stored)
    state["items"][0] = {"id": "a", "v": after}  # item replaced by an equal-looking copy
    step(lay, state, flat, stored)
    rebuilt = lay.rebuild(sorted(stored.items()))[0]
    assert type(rebuilt["x"]) is type(after) and type(rebuilt["items"][0]["v"]) is type(after)
    assert repr(rebuilt["x"]) == repr(after)  # -0.0 is not 0.0


def test_in_place_changes_to_list_items_are_written() -> None:
    state = [{"id": f"i{i}", "n": 0, "tags": ["t"], "meta": {"k": 1}} for i in range(50)]
    lay, flat, stored = start(state)
    state[3]["n"] += 1
    flat = step(lay, state, flat, stored)
    state[4]["tags"].append("u")  # a mutable leaf inside an item, mutated in place
    flat = step(lay, state, flat, stored)
    state[5]["meta"]["k"] = 2  # a nested dict inside an item
    flat = step(lay, state, flat, stored)
    state[6]["id"] = "renamed"  # an id changed in place
    flat = step(lay, state, flat, stored)
    state[7]["extra"] = 1
    flat = step(lay, state, flat, stored)
    del state[8]["meta"]
    flat = step(lay, state, flat, stored)
    state[9][1] = "non-str key: the list becomes one value"  # type: ignore[index]
    flat = step(lay, state, flat, stored)
    del state[9][1]  # type: ignore[arg-type]
    step(lay, state, flat, stored)


def test_in_place_changes_to_dataclasses_are_written() -> None:
    state = {"items": [Item("a", 1, ("x",)), Item("b", 2)], "p": Point(1, 2.0)}
    lay, flat, stored = start(state)
    state["items"][1].qty = 3
    flat = step(lay, state, flat, stored)
    state["p"].y = 2  # float -> int, equal value
    flat = step(lay, state, flat, stored)
    state["items"][0].tags = ("x",)  # equal tuple, other object: nothing to write
    flat = step(lay, state, flat, stored)
    assert diff(flat, lay.flatten(state, flat)).keys_touched == 0
    state["p"] = {"x": 1, "y": 2, "label": "p"}  # dataclass -> dict with the same fields
    step(lay, state, flat, stored)


def test_a_datetime_with_a_mutable_timezone_is_re_encoded() -> None:
    class Shifting(datetime.tzinfo):
        hours = 0

        def utcoffset(self, dt: Any) -> datetime.timedelta:
            return datetime.timedelta(hours=self.hours)

    zone = Shifting()
    stamp = datetime.datetime(2026, 1, 1, tzinfo=zone)
    naive = datetime.datetime(2026, 1, 1)
    lay = layout()
    before = lay.flatten({"at": stamp, "naive": naive})
    zone.hours = 2  # the same datetime object now encodes differently
    after = lay.flatten({"at": stamp, "naive": naive}, before)
    assert after.entries == reference(lay, {"at": stamp, "naive": naive}, {})
    assert diff(before, after).keys_touched == 1


def test_a_failed_attempt_leaves_the_previous_flattening_intact() -> None:
    # The consumer flattens a mutated state; the commit fails; it rebuilds the
    # state from the previous flattening and flattens again over it.
    state = [{"id": f"i{i}", "n": 0, "log": [i]} for i in range(20)]
    lay, flat, stored = start(state)
    snapshot = dict(flat.entries)
    state[2]["n"] = 99
    state[3]["log"].append(1)
    state.insert(0, {"id": "new", "n": 0, "log": []})
    lay.flatten(state, flat)  # discarded, as if its transaction failed
    assert flat.entries == snapshot
    retry, _ = lay.rebuild(sorted(flat.entries.items()))
    retry[5]["n"] = 7
    step(lay, retry, flat, stored)


def test_only_the_flattening_it_was_made_from_gets_the_shortcut_diff() -> None:
    lay = layout()
    a = lay.flatten(items(*"abc"))
    b = lay.flatten(items(*"abd"), a)
    other = lay.flatten(items(*"xyz"))
    full = {k: v for k, v in b.entries.items() if other.entries.get(k) != v}
    assert diff(other, b).sets == full and diff(other, b).clears == [
        k for k in other.entries if k not in b.entries
    ]
    assert diff(None, b).sets == b.entries
    # A flattening from another layout (prefix) is not used as a shadow.
    elsewhere = StateLayout(keys.pack(("dgen", "other", "s")), 100_000)
    c = elsewhere.flatten(items(*"abc"), a)
    assert all(k.startswith(elsewhere.prefix) for k in c.entries)
    assert diff(a, c).clears == list(a.entries)


def test_flattenings_do_not_keep_their_predecessors_alive() -> None:
    import gc
    import weakref

    lay = layout()
    state = items(*"abc")
    flat = lay.flatten(state)
    first = weakref.ref(flat)
    for n in range(5):
        state[0]["v"] = n
        flat = lay.flatten(state, flat)
    gc.collect()
    assert first() is None


def test_a_rebuilt_state_flattens_incrementally_and_correctly() -> None:
    state = {"items": [{"id": f"i{i}", "n": i} for i in range(30)], "p": Point(1, 2.0)}
    lay, _, stored = start(state)
    rebuilt, read = lay.rebuild(sorted(stored.items()))
    rebuilt["items"][4]["n"] = -1
    after = step(lay, rebuilt, read, stored)
    assert diff(read, after).keys_touched == 1
    # An older stored layout (a field missing, filled by its default) must get
    # the default written; a stray key must be cleared.
    older = {k: v for k, v in stored.items() if b"label" not in k}
    rebuilt, read = lay.rebuild(sorted(older.items()))
    rebuilt["items"][0]["n"] = 5
    new = lay.flatten(rebuilt, read)
    assert any(b"label" in k for k in diff(read, new).sets)
    assert new.entries == reference(lay, rebuilt, read.indexes)
    stray = lay.prefix + keys.pack(("f", "items", "v", 0))
    rebuilt, read = lay.rebuild(sorted({**stored, stray: codec.encode("junk")}.items()))
    rebuilt["items"][0]["n"] = 6
    new = lay.flatten(rebuilt, read)
    assert stray in diff(read, new).clears
    assert new.entries == reference(lay, rebuilt, read.indexes)


def test_a_key_renamed_in_place_is_written() -> None:
    # Same length, same value objects, another key: identity of the values alone
    # must not pass for "unchanged".
    value = "shared value"
    state = [{"id": "a", "n": value}, {"id": "b", "n": 1}]
    lay, flat, stored = start(state)
    state[0]["m"] = state[0].pop("n")
    flat = step(lay, state, flat, stored)
    top = {"x": value, "y": 2}
    lay, flat, stored = start(top)
    top["z"] = top.pop("x")
    step(lay, top, flat, stored)


def test_unchanged_state_costs_no_encoding(monkeypatch: pytest.MonkeyPatch) -> None:
    # Not a timing: count the leaves encoded. A one-item change in a list of
    # fixed leaves re-encodes that item's changed leaf only.
    state = [{"id": f"i{i}", "n": 0, "name": f"item {i}"} for i in range(200)]
    lay = layout()
    flat = lay.flatten(state)
    calls: list[Any] = []
    real = codec.encode

    def counting(value: Any) -> bytes:
        calls.append(value)
        return real(value)

    monkeypatch.setattr(codec, "encode", counting)
    flat = lay.flatten(state, flat)
    assert calls == []
    state[17]["n"] += 1
    new = lay.flatten(state, flat)
    assert calls == [1]
    assert diff(flat, new).keys_touched == 1


# Random in-place edits of one state object, checked against the reference.


def random_leaf(rng: random.Random) -> Any:
    return rng.choice(
        [0, 1, 1.0, -0.0, 0.0, True, False, None, "s", "", b"b", (1, "t"), (1.0,), ([1],), [1, 2],
         {1: "int key"}, {"x"}, frozenset({2}), datetime.date(2026, 1, 1), rng.random()]
    )  # fmt: skip


def random_value(rng: random.Random, depth: int) -> Any:
    roll = rng.random()
    if depth <= 0 or roll < 0.4:
        return random_leaf(rng)
    if roll < 0.65:
        return {rng.choice("abcd"): random_value(rng, depth - 1) for _ in range(rng.randrange(4))}
    if roll < 0.9:
        ids = rng.sample("pqrstu", rng.randrange(1, 5))
        return [{"id": i, "v": random_value(rng, depth - 1)} for i in ids]
    return Item(rng.choice("xyz"), rng.randrange(3), rng.choice([(), ("t",)]))


def containers(value: Any, out: list[Any]) -> list[Any]:
    if type(value) in (dict, list) or dataclasses.is_dataclass(value):
        out.append(value)
        children = (
            value.values()
            if type(value) is dict
            else value
            if type(value) is list
            else [getattr(value, f.name) for f in dataclasses.fields(value)]
        )
        for child in children:
            containers(child, out)
    elif type(value) is tuple:
        for child in value:
            containers(child, out)
    return out


def mutate(rng: random.Random, state: dict[str, Any]) -> None:
    """One in-place edit somewhere in ``state``."""
    target = rng.choice(containers(state, []))
    if type(target) is dict:
        roll = rng.random()
        if roll < 0.5 or not target:
            target[rng.choice("abcd")] = random_value(rng, 2)
        elif roll < 0.7:
            del target[rng.choice(list(target))]
        elif roll < 0.8:
            name = rng.choice(list(target))
            target[name] = copy.deepcopy(target[name])  # equal, other objects
        else:
            name = rng.choice(list(target))  # re-insert: same content, new key order
            target[name] = target.pop(name)
    elif type(target) is list:
        roll = rng.random()
        if roll < 0.3:
            target.insert(rng.randrange(len(target) + 1), random_value(rng, 1))
        elif roll < 0.5 and target:
            target.pop(rng.randrange(len(target)))
        elif roll < 0.7 and len(target) > 1:
            target.insert(rng.randrange(len(target)), target.pop(rng.randrange(len(target))))
        elif target:
            pos = rng.randrange(len(target))
            target[pos] = copy.deepcopy(target[pos])
        else:
            target.append(random_leaf(rng))
    else:
        target.qty = rng.choice([0, 1, 1.0, True])


@pytest.mark.parametrize("seed", range(40))
def test_random_in_place_edits_match_the_reference(seed: int) -> None:
    rng = random.Random(seed)
    state = {"root": random_value(rng, 3), "list": random_value(rng, 3), "n": 0}
    lay, flat, stored = start(state, limit=rng.choice([8, 100_000]))
    for _ in range(40):
        mutate(rng, state)
        flat = step(lay, state, flat, stored)


def test_unencodable_value_is_located_in_an_incremental_flatten() -> None:
    state: dict[str, Any] = {"rooms": [{"id": f"r{i}", "log": {"a": 1}} for i in range(10)]}
    lay = layout()
    flat = lay.flatten(state)
    state["rooms"][3]["log"]["sock"] = object()
    with pytest.raises(UnencodableError, match=r"state\['rooms'\]\[id='r3'\]\['log'\]\['sock'\]"):
        lay.flatten(state, flat)
    del state["rooms"][3]["log"]["sock"]
    state["n"] = object()
    with pytest.raises(UnencodableError, match=r"state\['n'\]"):
        lay.flatten(state, flat)
