"""Named SQL files: every statement a service sends, findable by name in its ``queries.sql``.

A file holds blocks introduced by a ``-- name: <name>`` line; a block's other leading ``--``
lines are its comment, and its text runs to the next ``-- name:`` line::

    -- name: claim
    -- Claim up to %(n)s jobs of a channel.
    SELECT ... FROM {jobs} WHERE app = %(app)s ...

Identifiers (schema-qualified tables, functions) are ``{placeholders}`` filled with
``psycopg.sql`` objects, never by string formatting; parameters are psycopg's ``%s`` or
``%(name)s``. A literal brace in SQL is written twice (``'{{}}'``). :func:`render` composes every
statement once per schema and returns bytes, which psycopg sends as they are, so named
statements cost nothing at run time.
"""

from __future__ import annotations

import functools
import re
from importlib import resources

from psycopg import sql

_NAME = re.compile(r"^--\s*name:\s*([a-z_][a-z0-9_]*)\s*$")


def parse(text: str) -> dict[str, str]:
    """The statements of a file's text by name (comments dropped, blank edges trimmed).

    Raises ValueError for text before the first name, a repeated name, or an empty block.
    """
    blocks: dict[str, list[str]] = {}
    current: list[str] | None = None
    for number, line in enumerate(text.splitlines(), 1):
        match = _NAME.match(line.strip())
        if match:
            name = match.group(1)
            if name in blocks:
                raise ValueError(f"line {number}: the statement {name!r} is named twice")
            current = blocks[name] = []
        elif current is None:
            if line.strip() and not line.strip().startswith("--"):
                raise ValueError(f"line {number}: SQL before the first '-- name:' line")
        elif current or not line.strip().startswith("--"):
            current.append(line)
    statements = {name: "\n".join(lines).strip() for name, lines in blocks.items()}
    empty = [name for name, body in statements.items() if not body]
    if empty:
        raise ValueError(f"empty statement(s): {', '.join(empty)}")
    return statements


@functools.cache
def load(package: str, filename: str = "queries.sql") -> dict[str, str]:
    """The statements of ``filename`` in ``package`` (read once per process)."""
    return parse(resources.files(package).joinpath(filename).read_text(encoding="utf-8"))


def render(statements: dict[str, str], **parts: sql.Composable) -> dict[str, bytes]:
    """Every statement with its ``{placeholders}`` filled from ``parts``, as bytes."""
    return {
        name: sql.SQL(text).format(**parts).as_string(None).encode()
        for name, text in statements.items()
    }


_PLACEHOLDER = re.compile(rb"%(.)", re.DOTALL)


def numbered(text: bytes) -> tuple[bytes, int]:
    """A rendered statement's ``%s`` placeholders as libpq's ``$1, $2, ...``, and their count.

    For statements sent through libpq directly (``pgcoord._prepared``). Only positional ``%s``
    is accepted: named ``%(name)s``, ``%b``/``%t`` and ``%%`` raise ValueError.
    """
    count = 0

    def number(match: re.Match[bytes]) -> bytes:
        nonlocal count
        if match.group(1) != b"s":
            raise ValueError(
                f"only %s placeholders can be numbered, not %{match.group(1).decode(errors='replace')}"
            )
        count += 1
        return b"$%d" % count

    return _PLACEHOLDER.sub(number, text), count
