"""Mapping of user names (channels, keys) to Postgres names (pure, no I/O).

User channels and keys are any Unicode string of up to 255 characters, but a Postgres channel
name is an identifier of at most 63 bytes and an advisory lock key is a 64-bit integer. Both are
derived with BLAKE2b over ``schema``, ``app``, a service tag and the user's name, separated by NUL
(which a validated identifier cannot contain), so two apps or two services never meet.

A hash collision can only make two channels share a Postgres channel: every envelope carries the
original channel, and receivers drop what is not theirs. For locks, a collision only makes two keys
wait for each other; it never lets two holders in.
"""

from __future__ import annotations

import hashlib

CHANNEL_PREFIX = "pgcoord"


def _digest(*parts: str, size: int) -> bytes:
    data = "\x00".join(parts).encode("utf-8", "surrogatepass")
    return hashlib.blake2b(data, digest_size=size).digest()


def pg_channel(schema: str, app: str, service: str, name: str) -> str:
    """The Postgres channel for a user channel: ``pgcoord_<service>_<20 hex>``, well under 63 bytes.

    Lower-case ASCII only, so it survives identifier case-folding; LISTEN still quotes it.
    """
    return f"{CHANNEL_PREFIX}_{service}_{_digest(schema, app, service, name, size=10).hex()}"


def advisory_key(schema: str, app: str, service: str, name: str) -> int:
    """A signed 64-bit advisory lock key (the documented, stable key mapping)."""
    return int.from_bytes(_digest(schema, app, service, name, size=8), "big", signed=True)
