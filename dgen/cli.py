"""The ``dgen`` command (also ``python -m dgen``): inspect and operate a store.

Subcommands: ``demo``, ``tenants``, ``inspect``, ``queue list|delete``,
``dead-letters list|retry|purge`` and ``conformance``; ``dgen SUBCOMMAND
--help`` explains each. Output is a table for people or, with ``--json``,
JSON for scripts. Reading subcommands only read (no writes, no locks), so
they never stop consumers. See docs/operating.md.

Exit status: 0 success; 1 not found or failed (unknown tenant or message
id, conformance failures); 2 usage error (bad arguments, URL or message
id); 3 the store cannot be reached or opened. Errors are one line on
stderr, never a traceback (set ``DGEN_DEBUG=1`` to see one).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib
import io
import json
import os
import pprint
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, fields, is_dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, TextIO, cast
from uuid import UUID

from dgen import admin
from dgen.store import Database, DGenError, StoreError, UnavailableError
from dgen.urls import URL, DriverMissingError, URLError, connect

__all__ = ["EXIT_FAILURE", "EXIT_OK", "EXIT_UNAVAILABLE", "EXIT_USAGE", "main"]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3

_EPILOG = (
    "exit status: 0 ok, 1 not found or failed, 2 usage error (arguments, URL, "
    "message id), 3 store unreachable. Docs: docs/operating.md"
)


class _UsageError(Exception):
    """Bad input that argparse could not catch (exit 2)."""


# -- output -----------------------------------------------------------------------------


def jsonable(value: Any) -> Any:
    """``value`` as JSON-compatible data: tuples and sets become lists, bytes
    ``{"hex": ...}``, dataclasses dicts, other types their ``str``; dicts with
    non-string keys become ``[[key, value], ...]``."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else str(value)
    if isinstance(value, (bytes, bytearray)):
        return {"hex": bytes(value).hex()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((jsonable(v) for v in value), key=repr)
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {k: jsonable(v) for k, v in value.items()}
        return [[jsonable(k), jsonable(v)] for k, v in value.items()]
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, (datetime.datetime, datetime.date)):
        return value.isoformat()
    if isinstance(value, (UUID, Decimal)):
        return str(value)
    return repr(value)


def _when(unix: float | None) -> str:
    if not unix:
        return "-"
    moment = datetime.datetime.fromtimestamp(unix, datetime.UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 120:
        return f"{value:.1f} s"
    if value < 7200:
        return f"{value / 60:.1f} min"
    return f"{value / 3600:.1f} h"


def _cut(text: str, width: int) -> str:
    text = text.replace("\n", " ")
    return text if len(text) <= width else text[: width - 3] + "..."


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], out: TextIO) -> None:
    """Print aligned columns (the last column is not padded)."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    for row in [list(headers), *cells]:
        line = "  ".join(c.ljust(w) for c, w in zip(row[:-1], widths, strict=False))
        print(f"{line}  {row[-1]}" if len(row) > 1 else row[0], file=out)


def _emit_json(data: Any, out: TextIO) -> None:
    json.dump(jsonable(data), out, indent=2)
    out.write("\n")


def _message_dict(m: admin.QueuedMessage) -> dict[str, Any]:
    return asdict(m)


def _lock_dict(lock: admin.LockInfo | None) -> dict[str, Any] | None:
    if lock is None:
        return None
    return {**asdict(lock), "expired": lock.expired, "age": lock.age}


# -- commands ---------------------------------------------------------------------------


async def _tenants(db: Database, args: argparse.Namespace, out: TextIO) -> int:
    rows = await admin.list_tenants(db)
    if args.json:
        _emit_json([asdict(r) for r in rows], out)
        return EXIT_OK
    if not rows:
        print("no tenants", file=out)
        return EXIT_OK

    def lock(r: admin.TenantSummary) -> str:
        return ("expired" if r.lock_expired else "locked") if r.locked else "-"

    table(
        ["TENANT", "QUEUED", "LOCK", "DEAD LETTERS", "STATE"],
        [
            [
                r.tenant
                if r.tenant.isprintable() and r.tenant.strip() == r.tenant
                else repr(r.tenant),
                r.queue_length,
                lock(r),
                r.dead_letters,
                "yes" if r.has_state else "no",
            ]
            for r in rows
        ],
        out,
    )
    return EXIT_OK


async def _inspect(db: Database, args: argparse.Namespace, out: TextIO) -> int:
    info = await admin.inspect_tenant(db, args.tenant, full_state=args.full)
    if args.json:
        data = asdict(info)
        data["lock"] = _lock_dict(info.lock)
        if not args.full:
            data.pop("state")
        _emit_json(data, out)
        return EXIT_OK
    print(f"tenant        {info.tenant}", file=out)
    hint = " (--import MODULE decodes its dataclasses)" if info.state_error else ""
    print(f"state         {info.state_summary}{hint}", file=out)
    print(f"state stored  {info.state_keys} keys, {info.state_bytes} bytes", file=out)
    print(f"queue         {info.queue_length} message(s)", file=out)
    if info.head is not None:
        h = info.head
        extra = f", {h.attempts} failed attempt(s), last: {h.last_error}" if h.attempts else ""
        print(f"head          {h.id} {h.kind} {h.preview}{extra}", file=out)
    if info.lock is None:
        print("lock          -", file=out)
    else:
        lk = info.lock
        state = "EXPIRED (the next consumer takes it over)" if lk.expired else "held"
        print(
            f"lock          {state} by {lk.holder or '?'} for message {lk.message_id} "
            f"({lk.kind}), age {_seconds(lk.age)}, lease {lk.lease:g} s, "
            f"deadline {_when(lk.deadline)}"
            + (f", {lk.attempts} failed attempt(s)" if lk.attempts else ""),
            file=out,
        )
    print(f"dead letters  {len(info.dead_letters)}", file=out)
    for d in info.dead_letters:
        print(
            f"  {d.id} {d.kind} after {d.error.attempts} attempt(s): "
            f"{_cut(f'{d.error.type}: {d.error.message}', 70)}",
            file=out,
        )
    if args.full:
        print("state:", file=out)
        if info.state_error:
            print(f"  cannot decode here: {info.state_error}", file=out)
        else:
            print(pprint.pformat(info.state, width=100, sort_dicts=False), file=out)
    return EXIT_OK


async def _queue_list(db: Database, args: argparse.Namespace, out: TextIO) -> int:
    rows = await admin.list_queue(db, args.tenant, limit=args.limit)
    if len(rows) == args.limit:
        note = f"dgen: showing the first {args.limit} messages (--limit N for more)"
        print(note, file=sys.stderr)
    if args.json:
        _emit_json([_message_dict(m) for m in rows], out)
        return EXIT_OK
    if not rows:
        print(f"the queue of tenant {args.tenant!r} is empty", file=out)
        return EXIT_OK
    table(
        ["ID", "KIND", "SIZE", "ATTEMPTS", "CALLER", "MESSAGE"],
        [
            [
                m.id,
                m.kind,
                m.size,
                m.attempts if not m.last_error else f"{m.attempts} ({_cut(m.last_error, 40)})",
                ("waiting" if m.caller_waiting else "gone") if m.kind == "call" else "-",
                m.preview,
            ]
            for m in rows
        ],
        out,
    )
    return EXIT_OK


async def _queue_delete(db: Database, args: argparse.Namespace, out: TextIO) -> int:
    removed = await admin.delete_message(db, args.tenant, args.message_id)
    if args.json:
        _emit_json({"deleted": _message_dict(removed)}, out)
        return EXIT_OK
    waiting = " (its waiting caller gets MessageDeletedError)" if removed.caller_waiting else ""
    print(f"deleted {removed.kind} message {removed.id}: {removed.preview}{waiting}", file=out)
    return EXIT_OK


async def _dead_list(db: Database, args: argparse.Namespace, out: TextIO) -> int:
    rows = await admin.list_dead_letters(db, args.tenant)
    if args.json:
        _emit_json([asdict(d) for d in rows], out)
        return EXIT_OK
    if not rows:
        print(f"tenant {args.tenant!r} has no dead letters", file=out)
        return EXIT_OK
    table(
        ["ID", "KIND", "ATTEMPTS", "DEAD SINCE", "ERROR", "MESSAGE"],
        [
            [
                d.id,
                d.kind,
                d.error.attempts,
                _when(d.error.time),
                _cut(f"{d.error.type}: {d.error.message}", 60),
                d.preview,
            ]
            for d in rows
        ],
        out,
    )
    if args.traceback:
        for d in rows:
            print(f"\n--- {d.id} ---\n{d.error.traceback or '(no traceback)'}", file=out)
    return EXIT_OK


def _dead_act(retry: bool) -> Callable[[Database, argparse.Namespace, TextIO], Awaitable[int]]:
    async def act(db: Database, args: argparse.Namespace, out: TextIO) -> int:
        if bool(args.message_ids) == bool(args.all):
            raise _UsageError("name the dead letters by MESSAGE_ID, or give --all (not both)")
        ids = None if args.all else args.message_ids
        fn = admin.retry_dead_letters if retry else admin.purge_dead_letters
        done = await fn(db, args.tenant, ids)
        verb = "retried" if retry else "purged"
        if args.json:
            _emit_json({verb: done}, out)
            return EXIT_OK
        for message_id in done:
            where = " (back at the head of the queue)" if retry else ""
            print(f"{verb} {message_id}{where}", file=out)
        if not done:
            print(f"tenant {args.tenant!r} has no dead letters; nothing {verb}", file=out)
        return EXIT_OK

    return act


# -- conformance --------------------------------------------------------------------------

_progress: _Progress | None = None


def pytest_collection_finish(session: Any) -> None:
    """pytest hook (``dgen conformance`` loads this module with ``-p``): the
    number of tests, for the progress display."""
    if _progress is not None:
        _progress.total = len(session.items)


class _Progress(io.TextIOBase):
    """Receives the runner's lines; shows a live status line on a terminal
    (one line per failure stays), or ``[n/total]``-numbered lines elsewhere."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = out.isatty()
        self.total: int | None = None
        self.done = 0
        self.counts = {"PASS": 0, "FAIL": 0, "SKIP": 0}
        self._buffer = ""
        self._status = False

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self._buffer += text
        while "\n" in self._buffer:
            line, self._buffer = self._buffer.split("\n", 1)
            self._line(line)
        return len(text)

    def _line(self, line: str) -> None:
        word = line[:4]
        if word not in self.counts:
            self._clear()
            print(line, file=self.out)
            return
        self.counts[word] += 1
        self.done += 1
        of = f"/{self.total}" if self.total else ""
        step = f"[{self.done}{of}]"
        if not self.tty:
            print(f"{step} {line}", file=self.out, flush=True)
            return
        if word == "FAIL":
            self._clear()
            print(f"{step} {line}", file=self.out)
        c = self.counts
        status = f"{step} {c['PASS']} passed, {c['FAIL']} failed, {c['SKIP']} skipped  {line[6:]}"
        self.out.write("\r\x1b[K" + _cut(status, 100))
        self.out.flush()
        self._status = True

    def _clear(self) -> None:
        if self._status:
            self.out.write("\r\x1b[K")
            self._status = False

    def flush(self) -> None:
        self.out.flush()

    def finish(self) -> None:
        if self._buffer:
            self._line(self._buffer)
            self._buffer = ""
        self._clear()
        self.out.flush()


def _conformance(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    global _progress
    try:
        from dgen.conformance import run_suite
    except ModuleNotFoundError as exc:
        raise DriverMissingError(
            f"dgen conformance needs the {exc.name!r} package. Install it with: pip install pytest"
        ) from None
    URL.parse(args.url)  # a malformed URL is a usage error before pytest starts
    progress = _Progress(err if args.json else out)
    _progress = progress
    try:
        result = run_suite(
            args.url,
            keyword=args.keyword,
            exitfirst=args.exitfirst,
            out=cast(TextIO, progress),
            pytest_args=["-p", "dgen.cli"],
        )
    finally:
        _progress = None
        progress.finish()
    if args.json:
        _emit_json(
            {
                "url": result.url,
                "ok": result.ok and bool(result.outcomes),
                "passed": result.passed,
                "failed": result.failed,
                "skipped": result.skipped,
                "pytest_exit_code": result.exit_code,
            },
            out,
        )
    if not result.outcomes:
        print("dgen: no conformance tests ran", file=err)
        return EXIT_FAILURE
    return EXIT_OK if result.ok else EXIT_FAILURE


# -- the parser -------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dgen",
        description="Operate DGen stores: list and inspect tenants, manage queued "
        "messages and dead letters, check a backend, run the demo.",
        epilog=_EPILOG,
    )
    from dgen import __version__

    parser.add_argument("--version", action="version", version=f"dgen {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(
        group: Any, name: str, help: str, fn: Any, *, tenant: bool = True
    ) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = group.add_parser(
            name, help=help, description=help, epilog=_EPILOG
        )
        p.add_argument("url", metavar="URL", help="store URL, e.g. sqlite:///app.db")
        if tenant:
            p.add_argument("tenant", metavar="TENANT", help="tenant name")
        p.add_argument("--json", action="store_true", help="print JSON instead of a table")
        p.add_argument(
            "--import",
            dest="imports",
            action="append",
            default=[],
            metavar="MODULE",
            help="import MODULE first (from the current directory or the path), so the "
            "dataclasses it defines decode in states and messages; repeatable",
        )
        p.add_argument(
            "--timeout",
            type=float,
            default=30.0,
            metavar="SECONDS",
            help="give up if the store does not answer in time (default 30)",
        )
        p.set_defaults(run=fn)
        return p

    demo = sub.add_parser(
        "demo",
        help="the quickstart demo: a durable counter survives SIGKILL",
        add_help=False,
    )
    demo.add_argument("demo_args", nargs=argparse.REMAINDER)
    demo.set_defaults(run=None)

    command(
        sub,
        "tenants",
        "list tenants with queue length, lock state and dead-letter count",
        _tenants,
        tenant=False,
    )
    p = command(
        sub,
        "inspect",
        "show a tenant: state summary, queue length, head message, lock holder and "
        "age, dead letters",
        _inspect,
    )
    p.add_argument("--full", action="store_true", help="print the whole state too")

    queue = sub.add_parser("queue", help="list or delete queued messages", epilog=_EPILOG)
    qsub = queue.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = command(qsub, "list", "list a tenant's queued messages, next to run first", _queue_list)
    p.add_argument(
        "--limit", type=int, default=1000, metavar="N", help="show at most N (default 1000)"
    )
    p = command(
        qsub,
        "delete",
        "delete one queued message; a caller waiting on it gets MessageDeletedError",
        _queue_delete,
    )
    p.add_argument("message_id", metavar="MESSAGE_ID", help="id shown by 'dgen queue list'")

    dead = sub.add_parser(
        "dead-letters", help="list, retry or purge a tenant's dead letters", epilog=_EPILOG
    )
    dsub = dead.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = command(dsub, "list", "list a tenant's dead letters with their errors", _dead_list)
    p.add_argument("--traceback", action="store_true", help="print each error's traceback")
    for name, retry, text in (
        ("retry", True, "put dead letters back at the head of the queue (fresh attempts)"),
        ("purge", False, "delete dead letters for good"),
    ):
        p = command(dsub, name, text, _dead_act(retry))
        p.add_argument("message_ids", nargs="*", metavar="MESSAGE_ID", help="dead letter ids")
        p.add_argument("--all", action="store_true", help="every dead letter of the tenant")

    conf = sub.add_parser(
        "conformance",
        help="run the storage conformance suite against a store, with progress",
        description="Run DGen's storage conformance suite (docs/conformance.md) "
        "against one backend URL. It writes only under a random key prefix and "
        "clears it afterwards. Exit status 0 only if no test failed.",
        epilog=_EPILOG,
    )
    conf.add_argument("url", metavar="URL", help="store URL, e.g. sqlite:////tmp/check.db")
    conf.add_argument("-k", dest="keyword", metavar="EXPR", help="run tests matching EXPR")
    conf.add_argument("-x", dest="exitfirst", action="store_true", help="stop at first failure")
    conf.add_argument(
        "--json", action="store_true", help="progress on stderr, JSON summary on stdout"
    )
    conf.set_defaults(run=None)
    return parser


def _check_reachable(url: URL) -> None:
    """Refuse URLs the command cannot use, before opening anything."""
    if url.scheme == "memory":
        raise _UsageError(
            "memory:// stores live inside one process; the dgen command runs in its "
            "own process and would see an empty store (use sqlite:// or postgresql://)"
        )
    if url.scheme == "sqlite" and not url.host:
        # Opening would create an empty database: an operator typo must not.
        raw = url.path[1:] if url.path.startswith("/") else url.path
        if raw and raw != ":memory:" and not Path(raw).exists():
            hint = "" if Path(raw).is_absolute() else f" (relative to {os.getcwd()})"
            raise UnavailableError(f"no SQLite database at {raw}{hint}")


def _import_modules(names: Sequence[str]) -> None:
    if names and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as exc:
            raise _UsageError(f"--import {name}: {type(exc).__name__}: {exc}") from None


async def _run_store_command(args: argparse.Namespace, out: TextIO) -> int:
    url = URL.parse(args.url)
    _check_reachable(url)
    _import_modules(args.imports)
    try:
        async with asyncio.timeout(args.timeout):
            async with connect(url) as db:
                code: int = await args.run(db, args, out)
                return code
    except TimeoutError:
        raise UnavailableError(
            f"no answer from {url} within {args.timeout:g} s (--timeout)"
        ) from None


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Run the ``dgen`` command; returns the exit status."""
    out = out or sys.stdout
    err = sys.stderr
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["demo"]:
        # The demo parses its own options (argparse's REMAINDER drops a leading --help).
        from dgen import demo

        return demo.main(args_list[1:])
    parser = _parser()
    try:
        args = parser.parse_args(args_list)
    except SystemExit as exit_:  # argparse: --help, --version or a usage error
        return int(exit_.code or 0)
    try:
        if args.command == "conformance":
            return _conformance(args, out, err)
        return asyncio.run(_run_store_command(args, out))
    except KeyboardInterrupt:
        print("dgen: interrupted", file=err)
        return 130
    except Exception as exc:
        if os.environ.get("DGEN_DEBUG"):
            raise
        code, text = _classify(exc)
        print(f"dgen: {text}", file=err)
        return code


def _classify(exc: Exception) -> tuple[int, str]:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if isinstance(exc, (_UsageError, URLError)):
        return EXIT_USAGE, text
    if isinstance(exc, (admin.TenantNotFoundError, admin.MessageNotFoundError)):
        return EXIT_FAILURE, text
    if isinstance(exc, ValueError):  # a malformed message id
        return EXIT_USAGE, text
    if isinstance(exc, (DriverMissingError, UnavailableError, OSError)):
        return EXIT_UNAVAILABLE, text
    if isinstance(exc, StoreError):
        return EXIT_UNAVAILABLE, f"{type(exc).__name__}: {text}"
    if isinstance(exc, DGenError):
        return EXIT_FAILURE, f"{type(exc).__name__}: {text}"
    return EXIT_FAILURE, f"unexpected {type(exc).__name__}: {text} (DGEN_DEBUG=1 shows a traceback)"


if __name__ == "__main__":
    sys.exit(main())
