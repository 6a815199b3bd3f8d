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


def check_identifier(value: object, what: str) -> str:
    """Validate an ``app`` or ``schema`` name: ``[a-z][a-z0-9_]*``, at most 32 characters."""
    if not isinstance(value, str):
        raise InvalidTypeError(f"{what} must be a str, not {type(value).__name__}")
    if not value or len(value) > IDENTIFIER_MAX or not IDENTIFIER_RE.fullmatch(value):
        raise InvalidInputError(
            f"{what} must match [a-z][a-z0-9_]* and be 1..{IDENTIFIER_MAX} characters; got {value!r}"
        )
    return value


def check_key(value: object, what: str = "key") -> str:
    """Validate a cache key, lock key or channel: a non-empty ``str`` of at most 255 characters."""
    if not isinstance(value, str):
        raise InvalidTypeError(f"{what} must be a str, not {type(value).__name__}")
    if not value:
        raise InvalidInputError(f"{what} must not be empty")
    if len(value) > KEY_MAX:
        raise InvalidInputError(f"{what} is {len(value)} characters; the maximum is {KEY_MAX}")
    return value


def _number(value: object, what: str) -> float:
    # bool is an int subclass; ttl=True is almost certainly a bug, so refuse it.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidTypeError(f"{what} must be a number of seconds, not {type(value).__name__}")
    number = float(value)
    if math.isnan(number):
        raise InvalidInputError(f"{what} must not be NaN")
    return number


def check_positive(value: object, what: str) -> float:
    """Validate a ttl/timeout/interval: a number of seconds > 0 (``inf`` is allowed)."""
    number = _number(value, what)
    if number <= 0:
        raise InvalidInputError(f"{what} must be > 0 seconds; got {value!r}")
    return number


def check_optional_positive(value: object, what: str) -> float | None:
    """Like :func:`check_positive`, but ``None`` (meaning "no limit") passes through."""
    return None if value is None else check_positive(value, what)


def check_non_negative(value: object, what: str) -> float:
    """Validate a delay or timeout that may be 0 (but not negative)."""
    number = _number(value, what)
    if number < 0:
        raise InvalidInputError(f"{what} must be >= 0 seconds; got {value!r}")
    return number


def check_int(value: object, what: str, *, minimum: int | None = None) -> int:
    """Validate an integer option such as ``max_retries`` or ``priority``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidTypeError(f"{what} must be an int, not {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise InvalidInputError(f"{what} must be >= {minimum}; got {value!r}")
    return value


def check_callable(value: object, what: str) -> Callable[..., Any]:
    """Validate a handler/process/fn callback (sync or async)."""
    if not callable(value):
        raise InvalidTypeError(f"{what} must be callable, not {type(value).__name__}")
    return value
