"""JSON encoding of messages, job payloads and cache values (pure, no I/O).

pgcoord accepts *JSON data* only: ``None``, ``bool``, ``int``, ``float``, ``str``, ``list`` and
``dict`` with ``str`` keys, nested. Anything else raises :class:`~pgcoord.errors.InvalidTypeError`
before a write, because a fast encoder would otherwise silently turn a datetime, a tuple or a
NaN into something that does not round-trip.

Encoded values travel as ``text`` (never ``jsonb``): Postgres ``jsonb`` refuses ``\\u0000``, and
skipping the server-side parse is also faster. NUL characters, lone surrogates and any Unicode
round-trip. The one string JSON cannot carry exactly is a surrogate pair written as two code
units (``"\\ud83d\\ude00"``): it would come back as the one character it encodes, so it is refused.
"""

from __future__ import annotations

import json
import math
from typing import Any

import orjson

from pgcoord.errors import InvalidInputError, InvalidTypeError
from pgcoord.validation import split_pair_at

JSON = None | bool | int | float | str | list[Any] | dict[str, Any]

# Deeper documents are refused rather than risking RecursionError in the walk.
_MAX_DEPTH = 200


def _check(value: object, path: str, depth: int) -> None:
    if depth > _MAX_DEPTH:
        raise InvalidInputError(f"JSON value nested deeper than {_MAX_DEPTH} levels at {path}")
    if value is None or isinstance(value, bool | str):
        return
    if isinstance(value, int):
        # orjson reads integers beyond 64 bits back as floats (silently losing digits), and most
        # JSON consumers cannot hold them either: refuse them rather than corrupt them.
        if not -(2**63) <= value < 2**64:
            raise InvalidInputError(f"integer at {path} does not fit in 64 bits; send it as a str")
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidInputError(f"{value!r} at {path} is not representable in JSON")
        return
    if isinstance(value, list):
        for index, item in enumerate(value):
            _check(item, f"{path}[{index}]", depth + 1)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidTypeError(
                    f"dict key {key!r} at {path} is a {type(key).__name__}; JSON keys must be str"
                )
            _check(item, f"{path}[{key!r}]", depth + 1)
        return
    raise InvalidTypeError(
        f"{type(value).__name__} at {path} is not JSON data "
        "(allowed: None, bool, int, float, str, list, dict with str keys)"
    )


def _split_pair(value: object, path: str) -> None:
    # Only reached when orjson refused the value, i.e. some string holds a surrogate.
    if isinstance(value, str):
        at = split_pair_at(value)
        if at is not None:
            raise InvalidInputError(
                f"string at {path} holds a surrogate pair written as two code units (index {at}); "
                "JSON cannot keep it apart from the character it encodes: write the character"
            )
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _split_pair(item, f"{path}[{index}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            _split_pair(key, f"{path} key {key!r}")
            _split_pair(item, f"{path}[{key!r}]")


def encode(value: object, what: str = "value") -> str:
    """Validate ``value`` as JSON data and return its JSON text."""
    _check(value, what, 0)
    try:
        return orjson.dumps(value).decode()
    except orjson.JSONEncodeError:
        # orjson refuses strings with surrogates; the standard library writes them as \uXXXX
        # escapes, which decode back to the same string unless two of them form a pair.
        _split_pair(value, what)
        return json.dumps(value, ensure_ascii=True, allow_nan=False, separators=(",", ":"))


def decode(text: str | bytes) -> Any:
    """Parse JSON text written by :func:`encode`."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)


def encoded_size(text: str) -> int:
    """Size in bytes of encoded text as Postgres counts it (UTF-8)."""
    return len(text.encode())
