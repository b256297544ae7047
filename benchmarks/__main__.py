"""``python -m benchmarks URL... [--quick] [--out FILE] [--peers] [--install-peers]``.

Each URL is a DGen store URL (``memory://``, ``sqlite:///dir/bench.db``,
``postgresql://...``) or one of the words ``sqlite`` (a file in a temporary
directory) and ``postgresql`` (a throwaway cluster started like the tests
do). SQLite runs use fresh files beside the named one and remove them.
Writes one JSON file per run and prints every figure with its ratio to the
baseline measured in the same run. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import tempfile
import time
import traceback
import uuid
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import dgen
from benchmarks import baselines, figures, pg
from benchmarks.common import (
    REPO,
    Report,
    Settings,
    machine_info,
    query_param,
    sqlite_path,
    with_query,
)
from benchmarks.figures import Target
from benchmarks.state import state_benchmark


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("urls", nargs="+", metavar="URL")
    parser.add_argument("--quick", action="store_true", help="tiny counts (< 1 minute)")
    parser.add_argument("--out", type=Path, help="JSON file (default benchmarks/results/...)")
    parser.add_argument(
        "--peers",
        choices=["auto", "no"],
        default="auto",
        help="run the peers (procrastinate, DBOS) on PostgreSQL/SQLite when installed",
    )
    parser.add_argument(
        "--install-peers",
        action="store_true",
        help="pip install procrastinate and dbos into this environment first",
    )
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated groups to run (default all): " + ",".join(GROUPS),
    )
    return parser.parse_args(argv)


GROUPS = ("baseline", "protocol", "cast", "e2e", "call", "consume", "tenants", "state", "peers")


@contextlib.contextmanager
def prepared(spec: str, run_id: str) -> Iterator[tuple[Target, dict[str, Any]]]:
    """The store behind ``spec``, and facts about it for the JSON."""
    if spec.startswith("memory"):
        yield Target("memory", spec, "memory", cross_process=False), {}
        return
    if spec == "sqlite" or spec.startswith("sqlite:"):
        tmp = None
        if spec == "sqlite":
            tmp = Path(tempfile.mkdtemp(prefix="dgen-bench-"))
            spec = f"sqlite:///{tmp}/bench.db"
        base = sqlite_path(spec)
        base.parent.mkdir(parents=True, exist_ok=True)
        fresh = base.with_name(f"{base.stem}-{run_id}.db")
        url = spec.replace(str(base), str(fresh), 1)
        try:
            yield (
                Target("sqlite", url, "sqlite", cross_process=True),
                {"directory": str(fresh.parent.resolve())},
            )
        finally:
            # the database, its -wal/-shm files and its -dgenwake socket directory
            for pattern in (f"{fresh.name}*", f"{base.stem}-raw-{run_id}*"):
                for p in fresh.parent.glob(pattern):
                    if p.is_dir():
                        shutil.rmtree(p, ignore_errors=True)
                    else:
                        p.unlink(missing_ok=True)
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        return
    if spec == "postgresql" or spec.startswith(("postgresql:", "postgres:")):
        server = None
        if spec == "postgresql":
            server = pg.start_throwaway()
            spec = server.url
        name = f"bench_dgen_{run_id}"
        url = pg.create_database(spec, name) or spec
        url = with_query(url, schema=f"dgen_{run_id}")
        info: dict[str, Any] = {"server": pg.server_info(url)}
        if server is not None:
            info["started"] = server.how
        try:
            yield Target("postgresql", url, "postgresql", cross_process=True), info
        finally:
            pg.drop_database(spec, name)
            if server is not None:
                server.close()
        return
    raise SystemExit(f"unknown URL {spec!r}: give memory://, sqlite:///..., postgresql://... "
                     "or the words sqlite / postgresql")  # fmt: skip


def run_baselines(report: Report, s: Settings, t: Target, run_id: str) -> None:
    if t.kind == "memory":
        report.skip("raw", "memory:// has no driver below it; ratios use protocol_1/protocol_8")
        report.aliases.update(raw_1="protocol_1", raw_8="protocol_8", raw_best="protocol_1")
        return
    if t.kind == "sqlite":
        sync = query_param(t.url, "synchronous", "full")
        path = sqlite_path(t.url)
        raw = path.with_name(f"{path.stem.rsplit('-', 1)[0]}-raw-{run_id}.db")
        rate = lambda w, n: baselines.sqlite_rate(raw, sync, w, n)  # noqa: E731
        label = f"sqlite3, WAL, synchronous={sync}"
    else:
        sync = query_param(t.url, "synchronous_commit", "")
        info = pg.conninfo(t.url)
        rate = lambda w, n: baselines.pg_rate(info, sync or None, w, n)  # noqa: E731
        label = "psycopg, same server and database" + (
            f", synchronous_commit={sync}" if sync else ""
        )
    # Calibrate the round size on one short run, then measure.
    t.ref_rate = rate(1, s.min_count)
    for writers in (1, 8):
        n = s.count(t.ref_rate, multiple=writers)
        values = [rate(writers, n) for _ in range(s.rounds)]
        report.add(f"raw_{writers}", f"bare driver one-row commit, {writers} writer(s): {label}",
                   values, "commit/s")  # fmt: skip
    # The physical limit for concurrent work: the better of 1 and 8 writers
    # (SQLite's 8 writers mostly wait on its busy handler).
    ones, eights = report.get("raw_1"), report.get("raw_8")
    assert ones is not None and eights is not None
    report.add("raw_best", "bare driver, the better of 1 and 8 writers (per round)",
               [max(a, b) for a, b in zip(ones["rounds"], eights["rounds"], strict=True)],
               "commit/s")  # fmt: skip
    t.ref_rate = ones["median"]


async def calibrate_memory(s: Settings, t: Target, db: dgen.Database) -> None:
    async def put(tr: dgen.Transaction) -> None:
        tr.set(b"calibrate", b"v")

    start = time.perf_counter()
    for _ in range(s.min_count):
        await db.run(put)
    t.ref_rate = s.min_count / (time.perf_counter() - start)


async def commits_per_message(report: Report, s: Settings, t: Target) -> None:
    """PostgreSQL only: xact_commit per message for a cast + consume pipeline."""
    for batch in (1, 16):
        values = []
        for _ in range(s.rounds):
            n = s.count(t.ref_rate)
            before = pg.xact_commits(t.url, settle=0.5)
            done = asyncio.Event()
            async with dgen.connect(t.url) as db:
                server = figures.Counter(n, lambda _, done=done: done.set())
                async with dgen.start(server, db, t.tenant("commits"), batch_size=batch) as run:
                    for i in range(n):
                        await run.cast(i)
                    await asyncio.wait_for(done.wait(), 300)
            after = pg.xact_commits(t.url)
            values.append((after - before) / n)
        report.add(
            f"commits_per_msg_batch{batch}",
            f"PostgreSQL commits per message (cast + consume, batch {batch}, incl. start/stop)",
            values,
            "commit/msg",
        )


async def run_target(spec: str, s: Settings, groups: set[str], args: argparse.Namespace,
                     run_id: str) -> dict[str, Any]:  # fmt: skip
    with prepared(spec, run_id) as (t, info):
        print(f"\n== {t.label}: {t.url}", flush=True)
        report = Report(t.label, extra={"url": t.url, **info})
        started = time.perf_counter()
        try:
            if "baseline" in groups:
                await asyncio.to_thread(run_baselines, report, s, t, run_id)
            async with dgen.connect(t.url) as db:
                if t.kind == "memory":
                    await calibrate_memory(s, t, db)
                steps = [
                    ("protocol", figures.protocol(report, s, t, db)),
                    ("cast", figures.casts(report, s, t, db)),
                    ("cast", figures.cast_processes(report, s, t)),
                    ("e2e", figures.end_to_end(report, s, t, db)),
                    ("call", figures.calls(report, s, t, db)),
                    ("consume", figures.consumer_processes(report, s, t, db)),
                    ("tenants", figures.many_tenants(report, s, t)),
                    ("state", state_benchmark(report, s, t, db)),
                ]
                for group, step in steps:
                    if group not in groups:
                        step.close()
                        continue
                    try:
                        await step
                    except Exception as exc:
                        # One failing figure must not cost the others.
                        traceback.print_exc()
                        report.skip(step.__name__, f"failed: {type(exc).__name__}: {exc}")
            if t.kind == "postgresql" and "peers" in groups:
                await commits_per_message(report, s, t)
            if args.peers != "no" and "peers" in groups and t.kind in ("postgresql", "sqlite"):
                from benchmarks import peers

                await peers.run_peers(report, s, t, run_id, install=args.install_peers)
        except Exception as exc:
            traceback.print_exc()
            report.extra["error"] = f"{type(exc).__name__}: {exc}"
        report.extra["seconds"] = round(time.perf_counter() - started, 1)
        return report.as_json()


def print_table(results: list[dict[str, Any]]) -> None:
    print("\n== summary (median of rounds; ratio to the baseline of the same run)")
    for r in results:
        print(f"\n{r['target']}  ({r.get('seconds', '?')} s)")
        for f in r["figures"]:
            ratio = f"{f['ratio']:.2f}x {f['baseline']}" if "ratio" in f else ""
            target = ""
            if "target" in f:
                # No verdict without a baseline measured in this run.
                verdict = {True: "ok", False: "MISS"}.get(f.get("meets"), "n/a")
                target = f"target {f['target']}: {verdict}"
            print(f"  {f['key']:30} {f['median']:>12,.2f} {f['unit']:10} {ratio:22} {target}")
        if r.get("error"):
            print(f"  ERROR: {r['error']}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    s = Settings.make(args.quick)
    groups = set(args.only.split(",")) if args.only else set(GROUPS)
    unknown = groups - set(GROUPS)
    if unknown:
        raise SystemExit(f"unknown group(s) {sorted(unknown)}; choose from {', '.join(GROUPS)}")
    run_id = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:4]
    run_id = run_id.replace("-", "_").lower()
    out = args.out or REPO / "benchmarks" / "results" / f"run-{run_id}.json"
    doc: dict[str, Any] = {
        "command": "python -m benchmarks " + " ".join(argv if argv is not None else _argv()),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine_info(),
        "settings": asdict(s),
        "groups": sorted(groups),
        "results": [],
    }
    for spec in args.urls:
        doc["results"].append(asyncio.run(run_target(spec, s, groups, args, run_id)))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    print_table(doc["results"])
    print(f"\nwrote {out}")
    return 1 if any(r.get("error") for r in doc["results"]) else 0


def _argv() -> list[str]:
    import sys

    return sys.argv[1:]


if __name__ == "__main__":
    raise SystemExit(main())
