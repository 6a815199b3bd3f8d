"""Tables of the locks service (declared here once; the Alembic revision creates them).

- ``lock_epochs`` (logged, one row): the durable fencing epoch. It is bumped, with a synchronous
  commit, whenever ``lock_epoch_live`` is found empty (first use, or after a crash emptied it).
- ``lock_epoch_live`` (UNLOGGED, at most one row): the epoch the token sequence currently runs
  under. PostgreSQL empties it in crash recovery at the same moment it resets the UNLOGGED
  sequence ``lock_token_seq``, so "row present" means "the sequence was not reset since the epoch
  was taken", and a token ``epoch * 2**40 + nextval`` never goes backwards.
- ``lock_holders`` (UNLOGGED): which key, instance and lease a lock connection serves, one row
  per connection (keyed by its backend pid), rewritten only when the connection takes a different
  key or lease than last time, so re-taking a hot key writes nothing. The start of a holding is
  the session's ``pg_stat_activity.state_change`` (the end of the acquiring statement) until an
  ``extend`` records it in ``since``. Rows are only trusted when ``pg_locks`` shows that backend
  holding that advisory key, so a crashed or released holder's leftover row is never listed.

The sequence ``lock_token_seq`` and the functions ``lock_acquire``/``lock_extend``/
``lock_new_epoch`` are created by the revision too (Alembic's autogenerate compares neither).
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    DateTime,
    Integer,
    MetaData,
    SmallInteger,
    Table,
    Text,
)


def define(metadata: MetaData) -> None:
    """Add this service's tables to ``metadata`` (whose ``schema`` is pgcoord's schema)."""
    Table(
        "lock_epochs",
        metadata,
        Column("id", SmallInteger, primary_key=True, autoincrement=False),
        Column("epoch", BigInteger, nullable=False),
        CheckConstraint("id = 1", name="lock_epochs_one_row"),
    )
    Table(
        "lock_epoch_live",
        metadata,
        Column("id", SmallInteger, primary_key=True, autoincrement=False),
        Column("epoch", BigInteger, nullable=False),
        CheckConstraint("id = 1", name="lock_epoch_live_one_row"),
        prefixes=["UNLOGGED"],
    )
    Table(
        "lock_holders",
        metadata,
        Column("pid", Integer, primary_key=True, autoincrement=False),
        Column("lock_key", BigInteger, nullable=False),
        Column("app", Text, nullable=False),
        Column("name", Text, nullable=False),
        Column("instance_id", Text, nullable=False),
        Column("ttl_ms", Integer, nullable=False),
        Column("since", DateTime(timezone=True), nullable=True),
        prefixes=["UNLOGGED"],
    )
