"""URL parsing, the backend registry and its errors."""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

import pytest

import dgen
from dgen import urls
from dgen.store import Database

pytestmark = pytest.mark.anyio


def test_password_never_in_repr_or_str() -> None:
    url = dgen.URL.parse("postgresql://bob:s3cr%40t@db.example:5433/app?schema=x")
    assert url.password == "s3cr@t"
    for text in (repr(url), str(url), url.render()):
        assert "s3cr" not in text
    assert "***" in str(url)
    assert url.render(hide_password=False).startswith("postgresql://bob:s3cr%40t@")
    assert (url.host, url.port, url.path, url.options) == (
        "db.example",
        5433,
        "/app",
        {"schema": "x"},
    )


def test_bad_urls() -> None:
    with pytest.raises(dgen.URLError, match="not a backend URL"):
        dgen.URL.parse("just-a-path")
    with pytest.raises(dgen.URLError, match="invalid port"):
        dgen.URL.parse("postgresql://u:pw@h:notaport/db")


async def test_unknown_scheme_lists_known_ones() -> None:
    with pytest.raises(dgen.BackendNotFoundError) as info:
        await dgen.connect("mongodb://u:hunter2@h/db")
    message = str(info.value)
    for scheme in ("memory", "sqlite", "postgresql", "fdb"):
        assert scheme in message
    assert "hunter2" not in message


async def test_missing_driver_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    # Simulate an environment without psycopg: the import system refuses it.
    monkeypatch.setitem(sys.modules, "psycopg", None)
    monkeypatch.delitem(sys.modules, "dgen.backends.postgres", raising=False)
    monkeypatch.setitem(urls._BUILTIN, "postgresql", ("dgen.backends.postgres", "postgres"))
    try:
        await dgen.connect("postgresql://u:hunter2@localhost/db")
    except dgen.DriverMissingError as exc:
        assert "pip install 'dgen[postgres]'" in str(exc)
        assert "hunter2" not in str(exc)
    except ModuleNotFoundError as exc:  # the adapter module itself is not written yet
        assert exc.name == "dgen.backends.postgres"
    else:
        pytest.fail("connect() succeeded without a PostgreSQL driver")


async def test_unknown_option_is_refused(tmp_path: Path) -> None:
    with pytest.raises(dgen.URLError, match=r"unknown option\(s\) colour.*accepts: .*synchronous"):
        await dgen.connect(f"sqlite:///{tmp_path}/x.db?colour=blue")
    with pytest.raises(dgen.URLError, match="memory backend accepts: none"):
        await dgen.connect("memory://?x=1")


async def test_connect_as_context_manager_and_awaitable() -> None:
    async with dgen.connect("memory://") as db:
        assert isinstance(db, Database)
    db = await dgen.connect("memory://")
    await db.aclose()


async def test_entry_point_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[dgen.URL] = []

    async def open_database(url: dgen.URL) -> Database:
        opened.append(url)
        return await dgen.connect("memory://")

    module = type(sys)("toy_backend_for_test")
    module.open_database = open_database  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "toy_backend_for_test", module)
    ep = importlib.metadata.EntryPoint(
        name="toy", value="toy_backend_for_test:open_database", group="dgen.backends"
    )
    monkeypatch.setattr(urls, "_entry_points", lambda: {"toy": ep})
    assert "toy" in urls.known_schemes()
    async with dgen.connect("toy://anything") as db:
        assert isinstance(db, Database)
    assert opened and opened[0].scheme == "toy"


def test_public_api_matches_all() -> None:
    public = {name for name in vars(dgen) if not name.startswith("_")}
    modules = {name for name, value in vars(dgen).items() if type(value) is type(sys)}
    assert set(dgen.__all__) == public - modules - {"annotations"}
