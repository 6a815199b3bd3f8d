"""The locks service's statements, read from ``queries.sql`` and rendered once per schema.

A lock starts as a session advisory lock on a borrowed work connection and, once held for
``PROMOTE_AFTER``, becomes a row of ``lock_leases`` (see the 0005 revision for the functions).
Every statement, and why it is written so, is in ``pgcoord/locks/queries.sql``; this module
only fills in the schema's identifiers (``psycopg.sql``) and renders them to bytes, since
composing per call costs time on the lock hot path.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from psycopg import sql

from pgcoord import sqlfile
from pgcoord.locks.lease import TOKEN_EPOCH_SHIFT

# The schema's objects the statements name, each filling the {placeholder} of the same name.
_OBJECTS = (
    "lock_epoch_live",
    "lock_new_epoch",
    "lock_free",
    "lock_try",
    "lock_wake",
    "lock_promote",
    "lock_release",
    "lock_xact",
    "lock_alive",
)


@dataclass(frozen=True)
class LockQueries:
    """Rendered statements for one schema (rendered once: composing per call costs time)."""

    acquire: bytes
    acquire_warm: bytes
    take_over_warm: bytes
    acquire_waiting: bytes
    take_over: bytes
    unlock: bytes
    wake_waiters: bytes
    extend_session: bytes
    promote: bytes
    unlock_promoted: bytes
    release_lease: bytes
    extend_lease: bytes
    release_instance: bytes
    sweep: bytes
    notify_many: bytes
    holders: bytes
    xact_lock: str  # runs on the caller's connection or session (pgcoord.transaction)

    @classmethod
    def for_schema(cls, schema: str) -> LockQueries:
        """Render every statement of ``queries.sql`` for ``schema``."""
        rendered = sqlfile.render(
            sqlfile.load("pgcoord.locks"),
            leases=sql.Identifier(schema, "lock_leases"),
            # nextval() takes the sequence's name as text: the quoted identifier as a literal.
            seq=sql.Literal(sql.Identifier(schema, "lock_token_seq").as_string(None)),
            factor=sql.Literal(1 << TOKEN_EPOCH_SHIFT),
            **{name: sql.Identifier(schema, name) for name in _OBJECTS},
        )
        fields = {field.name for field in dataclasses.fields(cls)}
        if rendered.keys() != fields:
            raise RuntimeError(
                "pgcoord/locks/queries.sql does not match LockQueries: "
                f"{sorted(rendered.keys() ^ fields)}"
            )
        xact_lock = rendered.pop("xact_lock").decode()  # pgcoord.transaction takes text
        return cls(xact_lock=xact_lock, **rendered)
