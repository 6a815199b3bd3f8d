"""Scale: connections of a cluster of instances, each its own OS process, beside the budget.

The scenario of ``tests/scale`` (issue 9), measured instead of asserted: worker processes
(``tests/workers/scale_worker.py``) of N Coordinators each (``migrate=True``, subscribed to
pub/sub, sync messages and one queue) start at once, go idle, then burst for ``--seconds``: 8 tasks
per Coordinator, each cycle a cache set+get, a publish, a sync message, a queue publish and a short
lock on its own key. Rows, per layout (45 processes x 1 Coordinator, 5 x 9): the connection peak
at start and during the burst beside the server's ``max_connections``; the idle connections and
the burst peak of the busiest process beside the per-process budget; cycles, errors, failures.

``python -m bench scale`` runs on a private server this benchmark starts with
``max_connections = 100`` (``tests/scale/harness.py``), because the figures mean something only
beside a known limit and the scenario would take most of a shared server's connections. To run
one layout on your own server::

    python -m bench.scale --dsn DSN --instances 45 --per-process 1 --seconds 5

(without ``--dsn`` it, too, uses a private server).
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from bench._common import BenchContext
from tests.scale.harness import IDLE_PER_INSTANCE, ScaleReport, private_server, run_scenario

LAYOUTS = ((45, 1), (5, 9))  # (processes, Coordinators per process): the two cases


def _quiet(line: str) -> None:
    """Progress lines of the harness, indented under the benchmark's own."""
    print(f"    {line}", flush=True)


def _rows(ctx: BenchContext, report: ScaleReport) -> None:
    layout = f"{report.processes}x{report.coordinators}"
    budget = report.budget if isinstance(report.budget, int | float) else None
    budget_note = "" if budget is not None else "this pgcoord has no max_connections budget"
    ctx.row(
        f"{layout}: start peak, whole server",
        report.start_peak,
        "connections",
        baseline="max_connections",
        baseline_value=report.max_connections,
        note=f"{len(report.start_failures)} start failures, {report.start_seconds:.1f} s",
    )
    ctx.row(
        f"{layout}: burst peak, whole server",
        report.burst_peak,
        "connections",
        baseline="max_connections",
        baseline_value=report.max_connections,
        note="includes the sampler's own connection",
    )
    for when, idle in (("idle", report.idle), ("idle after burst", report.idle_after_burst)):
        if idle is None or not idle.per_process:
            continue
        ctx.row(
            f"{layout}: {when}, busiest process",
            max(idle.per_process.values()),
            "connections",
            baseline="budget per process" if budget is not None else None,
            baseline_value=budget,
            note="; ".join(
                part
                for part in (
                    f"{max(idle.per_process.values()) / report.coordinators:.2f} per instance"
                    f" (bound {IDLE_PER_INSTANCE})",
                    "never idle in 60 s" if idle.seconds is None else "",
                    budget_note,
                )
                if part
            ),
        )
    if report.burst_process_peak is not None:
        ctx.row(
            f"{layout}: burst peak, busiest process",
            report.burst_process_peak,
            "connections",
            baseline="budget per process" if budget is not None else None,
            baseline_value=budget,
            note=budget_note,
        )
    ctx.row(
        f"{layout}: burst cycles, all instances",
        sum(report.cycles) / max(report.burst_seconds, 1e-9),
        "cycles/s",
        note=(
            f"{report.errors} errors, {len(report.cycles)}/{report.instances} instances ran, "
            f"min {min(report.cycles, default=0)} cycles per instance"
        ),
    )


async def _layout(
    ctx: BenchContext, server_dsn: str, processes_n: int, coordinators: int, seconds: float
) -> None:
    scratch = BenchContext(server_dsn=server_dsn, seconds=seconds, redis_url=ctx.redis_url)
    try:
        dsn = scratch.fresh_database(migrate=False)  # the workers migrate it, all at once
        print(f"  {processes_n} processes x {coordinators} Coordinators ...", flush=True)
        report = await asyncio.to_thread(
            run_scenario,
            dsn,
            processes_n=processes_n,
            coordinators=coordinators,
            burst_seconds=seconds,
            idle_after_burst=True,
            log=_quiet,
        )
    finally:
        scratch.drop_databases()
    _rows(ctx, report)


async def run(ctx: BenchContext) -> None:
    """Both layouts on a private server with ``max_connections = 100``."""
    with private_server() as server:
        for processes_n, coordinators in LAYOUTS:
            await _layout(ctx, server.dsn_for("postgres"), processes_n, coordinators, ctx.seconds)


def main(argv: list[str] | None = None) -> int:
    """One layout, on ``--dsn`` or on a private server."""
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__)
    parser.add_argument("--dsn", help="your server (default: a private one, max_connections=100)")
    parser.add_argument("--instances", type=int, default=45, help="Coordinators in all")
    parser.add_argument("--per-process", type=int, default=1, help="Coordinators per process")
    parser.add_argument("--seconds", type=float, default=5.0, help="burst duration")
    args = parser.parse_args(argv)
    if args.instances % args.per_process:
        parser.error("--instances must be a multiple of --per-process")
    processes_n = args.instances // args.per_process

    def measure(server_dsn: str) -> None:
        ctx = BenchContext(server_dsn=server_dsn, seconds=args.seconds, redis_url="")
        asyncio.run(_layout(ctx, server_dsn, processes_n, args.per_process, args.seconds))
        ctx.print_table(title="bench scale")  # while the server still runs: it drops scratch

    if args.dsn:
        measure(args.dsn)
    else:
        with private_server() as server:
            measure(server.dsn_for("postgres"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
