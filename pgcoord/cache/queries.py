"""The cache's statements, read from ``queries.sql`` and rendered once per schema to bytes.

The SQL itself, with why each statement is written so, lives in ``pgcoord/cache/queries.sql``;
this module only fills in the schema's table (through ``psycopg.sql``) and names the result.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

from psycopg import sql

from pgcoord import sqlfile
from pgcoord.schema.cache import TABLE


@dataclass(frozen=True)
class Queries:
    """Ready-to-execute statements (bytes, so psycopg's per-query cache and auto-prepare apply).

    Each attribute is the ``queries.sql`` block of the same name.
    """

    get: bytes
    get_with_ttl: bytes
    mget: bytes
    set: bytes
    mset: bytes
    mdel: bytes
    reset: bytes
    flush_app: bytes
    ttl: bytes
    keys: bytes
    incr: bytes
    sweep: bytes
    count: bytes
    evict: bytes
    try_xact_lock: bytes
    wrap_try_lock: bytes
    wrap_unlock: bytes
    notify: bytes
    near_writers: bytes
    near_writers_left: bytes
    near_register: bytes
    near_renew: bytes
    near_unregister: bytes


@functools.cache
def build(schema: str) -> Queries:
    """The statements for the cache table in ``schema`` (rendered once per schema)."""
    rendered = sqlfile.render(sqlfile.load("pgcoord.cache"), entries=sql.Identifier(schema, TABLE))
    fields = {field.name for field in dataclasses.fields(Queries)}
    if rendered.keys() != fields:
        # A block added to or missing from the file must not go unnoticed until it is sent.
        raise RuntimeError(
            f"pgcoord/cache/queries.sql does not match Queries: {sorted(rendered.keys() ^ fields)}"
        )
    return Queries(**rendered)
