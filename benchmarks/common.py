"""Shared pieces: settings, figures with their spread, machine info, store targets."""

from __future__ import annotations

import os
import platform
import sqlite3
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Settings:
    """How much work each figure does. ``seconds`` sizes a round from the
    baseline rate measured first, so slow and fast stores take similar time."""

    quick: bool
    rounds: int = 3
    seconds: float = 0.6
    min_count: int = 200
    max_count: int = 20_000
    calls: int = 300
    tenants: int = 1000
    per_tenant: int = 3
    state_items: int = 1000
    state_fields: int = 200
    state_changes: int = 200
    peer_jobs: int = 300
    peer_rounds: int = 3

    @classmethod
    def make(cls, quick: bool) -> Settings:
        if quick:
            return cls(
                quick=True,
                seconds=0.03,
                min_count=16,
                max_count=200,
                calls=12,
                tenants=20,
                per_tenant=2,
                state_changes=10,
                peer_jobs=40,
                peer_rounds=1,  # a peer's start-up (DBOS) dominates; quick is a smoke run
            )
        return cls(quick=False)

    def count(self, rate: float, seconds: float | None = None, multiple: int = 1) -> int:
        """Messages for a round at ``rate``/s lasting about ``seconds``, rounded to ``multiple``."""
        n = int(rate * (self.seconds if seconds is None else seconds))
        n = max(self.min_count, min(self.max_count, n))
        return max(multiple, n - n % multiple)


def spread(values: list[float]) -> dict[str, Any]:
    ordered = sorted(values)
    return {
        "rounds": [round(v, 4) for v in values],
        "median": statistics.median(ordered),
        "min": ordered[0],
        "max": ordered[-1],
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


@dataclass
class Report:
    """The figures of one store, in the order they were measured."""

    target: str
    figures: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    """Baselines standing in for missing ones (memory:// has no bare driver)."""

    def get(self, key: str) -> dict[str, Any] | None:
        found = next((f for f in self.figures if f["key"] == key), None)
        if found is None and key in self.aliases:
            return self.get(self.aliases[key])
        return found

    def add(
        self,
        key: str,
        name: str,
        values: list[float],
        unit: str,
        *,
        baseline: str | None = None,
        target: float | None = None,
        lower_is_better: bool = False,
        note: str = "",
        **more: Any,
    ) -> dict[str, Any]:
        figure: dict[str, Any] = {"key": key, "name": name, "unit": unit, **spread(values)}
        if baseline is not None:
            base = self.get(baseline)
            if base is not None and base["median"]:
                if unit == "ms" and base["unit"] != "ms":
                    # Latency against one raw commit: milliseconds per commit.
                    base_value = 1000.0 / base["median"]
                else:
                    base_value = base["median"]
                figure["baseline"] = base["key"]
                figure["ratio"] = figure["median"] / base_value
                if target is not None:
                    figure["target"] = target
                    figure["meets"] = (
                        figure["ratio"] <= target if lower_is_better else figure["ratio"] >= target
                    )
        if target is not None and "target" not in figure:
            figure["target"] = target
        if note:
            figure["note"] = note
        figure.update(more)
        self.figures.append(figure)
        print(_line(figure), flush=True)
        return figure

    def skip(self, key: str, reason: str) -> None:
        self.skipped.append({"key": key, "reason": reason})
        print(f"  {key:28} skipped: {reason}", flush=True)

    def as_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "figures": self.figures,
            "skipped": self.skipped,
            **self.extra,
        }


def _fmt(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def _line(f: dict[str, Any]) -> str:
    spread = f"[{_fmt(f['min'])} .. {_fmt(f['max'])}]"
    text = f"  {f['key']:28} {_fmt(f['median']):>10} {f['unit']:8} {spread}"
    if "ratio" in f:
        text += f"  {f['ratio']:.2f}x {f['baseline']}"
        if "target" in f:
            sign = "<=" if f["unit"] == "ms" else ">="
            text += f" (target {sign} {f['target']}: {'ok' if f['meets'] else 'MISS'})"
    return text


async def timed_rounds(
    settings: Settings, once: Callable[[], Awaitable[float]], rounds: int | None = None
) -> list[float]:
    """Run ``once`` (which returns a figure) ``rounds`` times."""
    return [await once() for _ in range(rounds or settings.rounds)]


class Clock:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def with_query(url: str, **params: str) -> str:
    """``url`` with query parameters set (replacing same-named ones)."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    query.update(params)
    return urlunsplit(parts._replace(query=urlencode(query, safe="/")))


def without_query(url: str, *names: str) -> str:
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in names]
    return urlunsplit(parts._replace(query=urlencode(query, safe="/")))


def with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + database))


def query_param(url: str, name: str, default: str) -> str:
    return dict(parse_qsl(urlsplit(url).query)).get(name, default)


def sqlite_path(url: str) -> Path:
    """The file of a ``sqlite:///rel`` or ``sqlite:////abs`` URL."""
    path = urlsplit(url).path
    return Path(path[1:] if path.startswith("/") else path)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return None


def _git_commit() -> str | None:
    try:
        done = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "dgen"],
            capture_output=True,
            text=True,
            timeout=5,
        )
    except OSError:
        return None
    return done.stdout.strip() + (" (dgen/ modified)" if dirty.stdout.strip() else "")


def machine_info() -> dict[str, Any]:
    load = os.getloadavg()
    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "load_average_at_start": [round(x, 2) for x in load],
        "memory_mb": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20,
        "python": sys.version.split()[0],
        "versions": {
            "dgen": _version("dgen"),
            "sqlite": sqlite3.sqlite_version,
            "psycopg": _version("psycopg"),
            "procrastinate": _version("procrastinate"),
            "dbos": _version("dbos"),
        },
        "git_commit": _git_commit(),
    }
