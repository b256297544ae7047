"""Shared fixtures: every backend the suite knows, as URLs."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

# Backends every runtime and conformance test runs on. PostgreSQL joins once
# its adapter lands (issue 4); it must then run, not skip, under CI=true.
BACKENDS = ["memory", "sqlite"]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def make_url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    if backend == "memory":
        return f"memory://{uuid.uuid4().hex}"
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    raise AssertionError(f"no URL factory for backend {backend!r}")


@pytest.fixture(params=BACKENDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A URL for a fresh, empty store on each backend in BACKENDS."""
    return make_url(request.param, tmp_path, request)
