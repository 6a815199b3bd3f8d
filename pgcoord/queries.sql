-- The statements of pgcoord's connection layer (listener, migrations, pooler detection).
-- Services keep theirs in pgcoord/<service>/queries.sql.

-- name: listener_setup
-- The LISTEN session names this process as the holder of its lease rows (locks), so nothing
-- may end it but the process: database or role defaults that would are turned off, and the
-- session's start is read to tell it from a later session that reuses its pid. The pid is
-- read too: behind a pooler (PgBouncer) the one in the connection's BackendKeyData is the
-- pooler's own cancel key, not a server process.
SELECT set_config('idle_session_timeout', '0', false),
       set_config('statement_timeout', '0', false),
       set_config('idle_in_transaction_session_timeout', '0', false),
       (SELECT backend_start FROM pg_stat_get_activity(pg_backend_pid())),
       pg_backend_pid()

-- name: work_session_setup
-- Every connection of pgcoord's own work pool, once when it opens: a database or role default
-- idle_session_timeout (a DBA's safeguard) would make the server close pooled sessions
-- during every quiet period. A held lock arms the timeout on its own session as its lease
-- (pgcoord/locks/queries.sql) and sets it back to 0 when it lets go.
SELECT set_config('idle_session_timeout', '0', false)

-- name: listener_database
-- At start with pool= or engine=: whether the listener's session (its server pid and start)
-- runs on this work connection's server and in its database (NOTIFY is per database). datid
-- is visible for every session; backend_start only for the role's own ones (or with
-- pg_read_all_stats), NULL otherwise. No row: that pid is not on this server.
SELECT a.datid = (SELECT oid FROM pg_database WHERE datname = current_database()),
       a.backend_start IS NULL OR a.backend_start = %s
FROM pg_stat_get_activity(%s) a

-- name: ping
-- The listener's heartbeat: the cheapest statement the server must answer.
SELECT 1

-- name: migration_lock
-- Held across an upgrade, so concurrent migrate=True starts migrate once.
SELECT pg_advisory_lock(%s)

-- name: migration_unlock
SELECT pg_advisory_unlock(%s)

-- name: migration_version
-- The revision recorded in the schema (Alembic's own table, inside pgcoord's schema).
SELECT version_num FROM {version_table}

-- name: backend_pid
-- Pooler detection: the server process this client connection is served by right now.
SELECT pg_backend_pid()

-- name: backend_pid_and_notify
-- Pooler detection: the same, plus a notification the listener must receive.
SELECT pg_backend_pid(), pg_notify(%s, %s)
