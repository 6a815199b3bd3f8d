"""Invalidation messages between instances (pure, no I/O).

One NOTIFY payload is ``{"i": <sender instance id>, "o": [op, ...]}`` where an op is
``["k", ns, key]`` (a key changed), ``["n", ns]`` (a whole namespace was reset), ``["a"]``
(the app's caches were flushed) or ``["w", ns, key]`` (a ``wrap`` computation ended: waiters
re-check). Ops are packed into as few payloads as fit under Postgres's NOTIFY limit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

#: Postgres refuses NOTIFY payloads of 8000 bytes or more; keep a margin.
PAYLOAD_LIMIT = 7800

Op = tuple[str, ...]


@dataclass(frozen=True)
class Message:
    """A decoded payload: who sent it, and what changed."""

    instance: str
    ops: list[Op]


def _dump(instance: str, ops: Sequence[Op]) -> bytes:
    return orjson.dumps({"i": instance, "o": [list(op) for op in ops]})


def pack(instance: str, ops: Sequence[Op], limit: int = PAYLOAD_LIMIT) -> list[str]:
    """Pack ``ops`` into payloads of at most ``limit`` bytes each (one op always fits)."""
    payloads: list[str] = []
    batch: list[Op] = []
    size = len(_dump(instance, []))
    for op in ops:
        op_size = len(orjson.dumps(list(op))) + 1
        if batch and size + op_size > limit:
            payloads.append(_dump(instance, batch).decode())
            batch, size = [], len(_dump(instance, []))
        batch.append(op)
        size += op_size
    if batch:
        payloads.append(_dump(instance, batch).decode())
    return payloads


def unpack(payload: str) -> Message:
    """Decode a payload; raises ``ValueError`` for anything malformed."""
    try:
        data: Any = orjson.loads(payload)
        instance = data["i"]
        ops = [tuple(op) for op in data["o"]]
    except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"malformed cache invalidation payload: {payload[:100]!r}") from exc
    if not isinstance(instance, str) or not all(
        op and all(isinstance(part, str) for part in op) for op in ops
    ):
        raise ValueError(f"malformed cache invalidation payload: {payload[:100]!r}")
    return Message(instance, ops)
