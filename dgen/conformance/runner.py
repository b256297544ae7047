"""Run the conformance suite against one URL programmatically, through pytest."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import pytest

__all__ = ["Outcome", "SuiteResult", "run_suite"]


@dataclass(frozen=True)
class Outcome:
    """One test's result: ``passed``, ``failed`` or ``skipped``, with the
    skip reason or failure report in ``detail``."""

    name: str
    status: str
    detail: str = ""
    seconds: float = 0.0


@dataclass
class SuiteResult:
    """What :func:`run_suite` ran and how each test ended."""

    url: str
    exit_code: int = 0
    outcomes: list[Outcome] = field(default_factory=list)

    def _named(self, status: str) -> dict[str, str]:
        return {o.name: o.detail for o in self.outcomes if o.status == status}

    @property
    def passed(self) -> list[str]:
        return list(self._named("passed"))

    @property
    def failed(self) -> dict[str, str]:
        """Failed test name -> failure report."""
        return self._named("failed")

    @property
    def skipped(self) -> dict[str, str]:
        """Skipped test name -> reason."""
        return self._named("skipped")

    @property
    def ok(self) -> bool:
        """True if the run completed and no test failed."""
        return self.exit_code == 0 and not self.failed

    def __iter__(self) -> Iterator[Outcome]:
        return iter(self.outcomes)


class _Recorder:
    """pytest hooks that collect outcomes and print one line per test."""

    def __init__(self, result: SuiteResult, out: TextIO | None) -> None:
        self.result = result
        self.out = out

    def _say(self, text: str) -> None:
        if self.out is not None:
            print(text, file=self.out, flush=True)

    @pytest.hookimpl(tryfirst=True)
    def pytest_report_teststatus(self, report: pytest.TestReport) -> tuple[str, str, str] | None:
        # Silence pytest's progress letters: this class prints its own lines.
        if report.when == "call" or report.outcome != "passed":
            return report.outcome, "", ""
        return "", "", ""

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        name = report.nodeid.rsplit("::", 1)[-1]
        if report.when == "call" or (report.when == "setup" and not report.passed):
            if report.skipped:
                reason = str(report.longrepr[2]) if isinstance(report.longrepr, tuple) else ""
                reason = reason.removeprefix("Skipped: ")
                self.result.outcomes.append(Outcome(name, "skipped", reason))
                self._say(f"SKIP  {name}  ({reason})")
            elif report.failed:
                self.result.outcomes.append(
                    Outcome(name, "failed", report.longreprtext, report.duration)
                )
                self._say(f"FAIL  {name}  ({report.duration:.2f} s)")
            else:
                self.result.outcomes.append(Outcome(name, "passed", "", report.duration))
                self._say(f"PASS  {name}  ({report.duration:.2f} s)")
        elif report.when == "teardown" and report.failed:
            self.result.outcomes.append(Outcome(name, "failed", report.longreprtext))
            self._say(f"FAIL  {name} (teardown)")

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed:
            self.result.outcomes.append(Outcome(report.nodeid, "failed", report.longreprtext))
            self._say(f"ERROR collecting {report.nodeid}")


def run_suite(
    url: str,
    *,
    keyword: str | None = None,
    exitfirst: bool = False,
    out: TextIO | None = sys.stdout,
    wait_seconds: float | None = None,
    pytest_args: Sequence[str] = (),
) -> SuiteResult:
    """Run the conformance suite against ``url`` and return the outcomes.

    ``keyword`` selects tests like pytest's ``-k``; ``exitfirst`` stops at
    the first failure. One line per test, then a summary with the failure
    reports, goes to ``out`` (None: silent). ``wait_seconds`` overrides how
    long a test waits for something that must happen (a watch firing)
    before it declares it lost (``DGEN_CONFORMANCE_WAIT``, default 20 s).
    The run ignores the current directory's pytest configuration.
    """
    result = SuiteResult(url)
    suite_dir = Path(__file__).parent / "suite"
    with tempfile.TemporaryDirectory(prefix="dgen-conformance-") as tmp:
        ini = Path(tmp) / "pytest.ini"
        ini.write_text("[pytest]\n")
        args = [
            str(suite_dir),
            "-c",
            str(ini),
            "--rootdir",
            str(suite_dir),
            "-p",
            "no:cacheprovider",
            "-qq",
            "--no-header",
            "--no-summary",
            "-p",
            "dgen.conformance.plugin",
            "--dgen-url",
            url,
            "-W",
            "error::pytest.PytestUnraisableExceptionWarning",
        ]
        if keyword:
            args += ["-k", keyword]
        if exitfirst:
            args.append("-x")
        args += list(pytest_args)
        saved = os.environ.get("DGEN_CONFORMANCE_WAIT")
        if wait_seconds is not None:
            os.environ["DGEN_CONFORMANCE_WAIT"] = str(wait_seconds)
        try:
            recorder = _Recorder(result, out)
            result.exit_code = int(pytest.main(args, plugins=[recorder]))
        finally:
            if saved is None:
                os.environ.pop("DGEN_CONFORMANCE_WAIT", None)
            else:
                os.environ["DGEN_CONFORMANCE_WAIT"] = saved
    if out is not None:
        _summarise(result, out)
    return result


def _summarise(result: SuiteResult, out: TextIO) -> None:
    for name, report in result.failed.items():
        print(f"\n{'=' * 30} {name} {'=' * 30}\n{report}", file=out)
    counts = (
        f"{len(result.passed)} passed, {len(result.failed)} failed, {len(result.skipped)} skipped"
    )
    print(f"\nDGen conformance against {result.url}: {counts}", file=out)
    for name, reason in result.skipped.items():
        print(f"  skipped {name}: {reason}", file=out)
    if result.exit_code not in (0, 1):
        print(f"pytest exited with code {result.exit_code} (usage or internal error)", file=out)
