"""The safe codec: messages, replies and state as bytes, without pickle.

A compact, tagged binary format. It encodes None, bool, int, float, str,
bytes, list, tuple, dict (any encodable keys), set, frozenset, UUID,
datetime, date, Decimal and dataclass instances; anything else is refused
with :class:`UnencodableError` naming the type and where it was found.

Decoding never imports a module and never runs user code: a dataclass is
rebuilt only if its module is already in ``sys.modules`` and the name there
is a dataclass; its fields are restored directly (``__init__`` and
``__post_init__`` are not called). Subclasses of the built-in types (enums,
``str`` subclasses) are refused rather than silently decoded as their base.

Format: one version byte, then the value. Each value starts with a one-byte
tag; lengths and counts are unsigned LEB128 varints.
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import struct
import sys
import uuid
from collections.abc import Callable
from typing import Any

from dgen.store import DGenError

__all__ = ["DecodeError", "UnencodableError", "decode", "encode"]

_VERSION = 1

_NONE, _TRUE, _FALSE = b"N", b"T", b"F"
_INT, _BIGINT, _FLOAT = ord("i"), ord("I"), ord("f")
_STR, _BYTES = ord("s"), ord("b")
_LIST, _TUPLE, _DICT, _SET, _FROZENSET = ord("l"), ord("t"), ord("d"), ord("S"), ord("Z")
_UUID, _DATETIME, _DATE, _DECIMAL, _DATACLASS = ord("U"), ord("D"), ord("a"), ord("m"), ord("c")

_pack_q = struct.Struct(">q").pack
_unpack_q = struct.Struct(">q").unpack_from
_pack_d = struct.Struct(">d").pack
_unpack_d = struct.Struct(">d").unpack_from


class UnencodableError(DGenError, TypeError):
    """A value cannot be stored: its type is not one the safe codec knows.

    Raised by ``cast``/``call`` before anything is written, and by the
    consumer when a handler returns such a value (the transaction aborts).
    """


class DecodeError(DGenError, ValueError):
    """Stored bytes cannot be decoded (corrupt data, or a dataclass whose
    module is not imported in this process)."""


def _varint(out: bytearray, n: int) -> None:
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)


def _enc_int(value: int, out: bytearray) -> None:
    if -(1 << 63) <= value < (1 << 63):
        out.append(_INT)
        out += _pack_q(value)
    else:
        raw = value.to_bytes((value.bit_length() + 8) // 8, "big", signed=True)
        out.append(_BIGINT)
        _varint(out, len(raw))
        out += raw


def _enc_float(value: float, out: bytearray) -> None:
    out.append(_FLOAT)
    out += _pack_d(value)


def _enc_str(value: str, out: bytearray) -> None:
    raw = value.encode("utf-8", "surrogatepass")
    out.append(_STR)
    _varint(out, len(raw))
    out += raw


def _enc_bytes(value: bytes, out: bytearray) -> None:
    out.append(_BYTES)
    _varint(out, len(value))
    out += value


def _enc_items(tag: int, items: Any, out: bytearray) -> None:
    out.append(tag)
    _varint(out, len(items))
    for i, item in enumerate(items):
        try:
            _enc(item, out)
        except UnencodableError as exc:
            raise _at(exc, f"[{i}]") from None


def _enc_list(value: list[Any], out: bytearray) -> None:
    _enc_items(_LIST, value, out)


def _enc_tuple(value: tuple[Any, ...], out: bytearray) -> None:
    _enc_items(_TUPLE, value, out)


def _enc_set(value: set[Any] | frozenset[Any], out: bytearray) -> None:
    # Sets are unordered: sort the encoded members so equal sets give equal bytes
    # (the consumer compares bytes to skip unchanged state writes).
    members: list[bytes] = []
    for item in value:
        part = bytearray()
        try:
            _enc(item, part)
        except UnencodableError as exc:
            raise _at(exc, f" member {item!r:.40}") from None
        members.append(bytes(part))
    members.sort()
    out.append(_SET if type(value) is set else _FROZENSET)
    _varint(out, len(members))
    for member in members:
        out += member


def _enc_dict(value: dict[Any, Any], out: bytearray) -> None:
    out.append(_DICT)
    _varint(out, len(value))
    for key, item in value.items():
        try:
            _enc(key, out)
        except UnencodableError as exc:
            raise _at(exc, " (a dict key)") from None
        try:
            _enc(item, out)
        except UnencodableError as exc:
            raise _at(exc, f"[{key!r:.40}]") from None


def _enc_uuid(value: uuid.UUID, out: bytearray) -> None:
    out.append(_UUID)
    out += value.bytes


def _enc_datetime(value: datetime.datetime, out: bytearray) -> None:
    out.append(_DATETIME)
    raw = value.isoformat().encode()
    _varint(out, len(raw))
    out += raw


def _enc_date(value: datetime.date, out: bytearray) -> None:
    out.append(_DATE)
    raw = value.isoformat().encode()
    _varint(out, len(raw))
    out += raw


def _enc_decimal(value: decimal.Decimal, out: bytearray) -> None:
    out.append(_DECIMAL)
    raw = str(value).encode()
    _varint(out, len(raw))
    out += raw


_ENCODERS: dict[type, Callable[[Any, bytearray], None]] = {
    int: _enc_int,
    float: _enc_float,
    str: _enc_str,
    bytes: _enc_bytes,
    list: _enc_list,
    tuple: _enc_tuple,
    dict: _enc_dict,
    set: _enc_set,
    frozenset: _enc_set,
    uuid.UUID: _enc_uuid,
    datetime.datetime: _enc_datetime,
    datetime.date: _enc_date,
    decimal.Decimal: _enc_decimal,
}


def _at(exc: UnencodableError, where: str) -> UnencodableError:
    path = getattr(exc, "path", "")
    new = UnencodableError(*exc.args)
    new.path = where + path  # type: ignore[attr-defined]
    new.kind = getattr(exc, "kind", "?")  # type: ignore[attr-defined]
    return new


def _enc(value: Any, out: bytearray) -> None:
    if value is None:
        out += _NONE
    elif value is True:
        out += _TRUE
    elif value is False:
        out += _FALSE
    else:
        encoder = _ENCODERS.get(type(value))
        if encoder is not None:
            encoder(value, out)
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            _enc_dataclass(value, out)
        else:
            exc = UnencodableError(type(value))
            exc.path = ""  # type: ignore[attr-defined]
            exc.kind = _type_name(type(value))  # type: ignore[attr-defined]
            raise exc


def _type_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}" if cls.__module__ != "builtins" else cls.__name__


def _enc_dataclass(value: Any, out: bytearray) -> None:
    cls = type(value)
    if "<locals>" in cls.__qualname__:
        exc = UnencodableError(cls)
        exc.path = ""  # type: ignore[attr-defined]
        exc.kind = (  # type: ignore[attr-defined]
            f"{_type_name(cls)} (a dataclass defined inside a function cannot be found "
            "again when decoding; define it at module level)"
        )
        raise exc
    out.append(_DATACLASS)
    _enc_str(cls.__module__, out)
    _enc_str(cls.__qualname__, out)
    fields = dataclasses.fields(value)
    _varint(out, len(fields))
    for f in fields:
        _enc_str(f.name, out)
        try:
            _enc(getattr(value, f.name), out)
        except UnencodableError as exc:
            raise _at(exc, f".{f.name}") from None


def encode(value: object) -> bytes:
    """Encode ``value`` to bytes, or raise :class:`UnencodableError`.

    The error message names the refused type and where it sits in the value,
    e.g. ``value['conn']``.
    """
    out = bytearray((_VERSION,))
    try:
        _enc(value, out)
    except UnencodableError as exc:
        kind = getattr(exc, "kind", "?")
        path = getattr(exc, "path", "")
        raise UnencodableError(
            f"cannot encode a value of type {kind} at value{path}: DGen stores None, bool, "
            "int, float, str, bytes, list, tuple, dict, set, frozenset, UUID, datetime, "
            "date, Decimal and dataclasses of these (messages carry data, not live objects "
            "such as sockets, locks or functions)"
        ) from None
    except RecursionError:
        raise UnencodableError(
            "cannot encode a value nested too deeply or containing itself (a cycle)"
        ) from None
    return bytes(out)


def _varint_at(data: bytes, pos: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _find_class(module_name: str, qualname: str) -> Any:
    module = sys.modules.get(module_name)
    if module is None:
        raise DecodeError(
            f"stored data holds a {module_name}.{qualname} dataclass, but module "
            f"{module_name!r} is not imported in this process; import it before decoding "
            "(DGen never imports modules named by stored data)"
        )
    obj: Any = module
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            break
    if not (isinstance(obj, type) and dataclasses.is_dataclass(obj)):
        raise DecodeError(
            f"stored data holds a {module_name}.{qualname} dataclass, but that name is "
            "not a dataclass in the imported module (renamed or removed?)"
        )
    return obj


def _dec(data: bytes, pos: int) -> tuple[Any, int]:
    tag = data[pos]
    pos += 1
    if tag == _INT:
        return _unpack_q(data, pos)[0], pos + 8
    if tag == _STR:
        n, pos = _varint_at(data, pos)
        return data[pos : pos + n].decode("utf-8", "surrogatepass"), pos + n
    if tag == 78:  # N
        return None, pos
    if tag == 84:  # T
        return True, pos
    if tag == 70:  # F
        return False, pos
    if tag == _DICT:
        n, pos = _varint_at(data, pos)
        result: dict[Any, Any] = {}
        for _ in range(n):
            key, pos = _dec(data, pos)
            result[key], pos = _dec(data, pos)
        return result, pos
    if tag in (_LIST, _TUPLE, _SET, _FROZENSET):
        n, pos = _varint_at(data, pos)
        items = []
        for _ in range(n):
            item, pos = _dec(data, pos)
            items.append(item)
        if tag == _LIST:
            return items, pos
        if tag == _TUPLE:
            return tuple(items), pos
        return (set(items) if tag == _SET else frozenset(items)), pos
    if tag == _FLOAT:
        return _unpack_d(data, pos)[0], pos + 8
    if tag == _BYTES:
        n, pos = _varint_at(data, pos)
        return bytes(data[pos : pos + n]), pos + n
    if tag == _BIGINT:
        n, pos = _varint_at(data, pos)
        return int.from_bytes(data[pos : pos + n], "big", signed=True), pos + n
    if tag == _UUID:
        return uuid.UUID(bytes=bytes(data[pos : pos + 16])), pos + 16
    if tag in (_DATETIME, _DATE, _DECIMAL):
        n, pos = _varint_at(data, pos)
        text = data[pos : pos + n].decode()
        if tag == _DATETIME:
            return datetime.datetime.fromisoformat(text), pos + n
        if tag == _DATE:
            return datetime.date.fromisoformat(text), pos + n
        return decimal.Decimal(text), pos + n
    if tag == _DATACLASS:
        module_name, pos = _dec(data, pos)
        qualname, pos = _dec(data, pos)
        cls = _find_class(module_name, qualname)
        n, pos = _varint_at(data, pos)
        obj = cls.__new__(cls)
        for _ in range(n):
            name, pos = _dec(data, pos)
            value, pos = _dec(data, pos)
            object.__setattr__(obj, name, value)  # works for frozen and slots classes
        return obj, pos
    raise DecodeError(f"unknown codec tag {tag!r} at byte {pos - 1}")


def decode(data: bytes) -> Any:
    """Decode bytes made by :func:`encode`; raise :class:`DecodeError` if they are
    not valid or name a dataclass this process has not imported."""
    if not data or data[0] != _VERSION:
        raise DecodeError(
            f"not DGen codec data (format byte {data[:1]!r}, expected {bytes([_VERSION])!r})"
        )
    try:
        value, pos = _dec(data, 1)
    except DecodeError:
        raise
    except (IndexError, ValueError, struct.error, UnicodeDecodeError) as exc:
        raise DecodeError(f"corrupt DGen codec data: {exc}") from None
    if pos != len(data):
        raise DecodeError(f"corrupt DGen codec data: {len(data) - pos} trailing bytes")
    return value
