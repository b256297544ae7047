"""The conformance suite catches broken backends.

Each toy backend in tests/conformance_broken.py is the memory backend with
one bug. We register it under its own URL scheme, run the relevant part of
the suite through the runner API and assert that the tests aimed at that
bug fail, while the same selection passes on the correct memory backend.
The cross-process variants of these tests skip on memory-based backends, so
the in-process variants (concurrent tasks and connections) must catch the
bug on their own.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest

import dgen.urls
from dgen.conformance import SuiteResult, run_suite

# scheme -> (-k selection, {test that must fail: text its report must hold},
#            tests that must pass)
CASES: dict[str, tuple[str, dict[str, str], set[str]]] = {
    "earlystamp": (
        "stamp or monotonic",
        {
            "test_stamps_follow_commit_order": "the later commit got the smaller stamp",
            "test_monotonic_visibility_concurrent_tasks": "monotonic visibility violated",
        },
        {"test_versionstamp_readable_after_commit"},
    ),
    "deafwatch": (
        "watch",
        {
            "test_watch_fires_on_change": "never fired",
            "test_watch_cancel": "never fired",
            "test_watch_burst_never_misses_a_change": "never fired",
        },
        {"test_watch_does_not_fire_without_change"},
    ),
    "nobaseline": (
        "watch",
        {"test_watch_baseline_is_the_transactions_view": "between the watching transaction's"},
        {"test_watch_fires_on_change", "test_watch_burst_never_misses_a_change"},
    ),
    "addmute": (
        "watch",
        {"test_watch_burst_never_misses_a_change": "never fired"},
        {"test_watch_baseline_is_the_transactions_view", "test_watch_cancel"},
    ),
    "lostupdate": (
        "isolation or increments or skew or cycle or conflict or serial",
        {
            "test_concurrent_increments_lose_nothing": "assert",
            "test_write_skew_is_prevented": "both doctors went off call",
            "test_cycle_workload": "broken ring",
            "test_conflict_range_write_inside_conflicts": "did not conflict",
            "test_real_conflict_is_retried_by_run": "assert",
            "test_stamps_agree_with_serial_order": "stamp order disagrees with commit order",
        },
        {"test_conflict_range_write_outside_does_not_conflict"},
    ),
    "eagerwrite": (
        "exception_in_transaction or read_your_writes",
        {"test_exception_in_transaction_leaves_nothing": "assert"},
        {"test_read_your_writes"},
    ),
}


def _run(url: str, keyword: str) -> SuiteResult:
    # A short wait: the broken watch backends leave watchers asleep, and
    # each such test waits this long before declaring the change missed.
    return run_suite(url, keyword=keyword, out=io.StringIO(), wait_seconds=2)


@pytest.mark.parametrize("scheme", sorted(CASES))
def test_suite_fails_on_broken_backend(scheme: str, monkeypatch: pytest.MonkeyPatch) -> None:
    keyword, must_fail, must_pass = CASES[scheme]
    monkeypatch.setitem(dgen.urls._BUILTIN, scheme, ("conformance_broken", None))

    control = _run(f"memory://control-{scheme}", keyword)
    assert control.ok, f"the selection fails on the correct backend: {control.failed}"
    assert set(must_fail) | must_pass <= set(control.passed)

    result = _run(f"{scheme}://toy", keyword)
    assert not result.ok
    assert result.exit_code == 1
    missed = set(must_fail) - set(result.failed)
    assert not missed, f"{scheme}: the suite did not catch the bug in {sorted(missed)}"
    for name, reason in must_fail.items():
        assert reason in result.failed[name], f"{name} failed for another reason"
    assert must_pass <= set(result.passed), f"{scheme}: {result.failed.keys()}"


def test_suite_catches_watches_that_miss_other_processes(tmp_path: Path) -> None:
    """Real OS processes: SQLite with a one-hour watch poll interval and no
    wake-up sockets (wake=off) notices commits made through other connections
    (other processes included) only when it polls, i.e. never within the test.
    The cross-process watch tests must fail; the worker processes really
    commit (their lines are read)."""
    url = f"sqlite:///{tmp_path / 'deaf.db'}?poll_interval=3600&wake=off"
    result = _run(url, "watch")
    for name in (
        "test_watch_fires_on_commit_from_another_process",
        "test_watch_burst_from_another_process",
    ):
        assert name in result.failed, f"{name} passed although watches miss other processes"
        assert "never fired" in result.failed[name]
    assert "test_watch_does_not_fire_without_change" in result.passed


def test_suite_catches_stamps_assigned_before_commit_across_processes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Real OS processes: SQLite whose ordered-commit keys are stamped with
    the wall clock when set, before commit. Three worker processes and a
    task append while this process tails; the monotonic-visibility test must
    see a key appear behind one it already read."""
    monkeypatch.setitem(dgen.urls._BUILTIN, "earlysqlite", ("conformance_broken", None))
    monkeypatch.setenv("DGEN_CONFORMANCE_WORKER_IMPORTS", "conformance_broken_register")
    result = _run(
        f"earlysqlite:///{tmp_path / 'early.db'}", "several_processes or stamps_follow_commit_order"
    )
    assert set(result.failed) == {
        "test_monotonic_visibility_several_processes",
        "test_stamps_follow_commit_order",
    }, result.failed
    report = result.failed["test_monotonic_visibility_several_processes"]
    assert "monotonic visibility violated" in report
