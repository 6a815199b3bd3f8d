"""Pure helpers (no database): validation, JSON codec, name mapping, error hierarchy."""

from __future__ import annotations

import datetime
import math

import psycopg
import pytest

import pgcoord
from pgcoord import codec, names, validation


@pytest.mark.parametrize("value", ["a", "main", "app_2", "a" * 32])
def test_identifier_accepts_lowercase_names(value: str) -> None:
    assert validation.check_identifier(value, "app") == value


@pytest.mark.parametrize("value", ["", "A", "1app", "app-x", "a" * 33, "äpp", "app name"])
def test_identifier_refuses_bad_names(value: str) -> None:
    with pytest.raises(ValueError, match="app must match"):
        validation.check_identifier(value, "app")


def test_identifier_refuses_non_str() -> None:
    with pytest.raises(TypeError):
        validation.check_identifier(5, "schema")


@pytest.mark.parametrize("key", ["k", "ключ", "🔑" * 255, "MiXeD", "e\u0301 combining"])
def test_keys_accept_any_unicode_up_to_255(key: str) -> None:
    assert validation.check_key(key) == key


@pytest.mark.parametrize("key", ["with\x00nul", "lone \ud800", "low \udcff", "pair \ud83d\ude00"])
def test_stored_keys_refuse_what_postgres_text_cannot_hold(key: str) -> None:
    with pytest.raises(ValueError, match=r"NUL|surrogate"):
        validation.check_key(key)


@pytest.mark.parametrize("channel", ["with\x00nul", "lone \ud800", "low \udcff"])
def test_hashed_channels_accept_nul_and_lone_surrogates(channel: str) -> None:
    assert validation.check_key(channel, "channel", stored=False) == channel


def test_hashed_channels_refuse_a_pair_written_as_two_code_units() -> None:
    with pytest.raises(ValueError, match="surrogate pair"):
        validation.check_key("\ud83d\ude00", "channel", stored=False)


@pytest.mark.parametrize("value", [10**400, 1e300, -(10**400), 1e9 + 1])
def test_durations_refuse_what_overflows_timers(value: float) -> None:
    with pytest.raises(ValueError, match=r"too large|maximum"):
        validation.check_positive(value, "ttl")


def test_infinite_durations_pass_unless_finite_is_asked() -> None:
    assert validation.check_positive(float("inf"), "timeout") == float("inf")
    with pytest.raises(ValueError, match="finite"):
        validation.check_non_negative(float("inf"), "delay", finite=True)


def test_schema_refuses_the_prefix_postgres_reserves() -> None:
    with pytest.raises(ValueError, match="pg_"):
        validation.check_schema("pg_x")
    assert validation.check_schema("pgcoord") == "pgcoord"


def test_storable_text_keeps_what_it_can_and_escapes_the_rest() -> None:
    assert validation.storable("plain") == "plain"
    text = validation.storable("a\x00b\ud800c\udcff 😀")
    text.encode()  # a surrogate left in would raise here
    assert "\x00" not in text
    assert text == "a\\x00b\\ud800c\\udcff 😀"


def test_keys_refuse_empty_long_and_non_str() -> None:
    with pytest.raises(ValueError, match="empty"):
        validation.check_key("")
    with pytest.raises(ValueError, match="256"):
        validation.check_key("x" * 256)
    with pytest.raises(TypeError):
        validation.check_key(b"bytes")


@pytest.mark.parametrize("bad", [0, -1, -0.001, math.nan])
def test_positive_refuses_zero_negative_nan(bad: float) -> None:
    with pytest.raises(ValueError):
        validation.check_positive(bad, "ttl")


@pytest.mark.parametrize("bad", ["1", None, True])
def test_positive_refuses_non_numbers(bad: object) -> None:
    with pytest.raises(TypeError):
        validation.check_positive(bad, "ttl")


def test_optional_positive_passes_none_and_callable_check() -> None:
    assert validation.check_optional_positive(None, "ttl") is None
    assert validation.check_non_negative(0, "delay") == 0.0
    with pytest.raises(TypeError, match="handler must be callable"):
        validation.check_callable("not a function", "handler")


JSON_VALUES = [
    None,
    True,
    0,
    -(2**63),
    2**64 - 1,
    1.5,
    "",
    "NUL \x00 inside",
    "lone surrogate \ud800",
    "low then high \udcff\ud800",
    {"key \ud800": "x"},
    "emoji 🎉 and 中文",
    [],
    {},
    {"nested": [1, {"deep": [None, "x"]}]},
]


@pytest.mark.parametrize("value", JSON_VALUES)
def test_codec_round_trips_json_data(value: object) -> None:
    text = codec.encode(value)
    assert isinstance(text, str)
    # Postgres text cannot hold NUL bytes; the encoding must escape them.
    assert "\x00" not in text
    assert codec.decode(text) == value


@pytest.mark.parametrize(
    "value",
    [
        (1, 2),
        {1, 2},
        datetime.datetime(2026, 1, 1),
        object(),
        b"bytes",
        {1: "int key"},
        [complex(1, 2)],
    ],
)
def test_codec_refuses_non_json_with_type_error(value: object) -> None:
    with pytest.raises(TypeError):
        codec.encode(value)


@pytest.mark.parametrize("value", ["\ud83d\ude00", {"k": ["x", "pair \ud83d\ude00"]}])
def test_codec_refuses_a_pair_json_would_merge(value: object) -> None:
    # Sent as two code units, it would come back as the one character they encode.
    with pytest.raises(ValueError, match="surrogate pair"):
        codec.encode(value)


@pytest.mark.parametrize("value", [math.nan, math.inf, [-math.inf], 2**64, -(2**63) - 1])
def test_codec_refuses_values_json_cannot_round_trip(value: object) -> None:
    with pytest.raises(ValueError):
        codec.encode(value)


def test_codec_error_names_the_path() -> None:
    with pytest.raises(TypeError, match=r"message\['a'\]\[1\]"):
        codec.encode({"a": [1, {2}]}, "message")


def test_channel_names_fit_postgres_and_are_namespaced() -> None:
    long_channel = "ж" * 255
    channel = names.pg_channel("pgcoord", "main", "ps", long_channel)
    assert len(channel.encode()) <= 63
    assert channel == channel.lower()
    others = {
        names.pg_channel("pgcoord", "other", "ps", long_channel),
        names.pg_channel("pgcoord2", "main", "ps", long_channel),
        names.pg_channel("pgcoord", "main", "sync", long_channel),
        names.pg_channel("pgcoord", "main", "ps", "Ж" * 255),
    }
    assert channel not in others
    assert len(others) == 4


def test_advisory_keys_are_stable_signed_64_bit() -> None:
    key = names.advisory_key("pgcoord", "main", "lock", "orders")
    assert -(2**63) <= key < 2**63
    # The mapping is documented and stable across versions: BLAKE2b-64 of the NUL-joined parts.
    assert key == names.advisory_key("pgcoord", "main", "lock", "orders")
    assert key != names.advisory_key("pgcoord", "other", "lock", "orders")


def test_every_error_is_exported_and_shares_the_root() -> None:
    for name in pgcoord.errors.__all__:
        cls = getattr(pgcoord, name)
        assert issubclass(cls, pgcoord.PgcoordError)
    assert issubclass(pgcoord.InvalidInputError, ValueError)
    assert issubclass(pgcoord.InvalidTypeError, TypeError)
    assert issubclass(pgcoord.CacheNotFoundError, KeyError)


def test_connect_errors_carrying_a_connection_sqlstate_are_connection_failures() -> None:
    """PgBouncer answers a login while its server is down with 08P01 on a plain
    OperationalError: that is a lost connection (retryable), not a refused operation."""
    from pgcoord import _driver

    class LoginFailing(psycopg.OperationalError):
        sqlstate = "08P01"

    class Refused(psycopg.OperationalError):
        sqlstate = "42501"

    translated = _driver.translate(LoginFailing("server login has been failing"), "host=h")
    assert isinstance(translated, pgcoord.ConnectionFailedError)
    assert "h:5432" in str(translated)
    assert not isinstance(_driver.translate(Refused("no"), None), pgcoord.ConnectionFailedError)
