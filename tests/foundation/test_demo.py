"""`pgcoord demo` (README's first command): instances in separate processes really coordinate."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support import ROOT


@pytest.mark.slow
def test_demo_instances_exchange_messages_through_postgres(empty_dsn: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pgcoord.cli", "demo", "--dsn", empty_dsn, "--instances", "3"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "pgcoord demo: OK" in out
    for n in (1, 2, 3):
        assert f"instance-{n} heard 2/2 peers" in out
    # Three instances each incremented the lock-protected counter exactly once.
    assert "incremented the shared counter to 3" in out
    # The instances drained the shared queue: every job ran exactly once across the cluster.
    assert out.count("queue: ran job") == 15
