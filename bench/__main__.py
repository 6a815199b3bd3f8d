"""Run one benchmark: ``python -m bench NAME [--dsn DSN] [--seconds S]``; ``python -m bench`` lists them.

Each benchmark module in this package defines ``async def run(ctx: BenchContext) -> None`` and
prints rows with :meth:`BenchContext.row`: pgcoord's figure beside the raw-Postgres primitive and
the peer a user would pick instead, all measured in the same run, with their ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import pkgutil
import sys
from pathlib import Path

from bench._common import BenchContext


def available() -> list[str]:
    """Names of the benchmark modules."""
    here = Path(__file__).parent
    return sorted(m.name for m in pkgutil.iter_modules([str(here)]) if not m.name.startswith("_"))


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and run the named benchmark."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("name", nargs="?", choices=available())
    parser.add_argument(
        "--dsn", help="PostgreSQL DSN (default: $PGCOORD_DSN, else the embedded server)"
    )
    parser.add_argument("--seconds", type=float, default=3.0, help="duration of each timed loop")
    parser.add_argument(
        "--redis", default="redis://127.0.0.1:6379/0", help="Redis URL for the Redis peers"
    )
    args = parser.parse_args(argv)
    if args.name is None:
        print("benchmarks:", ", ".join(available()))
        return 0
    module = importlib.import_module(f"bench.{args.name}")
    ctx = BenchContext.create(dsn=args.dsn, seconds=args.seconds, redis_url=args.redis)
    asyncio.run(module.run(ctx))
    ctx.print_table(title=f"bench {args.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
