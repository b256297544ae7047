"""A throwaway PostgreSQL server for the tests.

Order of preference: an explicit URL in ``DGEN_TEST_POSTGRES_URL``; a fresh
cluster made with ``initdb`` and ``pg_ctl`` in a temporary directory,
listening only on a unix socket there (run as the ``postgres`` OS user when
we are root, since PostgreSQL refuses to run as root); a testcontainers
container when a Docker engine answers. With none of these the tests skip,
except under ``CI=true``, where they fail: CI must exercise PostgreSQL.

The cluster trusts local connections, except for the role ``dgen_pw`` whose
password is ``PASSWORD``: tests use it to check wrong-password errors.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

PASSWORD = "s3cret-Pw-never-print"
PASSWORD_ROLE = "dgen_pw"
_PG_BIN_DIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)


class NoServer(Exception):
    """No PostgreSQL server could be found or started; the message says why."""


def _find(tool: str) -> str | None:
    found = shutil.which(tool)
    if found:
        return found
    for directory in _PG_BIN_DIRS:
        if (directory / tool).exists():
            return str(directory / tool)
    return None


@dataclass
class Cluster:
    """A cluster in a temporary directory; ``url`` reaches it over its socket."""

    root: Path
    port: int = 5432
    as_postgres: bool = field(default=False)
    database: str = "dgen_test"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root / "sock"

    @property
    def url(self) -> str:
        return f"postgresql://postgres@/{self.database}?host={quote(str(self.socket_dir))}&port={self.port}"

    def password_url(self, password: str) -> str:
        return (
            f"postgresql://{PASSWORD_ROLE}:{quote(password, safe='')}@/{self.database}"
            f"?host={quote(str(self.socket_dir))}&port={self.port}"
        )

    def _run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = list(argv)
        if self.as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=120)

    def init(self) -> None:
        initdb = _find("initdb")
        if initdb is None:
            raise NoServer("initdb is not installed (Debian: apt-get install postgresql)")
        self.socket_dir.mkdir()
        if self.as_postgres:
            shutil.chown(self.root, "postgres", "postgres")
            shutil.chown(self.socket_dir, "postgres", "postgres")
        try:
            self._run(initdb, "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        except subprocess.CalledProcessError as exc:
            raise NoServer(f"initdb failed: {exc.stderr.strip()}") from None
        hba = self.data / "pg_hba.conf"
        # The password role is checked first; everyone else is trusted locally.
        hba.write_text(f"local all {PASSWORD_ROLE} scram-sha-256\nlocal all all trust\n")
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(
                "\nlisten_addresses = ''\n"
                f"unix_socket_directories = '{self.socket_dir}'\n"
                f"port = {self.port}\n"
                "max_connections = 200\n"
                "max_pred_locks_per_transaction = 256\n"
                "shared_buffers = 64MB\n"
            )

    def start(self) -> None:
        pg_ctl = _find("pg_ctl")
        if pg_ctl is None:
            raise NoServer("pg_ctl is not installed")
        log = self.root / "server.log"
        try:
            self._run(pg_ctl, "-D", str(self.data), "-l", str(log), "-w", "-t", "60", "start")
        except subprocess.CalledProcessError as exc:
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise NoServer(f"pg_ctl start failed: {exc.stderr.strip()}\n{tail}") from None

    def stop(self, mode: str = "fast") -> None:
        pg_ctl = _find("pg_ctl")
        assert pg_ctl is not None
        self._run(pg_ctl, "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def psql(self, sql: str, database: str = "postgres") -> str:
        psql = _find("psql")
        assert psql is not None
        done = self._run(
            psql, "-h", str(self.socket_dir), "-p", str(self.port), "-U", "postgres",
            "-d", database, "-v", "ON_ERROR_STOP=1", "-Atc", sql,
        )  # fmt: skip
        return done.stdout

    def setup_roles(self) -> None:
        self.psql(f"CREATE DATABASE {self.database}")
        self.psql(f"CREATE ROLE {PASSWORD_ROLE} LOGIN PASSWORD '{PASSWORD}'")
        self.psql(f"GRANT ALL ON DATABASE {self.database} TO {PASSWORD_ROLE}")

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


def start_cluster() -> Cluster:
    """Create and start a fresh cluster; the caller must call ``destroy``."""
    root = Path(tempfile.mkdtemp(prefix="dgen-pg-"))
    os.chmod(root, 0o755)
    cluster = Cluster(root=root, as_postgres=os.geteuid() == 0)
    try:
        cluster.init()
        cluster.start()
        cluster.setup_roles()
    except BaseException:
        cluster.destroy()
        raise
    return cluster


def _docker_answers() -> bool:
    try:
        done = subprocess.run(["docker", "info"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


@dataclass
class Server:
    """Where the tests' PostgreSQL lives and how to tear it down."""

    url: str
    how: str
    cluster: Cluster | None = None
    container: object | None = None

    def close(self) -> None:
        if self.cluster is not None:
            self.cluster.destroy()
        if self.container is not None:
            self.container.stop()  # type: ignore[attr-defined]


def start_server() -> Server:
    """Find or start a server, or raise :class:`NoServer` saying why not."""
    explicit = os.environ.get("DGEN_TEST_POSTGRES_URL")
    if explicit:
        return Server(url=explicit, how="DGEN_TEST_POSTGRES_URL")
    reasons = []
    if _find("initdb") is not None:
        started = time.monotonic()
        cluster = start_cluster()
        return Server(
            url=cluster.url,
            how=f"initdb cluster in {cluster.root} ({time.monotonic() - started:.1f}s)",
            cluster=cluster,
        )
    reasons.append("initdb not found")
    if _docker_answers():
        from testcontainers.postgres import PostgresContainer

        container = PostgresContainer("postgres:15", driver=None)
        container.start()
        return Server(url=container.get_connection_url(), how="testcontainers", container=container)
    reasons.append("no Docker engine answers")
    raise NoServer(
        "no PostgreSQL server for the tests: "
        + "; ".join(reasons)
        + ". Set DGEN_TEST_POSTGRES_URL or install PostgreSQL."
    )


def schema_url(base: str, schema: str) -> str:
    """``base`` with ``schema=`` set: one schema per test keeps stores apart."""
    return f"{base}{'&' if '?' in base else '?'}schema={schema}"


def fresh_schema_url(base: str) -> str:
    return schema_url(base, f"t_{uuid.uuid4().hex[:16]}")


def drop_schema(url: str) -> None:
    """Best-effort cleanup of a test's schema (matters on a shared server)."""
    import psycopg

    from dgen.backends.postgres import _parse
    from dgen.urls import URL

    conninfo, schema, *_ = _parse(URL.parse(url))
    try:
        with psycopg.connect(conninfo, autocommit=True, connect_timeout=5) as conn:
            conn.execute("SET lock_timeout = '5s'")
            conn.execute(sql_drop(schema))
    except psycopg.Error:
        pass


def role_url(owner_url: str, role: str, privileges: list[str]) -> str:
    """``owner_url`` as LOGIN role ``role`` (created if missing), granted
    USAGE on the URL's schema and ``privileges`` on all its tables."""
    import psycopg
    from psycopg import sql

    from dgen.backends.postgres import _parse
    from dgen.urls import URL

    conninfo, schema, *_ = _parse(URL.parse(owner_url))
    name, where = sql.Identifier(role), sql.Identifier(schema)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone() is None:
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(name))
        conn.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(where, name))
        conn.execute(
            sql.SQL("GRANT {} ON ALL TABLES IN SCHEMA {} TO {}").format(
                sql.SQL(", ").join(sql.SQL(p) for p in privileges), where, name
            )
        )
    url = owner_url.replace("postgresql://postgres@", f"postgresql://{role}@", 1)
    assert url != owner_url, "the tests' cluster URL names the postgres role"
    return url


def sql_drop(schema: str) -> bytes:
    from psycopg import sql

    return sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)).as_bytes()
