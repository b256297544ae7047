"""FoundationDB backend: everything that can be checked without a cluster.

libfdb_c and fdbserver cannot be installed on CI machines, so these tests
cover the parts that do not need them: key and versionstamp encoding
byte-for-byte against FoundationDB's tuple layer and documented formats,
the error-code mapping, the bridge from the binding's futures to asyncio
(driven by ``StandInFDBFuture``, a minimal stand-in for the binding's
future object, used here only), URL parsing, API version choice, and the
error a user gets without libfdb_c. ``test_live_cluster_*`` run only when
``FDB_CLUSTER_FILE`` names a reachable cluster and otherwise report as
skipped with that reason.
"""

from __future__ import annotations

import asyncio
import importlib
import struct
import threading
import types
import uuid
from collections.abc import Callable
from typing import Any

import fdb
import fdb.tuple as fdb_tuple
import pytest

import dgen
from dgen import keys
from dgen.backends import fdb as fdb_backend
from dgen.backends.fdb import (
    FDB_LIMITS,
    CommitTimedOutError,
    FDBDatabase,
    FDBOptions,
    FDBTransaction,
    TooManyWatchesError,
    TransactionTimedOutError,
    bridge_future,
    choose_api_version,
    cluster_url_for_tests,
    map_fdb_error,
    parse_fdb_url,
    translate_exception,
    versionstamped_key_param,
    watch_from_native,
)
from dgen.keys import Versionstamp
from dgen.store import (
    CommitUnknownError,
    ConflictError,
    KeyTooLargeError,
    StoreError,
    TransactionClosedError,
    TransactionTooLargeError,
    UnavailableError,
    ValueTooLargeError,
)
from dgen.urls import URL, DriverMissingError, URLError

pytestmark = pytest.mark.anyio


# -- stand-ins for the binding (unit tests only) ------------------------------


class StandInBinding:
    """Namespace for stand-ins of the ``fdb`` binding's classes."""

    class FDBError(Exception):
        """Stand-in for ``fdb.impl.FDBError`` (the real one needs libfdb_c).
        Same class name and ``code`` attribute, which is what the adapter
        recognises."""

        def __init__(self, code: int) -> None:
            super().__init__(code)
            self.code = code


class StandInFDBFuture:
    """A minimal stand-in for the binding's future object (``fdb.impl.Future``)
    with the behaviour the bridge relies on, as FoundationDB's C API
    documents it: ``on_ready`` calls back at once in the calling thread if
    the future is ready, otherwise later in the thread that completes it;
    ``cancel`` completes a pending future with ``operation_cancelled``
    (1101); ``wait``/``value`` read a ready result without blocking."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ready = False
        self._value: Any = None
        self._error: BaseException | None = None
        self._callbacks: list[Callable[[Any], object]] = []
        self.cancelled = False
        self.callback_errors: list[BaseException] = []

    def on_ready(self, callback: Callable[[Any], object]) -> None:
        with self._lock:
            if not self._ready:
                self._callbacks.append(callback)
                return
        self._call(callback)

    def _call(self, callback: Callable[[Any], object]) -> None:
        try:
            callback(self)
        except BaseException as exc:  # the binding prints and discards these
            self.callback_errors.append(exc)

    def _complete(self, value: Any, error: BaseException | None) -> None:
        with self._lock:
            if self._ready:
                return
            self._ready, self._value, self._error = True, value, error
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            self._call(callback)

    def resolve(self, value: Any = None) -> None:
        self._complete(value, None)

    def fail(self, code: int) -> None:
        self._complete(None, StandInBinding.FDBError(code))

    def cancel(self) -> None:
        self.cancelled = True
        self.fail(1101)

    def wait(self) -> Any:
        assert self._ready, "the bridge must only read a ready future"
        if self._error is not None:
            raise self._error
        return self._value

    @property
    def value(self) -> Any:
        return self.wait()


async def until(condition: Callable[[], bool]) -> None:
    """Let the event loop run its scheduled callbacks until ``condition`` holds
    (asyncio runs done-callbacks on a later loop iteration)."""
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never became true")


def in_thread(fn: Callable[[], object]) -> threading.Thread:
    """Run ``fn`` on another OS thread, as FoundationDB's network thread would."""
    thread = threading.Thread(target=fn)
    thread.start()
    return thread


# -- keys and versionstamps ---------------------------------------------------


@pytest.fixture
def fdb_tuple_versionstamps(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let ``fdb.tuple`` pack versionstamps without libfdb_c.

    Its ``Versionstamp.to_bytes`` only checks ``isinstance(x, fdb.impl.Value)``;
    ``fdb.impl`` cannot load here, so give the check a class nothing is an
    instance of. The packing code under comparison is the binding's own.
    """
    stub = types.SimpleNamespace(Value=type("NoValue", (), {}))
    monkeypatch.setattr(fdb, "impl", stub, raising=False)


STAMP_TUPLES: list[tuple[Any, ...]] = [
    ("q", Versionstamp(user_version=0)),
    ("tenant", "q", 0, "i", Versionstamp(user_version=3)),
    (b"\x00raw", -5, 1.5, Versionstamp(user_version=65535), "after"),
    ("nested", ("in", Versionstamp(user_version=7)), None),
    (uuid.UUID(int=42), True, Versionstamp(user_version=1)),
]


def as_fdb(value: Any) -> Any:
    """The same tuple with fdb.tuple's Versionstamp class."""
    if isinstance(value, Versionstamp):
        return fdb_tuple.Versionstamp(value.tr_version, value.user_version)
    if isinstance(value, tuple):
        return tuple(as_fdb(v) for v in value)
    return value


def test_incomplete_versionstamp_bytes_follow_documented_format() -> None:
    # design/tuple.md: type code 0x33, 10-byte transaction version (all 0xff
    # while incomplete), 2-byte big-endian user version.
    key, offset = keys.pack_with_versionstamp(("q", Versionstamp(user_version=0x0102)))
    assert key == b"\x02q\x00" + b"\x33" + b"\xff" * 10 + b"\x01\x02"
    assert offset == 4
    assert key[offset : offset + 10] == b"\xff" * 10


@pytest.mark.usefixtures("fdb_tuple_versionstamps")
@pytest.mark.parametrize("items", STAMP_TUPLES)
@pytest.mark.parametrize("prefix", [b"", b"\x15\x07app"])
def test_versionstamped_key_param_matches_fdb_tuple(items: tuple[Any, ...], prefix: bytes) -> None:
    expected = fdb_tuple.pack_with_versionstamp(as_fdb(items), prefix=prefix or None)
    # The whole key packed with the prefix inside...
    key, offset = keys.pack_with_versionstamp(items, prefix)
    assert versionstamped_key_param(key, offset) == expected
    # ...and the adapter's way: the prefix added to a key packed without it.
    bare, bare_offset = keys.pack_with_versionstamp(items)
    assert versionstamped_key_param(bare, bare_offset, prefix) == expected


def test_versionstamped_key_param_is_key_plus_le32_offset() -> None:
    key, offset = keys.pack_with_versionstamp(("a" * 300, Versionstamp()))
    param = versionstamped_key_param(key, offset, b"P")
    assert param[:-4] == b"P" + key
    assert struct.unpack("<I", param[-4:])[0] == offset + 1 > 0xFF  # needs all 4 bytes
    with pytest.raises(ValueError, match="offset"):
        versionstamped_key_param(key, len(key) - 9)
    with pytest.raises(ValueError, match="offset"):
        versionstamped_key_param(key, -1)


def apply_versionstamp(param: bytes, stamp: bytes) -> bytes:
    """What FoundationDB documents set_versionstamped_key doing at commit: drop
    the last 4 bytes, read them as a little-endian position, and write the
    10-byte stamp there."""
    key, pos = param[:-4], struct.unpack("<I", param[-4:])[0]
    return key[:pos] + stamp + key[pos + 10 :]


@pytest.mark.usefixtures("fdb_tuple_versionstamps")
@pytest.mark.parametrize("items", STAMP_TUPLES)
def test_committed_versionstamped_keys_decode_and_order(items: tuple[Any, ...]) -> None:
    key, offset = keys.pack_with_versionstamp(items, b"\x15\x07")
    param = versionstamped_key_param(key, offset)
    # Stamps: 8-byte big-endian commit version, 2-byte batch order.
    stamps = [v.to_bytes(8, "big") + b.to_bytes(2, "big") for v, b in [(5, 0), (5, 1), (900, 0)]]
    stored = [apply_versionstamp(param, s) for s in stamps]
    assert stored == sorted(stored)  # commit order is key order
    for stamp, final in zip(stamps, stored, strict=True):
        decoded = fdb_tuple.unpack(final, prefix_len=2)
        completed = _complete(items, stamp)
        assert decoded == as_fdb(completed)
        assert keys.pack(completed, b"\x15\x07") == final
        assert fdb_tuple.pack(as_fdb(completed), prefix=b"\x15\x07") == final


def _complete(value: Any, stamp: bytes) -> Any:
    if isinstance(value, Versionstamp):
        return Versionstamp(stamp, value.user_version)
    if isinstance(value, tuple):
        return tuple(_complete(v, stamp) for v in value)
    return value


@pytest.mark.parametrize(
    "items",
    [(1, "a", b"b", None), (-(2**70), 2**64, 0.0, -0.0), (("x", None), False, uuid.UUID(int=7))],
)
def test_plain_keys_match_fdb_tuple(items: tuple[Any, ...]) -> None:
    assert keys.pack(items) == fdb_tuple.pack(items)
    assert keys.unpack(fdb_tuple.pack(items)) == items


# -- error mapping -------------------------------------------------------------

MAPPING = [
    # code, during_commit, expected class
    (1007, False, ConflictError),  # transaction_too_old
    (1009, False, ConflictError),  # future_version
    (1020, True, ConflictError),  # not_committed
    (1037, False, ConflictError),  # process_behind
    (1038, True, ConflictError),  # database_locked
    (1042, True, ConflictError),
    (1051, False, ConflictError),
    (1078, False, ConflictError),
    (1213, False, ConflictError),  # tag_throttled
    (1223, False, ConflictError),
    (1235, True, ConflictError),
    (1021, True, CommitUnknownError),  # commit_unknown_result
    (1039, True, CommitUnknownError),  # cluster_version_changed during commit
    (1022, True, CommitUnknownError),
    (1039, False, ConflictError),  # ... but before commit nothing was applied
    (1031, False, TransactionTimedOutError),
    (1031, True, CommitTimedOutError),
    (2101, True, TransactionTooLargeError),
    (2102, False, KeyTooLargeError),
    (2103, False, ValueTooLargeError),
    (1032, False, TooManyWatchesError),
    (1025, False, TransactionClosedError),
    (1101, False, TransactionClosedError),
    (2017, False, TransactionClosedError),
    (1026, False, UnavailableError),  # connection_failed
    (1515, False, UnavailableError),  # no_cluster_file_found
    (2104, False, UnavailableError),  # connection_string_invalid
    (2125, False, UnavailableError),  # incompatible_client
    (2021, False, StoreError),  # no_commit_version
    (4100, False, StoreError),  # internal_error: not retryable
]


@pytest.mark.parametrize(("code", "during_commit", "expected"), MAPPING)
def test_error_mapping(code: int, during_commit: bool, expected: type[StoreError]) -> None:
    error = map_fdb_error(code, during_commit=during_commit)
    assert type(error) is expected
    assert f"FoundationDB error {code}" in str(error)
    # Only the conflict error is retried by Database.run.
    assert error.retryable is (expected is ConflictError)


def test_timeouts_and_unknown_commits_are_never_retried() -> None:
    during = map_fdb_error(1031, during_commit=True)
    assert isinstance(during, CommitUnknownError)  # may have been applied
    assert isinstance(during, TransactionTimedOutError)
    assert not during.retryable
    assert not map_fdb_error(1031).retryable
    assert not map_fdb_error(1021, during_commit=True).retryable


def test_too_old_message_names_the_five_second_limit() -> None:
    error = map_fdb_error(1007, age=6.25)
    assert "transaction_too_old" in str(error) and "5 s" in str(error) and "6.2" in str(error)


def test_codes_unknown_to_the_table_follow_the_native_predicate(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert type(map_fdb_error(1999)) is StoreError
    monkeypatch.setattr(fdb_backend, "_native_retryable", lambda code: code == 1999)
    assert type(map_fdb_error(1999)) is ConflictError
    assert type(map_fdb_error(1998)) is StoreError


def test_translate_exception_chains_the_native_error() -> None:
    native = StandInBinding.FDBError(1020)
    mapped = translate_exception(native)
    assert isinstance(mapped, ConflictError) and mapped.__cause__ is native
    other = RuntimeError("not from FoundationDB")
    assert translate_exception(other) is other


# -- the future bridge -----------------------------------------------------------


async def test_bridge_resolves_from_another_thread() -> None:
    native = StandInFDBFuture()
    result = bridge_future(native, lambda f: f.wait())
    assert not result.done()
    worker = in_thread(lambda: native.resolve(b"value"))
    assert await asyncio.wait_for(result, 30) == b"value"
    worker.join()
    assert native.callback_errors == []


async def test_bridge_of_a_ready_future() -> None:
    native = StandInFDBFuture()
    native.resolve(7)
    assert await asyncio.wait_for(bridge_future(native, lambda f: f.wait()), 30) == 7


async def test_bridge_translates_native_errors() -> None:
    native = StandInFDBFuture()
    result = bridge_future(native, lambda f: f.wait(), translate_exception)
    in_thread(lambda: native.fail(1020)).join()
    with pytest.raises(ConflictError) as info:
        await asyncio.wait_for(result, 30)
    assert isinstance(info.value.__cause__, StandInBinding.FDBError)


async def test_cancelling_the_awaiting_task_cancels_the_native_future() -> None:
    native = StandInFDBFuture()
    started = asyncio.Event()

    async def reader() -> Any:
        started.set()
        return await bridge_future(native, lambda f: f.wait(), translate_exception)

    task = asyncio.create_task(reader())
    await started.wait()
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert native.cancelled


async def test_completion_after_cancellation_is_ignored() -> None:
    loop = asyncio.get_running_loop()
    problems: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: problems.append(context))
    try:
        native = StandInFDBFuture()
        result = bridge_future(native, lambda f: f.wait())
        result.cancel()
        await until(lambda: native.cancelled)
        in_thread(lambda: native.resolve(b"late")).join()
        for _ in range(3):
            await asyncio.sleep(0)
        assert problems == [] and native.callback_errors == []
    finally:
        loop.set_exception_handler(None)


def test_completion_after_the_loop_closed_does_not_raise_in_the_network_thread() -> None:
    native = StandInFDBFuture()

    async def start() -> None:
        bridge_future(native, lambda f: f.wait())

    asyncio.run(start())
    in_thread(lambda: native.resolve(b"late")).join()
    assert native.callback_errors == []


async def test_native_watch_fires_and_leaves_its_registries() -> None:
    native = StandInFDBFuture()
    live: set[Any] = set()
    watch = watch_from_native(b"k", native, (live,), translate_exception)
    assert live == {watch} and not watch.done()
    in_thread(native.resolve).join()
    await asyncio.wait_for(watch, 30)
    assert live == set() and not native.cancelled


async def test_cancelled_watch_cancels_the_native_watch() -> None:
    native = StandInFDBFuture()
    live: set[Any] = set()
    watch = watch_from_native(b"k", native, (live,), translate_exception)
    watch.cancel()
    await until(lambda: native.cancelled)
    assert live == set()


async def test_watch_of_a_failed_commit_fails_with_the_mapped_error() -> None:
    native = StandInFDBFuture()
    watch = watch_from_native(
        b"k", native, (), lambda exc: translate_exception(exc, during_commit=True)
    )
    in_thread(lambda: native.fail(1021)).join()
    with pytest.raises(CommitUnknownError):
        await asyncio.wait_for(watch, 30)


async def test_native_error_after_commit_wakes_the_watcher_instead_of_failing() -> None:
    # 1029 watch_cancelled: the storage server dropped the watch. The watcher
    # must re-read and re-watch, not crash: a spurious fire does that.
    native = StandInFDBFuture()
    watch = watch_from_native(b"k", native, (), translate_exception, committed=lambda: True)
    in_thread(lambda: native.fail(1029)).join()
    await asyncio.wait_for(watch, 30)
    # ... except the watch limit, where re-watching would spin.
    native = StandInFDBFuture()
    watch = watch_from_native(b"k", native, (), translate_exception, committed=lambda: True)
    in_thread(lambda: native.fail(1032)).join()
    with pytest.raises(TooManyWatchesError):
        await asyncio.wait_for(watch, 30)


async def test_watch_budget_refuses_before_the_native_limit() -> None:
    budget = fdb_backend._WatchBudget(limit=2)
    natives = [StandInFDBFuture() for _ in range(2)]
    watches = [watch_from_native(b"k", n, (budget.live,)) for n in natives]
    with pytest.raises(TooManyWatchesError, match="max_watches=2"):
        budget.reserve()
    watches[0].cancel()
    await until(lambda: natives[0].cancelled)
    budget.reserve()  # a slot is free again


# -- limits enforced before anything is sent ---------------------------------------


def offline_transaction(prefix: str | None = None) -> FDBTransaction:
    """A transaction whose native side is None: any call that reached the
    binding would raise AttributeError, so passing checks prove nothing was sent."""
    text = "fdb://" + (f"?prefix={prefix}" if prefix else "")
    options = parse_fdb_url(URL.parse(text))
    db = FDBDatabase(URL.parse(text), options, None, None, fdb_backend._WatchBudget(10))
    return FDBTransaction(db, None)


def test_declared_limits_are_foundationdbs() -> None:
    assert FDB_LIMITS.max_key_size == 10_000
    assert FDB_LIMITS.max_value_size == 100_000
    assert FDB_LIMITS.max_transaction_size == 10_000_000
    assert FDB_LIMITS.max_transaction_seconds == 5.0
    assert FDB_LIMITS.max_watches == 10_000


def test_oversized_keys_and_values_are_refused_before_sending() -> None:
    tr = offline_transaction()
    with pytest.raises(KeyTooLargeError, match="10000"):
        tr.set(b"k" * 10_001, b"v")
    with pytest.raises(ValueTooLargeError, match="100000"):
        tr.set(b"k", b"v" * 100_001)
    with pytest.raises(KeyTooLargeError):
        tr.set_versionstamped_key(b"k" * 10_001, 0, b"v")
    with pytest.raises(ValueTooLargeError):
        tr.set_versionstamped_key(b"k" * 20, 0, b"v" * 100_001)
    with pytest.raises(ValueError, match="system keyspace"):
        tr.set(b"\xffsystem", b"v")


def test_prefix_shortens_the_key_limit() -> None:
    tr = offline_transaction("app")
    prefix = keys.pack(("app",))
    assert tr._limits.max_key_size == 10_000 - len(prefix)
    with pytest.raises(KeyTooLargeError, match="prefix"):
        tr.set(b"k" * (10_001 - len(prefix)), b"v")


def test_versionstamped_keys_wait_for_commit_with_the_prefix_applied() -> None:
    tr = offline_transaction("app")
    key, offset = keys.pack_with_versionstamp(("q", Versionstamp(user_version=1)))
    tr.set_versionstamped_key(key, offset, b"msg")  # native is None: nothing sent yet
    prefix = keys.pack(("app",))
    assert tr._stamped == [(versionstamped_key_param(key, offset, prefix), b"msg")]


# -- URLs and API versions ----------------------------------------------------------


def test_default_and_explicit_cluster_files() -> None:
    assert parse_fdb_url(URL.parse("fdb://")) == FDBOptions()
    options = parse_fdb_url(URL.parse("fdb:///etc/foundationdb/fdb.cluster"))
    assert options.cluster_file == "/etc/foundationdb/fdb.cluster"


def test_url_options() -> None:
    options = parse_fdb_url(
        URL.parse(
            "fdb:///c/fdb.cluster?api_version=730&prefix=shop&transaction_timeout=2.5"
            "&connect_timeout=0&max_watches=50000"
        )
    )
    assert options == FDBOptions(
        cluster_file="/c/fdb.cluster",
        api_version=730,
        prefix=keys.pack(("shop",)),
        transaction_timeout=2.5,
        connect_timeout=0.0,
        max_watches=50_000,
    )


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("fdb://host:4500", "names a cluster file"),
        ("fdb://?bogus=1", "unknown option"),
        ("fdb://?tenant=a", "prefix=NAME"),
        ("fdb://?api_version=seven", "not an integer"),
        ("fdb://?api_version=630", "710"),
        ("fdb://?prefix=", "empty"),
        ("fdb://?transaction_timeout=-1", "positive number"),
        ("fdb://?transaction_timeout=0", "positive number"),
        ("fdb://?connect_timeout=nan", "positive number"),
        ("fdb://?max_watches=0", "1 to 1000000"),
        ("fdb://?max_watches=2000000", "1 to 1000000"),
    ],
)
def test_bad_urls(url: str, message: str) -> None:
    with pytest.raises(URLError, match=message):
        parse_fdb_url(URL.parse(url))


async def test_bad_url_is_reported_before_the_driver_loads() -> None:
    with pytest.raises(URLError, match="unknown option"):
        await dgen.connect("fdb://?bogus=1")


@pytest.mark.parametrize(
    ("requested", "binding", "library", "expected"),
    [
        (None, 730, 730, 730),
        (None, 730, 800, 730),  # capped at the binding's
        (710, 730, 800, 710),
        (730, 800, 800, 730),
    ],
)
def test_api_version_choice(
    requested: int | None, binding: int, library: int, expected: int
) -> None:
    assert choose_api_version(requested, binding, library) == expected


def test_api_version_mismatch_is_explained() -> None:
    with pytest.raises(UnavailableError, match=r"supports at most 730.*foundationdb==7\.3"):
        choose_api_version(None, 800, 730, "7.3.43")
    with pytest.raises(UnavailableError, match="binding supports at most 730"):
        choose_api_version(800, 730, 800)
    with pytest.raises(UnavailableError, match="older than DGen supports"):
        choose_api_version(700, 730, 730)


# -- without libfdb_c (this machine) ---------------------------------------------------


def libfdb_c_loads() -> bool:
    if fdb.is_api_version_selected():
        return True
    try:
        importlib.import_module("fdb.impl")
    except Exception:
        return False
    return True


@pytest.mark.skipif(libfdb_c_loads(), reason="libfdb_c is installed here")
@pytest.mark.parametrize("url", ["fdb://", "fdb:///etc/foundationdb/fdb.cluster?prefix=app"])
async def test_missing_libfdb_c_is_a_clear_error(url: str) -> None:
    with pytest.raises(DriverMissingError) as info:
        await dgen.connect(url)
    text = str(info.value)
    assert "libfdb_c" in text
    assert "github.com/apple/foundationdb/releases" in text
    assert isinstance(info.value, ImportError)  # what DGen raises for missing drivers


def test_cluster_url_for_tests_gives_the_reason_when_unusable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    monkeypatch.delenv("FDB_CLUSTER_FILE", raising=False)
    url, reason = cluster_url_for_tests()
    assert url is None and "set FDB_CLUSTER_FILE" in reason
    monkeypatch.setenv("FDB_CLUSTER_FILE", str(tmp_path / "absent.cluster"))
    url, reason = cluster_url_for_tests()
    assert url is None and "does not exist" in reason
    if not libfdb_c_loads():
        cluster = tmp_path / "fdb.cluster"
        cluster.write_text("test:test@127.0.0.1:4500\n")
        monkeypatch.setenv("FDB_CLUSTER_FILE", str(cluster))
        url, reason = cluster_url_for_tests()
        assert url is None and "libfdb_c" in reason


# -- a live cluster, when one is reachable ---------------------------------------------------

LIVE_URL, LIVE_SKIP_REASON = cluster_url_for_tests()


@pytest.fixture
async def live_db() -> Any:
    """A database on the cluster ``FDB_CLUSTER_FILE`` names, under a fresh
    prefix that is cleared afterwards; skipped with the reason otherwise."""
    if LIVE_URL is None:
        pytest.skip(LIVE_SKIP_REASON)
    url = f"{LIVE_URL}?prefix=dgen-test-{uuid.uuid4().hex}"
    async with dgen.connect(url) as db:
        try:
            yield db
        finally:

            async def wipe(tr: Any) -> None:
                tr.clear_range(b"", b"\xff")

            await db.run(wipe)


async def test_live_cluster_reads_writes_stamps_and_watches(live_db: Any) -> None:
    async def write(tr: Any) -> Any:
        tr.set(keys.pack(("a",)), b"1")
        tr.add(keys.pack(("n",)), 5)
        key, offset = keys.pack_with_versionstamp(("q", Versionstamp(user_version=0)))
        tr.set_versionstamped_key(key, offset, b"first")
        key, offset = keys.pack_with_versionstamp(("q", Versionstamp(user_version=1)))
        tr.set_versionstamped_key(key, offset, b"second")
        return tr.get_versionstamp()

    stamp = await (await live_db.run(write))
    assert len(stamp) == 10

    async def read(tr: Any) -> Any:
        begin, end = keys.range_of(("q",))
        return (
            await tr.get(keys.pack(("a",))),
            await tr.get(keys.pack(("n",))),
            await tr.get_range(begin, end),
            await tr.get_range(begin, end, limit=1, reverse=True),
        )

    a, n, queue, last = await live_db.run(read)
    assert a == b"1" and dgen.store.decode_counter(n) == 5
    assert [v for _, v in queue] == [b"first", b"second"]
    assert keys.unpack(queue[0][0]) == ("q", Versionstamp(stamp, 0))
    assert last == queue[-1:]

    tr = live_db.create_transaction()
    watch = tr.watch(keys.pack(("n",)))
    await tr.commit()

    async def bump(tr: Any) -> None:
        tr.add(keys.pack(("n",)), 1)

    await live_db.run(bump)
    await asyncio.wait_for(watch, 30)


def test_live_cluster_availability_is_reported() -> None:
    """States, in the test report, whether the conformance and runtime suites
    can run on FoundationDB here (see docs/fdb.md for wiring them)."""
    if LIVE_URL is None:
        pytest.skip(LIVE_SKIP_REASON)
    assert LIVE_URL.startswith("fdb:///")
