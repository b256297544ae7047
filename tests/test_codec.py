"""The safe codec: round trips, refusals with clear errors, and safety of decoding."""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import math
import socket
import sys
import threading
import time
import types
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dgen import codec
from dgen.codec import DecodeError, UnencodableError, decode, encode
from dgen.store import DGenError


@dataclasses.dataclass
class Point:
    x: int
    y: int = 0
    tags: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True, slots=True)
class Frozen:
    name: str
    where: Point | None = None


@dataclasses.dataclass
class Normalising:
    value: int

    def __post_init__(self) -> None:
        self.value = self.value * 2  # decoding must not run this again


class Outer:
    @dataclasses.dataclass
    class Inner:
        n: int


VALUES = [
    None,
    True,
    False,
    0,
    1,
    -1,
    2**63 - 1,
    -(2**63),
    2**63,
    -(2**200) + 7,
    0.0,
    -2.5,
    1e300,
    math.inf,
    "",
    "héllo ✓ \x00 nul",
    b"",
    b"\x00\xff raw",
    [],
    [1, [2, [3]]],
    (),
    (1, "a", (None,)),
    {},
    {"a": 1, 2: "b", (1, 2): [3], None: None, b"k": {"n": {}}},
    set(),
    {1, 2, 3},
    frozenset({"x", "y"}),
    uuid.UUID("12345678-1234-5678-1234-567812345678"),
    datetime.datetime(2026, 11, 26, 15, 4, 5, 123456),
    datetime.datetime(2026, 11, 26, 15, 4, 5, tzinfo=datetime.UTC),
    datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone(datetime.timedelta(hours=-5))),
    datetime.date(2026, 11, 26),
    decimal.Decimal("3.14159265358979323846"),
    decimal.Decimal("-0"),
    Point(1, 2, ["a"]),
    Frozen("f", Point(3)),
    Outer.Inner(5),
    {"points": [Point(i, -i) for i in range(5)], "when": datetime.date(2020, 2, 29)},
]


@pytest.mark.parametrize("value", VALUES, ids=lambda v: type(v).__name__)
def test_round_trip_keeps_value_and_type(value: object) -> None:
    back = decode(encode(value))
    assert back == value
    assert type(back) is type(value)


def test_nested_types_are_kept() -> None:
    value = {"t": (1, [2, (3,)]), "s": frozenset({(1, 2)}), "f": 1.0, "i": 1}
    back = decode(encode(value))
    assert type(back["t"]) is tuple and type(back["t"][1]) is list
    assert type(back["t"][1][1]) is tuple
    assert type(back["f"]) is float and type(back["i"]) is int


def test_nan_round_trips() -> None:
    assert math.isnan(decode(encode(math.nan)))


def test_equal_sets_encode_to_equal_bytes() -> None:
    a = set(range(100))
    b = set(reversed(range(100)))
    assert encode(a) == encode(b)


def test_decoding_does_not_run_post_init() -> None:
    obj = Normalising(3)
    assert obj.value == 6
    assert decode(encode(obj)).value == 6


def test_frozen_slots_dataclass_round_trips() -> None:
    back = decode(encode(Frozen("n", None)))
    assert back == Frozen("n", None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        back.name = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("value", "type_name"),
    [
        (lambda: None, "function"),
        (threading.Lock(), "lock"),
        (object(), "object"),
        (types.SimpleNamespace(a=1), "SimpleNamespace"),
        (bytearray(b"x"), "bytearray"),
        (range(3), "range"),
    ],
)
def test_refuses_unknown_types_naming_them(value: object, type_name: str) -> None:
    with pytest.raises(UnencodableError) as info:
        encode(value)
    assert type_name in str(info.value)
    assert isinstance(info.value, TypeError) and isinstance(info.value, DGenError)


def test_refuses_socket_deep_inside_and_names_the_path() -> None:
    with socket.socket() as sock, pytest.raises(UnencodableError) as info:
        encode({"user": {"conns": [1, sock]}})
    text = str(info.value)
    assert "socket" in text
    assert "['user']['conns'][1]" in text


def test_refuses_subclasses_of_builtins() -> None:
    class Name(str):
        pass

    with pytest.raises(UnencodableError, match="Name"):
        encode(Name("x"))


def test_refuses_local_dataclass_with_advice() -> None:
    @dataclasses.dataclass
    class Local:
        a: int

    with pytest.raises(UnencodableError, match="module level"):
        encode(Local(1))


def test_refuses_cycles() -> None:
    loop: list[object] = []
    loop.append(loop)
    with pytest.raises(UnencodableError, match="cycle"):
        encode(loop)


def test_decode_never_imports_a_module() -> None:
    data = encode(Point(1))
    # Rewrite the module name to one that exists on disk but is not imported.
    assert "tabnanny" not in sys.modules
    forged = data.replace(codec.encode(__name__)[1:], codec.encode("tabnanny")[1:])
    with pytest.raises(DecodeError, match="not imported"):
        decode(forged)
    assert "tabnanny" not in sys.modules


def test_decode_refuses_a_name_that_is_not_a_dataclass() -> None:
    data = encode(Point(1)).replace(codec.encode("Point")[1:], codec.encode("Outer")[1:])
    with pytest.raises(DecodeError, match="not a dataclass"):
        decode(data)


@pytest.mark.parametrize("data", [b"", b"\x02N", b"\x01", b"\x01s\x05ab", b"\x01Q", b"\x01NN"])
def test_corrupt_data_gives_decode_error(data: bytes) -> None:
    with pytest.raises(DecodeError):
        decode(data)


def test_speed_of_a_typical_small_message_is_reported() -> None:
    # Not a timed assertion: prints the rate so a regression is visible in -s output.
    message = {"op": "add", "item": {"id": "sku-1", "qty": 2, "price": 9.99}, "n": [1, 2, 3]}
    n = 20_000
    start = time.perf_counter()
    for _ in range(n):
        decode(encode(message))
    elapsed = time.perf_counter() - start
    print(f"codec round trip of a small message: {n / elapsed:,.0f}/s")
    assert decode(encode(message)) == message


# -- property: any value built from the supported types round-trips --------------

_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text()
    | st.binary()
    | st.uuids()
    | st.datetimes()
    | st.dates()
    | st.decimals(allow_nan=False, allow_infinity=False)
)
_hashable = st.recursive(_scalars, lambda inner: st.tuples(inner, inner), max_leaves=5)
_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.tuples(inner, inner)
        | st.dictionaries(_hashable, inner, max_size=5)
        | st.frozensets(_hashable, max_size=5)
        | st.sets(_hashable, max_size=5)
        | st.builds(Point, st.integers(), st.integers(), st.lists(st.text(), max_size=3))
    ),
    max_leaves=20,
)


def _same(a: object, b: object) -> bool:
    """Equal, and of the same type all the way down (1 == 1.0 == True is not enough)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(map(_same, a, b))  # type: ignore[arg-type]
    if isinstance(a, dict):
        assert isinstance(b, dict)
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    return a == b


@settings(max_examples=300, deadline=None)
@given(_values)
def test_any_supported_value_round_trips(value: object) -> None:
    back = decode(encode(value))
    assert _same(back, value)
    assert encode(back) == encode(value)
