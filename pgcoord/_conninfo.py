"""How pgcoord names a server in messages: ``host:port/dbname``, never the password."""

from __future__ import annotations

import psycopg
import psycopg.conninfo


def describe_server(dsn: str) -> str:
    """A human label for the server a DSN points at (``host:port/dbname``), without the password."""
    try:
        params = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "<unparsable DSN>"
    host = str(params.get("host") or params.get("hostaddr") or "")
    port = str(params.get("port") or "5432")
    db = str(params.get("dbname") or params.get("user") or "")
    if not host or host.startswith("/"):
        # A Unix socket (the embedded server's, or libpq's default directory).
        return f"unix socket in {host or 'the default directory'} (port {port})/{db}"
    return f"{host}:{port}/{db}"
