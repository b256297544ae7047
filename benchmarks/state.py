"""Issue 5: what one small change to a big state costs.

Two states: a list of ``state_items`` items ``{"id", "n", "name"}`` and a
mapping of ``state_fields`` int fields. Each message changes one item / one
field. DGen stores them incrementally (dgen.layout); the comparison writes
the whole state as one value, which DGen itself does for a leaf (the state
wrapped in a tuple), so both cases run through the same consumer.

Figures: bytes and keys written per change from ``StateLayout``/``diff``
(offline) and from ``ConsumerStats`` of a live consumer with batch size 1,
plus the consumer's message rate in each case, and (in ``offline``) the CPU
microseconds of flatten + diff per change, incremental against whole.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import dgen
from benchmarks.common import Report, Settings
from benchmarks.figures import Target, _fill
from dgen import codec
from dgen.layout import StateLayout, diff
from dgen.queue import TenantKeys


def make_state(kind: str, s: Settings) -> Any:
    if kind == "list":
        return [{"id": f"i{i}", "n": 0, "name": f"item number {i}"} for i in range(s.state_items)]
    return {f"field_{i}": 0 for i in range(s.state_fields)}


def change(kind: str, state: Any, i: int) -> None:
    """Change one item / field in place."""
    if kind == "list":
        state[i % len(state)]["n"] += 1
    else:
        state[f"field_{i % len(state)}"] += 1


class StateServer(dgen.DGenServer):
    def __init__(self, kind: str, whole: bool, s: Settings, target: int) -> None:
        self.kind, self.whole, self.settings = kind, whole, s
        self.target, self.seen = target, 0
        self.done = asyncio.Event()

    def init(self, arg: Any) -> Any:
        state = make_state(self.kind, self.settings)
        return (state,) if self.whole else state  # a tuple is one leaf: one value

    def _tick(self, state: Any) -> None:
        self.seen += 1
        if self.seen == self.target:
            self.done.set()

    def handle_cast(self, message: int, state: Any) -> dgen.NoReply:
        change(self.kind, state[0] if self.whole else state, message)
        return dgen.NoReply(state, actions=[self._tick])


def offline(kind: str, s: Settings, max_value: int) -> dict[str, float]:
    layout = StateLayout(TenantKeys("bench").state, max_value)
    state = make_state(kind, s)
    before = layout.flatten(state)
    change(kind, state, 7)
    changes = diff(before, layout.flatten(state, before))
    whole = (state,)
    whole_flat = layout.flatten(whole)
    return {
        "incremental_bytes": changes.bytes_written,
        "incremental_keys": changes.keys_touched,
        "whole_bytes": diff(None, whole_flat).bytes_written,
        "whole_keys": diff(None, whole_flat).keys_touched,
        "state_keys": len(before.entries),
        "encoded_state_bytes": len(codec.encode(state)),
        **cpu_per_change(kind, s, layout),
    }


def cpu_per_change(kind: str, s: Settings, layout: StateLayout) -> dict[str, float]:
    """Microseconds of flatten + diff per one-item / one-field change made in
    place, incremental against whole-state (best of 3 runs of 50 changes): the
    CPU part of the consumer's cost, without the store."""
    state = make_state(kind, s)
    flat = layout.flatten(state)
    whole_flat = layout.flatten((state,))
    best = {"incremental_cpu_us": float("inf"), "whole_cpu_us": float("inf")}
    for _ in range(3):
        t0 = time.perf_counter()
        for i in range(50):
            change(kind, state, i)
            new = layout.flatten(state, flat)
            diff(flat, new)
            flat = new
        t1 = time.perf_counter()
        for i in range(50):
            change(kind, state, i)
            new = layout.flatten((state,), whole_flat)
            diff(whole_flat, new)
            whole_flat = new
        t2 = time.perf_counter()
        best["incremental_cpu_us"] = min(best["incremental_cpu_us"], (t1 - t0) / 50 * 1e6)
        best["whole_cpu_us"] = min(best["whole_cpu_us"], (t2 - t1) / 50 * 1e6)
    return best


async def state_benchmark(report: Report, s: Settings, t: Target, db: dgen.Database) -> None:
    for kind in ("list", "mapping"):
        size = f"{s.state_items} items" if kind == "list" else f"{s.state_fields} fields"
        o = offline(kind, s, db.limits.max_value_size)
        rates: dict[bool, list[float]] = {True: [], False: []}
        per_tx: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
        n = s.state_changes
        for _ in range(s.rounds):
            for whole in (False, True):
                tenant = t.tenant(f"state-{kind}")
                server = StateServer(kind, whole, s, n)
                await _fill(db, tenant, n)
                async with dgen.start(server, db, tenant, batch_size=1) as running:
                    first = running.stats.state_bytes_written, running.stats.state_keys_written
                    tx0 = running.stats.transactions
                    start = time.perf_counter()
                    await asyncio.wait_for(server.done.wait(), 300)
                    elapsed = time.perf_counter() - start
                    st = running.stats
                    txs = max(1, st.transactions - tx0)
                    per_tx[whole].append(
                        (
                            (st.state_bytes_written - first[0]) / txs,
                            (st.state_keys_written - first[1]) / txs,
                        )
                    )
                rates[whole].append(n / elapsed)
        inc_bytes = [b for b, _ in per_tx[False]]
        whole_bytes = [b for b, _ in per_tx[True]]
        report.add(
            f"state_{kind}_bytes_per_change",
            f"state bytes written per one-{'item' if kind == 'list' else 'field'} change, "
            f"{size}, incremental (live consumer)",
            inc_bytes,
            "B/tx",
            keys_per_tx=[k for _, k in per_tx[False]],
            offline=o,
        )
        report.add(
            f"state_{kind}_bytes_whole",
            f"state bytes written per change, {size}, whole state as one value",
            whole_bytes,
            "B/tx",
            keys_per_tx=[k for _, k in per_tx[True]],
        )
        report.add(
            f"state_{kind}_bytes_saving",
            f"whole-value bytes / incremental bytes, {size}",
            [w / max(i, 1) for w, i in zip(whole_bytes, inc_bytes, strict=True)],
            "x",
            target=20,
            meets=min(w / max(i, 1) for w, i in zip(whole_bytes, inc_bytes, strict=True)) >= 20,
        )
        report.add(
            f"state_{kind}_rate",
            f"consumer rate, batch 1, {size}, incremental",
            rates[False],
            "msg/s",
            baseline="raw_1" if report.get("raw_1") else None,
        )
        report.add(
            f"state_{kind}_rate_whole",
            f"consumer rate, batch 1, {size}, whole state as one value",
            rates[True],
            "msg/s",
            baseline=f"state_{kind}_rate",
        )
