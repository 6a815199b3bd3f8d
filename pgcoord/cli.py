"""The ``pgcoord`` command: ``migrate``, ``grant``, ``demo``, ``server``, and what services add
(``jobs``)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from pgcoord.dsn import DSN_ENV, resolve_or_embedded
from pgcoord.errors import PgcoordError

#: ``--dsn``, else ``$PGCOORD_DSN``, else the embedded server (started if needed).
resolve_cli_dsn = resolve_or_embedded


def _cmd_migrate(args: argparse.Namespace) -> int:
    from pgcoord import migrate

    if args.sql:
        sys.stdout.write(migrate.upgrade_sql(args.schema))
        return 0
    dsn = resolve_cli_dsn(args.dsn)
    migrate.upgrade(dsn, args.schema)
    print(f"pgcoord schema {args.schema!r} is at revision {migrate.head_revision()}")
    return 0


def _cmd_grant(args: argparse.Namespace) -> int:
    from pgcoord import grants

    if args.sql:
        sys.stdout.write(grants.grant_sql(args.role, args.schema))
        return 0
    dsn = resolve_cli_dsn(args.dsn)
    grants.grant(dsn, args.role, args.schema)
    print(f"role {args.role!r} may now run every pgcoord service on schema {args.schema!r}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from pgcoord.demo import run_demo

    return asyncio.run(run_demo(dsn=args.dsn, instances=args.instances))


def _cmd_demo_instance(args: argparse.Namespace) -> int:
    from pgcoord.demo import run_instance

    return asyncio.run(run_instance(args.name, args.peers, args.dsn))


def _cmd_server(args: argparse.Namespace) -> int:
    from pgcoord.embedded import default_data_dir, ensure_server, stop_server

    data_dir = default_data_dir()
    if args.action == "start":
        print(ensure_server(data_dir))
    elif args.action == "stop":
        print("stopped" if stop_server(data_dir) else f"no embedded server runs in {data_dir}")
    else:
        running = (data_dir / "postmaster.pid").exists()
        print(f"embedded server in {data_dir}: {'running' if running else 'not running'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``pgcoord`` command."""
    parser = argparse.ArgumentParser(
        prog="pgcoord", description="Coordinate app instances through PostgreSQL."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--dsn",
            default=None,
            help=f"PostgreSQL DSN (default: ${DSN_ENV}, else the embedded server)",
        )
        p.add_argument(
            "--schema", default="pgcoord", help="schema holding pgcoord's tables (default: pgcoord)"
        )
        p.add_argument("--app", default="main", help="application namespace (default: main)")

    migrate = sub.add_parser("migrate", help="create or upgrade pgcoord's tables")
    common(migrate)
    migrate.add_argument(
        "--sql",
        action="store_true",
        help="print the DDL instead of running it (no database needed)",
    )
    migrate.set_defaults(func=_cmd_migrate)

    grant = sub.add_parser(
        "grant",
        help="give an application role what it needs on a schema the owner migrated",
        description="Grant ROLE exactly what every pgcoord service needs on the schema (run "
        "as the role that ran `pgcoord migrate`, after each migration); see docs/security.md.",
    )
    grant.add_argument("role", metavar="ROLE", help="the role the application connects as")
    grant.add_argument(
        "--dsn",
        default=None,
        help=f"PostgreSQL DSN of the schema's owner (default: ${DSN_ENV}, else the embedded server)",
    )
    grant.add_argument(
        "--schema", default="pgcoord", help="schema holding pgcoord's tables (default: pgcoord)"
    )
    grant.add_argument(
        "--sql",
        action="store_true",
        help="print the GRANT statements instead of running them (no database needed)",
    )
    grant.set_defaults(func=_cmd_grant)

    demo = sub.add_parser(
        "demo", help="run a live multi-instance demo (embedded server by default)"
    )
    demo.add_argument(
        "--dsn",
        default=None,
        help=f"PostgreSQL DSN (default: ${DSN_ENV}, else the embedded server)",
    )
    demo.add_argument(
        "--instances", type=int, default=2, help="how many instance processes (default: 2)"
    )
    demo.set_defaults(func=_cmd_demo)

    instance = sub.add_parser("demo-instance", help=argparse.SUPPRESS)
    instance.add_argument("name")
    instance.add_argument("peers", type=int)
    instance.add_argument("--dsn", required=True)
    instance.set_defaults(func=_cmd_demo_instance)

    server = sub.add_parser("server", help="manage the embedded PostgreSQL server")
    server.add_argument("action", choices=["start", "stop", "status"])
    server.set_defaults(func=_cmd_server)

    # Services add their own commands (the queue: `pgcoord jobs failed|retry|purge`).
    from pgcoord.queue import cli as queue_cli

    queue_cli.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pgcoord`` command."""
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except PgcoordError as exc:
        print(f"pgcoord: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
