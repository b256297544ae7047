"""Incremental state layout: a state as many small keys, so a change writes little.

A state is stored under a key prefix as a tree of nodes, each at a *path*
(a tuple appended to the prefix):

* a ``dict`` whose keys are all ``str``: a marker ``path + ("m",)`` and one
  child per key at ``path + ("f", key)``;
* a dataclass instance: a marker ``path + ("d",)`` naming the class and one
  child per field at ``path + ("f", name)``;
* a non-empty ``list`` whose items are all such dicts or dataclasses with a
  unique ``str`` field ``id``: a marker ``path + ("l",)``, each item at
  ``path + ("i", id)``, and its position as a fractional index
  ``path + ("o", index) -> id``, so moving an item rewrites one small key;
* anything else: a leaf, encoded with the safe codec and split into chunks
  ``path + ("v", n)`` no larger than the backend's value limit.

:meth:`StateLayout.flatten` turns a state into ``{key: value}``;
:func:`diff` compares two flattenings, so what is written is exactly what
changed, however the handler built the new state (in place or not).
:meth:`StateLayout.rebuild` turns a range read back into the same value, types
included.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from dgen import codec, keys
from dgen.codec import DecodeError
from dgen.store import KeyValue, Transaction

__all__ = ["Changes", "Flat", "StateLayout", "between", "diff"]

Path = tuple[Any, ...]


def between(lo: bytes | None, hi: bytes | None) -> bytes:
    """A byte string strictly between ``lo`` and ``hi`` (None: unbounded)."""
    if lo is not None and hi is not None and not lo < hi:
        raise ValueError(f"no fractional index between {lo!r} and {hi!r}")
    low = lo or b""
    out = bytearray()
    i = 0
    while True:
        a = low[i] if i < len(low) else 0
        b = hi[i] if hi is not None and i < len(hi) else 256
        if b - a > 1:
            out.append((a + b) // 2)
            return bytes(out)
        out.append(a)
        if a < b:
            hi = None  # the prefix is now below hi, so hi no longer bounds us
        i += 1


def _spread(lo: bytes | None, hi: bytes | None, count: int) -> list[bytes]:
    """``count`` increasing indexes between lo and hi, short by bisection."""
    if count <= 0:
        return []
    mid = between(lo, hi)
    half = (count - 1) // 2
    return [*_spread(lo, mid, half), mid, *_spread(mid, hi, count - 1 - half)]


def _keep_in_order(fracs: list[bytes | None]) -> set[int]:
    """Positions of a longest strictly increasing run of known indexes."""
    tails: list[bytes] = []
    tail_pos: list[int] = []
    parent: dict[int, int] = {}
    for pos, frac in enumerate(fracs):
        if frac is None:
            continue
        i = bisect.bisect_left(tails, frac)
        if i == len(tails):
            tails.append(frac)
            tail_pos.append(pos)
        else:
            tails[i] = frac
            tail_pos[i] = pos
        if i > 0:
            parent[pos] = tail_pos[i - 1]
    kept: set[int] = set()
    node = tail_pos[-1] if tail_pos else None
    while node is not None:
        kept.add(node)
        node = parent.get(node)
    return kept


@dataclass
class Flat:
    """A flattened state: its keys and values, and each list's indexes."""

    entries: dict[bytes, bytes] = field(default_factory=dict)
    indexes: dict[Path, dict[str, bytes]] = field(default_factory=dict)


@dataclass
class Changes:
    """What :func:`diff` found: keys to set and keys to clear."""

    sets: dict[bytes, bytes]
    clears: list[bytes]

    @property
    def keys_touched(self) -> int:
        return len(self.sets) + len(self.clears)

    @property
    def bytes_written(self) -> int:
        return sum(len(k) + len(v) for k, v in self.sets.items()) + sum(map(len, self.clears))

    def apply(self, tr: Transaction) -> None:
        for key in self.clears:
            tr.clear(key)
        for key, value in self.sets.items():
            tr.set(key, value)


def diff(old: Flat | None, new: Flat) -> Changes:
    """The writes that turn the stored ``old`` flattening into ``new``."""
    before = old.entries if old is not None else {}
    sets = {k: v for k, v in new.entries.items() if before.get(k) != v}
    clears = [k for k in before if k not in new.entries]
    return Changes(sets, clears)


_PACKED: dict[str | bytes | int, bytes] = {}


def _pack1(element: str | bytes | int) -> bytes:
    """``keys.pack((element,))``, memoised: field names and chunk numbers repeat
    in every flatten, and packing dominated its time."""
    packed = _PACKED.get(element)
    if packed is None:
        packed = keys.pack((element,))
        if len(_PACKED) < 50_000:
            _PACKED[element] = packed
    return packed


_M, _D, _L, _F, _I, _O, _V = (_pack1(tag) for tag in ("m", "d", "l", "f", "i", "o", "v"))


def _describe(path: Path) -> str:
    """A path as the user wrote it: ``state['rooms'][id='r1']['log']``."""
    out = "state"
    for kind, name in zip(path[::2], path[1::2], strict=True):
        out += f"[{name!r}]" if kind == "f" else f"[id={name!r}]"
    return out


def _item_id(item: Any) -> str | None:
    if type(item) is dict:
        ident = item.get("id")
        return ident if type(ident) is str and all(type(k) is str for k in item) else None
    if dataclasses.is_dataclass(item) and not isinstance(item, type):
        ident = getattr(item, "id", None)
        return ident if type(ident) is str else None
    return None


def _list_ids(value: list[Any]) -> list[str] | None:
    if not value:
        return None
    ids = [_item_id(item) for item in value]
    if any(i is None for i in ids) or len(set(ids)) != len(ids):
        return None
    return ids  # type: ignore[return-value]


class StateLayout:
    """Reads and writes one state under ``prefix`` (bytes every key starts with)."""

    def __init__(self, prefix: bytes, max_value_size: int) -> None:
        self.prefix = prefix
        self.chunk_size = max(1, max_value_size)

    @property
    def range(self) -> tuple[bytes, bytes]:
        return self.prefix, keys.strinc(self.prefix)

    # -- writing -----------------------------------------------------------

    def flatten(self, state: Any, previous: Flat | None = None) -> Flat:
        """Lay ``state`` out as keys. ``previous`` (the stored layout) lets
        unmoved list items keep their indexes. Raises
        :class:`dgen.codec.UnencodableError` for values the codec refuses."""
        flat = Flat()
        self._node((), self.prefix, state, flat, previous.indexes if previous is not None else {})
        return flat

    def _node(
        self, path: Path, base: bytes, value: Any, flat: Flat, old: dict[Path, dict[str, bytes]]
    ) -> None:
        # ``base`` is ``pack(path, prefix)``: a packed tuple is the concatenation
        # of its packed elements, so children extend it instead of re-packing
        # the whole path (which dominated flatten's time for large lists).
        entries = flat.entries
        if type(value) is dict and all(type(k) is str for k in value):
            entries[base + _M] = b""
            for name, child in value.items():
                self._node((*path, "f", name), base + _F + _pack1(name), child, flat, old)
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            cls = type(value)
            entries[base + _D] = codec.encode((cls.__module__, cls.__qualname__))
            for f in dataclasses.fields(value):
                child_key = base + _F + _pack1(f.name)
                self._node((*path, "f", f.name), child_key, getattr(value, f.name), flat, old)
        elif type(value) is list and (ids := _list_ids(value)) is not None:
            entries[base + _L] = b""
            indexes = self._indexes(ids, old.get(path, {}))
            flat.indexes[path] = indexes
            for ident, item in zip(ids, value, strict=True):
                packed_id = _pack1(ident)
                entries[base + _O + _pack1(indexes[ident])] = ident.encode()
                self._node((*path, "i", ident), base + _I + packed_id, item, flat, old)
        else:
            try:
                data = codec.encode(value)
            except codec.UnencodableError as exc:
                raise codec.UnencodableError(f"in the state at {_describe(path)}: {exc}") from None
            for n, start in enumerate(range(0, max(len(data), 1), self.chunk_size)):
                entries[base + _V + _pack1(n)] = data[start : start + self.chunk_size]

    @staticmethod
    def _indexes(ids: list[str], old: dict[str, bytes]) -> dict[str, bytes]:
        fracs = [old.get(i) for i in ids]
        kept = _keep_in_order(fracs)
        result: dict[str, bytes] = {}
        pos = 0
        lo: bytes | None = None
        while pos < len(ids):
            if pos in kept:
                lo = fracs[pos]
                assert lo is not None
                result[ids[pos]] = lo
                pos += 1
                continue
            end = pos
            while end < len(ids) and end not in kept:
                end += 1
            hi = fracs[end] if end < len(ids) else None
            for ident, frac in zip(ids[pos:end], _spread(lo, hi, end - pos), strict=True):
                result[ident] = frac
            pos = end
        return result

    # -- reading -----------------------------------------------------------

    async def read(self, tr: Transaction) -> tuple[bool, Any, Flat]:
        """``(found, state, flat)`` from one range read of the state's keys."""
        pairs = await tr.get_range(*self.range)
        if not pairs:
            return False, None, Flat()
        state, flat = self.rebuild(pairs)
        return True, state, flat

    def rebuild(self, pairs: Iterable[KeyValue]) -> tuple[Any, Flat]:
        """The state and its flattening from the pairs under the prefix."""
        flat = Flat()
        tree: dict[Any, Any] = {}
        skip = len(self.prefix)
        for key, value in pairs:
            flat.entries[key] = value
            path = keys.unpack(key, skip)
            node = tree
            for part in path[:-1]:
                node = node.setdefault(part, {})
            node[path[-1]] = value
        return self._build((), tree, flat), flat

    def _dataclass(self, cls: Any, path: Path, stored: dict[str, Any], flat: Flat) -> Any:
        # Fields are restored directly, as the codec does (no __init__ runs).
        # Schema evolution: a field added to the class since the state was
        # written takes its default; a stored field the class no longer has
        # is dropped.
        obj = cls.__new__(cls)
        for f in dataclasses.fields(cls):
            if f.name in stored:
                value = self._build((*path, "f", f.name), stored[f.name], flat)
            elif f.default is not dataclasses.MISSING:
                value = f.default
            elif f.default_factory is not dataclasses.MISSING:
                value = f.default_factory()
            else:
                raise DecodeError(
                    f"stored {cls.__qualname__} has no field {f.name!r} and the class gives "
                    "it no default; add a default to migrate old states"
                )
            object.__setattr__(obj, f.name, value)
        return obj

    def _build(self, path: Path, node: dict[Any, Any], flat: Flat) -> Any:
        try:
            if "m" in node:
                return {
                    name: self._build((*path, "f", name), child, flat)
                    for name, child in node.get("f", {}).items()
                }
            if "d" in node:
                module, qualname = codec.decode(node["d"])
                cls = codec._find_class(module, qualname)
                return self._dataclass(cls, path, node.get("f", {}), flat)
            if "l" in node:
                order = sorted(node.get("o", {}).items())
                flat.indexes[path] = {ident.decode(): frac for frac, ident in order}
                items = node.get("i", {})
                return [
                    self._build((*path, "i", ident.decode()), items[ident.decode()], flat)
                    for _, ident in order
                ]
            chunks = node["v"]
            return codec.decode(b"".join(chunks[n] for n in range(len(chunks))))
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, DecodeError):
                raise
            raise DecodeError(
                f"stored state is damaged at {path!r} under prefix {self.prefix!r}: {exc!r}"
            ) from None
