"""DGen's own figures: protocol writes, casts, end to end, calls, consumers, tenants.

Every rate here is a ratio to a bare-driver baseline of the same run (see
baselines.py): ``raw_1`` (one writer) for sequential work, ``raw_8`` (eight
concurrent writers) for db.run with 8 tasks, ``raw_best`` (the better of
the two) for concurrent producers and end to end.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from typing import Any

import dgen
from benchmarks.common import Clock, Report, Settings, percentile
from benchmarks.procs import children
from benchmarks.worker import Counter


@dataclass
class Target:
    """One store under test."""

    label: str
    url: str  # the DGen URL
    kind: str  # memory, sqlite or postgresql
    cross_process: bool
    ref_rate: float = 1000.0  # raw_1, to size rounds

    def tenant(self, what: str) -> str:
        return f"bench-{what}-{uuid.uuid4().hex[:8]}"


async def protocol(report: Report, s: Settings, t: Target, db: dgen.Database) -> None:
    """One-key write transactions through ``db.run`` (1 and 8 concurrent tasks)."""
    for writers in (1, 8):
        baseline = f"raw_{writers}" if t.kind != "memory" else None

        async def once(writers: int = writers) -> float:
            n = s.count(t.ref_rate, multiple=writers)
            prefix = uuid.uuid4().bytes

            async def writer(w: int) -> None:
                for i in range(n // writers):
                    key = b"bench/" + prefix + bytes([w]) + i.to_bytes(4, "big")

                    async def put(tr: dgen.Transaction, key: bytes = key) -> None:
                        tr.set(key, b"v")

                    await db.run(put)

            clock = Clock()
            await asyncio.gather(*(writer(w) for w in range(writers)))
            return n / clock.elapsed()

        values = [await once() for _ in range(s.rounds)]
        report.add(
            f"protocol_{writers}",
            f"one-key write via db.run, {writers} task(s)",
            values,
            "commit/s",
            baseline=baseline,
            target=0.85 if baseline else None,
        )


async def casts(report: Report, s: Settings, t: Target, db: dgen.Database) -> None:
    """Cast rate with 1, 8, 32 producer tasks (no consumer running)."""
    for tasks in (1, 8, 32):
        baseline = "raw_1" if tasks == 1 else "raw_best"

        async def once(tasks: int = tasks) -> float:
            n = s.count(t.ref_rate, multiple=tasks)
            handle = dgen.handle(db, t.tenant("cast"))

            async def producer() -> None:
                for i in range(n // tasks):
                    await handle.cast(i)

            clock = Clock()
            await asyncio.gather(*(producer() for _ in range(tasks)))
            return n / clock.elapsed()

        values = [await once() for _ in range(s.rounds)]
        report.add(
            f"cast_{tasks}",
            f"cast, {tasks} producer task(s)",
            values,
            "msg/s",
            baseline=baseline if report.get(baseline) else None,
            target=0.8,
        )


async def cast_processes(report: Report, s: Settings, t: Target, processes: int = 4) -> None:
    if not t.cross_process:
        report.skip(f"cast_{processes}proc", "the store is not shared between processes")
        return

    async def once() -> float:
        n = s.count(t.ref_rate, multiple=processes)
        tenant = t.tenant("castp")
        configs = [{"url": t.url, "tenant": tenant, "count": n // processes}] * processes
        async with children("produce", configs) as procs:
            for p in procs:
                p.go()
            results = [(await p.line())["result"] for p in procs]
        start = min(r["start"] for r in results)
        end = max(r["end"] for r in results)
        return n / (end - start)

    values = [await once() for _ in range(s.rounds)]
    report.add(
        f"cast_{processes}proc",
        f"cast, {processes} producer processes",
        values,
        "msg/s",
        baseline="raw_best" if report.get("raw_best") else None,
        target=0.8,
    )


async def end_to_end(report: Report, s: Settings, t: Target, db: dgen.Database) -> None:
    """First cast to the commit of the last message's state, 8 producer tasks
    and one consumer in this process, for batch sizes 1, 16 and 64."""
    producers = 8
    for batch in (1, 16, 64):

        async def once(batch: int = batch) -> tuple[float, dict[str, int]]:
            n = s.count(t.ref_rate, multiple=producers)
            done = asyncio.Event()
            finished: list[float] = []

            def reached(state: int) -> None:
                finished.append(time.perf_counter())
                done.set()

            server = Counter(n, reached)
            async with dgen.start(server, db, t.tenant("e2e"), batch_size=batch) as running:

                async def producer() -> None:
                    for i in range(n // producers):
                        await running.cast(i)

                start = time.perf_counter()
                await asyncio.gather(*(producer() for _ in range(producers)))
                await asyncio.wait_for(done.wait(), 300)
                stats = {"transactions": running.stats.transactions,
                         "attempts": running.stats.attempts}  # fmt: skip
            return n / (finished[0] - start), stats

        values, extras = [], []
        for _ in range(s.rounds):
            rate, stats = await once()
            values.append(rate)
            extras.append(stats)
        report.add(
            f"e2e_batch{batch}",
            f"end to end, batch size {batch} (8 producer tasks)",
            values,
            "msg/s",
            baseline="raw_best" if report.get("raw_best") else None,
            target=0.45 if batch == 1 else 0.8,
            consumer_stats=extras,
        )


def _latencies(report: Report, key: str, name: str, per_round: list[list[float]]) -> None:
    p50 = [percentile(r, 0.5) for r in per_round]
    p99 = [percentile(r, 0.99) for r in per_round]
    worst = [max(r) for r in per_round]
    base = "raw_1" if report.get("raw_1") else None
    report.add(f"{key}_p50", f"{name}, p50", p50, "ms", baseline=base, target=2.5,
               lower_is_better=True, calls_per_round=len(per_round[0]))  # fmt: skip
    report.add(f"{key}_p99", f"{name}, p99", p99, "ms", baseline=base)
    report.add(f"{key}_max", f"{name}, max", worst, "ms", baseline=base)


async def _sequential_calls(handle: dgen.Handle, n: int) -> list[float]:
    for _ in range(3):  # warm-up
        await handle.call("get", timeout=60)
    out = []
    for _ in range(n):
        start = time.perf_counter()
        await handle.call("get", timeout=60)
        out.append((time.perf_counter() - start) * 1000)
    return out


async def calls(report: Report, s: Settings, t: Target, db: dgen.Database) -> None:
    rounds = []
    for _ in range(s.rounds):
        async with dgen.start(Counter(), db, t.tenant("call")) as running:
            rounds.append(await _sequential_calls(running, s.calls))
    _latencies(report, "call_local", "call round trip, consumer in this process", rounds)
    if not t.cross_process:
        report.skip("call_remote", "the store is not shared between processes")
        return
    rounds = []
    for _ in range(s.rounds):
        tenant = t.tenant("callp")
        async with children("consume", [{"url": t.url, "tenant": tenant}]) as (proc,):
            proc.go()
            rounds.append(await _sequential_calls(dgen.handle(db, tenant), s.calls))
    _latencies(report, "call_remote", "call round trip, consumer in another process", rounds)


async def _fill(db: dgen.Database, tenant: str, n: int) -> None:
    handle = dgen.handle(db, tenant)
    for start in range(0, n, 500):
        await handle.cast_many(range(start, min(n, start + 500)))


async def consumer_processes(report: Report, s: Settings, t: Target, db: dgen.Database) -> None:
    """Drain a pre-filled queue of one tenant with 1 and 2 consumer processes
    (batch size 16), from the go signal to the commit of the last message."""
    if not t.cross_process:
        report.skip("consume_1proc", "the store is not shared between processes")
        return
    for processes in (1, 2):

        async def once(processes: int = processes) -> tuple[float, list[Any]]:
            n = s.count(t.ref_rate, seconds=s.seconds * 3)
            tenant = t.tenant("consume")
            await _fill(db, tenant, n)
            configs = [{"url": t.url, "tenant": tenant, "target": n}] * processes
            async with children("consume", configs) as procs:
                start = time.time()
                for p in procs:
                    p.go()
                lines = [asyncio.ensure_future(p.line()) for p in procs]
                finished, pending = await asyncio.wait(lines, return_when=asyncio.FIRST_COMPLETED)
                for p in pending:
                    p.cancel()
                result = next(iter(finished)).result()["result"]
            return n / (result["end"] - start), result

        values, stats = [], []
        for _ in range(s.rounds):
            rate, result = await once()
            values.append(rate)
            stats.append({k: result[k] for k in ("transactions", "attempts", "messages")})
        report.add(
            f"consume_{processes}proc",
            f"consumer rate, {processes} consumer process(es) on one tenant, batch 16",
            values,
            "msg/s",
            baseline="raw_1" if report.get("raw_1") else None,
            finishing_consumer_stats=stats,
        )


async def many_tenants(report: Report, s: Settings, t: Target) -> None:
    """``s.tenants`` tenants served by one process (a child, so its RSS is its own)."""
    rates, peaks, connected, txs = [], [], [], []
    for _ in range(s.rounds):
        cfg = {
            "url": t.url,
            "prefix": t.tenant("many"),
            "tenants": s.tenants,
            "per_tenant": s.per_tenant,
            "batch_size": 16,
            "timeout": 90,
        }
        async with children("tenants", [cfg]) as (proc,):
            result = (await proc.line())["result"]
        rates.append(result["rate"])
        peaks.append(result["rss_peak_kb"] / 1024)
        connected.append(result["rss_connected_kb"] / 1024)
        txs.append(result["transactions"])
    report.add(
        "tenants_rate",
        f"rate over {s.tenants} tenants served by one process ({s.per_tenant} queued each)",
        rates,
        "msg/s",
        baseline="raw_1" if report.get("raw_1") else None,
        consume_transactions=txs,
    )
    report.add(
        "tenants_peak_rss",
        f"peak RSS of the consumer process with {s.tenants} tenants",
        peaks,
        "MB",
        rss_after_connect_mb=connected,
        per_tenant_kb=[(p - c) * 1024 / s.tenants for p, c in zip(peaks, connected, strict=True)],
    )
