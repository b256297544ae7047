"""Peers doing DGen's job on the same store: a durable counter increment
processed by a worker. Optional: ``pip install procrastinate dbos`` (or
``python -m benchmarks ... --install-peers``); they are not test dependencies.

* procrastinate (PostgreSQL only): ``defer_async`` N jobs, then one worker
  (``run_worker_async(wait=False)``) runs them; each job increments a row.
* DBOS: a workflow with one transaction step (``SQLAlchemyDatasource``
  ``@transaction`` incrementing a row), N started one after another; and the
  same workflow through a DBOS ``Queue`` (enqueue N, wait for all results).
* oban (the Python package) needs Python >= 3.12; this environment runs 3.11.

Each peer runs in its own process (DBOS is a per-process singleton):
``python -m benchmarks.peers ROLE JSON`` prints one JSON result line. The
parent counts the commits of the peer's databases (``pg_stat_database``).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from typing import Any

from benchmarks import pg
from benchmarks.common import REPO, Report, Settings

PACKAGES = ("procrastinate", "dbos")
OBAN_REASON = (
    "the oban package on PyPI requires Python >= 3.12 (every release: 0.5.0 to 0.7.0); "
    "this environment runs Python 3.11"
)


def installed(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def install() -> None:
    subprocess.run([sys.executable, "-m", "pip", "install", *PACKAGES], check=True)


# -- the peers, run in child processes ------------------------------------------------


def _pg_setup(conninfo: str) -> None:
    import psycopg

    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS counter (id int PRIMARY KEY, n bigint NOT NULL)")
        conn.execute("INSERT INTO counter VALUES (1, 0) ON CONFLICT DO NOTHING")


async def run_procrastinate(cfg: dict[str, Any]) -> dict[str, Any]:
    import psycopg
    from procrastinate import App, PsycopgConnector

    n = cfg["jobs"]
    _pg_setup(cfg["conninfo"])
    app = App(connector=PsycopgConnector(conninfo=cfg["conninfo"]))
    conn = await psycopg.AsyncConnection.connect(cfg["conninfo"], autocommit=True)

    @app.task(queue="bench")
    async def increment() -> None:
        await conn.execute("UPDATE counter SET n = n + 1 WHERE id = 1")

    async with app.open_async():
        await app.schema_manager.apply_schema_async()
        print(json.dumps({"ready": True}), flush=True)
        sys.stdin.readline()
        start = time.perf_counter()
        for _ in range(n):
            await increment.defer_async()
        deferred = time.perf_counter()
        await app.run_worker_async(
            queues=["bench"], wait=False, concurrency=1, install_signal_handlers=False
        )
        done = time.perf_counter()
    count = (await (await conn.execute("SELECT n FROM counter WHERE id = 1")).fetchone())[0]  # type: ignore[index]
    await conn.close()
    return {
        "enqueue_rate": n / (deferred - start),
        "work_rate": n / (done - deferred),
        "rate": n / (done - start),
        "counter": count,
    }


def run_dbos(cfg: dict[str, Any]) -> dict[str, Any]:
    import sqlalchemy as sa
    from dbos import DBOS, SQLAlchemyDatasource

    n = cfg["jobs"]
    if cfg["app_url"].startswith("postgresql"):
        _pg_setup(cfg["conninfo"])
    DBOS(config={"name": "dgen_bench", "system_database_url": cfg["sys_url"],
                 "log_level": "WARNING"})  # fmt: skip
    ds = SQLAlchemyDatasource.create(cfg["app_url"])
    with ds.engine.begin() as c:
        c.execute(sa.text("CREATE TABLE IF NOT EXISTS counter (id int PRIMARY KEY, n bigint)"))
        if not c.execute(sa.text("SELECT 1 FROM counter WHERE id = 1")).first():
            c.execute(sa.text("INSERT INTO counter VALUES (1, 0)"))

    @ds.transaction()
    def increment() -> None:
        ds.sql_session().execute(sa.text("UPDATE counter SET n = n + 1 WHERE id = 1"))

    @DBOS.workflow()
    def workflow() -> None:
        increment()

    DBOS.launch()
    queue = DBOS.register_queue("bench", polling_interval_sec=0.01)
    print(json.dumps({"ready": True}), flush=True)
    sys.stdin.readline()
    start = time.perf_counter()
    if cfg["mode"] == "workflow":
        for _ in range(n):
            workflow()
    else:
        handles = [queue.enqueue(workflow) for _ in range(n)]
        for h in handles:
            h.get_result()
    elapsed = time.perf_counter() - start
    with ds.engine.begin() as c:
        count = c.execute(sa.text("SELECT n FROM counter WHERE id = 1")).scalar()
    DBOS.destroy()
    return {"rate": n / elapsed, "counter": count}


def child_main() -> None:
    role, cfg = sys.argv[1], json.loads(sys.argv[2])
    result = asyncio.run(run_procrastinate(cfg)) if role == "procrastinate" else run_dbos(cfg)
    print(json.dumps({"result": result}), flush=True)


# -- the parent -----------------------------------------------------------------------------


def _child(role: str, cfg: dict[str, Any], before: Any) -> dict[str, Any]:
    """Run a peer child: wait until it is set up, take the 'before' reading, let it go."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.peers", role, json.dumps(cfg)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=str(REPO),
        env=env,
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        out: dict[str, Any] = {}
        for line in proc.stdout:
            msg = json.loads(line) if line.startswith("{") else {}
            if msg.get("ready"):
                out["before"] = before()
                proc.stdin.write("go\n")
                proc.stdin.flush()
            elif "result" in msg:
                out.update(msg["result"])
                break
        proc.wait(timeout=120)
        if "rate" not in out:
            raise RuntimeError(f"peer {role} failed:\n{proc.stderr.read()[-3000:]}")  # type: ignore[union-attr]
        return out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _measure(report: Report, s: Settings, key: str, name: str, role: str,
             cfg_for: Any, counted: Any) -> None:  # fmt: skip
    """Rounds of one peer, each on fresh databases; commits per job from pg_stat_database."""
    rates, commits, extras = [], [], []
    for r in range(s.peer_rounds):
        cfg, dbs, cleanup = cfg_for(r)
        try:
            before = (lambda dbs=dbs: counted(dbs, 0.5)) if dbs else (lambda: None)
            result = _child(role, {**cfg, "jobs": s.peer_jobs}, before)
            if result["counter"] != s.peer_jobs:
                raise RuntimeError(f"{role}: counter is {result['counter']}, not {s.peer_jobs}")
            rates.append(result["rate"])
            if dbs:
                commits.append((counted(dbs, 1.0) - result["before"]) / s.peer_jobs)
            extras.append({k: v for k, v in result.items() if k not in ("before", "counter")})
        finally:
            cleanup()
    more: dict[str, Any] = {"rounds_detail": extras, "jobs_per_round": s.peer_jobs}
    if commits:
        more["commits_per_job"] = commits
    report.add(key, name, rates, "job/s", baseline="raw_1" if report.get("raw_1") else None, **more)


async def run_peers(report: Report, s: Settings, t: Any, run_id: str, install: bool) -> None:
    report.skip("peer_oban", OBAN_REASON)
    missing = [p for p in PACKAGES if not installed(p)]
    if missing and install:
        await asyncio.to_thread(globals()["install"])
        missing = [p for p in PACKAGES if not installed(p)]
    for p in missing:
        report.skip(f"peer_{p}", f"{p} is not installed (pip install {p}, or --install-peers)")
    await asyncio.to_thread(_run_peers_sync, report, s, t, run_id, missing)


def _run_peers_sync(report: Report, s: Settings, t: Any, run_id: str, missing: list[str]) -> None:
    if t.kind == "postgresql":
        base = t.url.split("?")[0].rsplit("/", 1)[0] + "/x?" + t.url.split("?", 1)[1]
        base = pg.conninfo(base)

        def fresh(suffix: str, r: int) -> tuple[str, str]:
            name = f"bench_{suffix}_{run_id}_{r}"
            url = pg.create_database(base, name)
            if url is None:
                raise RuntimeError(f"cannot create database {name} for a peer")
            return name, url

        def counted(dbs: list[str], settle: float) -> int:
            return pg.xact_commits(base, dbs, settle=settle)

        if "procrastinate" not in missing:

            def proc_cfg(r: int) -> Any:
                name, url = fresh("procrastinate", r)
                return {"conninfo": url}, [name], lambda: pg.drop_database(base, name)

            try:
                _measure(report, s, "peer_procrastinate", "procrastinate: defer + worker, one "
                         "increment per job", "procrastinate", proc_cfg, counted)  # fmt: skip
            except Exception as exc:
                report.skip("peer_procrastinate", f"failed: {type(exc).__name__}: {exc}")
        if "dbos" not in missing:
            for mode in ("workflow", "queue"):

                def dbos_cfg(r: int, mode: str = mode) -> Any:
                    app, app_url = fresh(f"dbos_{mode}", r)
                    sys_name, sys_url = fresh(f"dbos_{mode}_sys", r)
                    cfg = {"conninfo": app_url, "app_url": _sa(app_url),
                           "sys_url": _sa(sys_url), "mode": mode}  # fmt: skip

                    def cleanup() -> None:
                        pg.drop_database(base, app)
                        pg.drop_database(base, sys_name)

                    return cfg, [app, sys_name], cleanup

                try:
                    _measure(report, s, f"peer_dbos_{mode}",
                             f"DBOS: workflow with one transaction step ({mode})",
                             "dbos", dbos_cfg, counted)  # fmt: skip
                except Exception as exc:
                    report.skip(f"peer_dbos_{mode}", f"failed: {type(exc).__name__}: {exc}")
    elif t.kind == "sqlite":
        report.skip("peer_procrastinate_sqlite", "procrastinate supports PostgreSQL only")
        if "dbos" not in missing:
            from benchmarks.common import sqlite_path

            directory = sqlite_path(t.url).parent.resolve()
            for mode in ("workflow", "queue"):

                def sqlite_cfg(r: int, mode: str = mode) -> Any:
                    files = [directory / f"dbos-{mode}-{run_id}-{r}-{w}.db" for w in ("app", "sys")]

                    def cleanup() -> None:
                        for f in files:
                            for p in f.parent.glob(f.name + "*"):
                                p.unlink(missing_ok=True)

                    cfg = {"app_url": f"sqlite:///{files[0]}", "sys_url": f"sqlite:///{files[1]}",
                           "mode": mode}  # fmt: skip
                    return cfg, [], cleanup

                try:
                    _measure(report, s, f"peer_dbos_{mode}",
                             f"DBOS on SQLite: workflow with one transaction step ({mode})",
                             "dbos", sqlite_cfg, None)  # fmt: skip
                except Exception as exc:
                    report.skip(f"peer_dbos_{mode}", f"failed: {type(exc).__name__}: {exc}")
    _compare(report)


def _sa(url: str) -> str:
    return url.replace("postgresql://", "postgresql+psycopg://", 1)


def _compare(report: Report) -> None:
    """DGen's best end-to-end rate against the best peer's rate."""
    peers = [f for f in report.figures if f["key"].startswith("peer_")]
    e2e = [f for f in report.figures if f["key"].startswith("e2e_batch")]
    if not peers or not e2e:
        return
    best_peer = max(peers, key=lambda f: f["median"])
    best = max(e2e, key=lambda f: f["median"])
    ratios = [best["median"] / v for v in best_peer["rounds"]]
    report.add(
        "dgen_vs_best_peer",
        f"DGen {best['key']} / {best_peer['key']} (rates)",
        ratios,
        "x",
        target=10,
        meets=sorted(ratios)[len(ratios) // 2] >= 10,
    )


if __name__ == "__main__":
    child_main()
