"""Schema migrations: metadata matches the revisions, down and up work, concurrent starts migrate once."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

import pgcoord
from pgcoord import migrate
from pgcoord.schema import VERSION_TABLE, build_metadata
from tests.support import ROOT


def _diff(dsn: str, schema: str) -> list[object]:
    engine = sa.create_engine("postgresql+psycopg://", creator=lambda: psycopg.connect(dsn))
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(
                conn,
                opts={
                    "include_schemas": True,
                    "include_name": lambda name, type_, parents: (
                        name == schema if type_ == "schema" else name != VERSION_TABLE
                    ),
                    "version_table_schema": schema,
                },
            )
            return list(compare_metadata(context, build_metadata(schema)))
    finally:
        engine.dispose()


def test_upgraded_schema_matches_the_declared_tables(empty_dsn: str) -> None:
    migrate.upgrade(empty_dsn, "pgcoord")
    assert _diff(empty_dsn, "pgcoord") == []


def test_downgrade_to_base_and_back(empty_dsn: str) -> None:
    migrate.upgrade(empty_dsn, "mig")
    migrate.downgrade(empty_dsn, "mig", "base")
    with psycopg.connect(empty_dsn) as conn:
        tables = conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'mig' AND table_name <> %s",
            (VERSION_TABLE,),
        ).fetchall()
        sequences = conn.execute(
            "SELECT sequence_name FROM information_schema.sequences WHERE sequence_schema = 'mig'"
        ).fetchall()
    assert tables == []
    assert sequences == []
    migrate.upgrade(empty_dsn, "mig")
    assert _diff(empty_dsn, "mig") == []


def test_version_table_is_pgcoords_own(empty_dsn: str) -> None:
    # A host application's Alembic keeps `alembic_version`; pgcoord must never touch it.
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.alembic_version (version_num varchar(32) PRIMARY KEY)")
        conn.execute("INSERT INTO public.alembic_version VALUES ('hostapp_rev')")
    migrate.upgrade(empty_dsn, "pgcoord")
    with psycopg.connect(empty_dsn) as conn:
        assert conn.execute("SELECT version_num FROM public.alembic_version").fetchall() == [
            ("hostapp_rev",)
        ]
        assert conn.execute(f"SELECT version_num FROM pgcoord.{VERSION_TABLE}").fetchall() == [
            (migrate.head_revision(),)
        ]


async def test_ten_coordinators_starting_together_migrate_exactly_once(empty_dsn: str) -> None:
    coords = [pgcoord.Coordinator(empty_dsn, migrate=True, app=f"i{n}") for n in range(10)]
    await asyncio.gather(*(c.start() for c in coords))
    try:
        assert all(c.running for c in coords)
    finally:
        await asyncio.gather(*(c.stop() for c in coords))
    with psycopg.connect(empty_dsn) as conn:
        versions = conn.execute(f"SELECT version_num FROM pgcoord.{VERSION_TABLE}").fetchall()
        # One insert of the version row: Alembic stamped it once, then updated it per revision.
        inserts = conn.execute(
            "SELECT n_tup_ins FROM pg_stat_user_tables WHERE schemaname = 'pgcoord' AND relname = %s",
            (VERSION_TABLE,),
        ).fetchone()
    assert versions == [(migrate.head_revision(),)]
    assert inserts is not None and inserts[0] <= 1


async def test_a_schema_from_a_newer_pgcoord_is_refused(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"UPDATE pgcoord.{VERSION_TABLE} SET version_num = '9999_future'")
    with pytest.raises(pgcoord.SchemaOutdatedError, match="newer pgcoord"):
        await pgcoord.Coordinator(dsn).start()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pgcoord.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
        cwd=cwd or ROOT,
    )


def test_cli_migrate_sql_prints_ddl_without_a_database() -> None:
    # A DSN that points nowhere proves no connection is attempted.
    result = _cli(
        "migrate",
        "--sql",
        "--schema",
        "printed",
        env={"PGCOORD_DSN": f"postgresql://127.0.0.1:{_closed_port()}/x"},
    )
    assert result.returncode == 0, result.stderr
    assert "CREATE SCHEMA IF NOT EXISTS printed" in result.stdout
    assert f"CREATE TABLE printed.{VERSION_TABLE}" in result.stdout


def test_cli_migrate_upgrades_the_given_schema(empty_dsn: str) -> None:
    result = _cli("migrate", "--dsn", empty_dsn, "--schema", "cli_schema")
    assert result.returncode == 0, result.stderr
    assert migrate.head_revision() in result.stdout
    with psycopg.connect(empty_dsn) as conn:
        assert conn.execute(f"SELECT version_num FROM cli_schema.{VERSION_TABLE}").fetchone() == (
            migrate.head_revision(),
        )


def test_cli_reports_an_unreachable_server_clearly() -> None:
    port = _closed_port()
    result = _cli("migrate", "--dsn", f"postgresql://root@127.0.0.1:{port}/x")
    assert result.returncode == 1
    assert "127.0.0.1" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_the_wheel_carries_the_migrations(tmp_path: Path, empty_dsn: str) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        timeout=300,
        capture_output=True,
    )
    wheel = next(tmp_path.glob("pgcoord-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        archive.extractall(tmp_path / "site")
    assert "pgcoord/migrations/env.py" in names
    assert "pgcoord/migrations/script.py.mako" in names
    assert any(n.startswith("pgcoord/migrations/versions/0001_") for n in names)
    assert "pgcoord/py.typed" in names
    # Run `pgcoord migrate` from the unpacked wheel, in another directory, with no source tree on the path.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = "import sys; from pgcoord.cli import main; sys.exit(main())"
    result = subprocess.run(
        [
            sys.executable,
            "-I",
            "-c",
            f"import sys; sys.path.insert(0, {str(tmp_path / 'site')!r}); {code}",
            "migrate",
            "--dsn",
            empty_dsn,
        ],
        capture_output=True,
        text=True,
        cwd=elsewhere,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    with psycopg.connect(empty_dsn) as conn:
        assert conn.execute(f"SELECT version_num FROM pgcoord.{VERSION_TABLE}").fetchone() == (
            migrate.head_revision(),
        )


@pytest.mark.parametrize("schema", ["Upper", "bad'quote", "", "x" * 33])
def test_migrations_refuse_schema_names_the_coordinator_would_refuse(schema: str) -> None:
    with pytest.raises(ValueError, match="schema"):
        migrate.upgrade("postgresql://127.0.0.1:1/unused", schema)
    with pytest.raises(ValueError, match="schema"):
        migrate.upgrade_sql(schema)
