"""How cache values become stored text and back (pure, no I/O).

A serializer is any object with ``dumps(value) -> str`` and ``loads(text) -> value``. The default,
:class:`JsonCacheSerializer`, accepts JSON data only and refuses anything else with ``TypeError``
before anything is written (see :mod:`pgcoord.codec`).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from pgcoord import codec
from pgcoord.errors import PayloadTooLargeError


@runtime_checkable
class CacheSerializer(Protocol):
    """Turns cache values into text (``dumps``) and back (``loads``)."""

    def dumps(self, value: Any) -> str:
        """Encode ``value``; raise ``TypeError``/``ValueError`` for values it refuses."""
        ...

    def loads(self, text: str) -> Any:
        """Decode text written by :meth:`dumps`."""
        ...


class JsonCacheSerializer:
    """The default serializer: strict JSON data (``None``, bool, number, str, list, dict)."""

    def dumps(self, value: Any) -> str:
        """Validate ``value`` as JSON data and return its JSON text."""
        return codec.encode(value, "cache value")

    def loads(self, text: str) -> Any:
        """Parse JSON text."""
        return codec.decode(text)


def check_size(text: str, limit: int, key: str) -> None:
    """Raise :class:`PayloadTooLargeError` (a ``ValueError``) when ``text`` exceeds ``limit`` bytes."""
    # A character is at most 4 UTF-8 bytes: short values skip the encode entirely.
    if len(text) * 4 <= limit:
        return
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > limit:
        raise PayloadTooLargeError(
            f"the value for cache key {key!r} is {size} bytes encoded; the limit is {limit} bytes "
            "(cache_max_value_bytes / max_value_bytes=)"
        )


#: Types whose decoded values may be handed out from the near cache without a copy.
IMMUTABLE = (str, int, float, bool, type(None))
