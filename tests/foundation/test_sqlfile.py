"""Named SQL files: parsing and rendering (pure)."""

from __future__ import annotations

import pytest
from psycopg import sql

from pgcoord.sqlfile import numbered, parse, render

TEXT = """
-- The file's own comment.

-- name: claim
-- Claim jobs (this comment is dropped).
SELECT id FROM {jobs}
-- an inner comment stays
WHERE app = %(app)s AND tags = '{{}}'

-- name: done
DELETE FROM {jobs} WHERE id = %s
"""


def test_blocks_are_found_by_name_with_their_leading_comments_dropped() -> None:
    statements = parse(TEXT)
    assert list(statements) == ["claim", "done"]
    assert statements["claim"].startswith("SELECT id FROM {jobs}")
    assert "-- an inner comment stays" in statements["claim"]
    assert statements["done"] == "DELETE FROM {jobs} WHERE id = %s"


def test_identifiers_are_composed_by_psycopg_and_rendered_to_bytes() -> None:
    rendered = render(parse(TEXT), jobs=sql.Identifier("my schema", "queue_jobs"))
    assert rendered["done"] == b'DELETE FROM "my schema"."queue_jobs" WHERE id = %s'
    assert b"tags = '{}'" in rendered["claim"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("SELECT 1\n-- name: a\nSELECT 2", "before the first"),
        ("-- name: a\nSELECT 1\n-- name: a\nSELECT 2", "named twice"),
        ("-- name: a\n-- only a comment\n-- name: b\nSELECT 1", "empty statement"),
    ],
)
def test_malformed_files_are_refused(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse(text)


def test_positional_placeholders_are_numbered_for_libpq() -> None:
    text, count = numbered(b"SELECT f(%s, %s) FROM t WHERE k = %s")
    assert (text, count) == (b"SELECT f($1, $2) FROM t WHERE k = $3", 3)
    assert numbered(b"SELECT 1") == (b"SELECT 1", 0)


@pytest.mark.parametrize("text", [b"SELECT %(name)s", b"SELECT %b", b"SELECT 5 %% 2"])
def test_only_positional_placeholders_can_be_numbered(text: bytes) -> None:
    with pytest.raises(ValueError, match="only %s placeholders"):
        numbered(text)
