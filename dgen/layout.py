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

Cost proportional to the change: a flattening keeps a *shadow* of what it
laid out (each node's kind, its children, and for each leaf the object and its
encoded chunks). The next :meth:`~StateLayout.flatten` walks the new state
against that shadow and re-encodes only leaves that may have changed, so
:func:`diff` is handed the writes instead of comparing every key. Handlers may
mutate the state in place, so a container (dict, list, dataclass) is never
trusted by identity: it is always descended into, but cheaply (its keys and
children compared by identity, in C). Only a leaf that is *deeply immutable*
(str, int, float, bool, None, bytes, date, naive or fixed-offset datetime, and
tuples / frozensets of these) and is the very object laid out last time is
assumed to encode to the same bytes; any other leaf is re-encoded and its bytes
compared. The shadow is never mutated, so the previous flattening stays valid
if the transaction that used the new one fails.
"""

from __future__ import annotations

import bisect
import dataclasses
import datetime
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import compress, count, repeat
from operator import is_, is_not
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


class Flat:
    """A flattened state: its keys and values (``entries``), and each list's
    fractional indexes (``indexes``, keyed by the list's path)."""

    __slots__ = ("__weakref__", "_base", "_changes", "_owner", "_root", "entries")

    def __init__(self, entries: dict[bytes, bytes] | None = None) -> None:
        self.entries: dict[bytes, bytes] = {} if entries is None else entries
        # The shadow of ``entries`` (None: unknown, the next flatten starts over),
        # the layout it belongs to, and the writes from the flattening it was
        # computed against (a weak reference: Flats must not chain in memory).
        self._root: _Node | None = None
        self._owner: tuple[bytes, int] | None = None
        self._base: weakref.ref[Flat] | None = None
        self._changes: Changes | None = None

    @property
    def indexes(self) -> dict[Path, dict[str, bytes]]:
        out: dict[Path, dict[str, bytes]] = {}
        if self._root is not None:
            _collect_indexes((), self._root, out)
        return out


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
    if old is not None and new._base is not None and new._base() is old:
        assert new._changes is not None
        return new._changes  # found by the flatten that made ``new`` from ``old``
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


# -- the shadow of a flattening ------------------------------------------------
#
# Nodes are never mutated once built: a new flattening shares the unchanged
# nodes of the previous one and builds new ones along the changed paths.

_ATOMS = frozenset({str, int, float, bool, bytes, type(None), datetime.date})


def _frozen(value: Any) -> bool:
    """Whether ``value`` can never encode differently than it does now."""
    kind = type(value)
    if kind in _ATOMS:
        return True
    if kind is tuple or kind is frozenset:
        return all(map(_frozen, value))
    if kind is datetime.datetime:
        # isoformat() asks the tzinfo for its offset: only a fixed one is stable.
        return value.tzinfo is None or type(value.tzinfo) is datetime.timezone
    return False


class _Leaf:
    """A value stored as chunks ``("v", n)``."""

    __slots__ = ("chunks", "fixed", "obj")

    def __init__(self, obj: Any, chunks: tuple[bytes, ...]) -> None:
        self.obj = obj
        self.chunks = chunks
        # Deeply immutable and laid out from this very object: the same object
        # next time has the same chunks, without encoding it again.
        self.fixed = _frozen(obj)


class _Map:
    """A str-keyed dict (``mark`` None) or a dataclass (``mark``: its class)."""

    __slots__ = ("cls", "kids", "mark", "names", "objs", "walk")

    def __init__(
        self,
        cls: type,
        mark: bytes | None,
        names: tuple[str, ...],
        objs: tuple[Any, ...],
        kids: tuple[_Node, ...],
        walk: tuple[int, ...] | None = None,
    ) -> None:
        self.cls: Any = cls  # Any: ``type(x) is cls`` must not narrow x to object
        self.mark = mark
        self.names = names
        self.objs = objs  # the children laid out, by position
        self.kids = kids
        # Positions to look into every time: all but the fixed leaves, whose
        # object identity is proof enough.
        self.walk = (
            tuple(i for i, kid in enumerate(kids) if type(kid) is not _Leaf or not kid.fixed)
            if walk is None
            else walk
        )


class _List:
    """A list of items with str ids, by position, and their fractional indexes."""

    __slots__ = ("fracs", "ids", "items")

    def __init__(self, ids: tuple[str, ...], items: tuple[_Map, ...], fracs: dict[str, bytes]):
        self.ids = ids
        self.items = items
        self.fracs = fracs


_Node = _Leaf | _Map | _List


def _collect_indexes(path: Path, node: _Node, out: dict[Path, dict[str, bytes]]) -> None:
    if type(node) is _Map:
        for name, kid in zip(node.names, node.kids, strict=True):
            _collect_indexes((*path, "f", name), kid, out)
    elif type(node) is _List:
        out[path] = dict(node.fracs)
        for ident, item in zip(node.ids, node.items, strict=True):
            _collect_indexes((*path, "i", ident), item, out)


def _count(node: _Node) -> int:
    """How many keys ``node`` stands for."""
    if type(node) is _Leaf:
        return len(node.chunks)
    if type(node) is _Map:
        return 1 + sum(map(_count, node.kids))
    assert type(node) is _List
    return 1 + len(node.fracs) + sum(map(_count, node.items))


class _Unencodable(Exception):
    """Carries a codec error up to :meth:`StateLayout.flatten`, collecting
    where in the state it happened (innermost part first)."""

    def __init__(self, error: codec.UnencodableError) -> None:
        self.error = error
        self.parts: list[tuple[str, str]] = []


class _Walk:
    """One flattening: lays a value out against the shadow of the previous one
    and collects the writes (``sets``, ``clears``) between them."""

    __slots__ = ("chunk", "clears", "sets")

    def __init__(self, chunk: int) -> None:
        self.chunk = chunk
        self.sets: dict[bytes, bytes] = {}
        self.clears: list[bytes] = []

    def node(self, base: bytes, value: Any, old: _Node | None) -> _Node:
        """Lay ``value`` out under the packed key ``base``, writing what differs
        from ``old`` (what is stored there now; None: nothing)."""
        kind = type(value)
        if kind is dict:
            if (
                type(old) is _Map
                and old.cls is dict
                and len(value) == len(old.names)
                and all(map(is_, value, old.names))
            ):
                return self.same_fields(base, old, tuple(value.values()))
            if all(map(is_, map(type, value), repeat(str))):
                return self.fields(base, dict, None, tuple(value), tuple(value.values()), old)
        elif kind is list:
            if value:
                made = self.update_list(base, value, old) if type(old) is _List else None
                if made is not None:
                    return made
                if type(old) is not _List and (ids := _list_ids(value)) is not None:
                    return self.new_list(base, value, ids, old)
        elif kind not in _ATOMS and kind is not tuple:
            if type(old) is _Map and old.cls is kind:
                return self.same_fields(base, old, tuple(map(getattr, repeat(value), old.names)))
            if dataclasses.is_dataclass(value) and not isinstance(value, type):
                names = tuple(f.name for f in dataclasses.fields(value))
                mark = codec.encode((kind.__module__, kind.__qualname__))
                values = tuple(map(getattr, repeat(value), names))
                return self.fields(base, kind, mark, names, values, old)
        return self.leaf(base, value, old)

    def leaf(self, base: bytes, value: Any, old: _Node | None) -> _Leaf:
        if type(old) is _Leaf and value is old.obj and old.fixed:
            return old
        try:
            data = codec.encode(value)
        except codec.UnencodableError as exc:
            raise _Unencodable(exc) from None
        size = self.chunk
        if len(data) <= size:
            chunks: tuple[bytes, ...] = (data,)
        else:
            chunks = tuple(data[i : i + size] for i in range(0, len(data), size))
        sets = self.sets
        if type(old) is _Leaf:
            before = old.chunks
            if chunks == before:
                return old if value is old.obj else _Leaf(value, before)
            for n, chunk in enumerate(chunks):
                if n >= len(before) or before[n] != chunk:
                    sets[base + _V + _pack1(n)] = chunk
            self.clears.extend(base + _V + _pack1(n) for n in range(len(chunks), len(before)))
        else:
            if old is not None:
                self.drop(base, old)
            for n, chunk in enumerate(chunks):
                sets[base + _V + _pack1(n)] = chunk
        return _Leaf(value, chunks)

    def fields(
        self,
        base: bytes,
        cls: type,
        mark: bytes | None,
        names: tuple[str, ...],
        values: tuple[Any, ...],
        old: _Node | None,
    ) -> _Map:
        """A dict or dataclass laid out afresh, or over a map of other fields
        or class (a dict and a dataclass share the children's keys)."""
        sets = self.sets
        mark_key = base + (_M if mark is None else _D)
        previous: dict[str, _Node] = {}
        if type(old) is _Map:
            old_key = base + (_M if old.mark is None else _D)
            if old_key != mark_key:
                self.clears.append(old_key)
                sets[mark_key] = mark or b""
            elif old.mark != mark:
                sets[mark_key] = mark or b""
            previous = dict(zip(old.names, old.kids, strict=True))
        else:
            if old is not None:
                self.drop(base, old)
            sets[mark_key] = mark or b""
        kids = []
        name = ""
        try:
            for name, child in zip(names, values, strict=True):
                kids.append(self.node(base + _F + _pack1(name), child, previous.pop(name, None)))
        except _Unencodable as exc:
            exc.parts.append(("f", name))
            raise
        for gone, kid in previous.items():
            self.drop(base + _F + _pack1(gone), kid)
        return _Map(cls, mark, names, values, tuple(kids))

    def same_fields(self, base: bytes, old: _Map, values: tuple[Any, ...]) -> _Map:
        """A map with the same names (and class) as ``old``: only children that
        are not the same fixed leaves are looked at."""
        todo = set(compress(range(len(values)), map(is_not, values, old.objs)))
        todo.update(old.walk)
        if not todo:
            return old
        kids = list(old.kids)
        names = old.names
        changed = False
        walk: set[int] | None = None
        pos = 0
        try:
            for pos in todo:
                before = kids[pos]
                kid = self.node(base + _F + _pack1(names[pos]), values[pos], before)
                if kid is not before:
                    kids[pos] = kid
                    if not changed:
                        changed = True
                        walk = set(old.walk)
                    assert walk is not None
                    if type(kid) is _Leaf and kid.fixed:
                        walk.discard(pos)
                    else:
                        walk.add(pos)
        except _Unencodable as exc:
            exc.parts.append(("f", names[pos]))
            raise
        if not changed:
            # Every child that is not a walked container is the same object as
            # last time (a fixed leaf given another object yields a new _Leaf).
            return old
        assert walk is not None
        return _Map(old.cls, old.mark, names, values, tuple(kids), tuple(sorted(walk)))

    def new_list(self, base: bytes, value: list[Any], ids: list[str], old: _Node | None) -> _List:
        if old is not None:
            self.drop(base, old)
        sets = self.sets
        sets[base + _L] = b""
        fracs = StateLayout._indexes(ids, {})
        for ident in ids:
            sets[base + _O + _pack1(fracs[ident])] = ident.encode()
        items = []
        ident = ""
        try:
            for ident, item in zip(ids, value, strict=True):
                made = self.node(base + _I + _pack1(ident), item, None)
                assert type(made) is _Map  # an item with an id is a dict or dataclass
                items.append(made)
        except _Unencodable as exc:
            exc.parts.append(("i", ident))
            raise
        return _List(tuple(ids), tuple(items), fracs)

    def update_list(self, base: bytes, value: list[Any], old: _List) -> _List | None:
        """``value`` over a stored list of items, or None if ``value`` is not a
        list of items with unique str ids (then it is a leaf). Writes nothing
        before it knows."""
        before = old.items
        todo: list[int] = []
        # Fast path, the hot loop of a large list: an item that is a dict (or
        # dataclass) whose children are the same fixed leaves, under the same
        # keys, as the item laid out at its position is unchanged, id included.
        for pos, item, prev in zip(count(), value, before):
            if prev.walk or type(item) is not prev.cls:
                todo.append(pos)
            elif prev.mark is None:
                if not (
                    len(item) == len(prev.names)
                    and all(map(is_, item.values(), prev.objs))
                    and all(map(is_, item, prev.names))
                ):
                    todo.append(pos)
            elif not all(map(is_, map(getattr, repeat(item), prev.names), prev.objs)):
                todo.append(pos)
        todo.extend(range(len(before), len(value)))
        ids = list(old.ids[: len(value)])
        ids.extend(repeat("", len(value) - len(ids)))
        items: list[_Map | None] = list(before[: len(value)])
        items.extend(repeat(None, len(value) - len(items)))
        for pos in todo:
            ident = _item_id(value[pos])
            if ident is None:
                return None
            ids[pos] = ident
            items[pos] = None
        new_ids = tuple(ids)
        before_ids = old.ids
        same_order = new_ids == before_ids
        if not todo and same_order:
            return old
        known = set(new_ids)
        if not same_order and len(known) != len(new_ids):
            return None
        sets = self.sets
        clears = self.clears
        by_id: dict[str, _Map] = {}
        if same_order:
            fracs = old.fracs
        else:
            fracs = StateLayout._indexes(ids, old.fracs)
            by_id = dict(zip(before_ids, before, strict=True))
            order_before = {frac: ident for ident, frac in old.fracs.items()}
            for ident, frac in fracs.items():
                if order_before.get(frac) != ident:
                    sets[base + _O + _pack1(frac)] = ident.encode()
            in_use = set(fracs.values())
            clears.extend(base + _O + _pack1(f) for f in order_before if f not in in_use)
            for ident, prev in by_id.items():
                if ident not in known:
                    self.drop(base + _I + _pack1(ident), prev)
        ident = ""
        try:
            for pos in todo:
                ident = ids[pos]
                prev_item = before[pos] if same_order else by_id.get(ident)
                made = self.node(base + _I + _pack1(ident), value[pos], prev_item)
                assert type(made) is _Map
                items[pos] = made
        except _Unencodable as exc:
            exc.parts.append(("i", ident))
            raise
        return _List(new_ids, tuple(items), fracs)  # type: ignore[arg-type]

    def drop(self, base: bytes, old: _Node) -> None:
        """Clear every key of the stored node ``old``."""
        clears = self.clears
        if type(old) is _Leaf:
            clears.extend(base + _V + _pack1(n) for n in range(len(old.chunks)))
        elif type(old) is _Map:
            clears.append(base + (_M if old.mark is None else _D))
            for name, kid in zip(old.names, old.kids, strict=True):
                self.drop(base + _F + _pack1(name), kid)
        else:
            assert type(old) is _List
            clears.append(base + _L)
            clears.extend(base + _O + _pack1(frac) for frac in old.fracs.values())
            for ident, item in zip(old.ids, old.items, strict=True):
                self.drop(base + _I + _pack1(ident), item)


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
        unmoved list items keep their indexes, and makes the work (and the
        later :func:`diff`) proportional to what changed since it. Raises
        :class:`dgen.codec.UnencodableError` for values the codec refuses."""
        owner = (self.prefix, self.chunk_size)
        usable = previous is not None and previous._root is not None and previous._owner == owner
        walk = _Walk(self.chunk_size)
        try:
            root = walk.node(self.prefix, state, previous._root if usable else None)  # type: ignore[union-attr]
        except _Unencodable as exc:
            path = tuple(part for pair in reversed(exc.parts) for part in pair)
            raise codec.UnencodableError(
                f"in the state at {_describe(path)}: {exc.error}"
            ) from None
        if not usable:
            flat = Flat(walk.sets)  # laid out from nothing: every key is a set
        else:
            assert previous is not None
            entries = previous.entries.copy()
            for key in walk.clears:
                del entries[key]
            entries.update(walk.sets)
            flat = Flat(entries)
            flat._base = weakref.ref(previous)
            flat._changes = Changes(walk.sets, walk.clears)
        flat._root = root
        flat._owner = owner
        return flat

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
        state, root = self._build((), tree)
        # The shadow lets the next flatten skip what is unchanged; it must
        # stand for exactly the stored keys, so any stray key (or a field
        # filled by a default) leaves it out and the next flatten starts over.
        if root is not None and _count(root) == len(flat.entries):
            flat._root = root
            flat._owner = (self.prefix, self.chunk_size)
        return state, flat

    def _dataclass(self, cls: Any, path: Path, stored: dict[str, Any]) -> tuple[Any, _Node | None]:
        # Fields are restored directly, as the codec does (no __init__ runs).
        # Schema evolution: a field added to the class since the state was
        # written takes its default; a stored field the class no longer has
        # is dropped.
        obj = cls.__new__(cls)
        names: list[str] = []
        values: list[Any] = []
        kids: list[_Node | None] = []
        for f in dataclasses.fields(cls):
            if f.name in stored:
                value, kid = self._build((*path, "f", f.name), stored[f.name])
            elif f.default is not dataclasses.MISSING:
                value, kid = f.default, None  # not stored: no shadow
            elif f.default_factory is not dataclasses.MISSING:
                value, kid = f.default_factory(), None
            else:
                raise DecodeError(
                    f"stored {cls.__qualname__} has no field {f.name!r} and the class gives "
                    "it no default; add a default to migrate old states"
                )
            object.__setattr__(obj, f.name, value)
            names.append(f.name)
            values.append(value)
            kids.append(kid)
        return obj, _map_node(
            cls, codec.encode((cls.__module__, cls.__qualname__)), names, values, kids
        )

    def _build(self, path: Path, node: dict[Any, Any]) -> tuple[Any, _Node | None]:
        try:
            if "m" in node:
                names: list[str] = []
                values: list[Any] = []
                kids: list[_Node | None] = []
                for name, child in node.get("f", {}).items():
                    value, kid = self._build((*path, "f", name), child)
                    names.append(name)
                    values.append(value)
                    kids.append(kid)
                return dict(zip(names, values, strict=True)), _map_node(
                    dict, None, names, values, kids
                )
            if "d" in node:
                module, qualname = codec.decode(node["d"])
                cls = codec._find_class(module, qualname)
                return self._dataclass(cls, path, node.get("f", {}))
            if "l" in node:
                order = sorted(node.get("o", {}).items())
                fracs = {ident.decode(): frac for frac, ident in order}
                stored = node.get("i", {})
                ids: list[str] = []
                items: list[Any] = []
                shadows: list[_Map] | None = []
                for _, raw in order:
                    ident = raw.decode()
                    item, kid = self._build((*path, "i", ident), stored[ident])
                    ids.append(ident)
                    items.append(item)
                    if shadows is not None and type(kid) is _Map:
                        shadows.append(kid)
                    else:
                        shadows = None
                if shadows is None or len(fracs) != len(order):  # an id listed twice
                    return items, None
                return items, _List(tuple(ids), tuple(shadows), fracs)
            chunks = node["v"]
            parts = tuple(chunks[n] for n in range(len(chunks)))
            value = codec.decode(b"".join(parts))
            return value, _Leaf(value, parts)
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, DecodeError):
                raise
            raise DecodeError(
                f"stored state is damaged at {path!r} under prefix {self.prefix!r}: {exc!r}"
            ) from None


def _map_node(
    cls: type, mark: bytes | None, names: list[str], values: list[Any], kids: list[_Node | None]
) -> _Map | None:
    if any(kid is None for kid in kids):
        return None
    return _Map(cls, mark, tuple(names), tuple(values), tuple(kids))  # type: ignore[arg-type]
