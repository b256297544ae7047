"""Shared fixtures: every backend the suite knows, as URLs."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# Backends every runtime and conformance test runs on. PostgreSQL must run,
# not skip, under CI=true (see the postgres_server fixture). FoundationDB runs
# when FDB_CLUSTER_FILE names a reachable cluster and libfdb_c loads; CI
# machines have neither, so there its tests report as skipped with the reason.
BACKENDS = ["memory", "sqlite", "postgresql", "fdb"]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[object]:
    """A PostgreSQL server for the whole session (tests/pgserver.py: explicit
    DGEN_TEST_POSTGRES_URL, else a throwaway initdb cluster, else Docker).
    Skips when there is none, but fails under CI=true."""
    from pgserver import NoServer, start_server

    try:
        server = start_server()
    except NoServer as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true: the PostgreSQL tests must run, but {exc}", pytrace=False)
        pytest.skip(str(exc))
    yield server
    server.close()


@pytest.fixture
def owner_url(postgres_server: Any) -> Iterator[str]:
    """A fresh schema on a throwaway cluster, as its superuser, for tests that
    create roles (pgserver.role_url); skips on an explicit server URL."""
    from pgserver import drop_schema, fresh_schema_url

    if postgres_server.cluster is None:
        pytest.skip("needs a throwaway cluster to create roles")
    url = fresh_schema_url(postgres_server.cluster.url)
    try:
        yield url
    finally:
        drop_schema(url)


def make_url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    if backend == "memory":
        return f"memory://{uuid.uuid4().hex}"
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    if backend == "postgresql":
        from pgserver import drop_schema, fresh_schema_url

        url = fresh_schema_url(request.getfixturevalue("postgres_server").url)
        request.addfinalizer(lambda: drop_schema(url))
        return url
    if backend == "fdb":
        from dgen.backends.fdb import cluster_url_for_tests

        fdb_url, reason = cluster_url_for_tests()
        if fdb_url is None:
            pytest.skip(reason)
        # A fresh key prefix per test isolates it inside the shared cluster.
        return f"{fdb_url}?prefix=t-{uuid.uuid4().hex}"
    raise AssertionError(f"no URL factory for backend {backend!r}")


@pytest.fixture(params=BACKENDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A URL for a fresh, empty store on each backend in BACKENDS."""
    return make_url(request.param, tmp_path, request)
