"""Backend URLs and the registry that maps a URL scheme to a backend.

This is the only module that names backends. Built-in schemes come first,
then the ``dgen.backends`` entry-point group, where a third-party package
registers ``scheme = "package.module:open_database"``; ``open_database`` is
an async callable taking a :class:`URL` and returning a
:class:`dgen.store.Database`.

We parse URLs ourselves rather than with SQLAlchemy's ``make_url``: that
import costs about 135 ms here (measured with ``python -X importtime``),
more than the rest of DGen, for forty lines of parsing.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Awaitable, Callable, Collection, Generator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from dgen.store import Database, DGenError

__all__ = [
    "URL",
    "BackendNotFoundError",
    "DriverMissingError",
    "URLError",
    "connect",
    "known_schemes",
]


class URLError(DGenError, ValueError):
    """A backend URL is malformed or carries options the backend does not know."""


class BackendNotFoundError(URLError):
    """No backend is registered for the URL's scheme."""


class DriverMissingError(DGenError, ImportError):
    """The backend for this scheme needs a driver that is not installed."""


@dataclass(frozen=True)
class URL:
    """A parsed backend URL. Its repr and str hide the password."""

    scheme: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    host: str | None = None
    port: int | None = None
    path: str = ""
    query: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, text: str) -> URL:
        if isinstance(text, URL):
            return text
        if not isinstance(text, str) or ("://" not in text and ":" not in text):
            raise URLError(
                f"not a backend URL: {text!r} (expected scheme://..., e.g. sqlite:///app.db)"
            )
        parts = urlsplit(text)
        if not parts.scheme:
            raise URLError(f"backend URL has no scheme: {_hide(text)!r}")
        try:
            port = parts.port
        except ValueError:
            raise URLError(f"backend URL has an invalid port: {_hide(text)!r}") from None
        return cls(
            scheme=parts.scheme.lower(),
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password is not None else None,
            host=unquote(parts.hostname) if parts.hostname else None,
            port=port,
            path=unquote(parts.path),
            query=tuple(parse_qsl(parts.query, keep_blank_values=True)),
        )

    @property
    def options(self) -> dict[str, str]:
        return dict(self.query)

    def check_options(self, known: Collection[str]) -> dict[str, str]:
        """The query options, after refusing any not in ``known``."""
        unknown = sorted({k for k, _ in self.query} - set(known))
        if unknown:
            listing = ", ".join(sorted(known)) or "none"
            raise URLError(
                f"unknown option(s) {', '.join(unknown)} in {self}; "
                f"the {self.scheme} backend accepts: {listing}"
            )
        return self.options

    def render(self, hide_password: bool = True) -> str:
        netloc = ""
        if self.username is not None:
            netloc = quote(self.username, safe="")
            if self.password is not None:
                netloc += ":" + ("***" if hide_password else quote(self.password, safe=""))
            netloc += "@"
        if self.host is not None:
            netloc += self.host
        if self.port is not None:
            netloc += f":{self.port}"
        text = f"{self.scheme}://{netloc}{self.path}"
        if self.query:
            text += "?" + "&".join(f"{quote(k)}={quote(v)}" for k, v in self.query)
        return text

    def __str__(self) -> str:
        return self.render()


def _hide(text: str) -> str:
    try:
        parts = urlsplit(text)
        if parts.password is not None:
            return text.replace(":" + parts.password + "@", ":***@", 1)
    except ValueError:
        pass
    return text


Opener = Callable[[URL], Awaitable[Database]]

# scheme -> (module, pip extra that brings its driver)
_BUILTIN: dict[str, tuple[str, str | None]] = {
    "memory": ("dgen.backends.memory", None),
    "sqlite": ("dgen.backends.sqlite", None),
    "postgresql": ("dgen.backends.postgres", "postgres"),
    "postgres": ("dgen.backends.postgres", "postgres"),
    "fdb": ("dgen.backends.fdb", "fdb"),
}


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group="dgen.backends")}


def known_schemes() -> list[str]:
    """Every scheme :func:`connect` accepts: built-ins, then entry points."""
    return [*_BUILTIN, *sorted(set(_entry_points()) - set(_BUILTIN))]


def _load_opener(url: URL) -> Opener:
    builtin = _BUILTIN.get(url.scheme)
    if builtin is not None:
        module_name, extra = builtin
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and not exc.name.startswith("dgen"):
                raise DriverMissingError(
                    f"the {url.scheme} backend needs the {exc.name!r} package. "
                    f"Install it with: pip install 'dgen[{extra}]'"
                ) from exc
            raise
        opener: Opener = module.open_database
        return opener
    ep = _entry_points().get(url.scheme)
    if ep is None:
        raise BackendNotFoundError(
            f"no DGen backend for scheme {url.scheme!r} in {url}; known schemes: "
            f"{', '.join(known_schemes())} (third-party backends register in the "
            "'dgen.backends' entry-point group)"
        )
    loaded: Opener = ep.load()
    return loaded


class connect:
    """Open the database a URL names.

    Use ``async with dgen.connect(url) as db:`` (closed on exit) or
    ``db = await dgen.connect(url)`` (call ``await db.aclose()``). The scheme
    picks the backend: ``memory://``, ``sqlite:///relative.db``,
    ``sqlite:////absolute.db``, ``postgresql://...``, ``fdb://`` or one
    registered by another package.
    """

    def __init__(self, url: str | URL) -> None:
        self.url = URL.parse(url) if isinstance(url, str) else url
        self._db: Database | None = None

    async def _open(self) -> Database:
        return await _load_opener(self.url)(self.url)

    def __await__(self) -> Generator[Any, None, Database]:
        return self._open().__await__()

    async def __aenter__(self) -> Database:
        self._db = await self._open()
        return self._db

    async def __aexit__(self, *exc_info: object) -> None:
        if self._db is not None:
            await self._db.aclose()
            self._db = None
