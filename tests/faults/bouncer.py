"""A real PgBouncer (the Debian ``pgbouncer`` binary) in front of the server under test.

``running_bouncer(server, "session")`` starts one on a free loopback port, with its
configuration in a temporary directory, a wildcard database entry pointing at ``server``
(its TCP address, or the embedded server's Unix socket), ``auth_type = trust`` for the
server's user, and stops it when the block ends, failing or not. Clients connect with
:meth:`Bouncer.dsn_for`; :meth:`Bouncer.show` reads the admin console (``SHOW POOLS``, ...).

PgBouncer refuses to run as root, so when the tests run as root it is started with ``-u``:
as the owner of the Unix socket's directory (the embedded server keeps its socket in its own
data directory, mode 0700), else as ``nobody``. The configuration is made readable to that
user; the log goes to a file the harness opened (PgBouncer writes it to stderr).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import psycopg
import psycopg.conninfo

from tests.support import PgServer

#: The pool modes pgcoord is tested with (``statement`` mode cannot run a transaction at all).
POOL_MODES = ("session", "transaction")

_START_TIMEOUT = 15.0
_STOP_TIMEOUT = 10.0


def pgbouncer_binary() -> str | None:
    """Path of the ``pgbouncer`` executable (Debian installs it in /usr/sbin), or None."""
    return shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin:/usr/bin")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ini_value(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


class Bouncer:
    """One PgBouncer process in front of ``server``; see the module docstring.

    ``default_pool_size`` is the number of server connections it opens per (database, user);
    a client that finds the pool full waits up to ``query_wait_timeout`` seconds (PgBouncer's
    default is 120) for one. ``settings`` adds or overrides any ``[pgbouncer]`` setting;
    ``databases`` adds ``[databases]`` entries (alias -> options such as ``"dbname=x
    pool_mode=session"``; the server's address is added to each).
    """

    def __init__(
        self,
        server: PgServer,
        mode: str,
        *,
        default_pool_size: int = 20,
        query_wait_timeout: float = 120.0,
        settings: Mapping[str, object] | None = None,
        databases: Mapping[str, str] | None = None,
    ) -> None:
        if mode not in POOL_MODES:
            raise ValueError(f"pool mode must be one of {POOL_MODES}, not {mode!r}")
        self.server = server
        self.mode = mode
        params = psycopg.conninfo.conninfo_to_dict(server.base_dsn)
        self.user = str(params.get("user") or pwd.getpwuid(os.geteuid()).pw_name)
        self._upstream_host = str(params.get("host") or "/var/run/postgresql")
        self._upstream = {
            "host": self._upstream_host,
            "port": str(params.get("port") or 5432),
        }
        if params.get("password"):
            self._upstream["password"] = str(params["password"])
        self._settings: dict[str, object] = {
            "pool_mode": mode,
            "default_pool_size": default_pool_size,
            "query_wait_timeout": query_wait_timeout,
            # Tests open many clients (cross-process ones, many instances); the default is 100.
            "max_client_conn": 1000,
            # A restarted server is retried after 1 s instead of PgBouncer's 15 s.
            "server_login_retry": 1,
            **(settings or {}),
        }
        self._databases = dict(databases or {})
        self.host = "127.0.0.1"
        self.port = 0
        self._dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start PgBouncer and wait until it accepts clients (a few ports are tried in turn)."""
        binary = pgbouncer_binary()
        if binary is None:
            raise RuntimeError("pgbouncer is not installed (apt-get install -y pgbouncer)")
        self._dir = Path(tempfile.mkdtemp(prefix="pgcoord-bouncer-"))
        # The (unprivileged) PgBouncer process must be able to read its configuration.
        self._dir.chmod(0o755)
        for attempt in range(5):
            self.port = _free_port()
            ini = self._write_config()
            command = [binary, *self._run_as(), str(ini)]
            with (self._dir / "pgbouncer.log").open("ab") as log:
                self._proc = subprocess.Popen(
                    command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
                )
            if self._wait_ready():
                return
            self._terminate()
            if "bind" not in self.log() or attempt == 4:
                raise RuntimeError(f"pgbouncer did not start:\n{self.log()}")

    def stop(self) -> None:
        """Stop PgBouncer (an immediate shutdown: clients are disconnected) and remove its files."""
        self._terminate()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def _terminate(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        # SIGTERM is PgBouncer's immediate shutdown (SIGINT would wait for every client).
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(_STOP_TIMEOUT)

    def __enter__(self) -> Bouncer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _run_as(self) -> list[str]:
        if os.geteuid() != 0:
            return []
        user = "nobody"
        if self._upstream_host.startswith("/"):
            # Only the socket directory's owner may enter it when it is private (the embedded
            # server's data directory).
            user = pwd.getpwuid(Path(self._upstream_host).stat().st_uid).pw_name
        return ["-u", user]

    def _write_config(self) -> Path:
        assert self._dir is not None
        auth_file = self._dir / "users.txt"
        auth_file.write_text(f'"{self.user}" ""\n')
        upstream = " ".join(f"{key}={value}" for key, value in self._upstream.items())
        settings = {
            "listen_addr": self.host,
            "listen_port": self.port,
            # No Unix socket: the harness's clients use TCP, and the directory would need to
            # be writable by the unprivileged PgBouncer user.
            "unix_socket_dir": "",
            "auth_type": "trust",
            "auth_file": auth_file,
            "admin_users": self.user,
            **self._settings,
        }
        lines = ["[databases]"]
        lines += [f"{alias} = {upstream} {options}" for alias, options in self._databases.items()]
        lines += [f"* = {upstream}", "", "[pgbouncer]"]
        lines += [f"{key} = {_ini_value(value)}" for key, value in settings.items()]
        ini = self._dir / "pgbouncer.ini"
        ini.write_text("\n".join(lines) + "\n")
        for path in (auth_file, ini):
            path.chmod(0o644)
        return ini

    def _wait_ready(self) -> bool:
        assert self._proc is not None
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False
            with contextlib.suppress(psycopg.OperationalError):
                self.show("VERSION")
                return True
            time.sleep(0.05)
        return False

    # -- use -------------------------------------------------------------------------------

    def dsn_for(self, dbname: str, **params: Any) -> str:
        """A DSN that reaches database ``dbname`` of the server through this PgBouncer."""
        return psycopg.conninfo.make_conninfo(
            "", host=self.host, port=self.port, dbname=dbname, user=self.user, **params
        )

    def show(self, what: str) -> list[dict[str, Any]]:
        """``SHOW <what>`` on the admin console (``POOLS``, ``CLIENTS``, ``SERVERS``, ...)."""
        if not what.replace("_", "").isalpha():
            raise ValueError(f"not a SHOW command: {what!r}")
        with psycopg.connect(self.dsn_for("pgbouncer"), autocommit=True, connect_timeout=2) as conn:
            # The console speaks only the simple query protocol, which a ClientCursor uses.
            cur = psycopg.ClientCursor(conn)
            cur.execute(f"SHOW {what}")
            names = [col.name for col in cur.description or ()]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def log(self) -> str:
        """PgBouncer's log so far (for failure messages)."""
        if self._dir is None:
            return ""
        path = self._dir / "pgbouncer.log"
        return path.read_text(errors="replace") if path.exists() else ""


@contextlib.contextmanager
def running_bouncer(server: PgServer, mode: str, **options: Any) -> Iterator[Bouncer]:
    """A started :class:`Bouncer` for the block; stopped when it ends, however it ends."""
    bouncer = Bouncer(server, mode, **options)
    try:
        bouncer.start()
        yield bouncer
    finally:
        bouncer.stop()
