"""Which server pgcoord talks to: the one rule the Coordinator and both CLIs follow.

An explicit DSN (argument or ``--dsn``), else ``$PGCOORD_DSN``, else the embedded server.
"""

from __future__ import annotations

import os

#: The environment variable naming the server when no DSN is given.
DSN_ENV = "PGCOORD_DSN"


def resolve_dsn(dsn: str | None) -> str | None:
    """The DSN to use: the argument, else ``$PGCOORD_DSN``; None means the embedded server."""
    return dsn or os.environ.get(DSN_ENV) or None


def resolve_or_embedded(dsn: str | None) -> str:
    """:func:`resolve_dsn`, starting the embedded server (blocking) when it says None."""
    chosen = resolve_dsn(dsn)
    if chosen:
        return chosen
    from pgcoord.embedded import ensure_server

    return ensure_server()
