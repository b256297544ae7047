"""Tuple encoding: order preservation, round trips, byte identity with fdb.tuple."""

from __future__ import annotations

import math
import struct
import uuid

import fdb.tuple as fdb_tuple
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dgen import keys
from dgen.keys import Versionstamp

scalars = (
    st.none()
    | st.binary(max_size=20)
    | st.text(max_size=20)
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False)
    | st.booleans()
    | st.uuids()
)
elements = st.recursive(
    scalars, lambda inner: st.tuples(inner, inner) | st.tuples(inner), max_leaves=8
)
tuples = st.lists(elements, max_size=4).map(tuple)

_TYPE_ORDER = {
    type(None): 0,
    bytes: 1,
    str: 2,
    tuple: 5,
    int: 20,
    float: 33,
    bool: 38,
    uuid.UUID: 48,
}


def sort_key(value: object) -> tuple[object, ...]:
    """The FDB tuple layer's documented order, computed independently of the encoder."""
    if isinstance(value, tuple):
        return (5, tuple(sort_key(v) for v in value))
    if isinstance(value, bool):
        return (38, value)
    if isinstance(value, float):
        # IEEE total order as FDB applies it (-0.0 sorts before 0.0).
        bits = struct.unpack(">q", struct.pack(">d", value))[0]
        return (33, bits if bits >= 0 else -(2**63) - bits - 1)
    if isinstance(value, uuid.UUID):
        return (48, value.bytes)
    if isinstance(value, str):
        return (2, value.encode())
    return (_TYPE_ORDER[type(value)], value if value is not None else 0)


def tuple_sort_key(items: tuple[object, ...]) -> tuple[object, ...]:
    return tuple(sort_key(v) for v in items)


@settings(max_examples=300)
@given(tuples)
def test_round_trip(items: tuple[object, ...]) -> None:
    assert keys.unpack(keys.pack(items)) == items


@settings(max_examples=300)
@given(tuples, tuples)
def test_order_preserved(a: tuple[object, ...], b: tuple[object, ...]) -> None:
    pa, pb = keys.pack(a), keys.pack(b)
    if tuple_sort_key(a) < tuple_sort_key(b):
        assert pa < pb
    elif tuple_sort_key(a) > tuple_sort_key(b):
        assert pa > pb
    else:
        assert pa == pb


@settings(max_examples=300)
@given(tuples)
def test_byte_identical_to_fdb_tuple(items: tuple[object, ...]) -> None:
    assert keys.pack(items) == fdb_tuple.pack(items)


@pytest.mark.parametrize(
    "value",
    [
        0,
        1,
        -1,
        255,
        256,
        -255,
        -256,
        2**64 - 1,
        2**64,
        -(2**64 - 1),
        -(2**64),
        2**200,
        -(2**200),
        0.0,
        -0.0,
        math.inf,
        -math.inf,
        1e-300,
        b"\x00\xff\x00",
        "\x00é",
        None,
        True,
        False,
        (None, (None,), b"", ""),
        uuid.UUID(int=0),
        uuid.UUID(int=2**128 - 1),
    ],
)
def test_edge_values_match_fdb(value: object) -> None:
    assert keys.pack((value,)) == fdb_tuple.pack((value,))
    assert keys.unpack(keys.pack((value,))) == (value,)


def test_nan_round_trips() -> None:
    assert math.isnan(keys.unpack(keys.pack((math.nan,)))[0])  # type: ignore[arg-type]


def test_versionstamp_documented_layout() -> None:
    # FDB's format: type code 0x33, 10-byte transaction version, 2-byte big-endian user version.
    stamp = Versionstamp(bytes(range(10)), 0x0102)
    assert keys.pack(("q", stamp)) == b"\x02q\x00\x33" + bytes(range(10)) + b"\x01\x02"
    assert keys.unpack(keys.pack(("q", stamp))) == ("q", stamp)


def test_pack_with_versionstamp_offset() -> None:
    key, offset = keys.pack_with_versionstamp(("q", Versionstamp(user_version=7)), prefix=b"P")
    assert key[offset : offset + 10] == b"\xff" * 10
    assert key[offset + 10 : offset + 12] == b"\x00\x07"
    assert key[:offset] == b"P" + keys.pack(("q",)) + b"\x33"
    with pytest.raises(ValueError, match="incomplete Versionstamp"):
        keys.pack(("q", Versionstamp()))
    with pytest.raises(ValueError, match="exactly one"):
        keys.pack_with_versionstamp(("q",))


def test_versionstamps_order_by_commit_then_user_version() -> None:
    a = keys.pack((Versionstamp(b"\x00" * 9 + b"\x01", 5),))
    b = keys.pack((Versionstamp(b"\x00" * 9 + b"\x02", 0),))
    c = keys.pack((Versionstamp(b"\x00" * 9 + b"\x02", 1),))
    assert a < b < c


def test_unencodable_type_names_it() -> None:
    with pytest.raises(TypeError, match="'dict'"):
        keys.pack(({},))  # type: ignore[arg-type]


def test_garbage_key_gives_clear_error() -> None:
    with pytest.raises(ValueError, match="not a valid tuple-encoded key"):
        keys.unpack(b"\x02unterminated")


def test_range_of_and_strinc() -> None:
    begin, end = keys.range_of(("t", 1))
    inside = keys.pack(("t", 1, "x"))
    outside = keys.pack(("t", 2))
    assert begin <= inside < end
    assert not begin <= outside < end
    assert keys.strinc(b"ab\xff") == b"ac"
    with pytest.raises(ValueError):
        keys.strinc(b"\xff\xff")
