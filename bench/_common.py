"""Shared benchmark plumbing: a scratch database, timing loops, and the result table."""

from __future__ import annotations

import asyncio
import os
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql


@dataclass
class Row:
    """One measured figure, with what it is compared against."""

    what: str
    value: float
    unit: str
    baseline: str | None = None
    baseline_value: float | None = None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        """``value / baseline_value`` (for latencies the row's note says which way is better)."""
        if self.baseline_value in (None, 0):
            return None
        assert self.baseline_value is not None
        return self.value / self.baseline_value


@dataclass
class BenchContext:
    """What a benchmark gets: a DSN of a fresh migrated database, durations, and the table."""

    server_dsn: str
    seconds: float
    redis_url: str
    rows: list[Row] = field(default_factory=list)
    _databases: list[str] = field(default_factory=list)

    @classmethod
    def create(cls, *, dsn: str | None, seconds: float, redis_url: str) -> BenchContext:
        """Resolve the server (argument, $PGCOORD_DSN, embedded)."""
        server = dsn or os.environ.get("PGCOORD_DSN")
        if not server:
            from pgcoord.embedded import ensure_server

            server = ensure_server()
        return cls(server_dsn=server, seconds=seconds, redis_url=redis_url)

    def fresh_database(self, migrate: bool = True) -> str:
        """Create a scratch database (migrated to head by default) and return its DSN."""
        name = f"pgcoord_bench_{uuid.uuid4().hex[:8]}"
        params = psycopg.conninfo.conninfo_to_dict(self.server_dsn)
        params["dbname"] = "postgres"
        with psycopg.connect(psycopg.conninfo.make_conninfo("", **params), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        self._databases.append(name)
        params["dbname"] = name
        dsn = psycopg.conninfo.make_conninfo("", **params)
        if migrate:
            from pgcoord import migrate as migrations

            migrations.upgrade(dsn, "pgcoord")
        return dsn

    def drop_databases(self) -> None:
        """Drop every scratch database this run created."""
        params = psycopg.conninfo.conninfo_to_dict(self.server_dsn)
        params["dbname"] = "postgres"
        with psycopg.connect(psycopg.conninfo.make_conninfo("", **params), autocommit=True) as conn:
            for name in self._databases:
                conn.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
                )
        self._databases.clear()

    def row(
        self,
        what: str,
        value: float,
        unit: str,
        *,
        baseline: str | None = None,
        baseline_value: float | None = None,
        note: str = "",
    ) -> Row:
        """Record a figure; printed in the table at the end."""
        r = Row(what, value, unit, baseline, baseline_value, note)
        self.rows.append(r)
        print(
            f"  {what}: {value:,.1f} {unit}"
            + (f"  (vs {baseline}: {baseline_value:,.1f})" if baseline else ""),
            flush=True,
        )
        return r

    def print_table(self, title: str) -> None:
        """Print every recorded row as a Markdown table (ready for a closing note)."""
        self.drop_databases()
        print(f"\n## {title} ({self.seconds:g} s loops, one run; compare ratios, not absolutes)\n")
        print("| measure | pgcoord | unit | compared with | its figure | ratio | note |")
        print("| --- | ---: | --- | --- | ---: | ---: | --- |")
        for r in self.rows:
            ratio = f"{r.ratio:.2f}" if r.ratio is not None else ""
            base = f"{r.baseline_value:,.1f}" if r.baseline_value is not None else ""
            print(
                f"| {r.what} | {r.value:,.1f} | {r.unit} | {r.baseline or ''} | {base} | {ratio} | {r.note} |"
            )


async def rate(fn: Callable[[], Awaitable[Any]], seconds: float, *, tasks: int = 1) -> float:
    """Operations per second of ``fn`` run back-to-back by ``tasks`` concurrent tasks."""
    count = 0
    deadline = time.perf_counter() + seconds

    async def loop() -> None:
        nonlocal count
        while time.perf_counter() < deadline:
            await fn()
            count += 1

    start = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(tasks)))
    return count / (time.perf_counter() - start)


def sync_rate(fn: Callable[[], Any], seconds: float) -> float:
    """Operations per second of a blocking ``fn`` run back-to-back."""
    count = 0
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        fn()
        count += 1
    return count / (time.perf_counter() - start)


def percentiles(samples: list[float]) -> tuple[float, float]:
    """(p50, p99) of ``samples``."""
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return statistics.median(ordered), p99


async def interleaved(
    runs: list[Callable[[float], Awaitable[float]]], seconds: float, rounds: int = 4
) -> list[float]:
    """Mean rate of each contender, alternating them in short rounds of ``seconds / rounds``.

    The machine is shared and noisy; alternating spreads any drift evenly over the contenders,
    so their ratio means something even when absolute figures swing.
    """
    totals = [0.0] * len(runs)
    for _ in range(rounds):
        for i, run_one in enumerate(runs):
            totals[i] += await run_one(seconds / rounds)
    return [t / rounds for t in totals]
