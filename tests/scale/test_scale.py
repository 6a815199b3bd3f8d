"""Scale (issue 9): a cluster that never exhausts a default PostgreSQL.

Every instance is a real OS process (``tests/workers/scale_worker.py``) on a private server this
module starts with ``max_connections = 100`` (``tests/scale/harness.py``: loopback only, its own
data directory, stopped at the end of the module whatever happens). Measured numbers go into
every assertion message and are printed.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import closing

import psycopg
import pytest

from tests.scale.harness import (
    IDLE_PER_INSTANCE,
    MAX_CONNECTIONS,
    WORKER,
    ConnectionCounter,
    PeakSampler,
    PrivateServer,
    ScaleReport,
    await_line,
    private_server,
    quit_all,
    run_scenario,
    send,
)
from tests.support import processes, spawn, unique_name

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server() -> Iterator[PrivateServer]:
    """One private server for the module (starting one costs a few seconds)."""
    with private_server() as started:
        yield started


@pytest.fixture
def scale_dsn(server: PrivateServer) -> Iterator[str]:
    """An empty database on the private server: the workers migrate it themselves, all at once."""
    name = unique_name("scale")
    yield server.create_database(name)
    server.drop_database(name)


def test_private_server_is_a_default_sized_loopback_server(server: PrivateServer) -> None:
    """The harness itself: the limit the scale tests rely on, on loopback TCP only."""
    with psycopg.connect(server.dsn_for("postgres")) as conn:
        settings = {
            name: conn.execute(f"SHOW {name}").fetchone()[0]  # type: ignore[index]
            for name in ("max_connections", "listen_addresses", "unix_socket_directories", "fsync")
        }
    assert settings == {
        "max_connections": str(MAX_CONNECTIONS),
        "listen_addresses": "127.0.0.1",
        "unix_socket_directories": "",
        "fsync": "off",
    }
    # Per-process counting (client port -> process) must see our own connection and nothing else.
    counter = ConnectionCounter(server.dsn_for("postgres"))
    try:
        assert counter.per_process([os.getpid()]) == {os.getpid(): 1}
    finally:
        counter.close()


def _check(report: ScaleReport) -> None:
    """The issue's assertions on one scenario run. Every violated claim is listed (not only the
    first), and the message carries every measured number."""
    per_process = IDLE_PER_INSTANCE * report.coordinators
    broken = []
    if report.start_failures:
        broken.append(f"{len(report.start_failures)} instances failed to start")
    idles = [("after start", report.idle)]
    if report.idle_after_burst is not None:
        idles.append(("after the burst", report.idle_after_burst))
    for when, idle in idles:
        worst = max((idle.per_process or {}).values(), default=None)
        if idle.seconds is None or worst is None or worst > per_process:
            broken.append(
                f"not idle {when} within 60 s: a process still held {worst} connections"
                f" (bound {per_process}: {IDLE_PER_INSTANCE} per instance)"
            )
        if idle.in_database > IDLE_PER_INSTANCE * report.instances:
            broken.append(f"{idle.in_database} connections in the database idle {when}")
    if report.errors:
        broken.append(f"{report.errors} burst errors")
    if len(report.cycles) != report.instances or min(report.cycles, default=0) == 0:
        broken.append("an instance completed no burst cycle")
    if report.burst_peak >= report.max_connections:
        broken.append(f"the burst reached the server's limit ({report.burst_peak})")
    msg = report.summary()
    print(msg)
    assert not broken, f"{'; '.join(broken)}. Measured: {msg}"


@pytest.mark.timeout(420)
def test_45_processes_start_idle_and_burst_within_100_connections(scale_dsn: str) -> None:
    """45 instances, one per process, start at once (migrate=True), idle at <= 2 connections each,
    burst 5 s x 8 tasks on all five services with 0 errors below the server's limit, and are back
    at <= 2 each once the pools' ``max_idle`` has passed (only here: that wait costs up to 60 s)."""
    # Sized as docs/operations.md says: instances x max_connections under the server's limit
    # (45 x 2 = 90 of 100). With the default budget (4) the same run also has 0 start failures
    # and 0 errors, but the pools grow into the limit and the server refuses connections.
    _check(
        run_scenario(
            scale_dsn,
            processes_n=45,
            coordinators=1,
            max_connections=2,
            burst_seconds=5.0,
            idle_after_burst=True,
        )
    )


@pytest.mark.timeout(300)
def test_5_processes_of_9_coordinators(scale_dsn: str) -> None:
    """The multi-app case: 9 Coordinators (apps scale0..scale8) in each of 5 processes."""
    _check(run_scenario(scale_dsn, processes_n=5, coordinators=9, burst_seconds=3.0))


LOCKS = 10_000
# Long enough to acquire 10,000 locks on a slow machine before the first lease ends: about
# 14 s on 2 quiet cores, 29 s in a CI run sharing them with other suites (30 s was too short).
TTL = 60.0


@pytest.mark.timeout(300)
def test_10000_locks_held_cost_no_connections_and_expire_when_frozen(scale_dsn: str) -> None:
    """One process holds 10,000 locks on distinct keys at <= idle + 2 connections; frozen
    (SIGSTOP) past the ttl, it loses them all to another process, which then has every key.

    The private server, not the machine's: per-process counts match client ports (TCP only), the
    machine's server is shared with other suites running right now, and the private one has a
    stock configuration (``max_locks_per_transaction = 64``), which is what users have.
    """
    with closing(ConnectionCounter(scale_dsn)) as counter, processes() as procs:
        holder = spawn(WORKER, dsn=scale_dsn)
        taker = spawn(WORKER, dsn=scale_dsn)
        procs += [holder, taker]
        for proc in procs:
            assert "failed" not in await_line(proc, "ready", 120)
            send(proc, {"op": "start"})
            started = await_line(proc, "started", 60)
            assert started.get("failures") == [], started

        idle = counter.per_process([holder.pid])[holder.pid]  # type: ignore[index]
        send(holder, {"op": "hold", "count": LOCKS, "ttl": TTL, "prefix": "held-"})
        with PeakSampler(scale_dsn, pids=[holder.pid], per_process_every=0.2) as acquiring:
            held = await_line(holder, "holding", 180)
        # Held: sample the holder's connections for a second.
        while_held = 0
        for _ in range(5):
            while_held = max(while_held, counter.per_process([holder.pid])[holder.pid])  # type: ignore[index]
            time.sleep(0.2)
        numbers = (
            f"holder: {idle} connections before, peak {acquiring.process_peaks.get(holder.pid)} "
            f"while acquiring, {while_held} while holding; {held}"
        )
        print(numbers)
        assert held.get("holding") == LOCKS, numbers
        assert held["seconds"] < TTL - 2, f"acquiring took longer than the ttl: {numbers}"
        assert held["lost"] == 0, numbers
        assert while_held <= IDLE_PER_INSTANCE + 2, numbers

        holder.stop()  # SIGSTOP: neither releases nor extends from now on
        send(taker, {"op": "take", "count": LOCKS, "prefix": "held-", "probe": 20, "timeout": 90})
        with PeakSampler(scale_dsn, pids=[taker.pid], per_process_every=0.2) as taking:
            took = await_line(taker, "taken", 240)
        lease_end = held["requested_at"] + TTL  # no lease of the holder ends before this
        numbers += (
            f"; taker: peak {taking.process_peaks.get(taker.pid)} connections while waiting; "
            f"{took}; first grant {(took.get('first_grant') or 0) - lease_end:+.2f} s and last "
            f"{(took.get('last_grant') or 0) - lease_end:+.2f} s after the earliest lease end"
        )
        print(numbers)
        assert took.get("probed_at", lease_end) < lease_end, f"probe came too late: {numbers}"
        assert took["probe_acquired"] == 0, f"a frozen holder's lease did not hold: {numbers}"
        assert took["taken"] == LOCKS and took["failed"] == 0, numbers
        assert took["first_grant"] >= lease_end - 0.5, f"taken before the ttl: {numbers}"
        assert (taking.process_peaks.get(taker.pid) or 0) <= IDLE_PER_INSTANCE + 2, numbers

        holder.cont()  # thawed, the old holder must learn that its leases ended
        send(holder, {"op": "wait_lost", "timeout": 10})
        lost = await_line(holder, "lost", 30)
        assert lost.get("lost") == LOCKS, f"thawed holder: {lost}; {numbers}"
        quit_all(procs)
