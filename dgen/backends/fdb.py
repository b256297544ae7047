"""``fdb://``: FoundationDB, the store DGen's storage contract is modelled on.

``fdb://`` opens the default cluster file (``$FDB_CLUSTER_FILE``, then
``./fdb.cluster``, then the platform default such as
``/etc/foundationdb/fdb.cluster``); ``fdb:///path/to/fdb.cluster`` names one.
Options: ``api_version``, ``prefix`` (a tuple-encoded string under which
every key lives, so several apps share a cluster), ``transaction_timeout``
and ``connect_timeout`` (seconds), ``max_watches``. See docs/fdb.md.

The adapter maps the contract onto FoundationDB's native transactions
(read-your-writes, conflict ranges, atomic add, versionstamped keys,
watches); it adds only what the binding lacks:

* asyncio: the binding's futures complete on FoundationDB's network thread;
  :func:`bridge_future` hands each completion to the event loop with
  ``call_soon_threadsafe`` and passes cancellation back to the native future;
* one error mapping (:func:`map_fdb_error`) from FoundationDB's codes to
  DGen's errors;
* size checks before anything is sent, and a watch budget checked before
  the native limit (error 1032) is reached.

The binding (``pip install 'dgen[fdb]'``) is pure Python and loads
FoundationDB's C client library, libfdb_c, at first use; without it
:func:`open_database` raises :class:`DriverMissingError` saying what to
install.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib
import math
import os
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from dgen.keys import pack
from dgen.store import (
    Capabilities,
    CommitUnknownError,
    ConflictError,
    Database,
    KeyTooLargeError,
    KeyValue,
    Limits,
    StoreError,
    Transaction,
    TransactionClosedError,
    TransactionTooLargeError,
    UnavailableError,
    ValueTooLargeError,
    Watch,
    check_key,
    check_value,
    encode_counter,
)
from dgen.urls import URL, DriverMissingError, URLError

__all__ = [
    "FDB_LIMITS",
    "MAYBE_COMMITTED",
    "MIN_API_VERSION",
    "RETRYABLE_NOT_COMMITTED",
    "UNAVAILABLE",
    "CommitTimedOutError",
    "FDBDatabase",
    "FDBOptions",
    "FDBTransaction",
    "NativeFuture",
    "TooManyWatchesError",
    "TransactionTimedOutError",
    "bridge_future",
    "choose_api_version",
    "cluster_url_for_tests",
    "map_fdb_error",
    "open_database",
    "parse_fdb_url",
    "translate_exception",
    "versionstamped_key_param",
    "watch_from_native",
]

T = TypeVar("T")

FDB_LIMITS = Limits(
    max_key_size=10_000,
    max_value_size=100_000,
    max_transaction_size=10_000_000,
    max_transaction_seconds=5.0,
    max_watches=10_000,
)
"""FoundationDB's documented limits. A ``prefix`` shortens the key limit by
its length, since the prefix is part of every stored key."""

MIN_API_VERSION = 710
"""Oldest FoundationDB API version DGen supports (FoundationDB 7.1)."""

_KNOWN_OPTIONS = ("api_version", "prefix", "transaction_timeout", "connect_timeout", "max_watches")
_MAX_WATCHES_CEILING = 1_000_000  # FoundationDB refuses a larger max_watches option
_STREAMING_WANT_ALL = -2  # FoundationDB's StreamingMode.want_all
_SYSTEM = b"\xff"  # keys from here on are FoundationDB's system keyspace

_INSTALL_HINT = (
    "Install the FoundationDB client package for this machine (foundationdb-clients "
    ".deb/.rpm, or the macOS .pkg) from https://github.com/apple/foundationdb/releases "
    "(linked from https://www.foundationdb.org), choosing the release that matches your "
    "cluster; or put libfdb_c on the library search path (LD_LIBRARY_PATH on Linux, "
    "DYLD_LIBRARY_PATH on macOS)."
)


# -- errors ------------------------------------------------------------------


class TransactionTimedOutError(StoreError):
    """The transaction hit its timeout (FoundationDB 1031, set by the
    ``transaction_timeout`` option). Not retried automatically: a timeout
    means the work or the cluster is too slow, and retrying blindly only
    repeats it."""


class CommitTimedOutError(CommitUnknownError, TransactionTimedOutError):
    """The timeout fired while the commit was in flight, so the transaction
    may or may not have been applied (FoundationDB documents this for 1031
    during commit). Handle it as :class:`CommitUnknownError`."""


class TooManyWatchesError(StoreError):
    """This process already has the maximum number of outstanding watches on
    this cluster (``max_watches``, FoundationDB's default 10,000; native
    error 1032). Cancel watches that are no longer needed."""


# FoundationDB error codes (flow/error_definitions.h) that DGen treats specially.
_NAMES = {
    1007: "transaction_too_old",
    1009: "future_version",
    1020: "not_committed",
    1021: "commit_unknown_result",
    1022: "commit_unknown_result_fatal",
    1025: "transaction_cancelled",
    1026: "connection_failed",
    1031: "transaction_timed_out",
    1032: "too_many_watches",
    1036: "accessed_unreadable",
    1037: "process_behind",
    1038: "database_locked",
    1039: "cluster_version_changed",
    1041: "lookup_failed",
    1042: "commit_proxy_memory_limit_exceeded",
    1043: "shutdown_in_progress",
    1051: "batch_transaction_throttled",
    1078: "grv_proxy_memory_limit_exceeded",
    1101: "operation_cancelled",
    1213: "tag_throttled",
    1223: "proxy_tag_throttled",
    1235: "transaction_throttled_hot_shard",
    1511: "file_not_found",
    1513: "file_not_readable",
    1515: "no_cluster_file_found",
    2004: "key_outside_legal_range",
    2017: "used_during_commit",
    2021: "no_commit_version",
    2100: "incompatible_protocol_version",
    2101: "transaction_too_large",
    2102: "key_too_large",
    2103: "value_too_large",
    2104: "connection_string_invalid",
    2107: "tls_error",
    2124: "all_external_clients_failed",
    2125: "incompatible_client",
    6000: "permission_denied",
}

# fdb_error_predicate(RETRYABLE_NOT_COMMITTED) in bindings/c/fdb_c.cpp.
RETRYABLE_NOT_COMMITTED = frozenset(
    {1007, 1009, 1020, 1037, 1038, 1042, 1051, 1078, 1213, 1223, 1235}
)
# fdb_error_predicate(MAYBE_COMMITTED): only a commit can leave this doubt.
MAYBE_COMMITTED = frozenset({1021, 1039})
# The cluster cannot be reached or spoken to; nothing was committed.
UNAVAILABLE = frozenset({1026, 1041, 1043, 1511, 1513, 1515, 2100, 2104, 2107, 2124, 2125, 6000})

# Set once libfdb_c is loaded: its own retryable_not_committed predicate, so
# codes added by newer clients are classified as the client classifies them.
_native_retryable: Callable[[int], bool] | None = None


def map_fdb_error(
    code: int,
    description: str = "",
    *,
    during_commit: bool = False,
    age: float | None = None,
) -> StoreError:
    """The DGen error for FoundationDB error ``code``: the one place native
    errors are translated.

    ``during_commit`` says the error came from the commit itself, which
    decides whether the outcome can be unknown. ``age`` (seconds since the
    transaction began) is added to the message of a ``transaction_too_old``.
    """
    name = _NAMES.get(code)
    label = f"FoundationDB error {code}" + (f" ({name})" if name else "")
    if description:
        label += f": {description}"
    if code == 1031:
        if during_commit:
            return CommitTimedOutError(
                f"{label}; the timeout fired during commit, so the transaction may or may "
                "not have been applied: check for its unique effect before retrying"
            )
        return TransactionTimedOutError(
            f"{label}; the transaction ran past its transaction_timeout and was cancelled. "
            "Not retried: shorten the work or raise the timeout"
        )
    if code in MAYBE_COMMITTED or code == 1022:
        if during_commit:
            return CommitUnknownError(
                f"{label}; the transaction may or may not have been applied: check for its "
                "unique effect (e.g. an idempotency key) before retrying"
            )
        return ConflictError(f"{label}; retry in a new transaction")
    if code in RETRYABLE_NOT_COMMITTED or (
        code not in _NAMES and _native_retryable is not None and _native_retryable(code)
    ):
        hint = "retry in a new transaction"
        if code == 1007:
            hint = (
                "FoundationDB transactions may live at most 5 s"
                + (f" (this one ran {age:.1f} s)" if age is not None else "")
                + "; retry, and keep each transaction's work short"
            )
        return ConflictError(f"{label}; {hint}")
    if code == 2101:
        return TransactionTooLargeError(
            f"{label}: the cluster refused the transaction as over its "
            f"{FDB_LIMITS.max_transaction_size}-byte limit (writes plus conflict ranges); "
            "split the work over several transactions"
        )
    if code == 2102:
        return KeyTooLargeError(f"{label}: keys are limited to {FDB_LIMITS.max_key_size} bytes")
    if code == 2103:
        return ValueTooLargeError(
            f"{label}: values are limited to {FDB_LIMITS.max_value_size} bytes"
        )
    if code == 1032:
        return TooManyWatchesError(
            f"{label}; cancel watches no longer needed or raise the max_watches URL option"
        )
    if code in (1025, 1101):
        return TransactionClosedError(f"{label}; the transaction was rolled back or cancelled")
    if code == 2004:
        return StoreError(f"{label}; keys from 0xff on are FoundationDB's system keyspace")
    if code == 2017:
        return TransactionClosedError(f"{label}; an operation was issued while commit ran")
    if code == 2021:
        return StoreError(f"{label}; a read-only transaction has no versionstamp")
    if code in UNAVAILABLE:
        return UnavailableError(
            f"{label}; check the cluster file and that the cluster is up (fdbcli --exec status)"
        )
    return StoreError(label)


def _fdb_error_code(exc: BaseException) -> int | None:
    """The code of a binding ``FDBError`` (duck-typed: the class is only
    importable once libfdb_c has loaded)."""
    code = getattr(exc, "code", None)
    if type(exc).__name__ == "FDBError" and isinstance(code, int):
        return code
    return None


def _describe(exc: BaseException) -> str:
    try:
        text = exc.description  # type: ignore[attr-defined]
    except Exception:  # the description needs libfdb_c; fall back to our names
        return ""
    return text.decode(errors="replace") if isinstance(text, bytes) else str(text or "")


def translate_exception(
    exc: BaseException, *, during_commit: bool = False, age: float | None = None
) -> BaseException:
    """``exc`` as DGen sees it: a binding ``FDBError`` becomes the error
    :func:`map_fdb_error` names (chained to the original); others pass."""
    code = _fdb_error_code(exc)
    if code is None:
        return exc
    mapped = map_fdb_error(code, _describe(exc), during_commit=during_commit, age=age)
    mapped.__cause__ = exc
    return mapped


# -- futures -------------------------------------------------------------------


class NativeFuture(Protocol):
    """What the bridge needs from a binding future (``fdb.impl.Future``)."""

    def on_ready(self, callback: Callable[[Any], object]) -> None:
        """Call ``callback(self)`` once ready: at once in the calling thread if
        already ready, else later on FoundationDB's network thread."""

    def cancel(self) -> None: ...


def bridge_future(
    native: NativeFuture,
    extract: Callable[[Any], T],
    translate: Callable[[BaseException], BaseException] = lambda exc: exc,
) -> asyncio.Future[T]:
    """An asyncio future that settles when the binding future ``native`` does.

    The binding calls back on its network thread, where nothing may block or
    touch the event loop, so the callback only schedules :func:`settle` on
    the loop with ``call_soon_threadsafe``. There ``extract(native)`` reads
    the ready result (it does not block) and errors pass through
    ``translate``. Cancelling the asyncio future cancels ``native``, which
    releases what it holds (for a watch, its slot in the watch limit).
    """
    loop = asyncio.get_running_loop()
    result: asyncio.Future[T] = loop.create_future()

    def settle() -> None:  # event loop thread
        if result.done():
            return
        try:
            value = extract(native)
        except Exception as exc:
            result.set_exception(translate(exc))
        else:
            result.set_result(value)

    def on_ready(_: object) -> None:  # network thread, or the caller if already ready
        # A closed loop raises RuntimeError: nobody can be waiting for the result.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle)

    def on_done(fut: asyncio.Future[T]) -> None:
        if fut.cancelled():
            native.cancel()

    result.add_done_callback(on_done)
    native.on_ready(on_ready)
    return result


def _void(native: Any) -> None:
    native.wait()


def _bytes_or_none(native: Any) -> bytes | None:
    value = native.value  # Value/Key futures: bytes, or None for an absent key
    return None if value is None else bytes(value)


def _stamp(native: Any) -> bytes:
    return bytes(native.value)


def _range_page(native: Any) -> tuple[list[tuple[bytes, bytes]], bool]:
    kvs, _count, more = native.wait()
    return [(bytes(kv.key), bytes(kv.value)) for kv in kvs], bool(more)


def _int(native: Any) -> int:
    return int(native.wait())


def versionstamped_key_param(key: bytes, offset: int, prefix: bytes = b"") -> bytes:
    """The key argument of FoundationDB's ``set_versionstamped_key`` for
    DGen's ``(key, offset)``: the stored key followed by the placeholder's
    position as a 4-byte little-endian integer (the format since API 520)."""
    if not 0 <= offset <= len(key) - 10:
        raise ValueError(f"versionstamp offset {offset} is outside the {len(key)}-byte key")
    return prefix + key + struct.pack("<I", offset + len(prefix))


# -- watches --------------------------------------------------------------------


class _WatchBudget:
    """Outstanding watches on one native database handle (the binding shares
    one handle per cluster file, and FoundationDB counts per handle)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.live: set[Watch] = set()

    def reserve(self) -> None:
        if len(self.live) >= self.limit:
            raise TooManyWatchesError(
                f"{len(self.live)} watches are outstanding on this FoundationDB cluster, "
                f"the limit (max_watches={self.limit}); cancel watches no longer needed "
                "or raise max_watches in the URL"
            )


class _FDBWatch(Watch):
    """A :class:`Watch` fed by a native watch future through the bridge.

    It counts in ``registries`` (the cluster's budget, its database's set)
    until it fires, fails or is cancelled; then the native watch is
    cancelled too, which frees its slot in FoundationDB's limit.

    A native error before or at commit fails the watch with the commit's
    error. Once ``committed()`` is true, an error (say the storage server
    dropped the watch, 1029) fires it instead: a spurious wake-up makes the
    watcher re-read and watch again, which the contract allows, whereas an
    exception would crash a consumer that did nothing wrong.
    """

    __slots__ = ("_bridge", "_committed", "_registries")

    def __init__(
        self,
        key: bytes,
        bridge: asyncio.Future[None],
        registries: tuple[set[Watch], ...],
        committed: Callable[[], bool],
    ) -> None:
        super().__init__(key)
        self._bridge = bridge
        self._registries = registries
        self._committed = committed
        for registry in registries:
            registry.add(self)
        bridge.add_done_callback(self._native_done)
        self._future.add_done_callback(self._released)

    def _native_done(self, bridge: asyncio.Future[None]) -> None:
        if bridge.cancelled():
            return
        exc = bridge.exception()
        if exc is None or (self._committed() and not isinstance(exc, TooManyWatchesError)):
            self._fire()
        else:
            self._fail(exc)

    def _released(self, _: object) -> None:
        for registry in self._registries:
            registry.discard(self)
        if not self._bridge.done():
            self._bridge.cancel()  # cancels the native watch, freeing its slot


def watch_from_native(
    key: bytes,
    native: NativeFuture,
    registries: tuple[set[Watch], ...] = (),
    translate: Callable[[BaseException], BaseException] = lambda exc: exc,
    committed: Callable[[], bool] = lambda: False,
) -> Watch:
    """Wrap a native watch future (``tr.watch(key)``) as a DGen :class:`Watch`
    listed in each of ``registries`` while outstanding; ``committed()`` says
    whether its transaction has committed (see :class:`_FDBWatch`)."""
    return _FDBWatch(key, bridge_future(native, _void, translate), registries, committed)


# -- URL and API version -----------------------------------------------------------


@dataclass(frozen=True)
class FDBOptions:
    """What an ``fdb://`` URL asks for."""

    cluster_file: str | None = None
    api_version: int | None = None
    prefix: bytes = b""
    transaction_timeout: float | None = None
    connect_timeout: float = 5.0
    max_watches: int = 10_000


def _seconds(url: URL, name: str, text: str, *, allow_zero: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise URLError(f"option {name}={text!r} in {url} must be a positive number of seconds")
    return value


def parse_fdb_url(url: URL) -> FDBOptions:
    """Check an ``fdb://`` URL and read its options, before any driver loads."""
    if url.username or url.password or url.host or url.port:
        raise URLError(
            f"{url}: an fdb URL names a cluster file, not a host: use fdb:// for the default "
            "cluster file or fdb:///path/to/fdb.cluster (three slashes for an absolute path)"
        )
    if "tenant" in url.options:
        raise URLError(
            f"{url}: DGen does not use FoundationDB tenants (the 8.0 binding no longer "
            "supports them); share a cluster between apps with prefix=NAME instead"
        )
    opts = url.check_options(_KNOWN_OPTIONS)
    api_version: int | None = None
    if "api_version" in opts:
        try:
            api_version = int(opts["api_version"])
        except ValueError:
            raise URLError(
                f"option api_version={opts['api_version']!r} in {url} is not an integer "
                "(e.g. 730 for FoundationDB 7.3)"
            ) from None
        if api_version < MIN_API_VERSION:
            raise URLError(
                f"api_version={api_version} in {url}: DGen needs API version "
                f"{MIN_API_VERSION} (FoundationDB 7.1) or later"
            )
    prefix = b""
    if "prefix" in opts:
        if not opts["prefix"]:
            raise URLError(f"option prefix in {url} is empty; give a name or leave it out")
        prefix = pack((opts["prefix"],))
    timeout = None
    if "transaction_timeout" in opts:
        timeout = _seconds(
            url, "transaction_timeout", opts["transaction_timeout"], allow_zero=False
        )
    connect = 5.0
    if "connect_timeout" in opts:
        connect = _seconds(url, "connect_timeout", opts["connect_timeout"], allow_zero=True)
    max_watches = 10_000
    if "max_watches" in opts:
        text = opts["max_watches"]
        if not text.isdigit() or not 1 <= int(text) <= _MAX_WATCHES_CEILING:
            raise URLError(
                f"option max_watches={text!r} in {url} must be an integer from 1 to "
                f"{_MAX_WATCHES_CEILING}"
            )
        max_watches = int(text)
    return FDBOptions(
        cluster_file=url.path or None,
        api_version=api_version,
        prefix=prefix,
        transaction_timeout=timeout,
        connect_timeout=connect,
        max_watches=max_watches,
    )


def choose_api_version(
    requested: int | None,
    binding_max: int,
    library_max: int,
    library_version: str = "unknown",
) -> int:
    """The API version to select, or :class:`UnavailableError` explaining
    the mismatch.

    The Python binding announces its own API version (``binding_max``) to
    libfdb_c as the header version, and libfdb_c refuses a header newer than
    it supports (``library_max``), so the binding may not be newer than the
    library. Within that, the default is the highest version both speak.
    """
    if library_max < binding_max:
        raise UnavailableError(
            f"the installed FoundationDB Python binding speaks API version {binding_max}, but "
            f"the installed libfdb_c (client {library_version}) supports at most "
            f"{library_max}. Install the binding matching the client library, e.g. "
            f"pip install 'foundationdb=={_release_of(library_max)}.*', or upgrade libfdb_c"
        )
    chosen = min(binding_max, library_max) if requested is None else requested
    if chosen > binding_max:
        raise UnavailableError(
            f"api_version={chosen} was requested but the installed FoundationDB Python "
            f"binding supports at most {binding_max}; upgrade the binding and libfdb_c together"
        )
    if chosen < MIN_API_VERSION:
        raise UnavailableError(
            f"API version {chosen} is older than DGen supports ({MIN_API_VERSION}, "
            "FoundationDB 7.1); upgrade the FoundationDB client and binding"
        )
    return chosen


def _release_of(api_version: int) -> str:
    return f"{api_version // 100}.{api_version // 10 % 10}"


_binding_lock = threading.Lock()


def _load_binding(requested: int | None) -> Any:
    """The ``fdb`` module with an API version selected, or a clear error."""
    try:
        fdb = importlib.import_module("fdb")
    except ModuleNotFoundError as exc:
        raise DriverMissingError(
            "the fdb backend needs the FoundationDB Python binding. "
            "Install it with: pip install 'dgen[fdb]'"
        ) from exc
    with _binding_lock:
        if fdb.is_api_version_selected():
            current = int(fdb.get_api_version())
            if requested is not None and requested != current:
                raise UnavailableError(
                    f"this process already selected FoundationDB API version {current}; "
                    f"api_version={requested} cannot be selected as well (one per process)"
                )
            _set_native_predicate(fdb)
            return fdb
        try:
            impl = importlib.import_module("fdb.impl")
        except Exception as exc:  # the binding raises a bare Exception or OSError
            raise DriverMissingError(
                "the fdb backend needs FoundationDB's C client library, libfdb_c, which "
                "the 'foundationdb' Python package loads but does not include; it could "
                f"not be loaded ({exc}). {_INSTALL_HINT}"
            ) from exc
        capi = impl._capi
        library_max = int(capi.fdb_get_max_api_version())
        version_fn = capi.fdb_get_client_version
        version_fn.restype = ctypes.c_char_p
        raw = version_fn()
        library_version = raw.decode(errors="replace").split(",")[0] if raw else "unknown"
        # Bindings older than 7.x may lack LATEST_API_VERSION; then only the
        # library's own limit is known.
        binding_max = int(getattr(fdb, "LATEST_API_VERSION", library_max))
        chosen = choose_api_version(requested, binding_max, library_max, library_version)
        try:
            fdb.api_version(chosen)
        except Exception as exc:
            raise UnavailableError(
                f"selecting FoundationDB API version {chosen} failed: {exc}"
            ) from exc
        _set_native_predicate(fdb)
        return fdb


def _set_native_predicate(fdb: Any) -> None:
    global _native_retryable
    predicates = getattr(fdb, "predicates", None)
    check = getattr(predicates, "is_retryable_not_committed", None)
    if check is not None:

        def retryable(code: int) -> bool:
            return bool(check(_CodeOnly(code)))

        _native_retryable = retryable


class _CodeOnly(Exception):
    """The binding's predicates read ``error.code`` only."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


# -- the adapter --------------------------------------------------------------------


class FDBTransaction(Transaction):
    """A native FoundationDB transaction behind DGen's protocol."""

    def __init__(self, db: FDBDatabase, native: Any) -> None:
        self._db = db
        self._tr = native
        self._prefix = db.prefix
        self._limits = db.limits
        self._started = time.monotonic()
        self._size = 0  # our estimate of FoundationDB's: mutations plus conflict ranges
        self._stamped: list[tuple[bytes, bytes]] = []
        self._watches: list[Watch] = []
        self._stamp: asyncio.Future[bytes] | None = None
        self._commit: asyncio.Future[None] | None = None
        self._closed = False

    # -- helpers

    def _committed(self) -> bool:
        done = self._commit
        return done is not None and done.done() and not done.cancelled() and not done.exception()

    def _translate(self, exc: BaseException, during_commit: bool = False) -> BaseException:
        age = time.monotonic() - self._started
        return translate_exception(exc, during_commit=during_commit, age=age)

    def _commit_translate(self, exc: BaseException) -> BaseException:
        # Watch and versionstamp futures fail with the commit's own error.
        return self._translate(exc, during_commit=True)

    async def _wait(self, native: Any, extract: Callable[[Any], T]) -> T:
        return await bridge_future(native, extract, self._translate)

    def _check_open(self) -> None:
        if self._closed:
            raise TransactionClosedError("this transaction was already committed or rolled back")

    def _check_key(self, key: bytes) -> None:
        check_key(key, self._limits, " (10,000 less the URL prefix)" if self._prefix else "")

    def _stored(self, key: bytes) -> bytes:
        """The stored form of a key written by this transaction."""
        self._check_key(key)
        stored = self._prefix + key
        if stored >= _SYSTEM:
            raise ValueError(
                f"key {key[:20]!r}... starts with 0xff, FoundationDB's system keyspace; "
                "DGen's tuple-encoded keys never do"
            )
        return stored

    def _check_value(self, value: bytes) -> None:
        check_value(value, self._limits)

    def _count(self, nbytes: int) -> None:
        self._size += nbytes

    # -- reads

    async def get(self, key: bytes, *, snapshot: bool = False) -> bytes | None:
        self._check_open()
        self._check_key(key)
        stored = self._prefix + key
        if stored >= _SYSTEM:
            return None  # FoundationDB's system keyspace, where writes are refused
        reader = self._tr.snapshot if snapshot else self._tr
        if not snapshot:
            self._count(2 * len(stored) + 1)
        return await self._wait(reader.get(stored), _bytes_or_none)

    async def get_range(
        self,
        begin: bytes,
        end: bytes,
        *,
        limit: int = 0,
        reverse: bool = False,
        snapshot: bool = False,
    ) -> list[KeyValue]:
        self._check_open()
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        if begin >= end:
            return []
        selector = self._db.binding.KeySelector.first_greater_or_equal
        plen = len(self._prefix)
        lo, hi = self._prefix + begin, min(self._prefix + end, _SYSTEM)
        if lo >= hi:
            return []
        reader = self._tr.snapshot if snapshot else self._tr
        if not snapshot:
            self._count(len(lo) + len(hi))
        out: list[KeyValue] = []
        iteration = 1
        while True:
            remaining = limit - len(out) if limit else 0
            native = reader._get_range(
                selector(lo), selector(hi), remaining, _STREAMING_WANT_ALL, iteration, reverse
            )
            page, more = await self._wait(native, _range_page)
            out.extend((k[plen:], v) for k, v in page)
            if not more or not page or (limit and len(out) >= limit):
                return out
            iteration += 1
            if reverse:
                hi = page[-1][0]
            else:
                lo = page[-1][0] + b"\x00"

    def add_read_conflict_range(self, begin: bytes, end: bytes) -> None:
        self._check_open()
        if not isinstance(begin, bytes) or not isinstance(end, bytes):
            raise TypeError("range bounds are bytes")
        lo, hi = self._prefix + begin, min(self._prefix + end, _SYSTEM)
        if lo < hi:
            self._tr.add_read_conflict_range(lo, hi)
            self._count(len(lo) + len(hi))

    # -- writes

    def set(self, key: bytes, value: bytes) -> None:
        self._check_open()
        self._check_value(value)
        stored = self._stored(key)
        self._tr.set(stored, value)
        self._count(3 * len(stored) + len(value) + 1)

    def clear(self, key: bytes) -> None:
        self._check_open()
        stored = self._stored(key)
        self._tr.clear(stored)
        self._count(3 * len(stored) + 1)

    def clear_range(self, begin: bytes, end: bytes) -> None:
        self._check_open()
        if not isinstance(begin, bytes) or not isinstance(end, bytes):
            raise TypeError("range bounds are bytes")
        lo, hi = self._prefix + begin, min(self._prefix + end, _SYSTEM)
        if lo < hi:  # FoundationDB rejects an inverted range (2005)
            self._tr.clear_range(lo, hi)
            self._count(2 * (len(lo) + len(hi)))

    def add(self, key: bytes, delta: int) -> None:
        self._check_open()
        stored = self._stored(key)
        self._tr.add(stored, encode_counter(delta))
        self._count(3 * len(stored) + 9)

    def set_versionstamped_key(self, key: bytes, offset: int, value: bytes) -> None:
        self._check_open()
        self._check_value(value)
        self._stored(key)
        param = versionstamped_key_param(key, offset, self._prefix)
        # Held back until commit: the contract says these keys are written after
        # the transaction's other writes, and FoundationDB would otherwise make
        # the range they may land in unreadable (1036) for the rest of it.
        self._stamped.append((param, value))
        self._count(len(param) + len(value))

    def get_versionstamp(self) -> asyncio.Future[bytes]:
        self._check_open()
        if self._stamp is None:
            native = self._tr.get_versionstamp()
            self._stamp = bridge_future(native, _stamp, self._commit_translate)
            self._stamp.add_done_callback(_retrieve)
        return self._stamp

    def watch(self, key: bytes) -> Watch:
        self._check_open()
        self._check_key(key)
        self._db.watch_budget.reserve()
        native = self._tr.watch(self._prefix + key)
        registries = (self._db.watch_budget.live, self._db.watches)
        watch = watch_from_native(key, native, registries, self._commit_translate, self._committed)
        self._watches.append(watch)
        return watch

    # -- ending

    async def commit(self) -> None:
        self._check_open()
        limit = self._limits.max_transaction_size
        if self._size > limit:
            error = TransactionTooLargeError(
                f"transaction writes and reads about {self._size} bytes, over FoundationDB's "
                f"limit of {limit}; split the work over several transactions"
            )
            self._end(error)
            raise error
        for param, value in self._stamped:
            self._tr.set_versionstamped_key(param, value)
        try:
            self._commit = bridge_future(self._tr.commit(), _void, self._commit_translate)
            await self._commit
        except asyncio.CancelledError:
            self._end(CommitUnknownError("the commit was cancelled while in flight"))
            raise
        except BaseException as error:
            self._end(error)
            raise
        self._closed = True

    async def rollback(self) -> None:
        if not self._closed:
            self._end(TransactionClosedError("the transaction was rolled back"))

    def _end(self, error: BaseException) -> None:
        self._closed = True
        self._tr.cancel()  # fails the native watch and versionstamp futures too
        for watch in self._watches:
            watch._fail(error)
        if self._stamp is not None and not self._stamp.done():
            self._stamp.set_exception(error)


def _retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()  # a stamp nobody awaits must not log "never retrieved"


class FDBDatabase(Database):
    """An open FoundationDB database (see the module docs)."""

    capabilities = Capabilities(durable=True, cross_process=True, watches_cross_process=True)

    def __init__(
        self, url: URL, options: FDBOptions, binding: Any, native: Any, budget: _WatchBudget
    ) -> None:
        self.url = url
        self.options = options
        self.binding = binding
        self.native = native
        self.prefix = options.prefix
        self.watch_budget = budget
        self.watches: set[Watch] = set()
        self.limits = Limits(
            max_key_size=FDB_LIMITS.max_key_size - len(options.prefix),
            max_value_size=FDB_LIMITS.max_value_size,
            max_transaction_size=FDB_LIMITS.max_transaction_size,
            max_transaction_seconds=FDB_LIMITS.max_transaction_seconds,
            max_watches=budget.limit,
        )
        self._closed = False

    def create_transaction(self) -> FDBTransaction:
        if self._closed:
            raise UnavailableError(f"{self.url} was closed")
        return FDBTransaction(self, self.native.create_transaction())

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        error = UnavailableError(f"{self.url} was closed")
        for watch in list(self.watches):
            watch._fail(error)
        # The network thread stays up: FoundationDB cannot restart it in a process.

    def __repr__(self) -> str:
        return f"<FDBDatabase {self.url}>"


_budgets: dict[str | None, _WatchBudget] = {}


async def open_database(url: URL) -> FDBDatabase:
    """Open the FoundationDB cluster an ``fdb://`` URL names (module docs)."""
    options = parse_fdb_url(url)
    fdb = _load_binding(options.api_version)
    where = options.cluster_file or "the default cluster file"
    try:
        native = fdb.open(options.cluster_file)
        native.options.set_max_watches(options.max_watches)
        if options.transaction_timeout is not None:
            native.options.set_transaction_timeout(round(options.transaction_timeout * 1000))
    except Exception as exc:
        mapped = translate_exception(exc)
        if isinstance(mapped, StoreError):
            raise UnavailableError(f"cannot open FoundationDB at {where}: {mapped}") from exc
        raise
    budget = _budgets.get(options.cluster_file)
    if budget is None:
        budget = _budgets[options.cluster_file] = _WatchBudget(options.max_watches)
    budget.limit = options.max_watches
    db = FDBDatabase(url, options, fdb, native, budget)
    if options.connect_timeout > 0:
        await _probe(db, where, options.connect_timeout)
    return db


async def _probe(db: FDBDatabase, where: str, seconds: float) -> None:
    """Fail now, clearly, if no cluster answers: FoundationDB itself would
    retry forever and leave the first transaction hanging."""
    tr = db.native.create_transaction()
    tr.options.set_timeout(max(1, round(seconds * 1000)))
    try:
        await bridge_future(tr.get_read_version(), _int, translate_exception)
    except TransactionTimedOutError:
        raise UnavailableError(
            f"no FoundationDB cluster answered within {seconds:g} s using {where}; check the "
            "cluster file's coordinators and that the cluster is up (fdbcli --exec status); "
            "connect_timeout=0 in the URL skips this check"
        ) from None
    except StoreError as exc:
        raise UnavailableError(f"cannot use FoundationDB at {where}: {exc}") from exc


def cluster_url_for_tests() -> tuple[str | None, str]:
    """``(url, reason)`` for tests: an ``fdb://`` URL when ``FDB_CLUSTER_FILE``
    names a cluster file and libfdb_c loads; otherwise None and why not."""
    path = os.environ.get("FDB_CLUSTER_FILE")
    if not path:
        return None, "no FoundationDB cluster: set FDB_CLUSTER_FILE to a cluster file to run"
    if not os.path.exists(path):
        return None, f"FDB_CLUSTER_FILE={path} does not exist"
    try:
        _load_binding(None)
    except (DriverMissingError, UnavailableError) as exc:
        return None, f"FoundationDB client unusable: {exc}"
    return f"fdb://{os.path.abspath(path)}", ""
