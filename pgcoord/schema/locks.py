"""Tables of the locks service (declared here once; the Alembic revisions create them).

- ``lock_epochs`` (logged, one row): the durable fencing epoch. It is bumped, with a synchronous
  commit, whenever ``lock_epoch_live`` is found empty (first use, or after a crash emptied it).
- ``lock_epoch_live`` (UNLOGGED, at most one row): the epoch the token sequence currently runs
  under. PostgreSQL empties it in crash recovery at the same moment it resets the UNLOGGED
  sequence ``lock_token_seq``, so "row present" means "the sequence was not reset since the epoch
  was taken", and a token ``epoch * 2**40 + nextval`` never goes backwards.
- ``lock_leases`` (UNLOGGED, one row per key that is held past its first moments or waited
  for): the holder of a promoted lock, named by the holding process's LISTEN session
  (``holder_pid`` + ``holder_start``, so a dead holder is seen at once), its token, and the end
  of its lease on the server's clock (``expires_at``; NULL: no lease). ``wanted`` is set by a
  waiter and tells the release to send one NOTIFY. A row without a holder only carries that mark.
  After a crash the table is empty, which frees every promoted lock, as a crash does.

The sequence ``lock_token_seq`` and the functions (``lock_try``, ``lock_unlock``,
``lock_promote``, ``lock_release``, ``lock_xact``, ``lock_live``, ``lock_alive``,
``lock_new_epoch``) are created by the revisions too (Alembic's autogenerate compares neither).
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    Integer,
    MetaData,
    SmallInteger,
    Table,
    Text,
    false,
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
        "lock_leases",
        metadata,
        Column("lock_key", BigInteger, primary_key=True, autoincrement=False),
        Column("app", Text, nullable=True),
        Column("name", Text, nullable=True),
        Column("instance_id", Text, nullable=True),
        Column("holder_pid", Integer, nullable=True),
        Column("holder_start", DateTime(timezone=True), nullable=True),
        Column("token", BigInteger, nullable=True),
        Column("ttl_ms", Integer, nullable=True),
        Column("since", DateTime(timezone=True), nullable=True),
        Column("expires_at", DateTime(timezone=True), nullable=True),
        Column("wanted", Boolean, nullable=False, server_default=false()),
        prefixes=["UNLOGGED"],
    )
