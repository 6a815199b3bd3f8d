"""Pure argument checks shared by every service (no I/O).

Each check raises before anything is written, with a message that names the argument.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

from pgcoord.errors import InvalidInputError, InvalidTypeError

#: The rule for ``app`` and ``schema``: they become parts of Postgres identifiers and channel names.
IDENTIFIER_RE = re.compile(r"[a-z][a-z0-9_]*")
IDENTIFIER_MAX = 32
#: Keys and channels: any non-empty Unicode string up to this many characters.
KEY_MAX = 255
#: Postgres ``integer`` and ``bigint`` bounds, for :func:`check_int`.
INT4_MIN, INT4_MAX = -(2**31), 2**31 - 1
INT8_MIN, INT8_MAX = -(2**63), 2**63 - 1
#: The longest finite duration accepted, in seconds (about 31 years). Longer ones overflow the
#: server's timestamps or asyncio's timers; pass ``None`` (or ``math.inf`` where the argument
#: says so) for "no limit" instead.
SECONDS_MAX = 1e9

# A high surrogate followed by a low one: JSON (and UTF-16) cannot tell these two code units
# from the one character they encode, so such a string would come back changed.
_SPLIT_PAIR_RE = re.compile("[\ud800-\udbff][\udc00-\udfff]")
_SURROGATE_RE = re.compile("[\ud800-\udfff]")


def split_pair_at(text: str) -> int | None:
    """Index of the first surrogate pair written as two code units in ``text``, else ``None``."""
    if text.isascii():
        return None
    found = _SPLIT_PAIR_RE.search(text)
    return None if found is None else found.start()


def storable(text: str) -> str:
    """``text`` made storable in a Postgres ``text`` column, for text pgcoord keeps on the
    user's behalf (a handler's error message, a traceback): NUL becomes ``\\x00`` and each
    surrogate code unit its ``\\udXXX`` escape. Everything else is kept as is."""
    if text.isascii() and "\x00" not in text:
        return text
    text = text.replace("\x00", "\\x00")
    return _SURROGATE_RE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def check_identifier(value: object, what: str) -> str:
    """Validate an ``app`` or ``schema`` name: ``[a-z][a-z0-9_]*``, at most 32 characters."""
    if not isinstance(value, str):
        raise InvalidTypeError(f"{what} must be a str, not {type(value).__name__}")
    if not value or len(value) > IDENTIFIER_MAX or not IDENTIFIER_RE.fullmatch(value):
        raise InvalidInputError(
            f"{what} must match [a-z][a-z0-9_]* and be 1..{IDENTIFIER_MAX} characters; got {value!r}"
        )
    return value


def check_schema(value: object, what: str = "schema") -> str:
    """Validate a ``schema`` name: an identifier (see :func:`check_identifier`) not starting
    with ``pg_``, which Postgres reserves (``CREATE SCHEMA pg_x`` would fail at migrate time)."""
    name = check_identifier(value, what)
    if name.startswith("pg_"):
        raise InvalidInputError(
            f"{what} must not start with 'pg_' (reserved by Postgres); got {name!r}"
        )
    return name


def check_key(value: object, what: str = "key", *, stored: bool = True) -> str:
    """Validate a cache key, lock key, queue name or channel: a non-empty ``str`` of at most
    255 characters.

    A ``stored`` name (cache keys and prefixes, lock keys, queue channels) is kept in a Postgres
    ``text`` column, which holds neither NUL nor surrogate code units: both are refused. A pub/sub
    channel (``stored=False``) is only hashed, so those pass, except a surrogate pair written as
    two code units, which would not come back the same.
    """
    if not isinstance(value, str):
        raise InvalidTypeError(f"{what} must be a str, not {type(value).__name__}")
    if not value:
        raise InvalidInputError(f"{what} must not be empty")
    if len(value) > KEY_MAX:
        raise InvalidInputError(f"{what} is {len(value)} characters; the maximum is {KEY_MAX}")
    if stored:
        if "\x00" in value:
            raise InvalidInputError(
                f"{what} must not contain NUL (\\x00): Postgres text cannot hold it"
            )
        found = None if value.isascii() else _SURROGATE_RE.search(value)
        if found is not None:
            raise InvalidInputError(
                f"{what} holds the surrogate code unit {ord(found.group()):#06x} at index "
                f"{found.start()}: it is not Unicode text Postgres can store"
            )
        return value
    at = split_pair_at(value)
    if at is not None:
        raise InvalidInputError(
            f"{what} holds a surrogate pair written as two code units at index {at}; "
            "write the character itself"
        )
    return value


def _number(value: object, what: str) -> float:
    # bool is an int subclass; ttl=True is almost certainly a bug, so refuse it.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidTypeError(f"{what} must be a number of seconds, not {type(value).__name__}")
    try:
        number = float(value)
    except OverflowError:
        raise InvalidInputError(f"{what} is too large: at most {SECONDS_MAX:.0f} seconds") from None
    if math.isnan(number):
        raise InvalidInputError(f"{what} must not be NaN")
    if SECONDS_MAX < abs(number) < math.inf:
        raise InvalidInputError(
            f"{what} is {number:g} seconds; the maximum is {SECONDS_MAX:.0f} "
            "(use None for no limit where the argument allows it)"
        )
    return number


def _no_inf(number: float, value: object, what: str, finite: bool) -> float:
    if finite and math.isinf(number):
        raise InvalidInputError(f"{what} must be a finite number of seconds; got {value!r}")
    return number


def check_positive(value: object, what: str, *, finite: bool = False) -> float:
    """Validate a ttl/timeout/interval: a number of seconds > 0 and at most
    :data:`SECONDS_MAX`; ``inf`` is allowed unless ``finite``."""
    number = _number(value, what)
    if number <= 0:
        raise InvalidInputError(f"{what} must be > 0 seconds; got {value!r}")
    return _no_inf(number, value, what, finite)


def check_optional_positive(value: object, what: str, *, finite: bool = False) -> float | None:
    """Like :func:`check_positive`, but ``None`` (meaning "no limit") passes through."""
    return None if value is None else check_positive(value, what, finite=finite)


def check_non_negative(value: object, what: str, *, finite: bool = False) -> float:
    """Validate a delay or timeout that may be 0 (but not negative), at most
    :data:`SECONDS_MAX`; ``inf`` is allowed unless ``finite``."""
    number = _number(value, what)
    if number < 0:
        raise InvalidInputError(f"{what} must be >= 0 seconds; got {value!r}")
    return _no_inf(number, value, what, finite)


def check_int(
    value: object, what: str, *, minimum: int | None = None, maximum: int | None = None
) -> int:
    """Validate an integer option such as ``max_retries`` or ``priority``, within
    ``minimum``..``maximum`` when given (e.g. :data:`INT4_MAX` for a Postgres ``integer``)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidTypeError(f"{what} must be an int, not {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise InvalidInputError(f"{what} must be >= {minimum}; got {value!r}")
    if maximum is not None and value > maximum:
        raise InvalidInputError(f"{what} must be <= {maximum}; got {value!r}")
    return value


def check_callable(value: object, what: str) -> Callable[..., Any]:
    """Validate a handler/process/fn callback (sync or async)."""
    if not callable(value):
        raise InvalidTypeError(f"{what} must be callable, not {type(value).__name__}")
    return value
