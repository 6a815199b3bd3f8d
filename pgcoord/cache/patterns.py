"""Glob patterns for ``Cache.keys`` (pure, no I/O).

Only ``*`` (any run of characters) and ``?`` (exactly one character) are special; every other
character matches itself, including SQL's own wildcards ``%`` and ``_`` and the backslash, which
are escaped so that a key containing them is matched literally.
"""

from __future__ import annotations

import re

#: The escape character used in the LIKE patterns built here (Postgres's default for LIKE).
LIKE_ESCAPE = "\\"


def glob_to_like(pattern: str) -> str:
    """Translate a glob to a Postgres ``LIKE`` pattern (escape character: backslash)."""
    out: list[str] = []
    for char in pattern:
        if char == "*":
            out.append("%")
        elif char == "?":
            out.append("_")
        elif char in "%_\\":
            out.append(LIKE_ESCAPE + char)
        else:
            out.append(char)
    return "".join(out)


def glob_to_regex(pattern: str) -> re.Pattern[str]:
    """Translate a glob to a compiled regular expression matching whole keys."""
    parts: list[str] = []
    for char in pattern:
        if char == "*":
            parts.append(".*")
        elif char == "?":
            parts.append(".")
        else:
            parts.append(re.escape(char))
    return re.compile("".join(parts), re.DOTALL)
