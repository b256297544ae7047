"""The benchmark entry point runs end to end in --quick mode and records every
figure with its spread. Never asserts on speed: benchmarks do not fail CI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

COMMON = [
    "protocol_1",
    "protocol_8",
    "cast_1",
    "cast_8",
    "cast_32",
    "e2e_batch1",
    "e2e_batch16",
    "e2e_batch64",
    "call_local_p50",
    "call_local_p99",
    "call_local_max",
    "tenants_rate",
    "tenants_peak_rss",
    "state_list_bytes_per_change",
    "state_list_bytes_whole",
    "state_list_bytes_saving",
    "state_list_rate",
    "state_list_rate_whole",
    "state_mapping_bytes_per_change",
    "state_mapping_bytes_whole",
    "state_mapping_rate",
]
SQLITE_ONLY = [
    "raw_1",
    "raw_8",
    "raw_best",
    "cast_4proc",
    "call_remote_p50",
    "call_remote_p99",
    "consume_1proc",
    "consume_2proc",
]


def test_quick_run_writes_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    db = tmp_path / "bench.db"
    argv = ["memory://", f"sqlite:///{db}", "--quick", "--peers", "no", "--out", str(out)]
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["machine"]["cpus"] >= 1 and doc["machine"]["versions"]["sqlite"]
    assert doc["settings"]["quick"] is True
    memory, sqlite = doc["results"]
    assert (memory["target"], sqlite["target"]) == ("memory", "sqlite")
    for result, expected in ((memory, COMMON), (sqlite, COMMON + SQLITE_ONLY)):
        assert "error" not in result, result["error"]
        figures = {f["key"]: f for f in result["figures"]}
        missing = [k for k in expected if k not in figures]
        assert not missing, f"{result['target']}: missing {missing}; skipped {result['skipped']}"
        for f in figures.values():
            assert len(f["rounds"]) >= 3, f
            assert f["min"] <= f["median"] <= f["max"], f
            assert f["median"] > 0, f
    sqlite_figures = {f["key"]: f for f in sqlite["figures"]}
    # Rates carry their ratio to a bare-driver baseline of the same run.
    assert sqlite_figures["cast_1"]["baseline"] == "raw_1"
    assert sqlite_figures["call_local_p50"]["baseline"] == "raw_1"
    assert sqlite_figures["e2e_batch16"]["baseline"] == "raw_best"
    # Memory has no driver below it: its ratios are to the protocol's own rate.
    memory_figures = {f["key"]: f for f in memory["figures"]}
    assert memory_figures["cast_1"]["baseline"] == "protocol_1"
    assert {s["key"] for s in memory["skipped"]} >= {"raw", "cast_4proc", "call_remote"}
    # Issue 5: a one-item change writes a small fraction of the whole state.
    saving = sqlite_figures["state_list_bytes_saving"]
    assert saving["median"] > 1 and "meets" in saving
    # The SQLite files the run created are gone.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]
    assert "== summary" in done.stdout
