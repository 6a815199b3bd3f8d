"""The SQL of pub/sub and sync messages: the statements of ``queries.sql``, ready to send.

The table is the one identifier, composed with ``psycopg.sql`` (never string formatting).
Each statement is rendered to bytes once per Coordinator, so sending one costs nothing extra
and psycopg can prepare it on each pooled connection after a few uses.
"""

from __future__ import annotations

from dataclasses import InitVar, dataclass, field, fields

from psycopg import sql

from pgcoord import sqlfile


@dataclass(frozen=True)
class Queries:
    """The statements against ``message_log`` in one schema (see ``queries.sql`` for each)."""

    log: InitVar[sql.Identifier]
    notify: bytes = field(init=False)
    insert_and_notify: bytes = field(init=False)
    insert_in_transaction: bytes = field(init=False)
    by_id: bytes = field(init=False)
    by_xid: bytes = field(init=False)
    after_seq: bytes = field(init=False)
    snapshot: bytes = field(init=False)
    catch_up: bytes = field(init=False)
    catch_up_after: bytes = field(init=False)
    sweep: bytes = field(init=False)

    def __post_init__(self, log: sql.Identifier) -> None:
        rendered = sqlfile.render(sqlfile.load("pgcoord.pubsub"), log=log)
        names = [f.name for f in fields(self)]
        if set(names) != rendered.keys():
            # A statement added to one side only would otherwise be silently unused or absent.
            raise RuntimeError(
                f"pgcoord/pubsub/queries.sql and Queries disagree: {sorted(rendered.keys() ^ set(names))}"
            )
        for name in names:
            object.__setattr__(self, name, rendered[name])
