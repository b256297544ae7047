"""DGen's storage conformance suite, shipped with the package.

A backend is correct when it passes every test here. Three ways to run it:

* ``python -m dgen.conformance URL [-k EXPR] [-x]`` prints each test and a
  summary and exits 0 only if nothing failed;
* :func:`run_suite` does the same from Python and returns the outcomes;
* in a backend's own pytest suite, ``pytest_plugins = ["dgen.conformance.plugin"]``
  plus ``from dgen.conformance.suite import *`` and ``--dgen-url URL``.

Tests needing a :class:`dgen.store.Capabilities` flag the backend does not
declare are skipped with the reason. See ``docs/conformance.md``.
"""

try:
    import pytest  # noqa: F401  (the suite runs through it)
except ModuleNotFoundError as exc:  # pragma: no cover - depends on the environment
    raise ModuleNotFoundError(
        "dgen.conformance runs through pytest, which is not installed. "
        "Install it with: pip install 'pytest>=8'"
    ) from exc

from dgen.conformance.runner import Outcome, SuiteResult, run_suite

__all__ = ["Outcome", "SuiteResult", "run_suite"]
