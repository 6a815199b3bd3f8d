"""``grant_sql``: the GRANT statements, built without a database (pure, no I/O)."""

from __future__ import annotations

import re

import pytest

from pgcoord import cli
from pgcoord.errors import InvalidInputError, InvalidTypeError
from pgcoord.grants import grant_sql, service_tables
from pgcoord.schema import VERSION_TABLE, build_metadata


def _statements(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith("--")]


def test_role_and_schema_are_quoted_identifiers() -> None:
    text = grant_sql('a"b', "pgc_x")
    statements = _statements(text)
    assert statements
    for statement in statements:
        # The role appears once per statement, quoted with its quote doubled, at the end.
        assert statement.endswith(' TO "a""b";'), statement
        assert statement.count('"a""b"') == 1
    assert 'GRANT USAGE ON SCHEMA "pgc_x" TO "a""b";' in statements
    assert f'GRANT SELECT ON TABLE "pgc_x"."{VERSION_TABLE}" TO "a""b";' in statements


def test_a_role_name_cannot_inject_sql() -> None:
    text = grant_sql("x; DROP TABLE t; --", "pgcoord")
    for statement in _statements(text):
        assert statement.endswith(' TO "x; DROP TABLE t; --";'), statement


def test_every_declared_table_gets_dml_and_the_version_table_only_select() -> None:
    text = grant_sql("app", "pgcoord")
    granted: dict[str, str] = {}
    for statement in _statements(text):
        match = re.fullmatch(r'GRANT (.+) ON TABLE (.+) TO "app";', statement)
        if match:
            for table in match.group(2).split(", "):
                granted[table] = match.group(1)
    declared = {t.name for t in build_metadata("pgcoord").sorted_tables}
    assert {t for _, tables in service_tables() for t in tables} == declared
    assert granted.pop(f'"pgcoord"."{VERSION_TABLE}"') == "SELECT"
    assert granted == {f'"pgcoord"."{t}"': "SELECT, INSERT, UPDATE, DELETE" for t in declared}


def test_nothing_beyond_what_the_services_use() -> None:
    upper = " ".join(_statements(grant_sql("app"))).upper()
    for word in (
        "TRUNCATE",
        "CREATE",
        "ALL PRIVILEGES",
        "REFERENCES",
        "TRIGGER",
        "OWNER",
        "WITH GRANT",
    ):
        assert word not in upper, word
    assert "GRANT USAGE ON ALL SEQUENCES IN SCHEMA" in upper
    assert "GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA" in upper


@pytest.mark.parametrize(
    ("role", "error"),
    [
        ("", InvalidInputError),
        ("public", InvalidInputError),
        ("PUBLIC", InvalidInputError),
        ("none", InvalidInputError),
        ("pg_monitor", InvalidInputError),
        ("a\x00b", InvalidInputError),
        ("\udc80", InvalidInputError),
        ("r" * 64, InvalidInputError),
        ("é" * 32, InvalidInputError),  # 64 bytes
        (None, InvalidTypeError),
        (b"app", InvalidTypeError),
    ],
)
def test_bad_roles_are_refused(role: object, error: type[Exception]) -> None:
    with pytest.raises(error):
        grant_sql(role, "pgcoord")  # type: ignore[arg-type]


@pytest.mark.parametrize("schema", ["", "Pgcoord", "pg_x", 'a"b', "a b"])
def test_bad_schemas_are_refused(schema: str) -> None:
    with pytest.raises(InvalidInputError):
        grant_sql("app", schema)


def test_longest_role_postgres_keeps_is_accepted() -> None:
    assert ' TO "' + "r" * 63 + '";' in grant_sql("r" * 63)


def test_cli_prints_the_same_sql(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["grant", 'a"b', "--schema", "other", "--sql"]) == 0
    assert capsys.readouterr().out == grant_sql('a"b', "other")


def test_cli_refuses_public(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["grant", "public", "--sql"]) == 1
    assert "InvalidInputError" in capsys.readouterr().err
