"""FoundationDB's tuple encoding: order-preserving keys shared by every backend.

``pack`` turns a tuple of None, bytes, str, int, float, bool, UUID, nested
tuples and :class:`Versionstamp` into bytes whose lexicographic order is the
order of the tuples, byte-identical to FoundationDB's tuple layer (see
``design/tuple.md`` in the FoundationDB repository), so data can be copied
between backends. We implement the spec instead of importing ``fdb.tuple``:
the ``foundationdb`` package cannot pack versionstamps without libfdb_c, and
SQLite users should not need it installed. Tests compare bytes with
``fdb.tuple`` for every type it can pack here.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Sequence
from typing import Union

__all__ = [
    "Element",
    "Versionstamp",
    "pack",
    "pack_with_versionstamp",
    "range_of",
    "strinc",
    "unpack",
]

_NULL = 0x00
_BYTES = 0x01
_STRING = 0x02
_NESTED = 0x05
_NEG_INT_BIG = 0x0B
_INT_ZERO = 0x14
_POS_INT_BIG = 0x1D
_DOUBLE = 0x21
_FALSE = 0x26
_TRUE = 0x27
_UUID = 0x30
_VERSIONSTAMP = 0x33

# _SIZE_LIMITS[n] is the largest magnitude that fits in n bytes.
_SIZE_LIMITS = [(1 << (8 * n)) - 1 for n in range(9)]


class Versionstamp:
    """A 12-byte stamp: 10 bytes fixed at commit plus a 2-byte user version.

    An *incomplete* stamp (``tr_version`` is None) marks the place in a key
    where the backend writes the commit's stamp; the user version orders
    several ordered-commit keys written by one transaction.
    """

    __slots__ = ("tr_version", "user_version")
    LENGTH = 12

    def __init__(self, tr_version: bytes | None = None, user_version: int = 0) -> None:
        if tr_version is not None and len(tr_version) != 10:
            raise ValueError(
                f"a versionstamp's transaction part is 10 bytes, got {len(tr_version)}"
            )
        if not 0 <= user_version <= 0xFFFF:
            raise ValueError(f"user_version must be in 0..65535, got {user_version}")
        self.tr_version = tr_version
        self.user_version = user_version

    @classmethod
    def from_bytes(cls, data: bytes) -> Versionstamp:
        if len(data) != 12:
            raise ValueError(f"a versionstamp is 12 bytes, got {len(data)}")
        return cls(bytes(data[:10]), int.from_bytes(data[10:], "big"))

    def is_complete(self) -> bool:
        return self.tr_version is not None

    def to_bytes(self) -> bytes:
        tr = self.tr_version if self.tr_version is not None else b"\xff" * 10
        return tr + self.user_version.to_bytes(2, "big")

    def _key(self) -> tuple[bytes, int]:
        return (self.tr_version or b"\xff" * 10, self.user_version)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Versionstamp):
            return NotImplemented
        return (self.tr_version, self.user_version) == (other.tr_version, other.user_version)

    def __lt__(self, other: Versionstamp) -> bool:
        return self._key() < other._key()

    def __hash__(self) -> int:
        return hash((self.tr_version, self.user_version))

    def __repr__(self) -> str:
        tr = self.tr_version.hex() if self.tr_version is not None else "incomplete"
        return f"Versionstamp({tr}, {self.user_version})"


Element = Union[None, bytes, str, int, float, bool, uuid.UUID, Versionstamp, tuple["Element", ...]]  # noqa: UP007 (recursive alias)


def _escape(data: bytes) -> bytes:
    return data.replace(b"\x00", b"\x00\xff")


def _encode(value: object, out: bytearray, nested: bool, stamps: list[int]) -> None:
    if value is None:
        out += b"\x00\xff" if nested else b"\x00"
    elif value is True:
        out.append(_TRUE)
    elif value is False:
        out.append(_FALSE)
    elif isinstance(value, (bytes, bytearray, memoryview)):
        out.append(_BYTES)
        out += _escape(bytes(value))
        out.append(0)
    elif isinstance(value, str):
        out.append(_STRING)
        out += _escape(value.encode("utf-8"))
        out.append(0)
    elif isinstance(value, int):
        _encode_int(value, out)
    elif isinstance(value, float):
        out.append(_DOUBLE)
        bits = bytearray(struct.pack(">d", value))
        if bits[0] & 0x80:
            bits = bytearray(b ^ 0xFF for b in bits)
        else:
            bits[0] ^= 0x80
        out += bits
    elif isinstance(value, uuid.UUID):
        out.append(_UUID)
        out += value.bytes
    elif isinstance(value, Versionstamp):
        out.append(_VERSIONSTAMP)
        if not value.is_complete():
            stamps.append(len(out))
        out += value.to_bytes()
    elif isinstance(value, (tuple, list)):
        out.append(_NESTED)
        for item in value:
            _encode(item, out, True, stamps)
        out.append(0)
    else:
        raise TypeError(
            f"cannot encode {type(value).__name__!r} in a key: keys hold None, bytes, str, "
            "int, float, bool, uuid.UUID, Versionstamp and tuples of these"
        )


def _encode_int(value: int, out: bytearray) -> None:
    if value == 0:
        out.append(_INT_ZERO)
    elif value > 0:
        if value >= _SIZE_LIMITS[-1]:
            length = (value.bit_length() + 7) // 8
            if length > 255:
                raise ValueError("integer too large for a key (more than 255 bytes)")
            out.append(_POS_INT_BIG)
            out.append(length)
            out += value.to_bytes(length, "big")
        else:
            n = next(i for i, limit in enumerate(_SIZE_LIMITS) if limit >= value)
            out.append(_INT_ZERO + n)
            out += value.to_bytes(n, "big")
    else:
        magnitude = -value
        if magnitude >= _SIZE_LIMITS[-1]:
            length = (value.bit_length() + 7) // 8
            if length > 255:
                raise ValueError("integer too large for a key (more than 255 bytes)")
            out.append(_NEG_INT_BIG)
            out.append(length ^ 0xFF)
            out += (value + (1 << (8 * length)) - 1).to_bytes(length, "big")
        else:
            n = next(i for i, limit in enumerate(_SIZE_LIMITS) if limit >= magnitude)
            out.append(_INT_ZERO - n)
            out += (_SIZE_LIMITS[n] + value).to_bytes(n, "big")


def pack(items: Sequence[Element], prefix: bytes = b"") -> bytes:
    """Encode a tuple as an order-preserving key (``prefix`` is prepended raw).

    Raises ValueError if it holds an incomplete :class:`Versionstamp`; use
    :func:`pack_with_versionstamp` for ordered-commit keys.
    """
    out = bytearray(prefix)
    stamps: list[int] = []
    for item in items:
        _encode(item, out, False, stamps)
    if stamps:
        raise ValueError("pack() got an incomplete Versionstamp; use pack_with_versionstamp()")
    return bytes(out)


def pack_with_versionstamp(items: Sequence[Element], prefix: bytes = b"") -> tuple[bytes, int]:
    """Encode a tuple holding exactly one incomplete Versionstamp.

    Returns ``(key, offset)``: ``key[offset:offset + 10]`` is the placeholder
    the backend replaces with the commit's stamp. Pass both to
    :meth:`dgen.store.Transaction.set_versionstamped_key`.
    """
    out = bytearray(prefix)
    stamps: list[int] = []
    for item in items:
        _encode(item, out, False, stamps)
    if len(stamps) != 1:
        raise ValueError(f"expected exactly one incomplete Versionstamp, found {len(stamps)}")
    return bytes(out), stamps[0]


def _find_terminator(data: bytes, pos: int) -> int:
    while True:
        end = data.index(b"\x00", pos)
        if end + 1 < len(data) and data[end + 1] == 0xFF:
            pos = end + 2
            continue
        return end


def _decode(data: bytes, pos: int, nested: bool) -> tuple[Element, int]:
    code = data[pos]
    if code == _NULL:
        if nested and pos + 1 < len(data) and data[pos + 1] == 0xFF:
            return None, pos + 2
        return None, pos + 1
    if code in (_BYTES, _STRING):
        end = _find_terminator(data, pos + 1)
        raw = data[pos + 1 : end].replace(b"\x00\xff", b"\x00")
        return (raw if code == _BYTES else raw.decode("utf-8")), end + 1
    if code == _NESTED:
        items: list[Element] = []
        pos += 1
        while True:
            if data[pos] == 0x00 and not (pos + 1 < len(data) and data[pos + 1] == 0xFF):
                return tuple(items), pos + 1
            item, pos = _decode(data, pos, True)
            items.append(item)
    if _INT_ZERO - 8 <= code <= _INT_ZERO + 8:
        n = code - _INT_ZERO
        if n >= 0:
            return int.from_bytes(data[pos + 1 : pos + 1 + n], "big"), pos + 1 + n
        n = -n
        return int.from_bytes(data[pos + 1 : pos + 1 + n], "big") - _SIZE_LIMITS[n], pos + 1 + n
    if code == _POS_INT_BIG:
        length = data[pos + 1]
        return int.from_bytes(data[pos + 2 : pos + 2 + length], "big"), pos + 2 + length
    if code == _NEG_INT_BIG:
        length = data[pos + 1] ^ 0xFF
        magnitude = int.from_bytes(data[pos + 2 : pos + 2 + length], "big")
        return magnitude - (1 << (8 * length)) + 1, pos + 2 + length
    if code == _DOUBLE:
        bits = bytearray(data[pos + 1 : pos + 9])
        if bits[0] & 0x80:
            bits[0] ^= 0x80
        else:
            bits = bytearray(b ^ 0xFF for b in bits)
        return struct.unpack(">d", bits)[0], pos + 9
    if code == _FALSE:
        return False, pos + 1
    if code == _TRUE:
        return True, pos + 1
    if code == _UUID:
        return uuid.UUID(bytes=bytes(data[pos + 1 : pos + 17])), pos + 17
    if code == _VERSIONSTAMP:
        return Versionstamp.from_bytes(data[pos + 1 : pos + 13]), pos + 13
    raise ValueError(f"unknown tuple type code 0x{code:02x} at byte {pos}")


def unpack(key: bytes, prefix_len: int = 0) -> tuple[Element, ...]:
    """Decode a key made by :func:`pack`, skipping ``prefix_len`` raw bytes."""
    items: list[Element] = []
    pos = prefix_len
    try:
        while pos < len(key):
            item, pos = _decode(key, pos, False)
            items.append(item)
    except (IndexError, ValueError, struct.error) as exc:
        raise ValueError(f"not a valid tuple-encoded key: {key!r} ({exc})") from None
    return tuple(items)


def strinc(key: bytes) -> bytes:
    """The first key after every key that starts with ``key``."""
    stripped = key.rstrip(b"\xff")
    if not stripped:
        raise ValueError("key must contain at least one byte other than 0xff")
    return stripped[:-1] + bytes([stripped[-1] + 1])


def range_of(items: Sequence[Element], prefix: bytes = b"") -> tuple[bytes, bytes]:
    """``(begin, end)`` covering every key that extends the packed tuple."""
    packed = pack(items, prefix)
    return packed + b"\x00", packed + b"\xff"
