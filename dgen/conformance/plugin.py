"""pytest plugin for running the conformance suite from a backend's repository.

Enable it in a ``conftest.py`` with ``pytest_plugins = ["dgen.conformance.plugin"]``
(or ``pytest -p dgen.conformance.plugin``), import the tests into a test
module with ``from dgen.conformance.suite import *`` and name the store
with ``--dgen-url URL``, the ``DGEN_CONFORMANCE_URL`` environment variable,
or by overriding the ``dgen_url`` fixture.
"""

from __future__ import annotations

import os

import pytest

__all__ = ["dgen_url", "pytest_addoption"]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("dgen", "DGen storage conformance suite")
    group.addoption(
        "--dgen-url",
        action="store",
        default=None,
        metavar="URL",
        help="backend URL the DGen conformance tests run against (default: $DGEN_CONFORMANCE_URL)",
    )


@pytest.fixture
def dgen_url(request: pytest.FixtureRequest) -> str:
    """The backend URL under test: ``--dgen-url`` or ``$DGEN_CONFORMANCE_URL``."""
    url = request.config.getoption("--dgen-url") or os.environ.get("DGEN_CONFORMANCE_URL")
    if not url:
        pytest.skip(
            "no backend URL for the DGen conformance suite: pass --dgen-url URL, "
            "set DGEN_CONFORMANCE_URL or override the dgen_url fixture"
        )
    assert isinstance(url, str)
    return url
