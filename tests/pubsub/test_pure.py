"""The pure parts of pub/sub, without a database: the envelope and the seen-id memory."""

from __future__ import annotations

import pytest

from pgcoord import codec
from pgcoord.errors import PayloadTooLargeError
from pgcoord.pubsub import envelope as wire
from pgcoord.pubsub.seen import SeenIds


def make(message: object, flags: int = 0, channel: str = "ch", sender: str = "me") -> str:
    text = wire.encode_message(message, 10_000_000)
    return wire.build(codec.encode(channel), codec.encode(sender), 7, flags, text)


@pytest.mark.parametrize(
    "message",
    [None, "", 0, -1.5, True, [], {}, {"a\x00": ["\ud800", "😀", 2**62]}, "x" * 10_000],
)
def test_an_envelope_round_trips_any_json_value(message: object) -> None:
    env = wire.parse(make(message, channel="頻道\x00", sender="host:1:ab"))
    assert env == wire.Envelope("頻道\x00", "host:1:ab", 7, 0, message)
    assert env.key == ("host:1:ab", 7)


def test_self_flags_decide_who_delivers() -> None:
    plain = wire.parse(make(1))
    skip = wire.parse(make(1, wire.flags_for(True, False)))
    only = wire.parse(make(1, wire.flags_for(False, True)))
    assert plain.wanted_by("me") and plain.wanted_by("you")
    assert not skip.wanted_by("me") and skip.wanted_by("you")
    assert only.wanted_by("me") and not only.wanted_by("you")
    with pytest.raises(ValueError):
        wire.flags_for(True, True)


def test_the_notify_limit_counts_utf8_bytes() -> None:
    assert wire.fits_notify("x" * 7_999)
    assert not wire.fits_notify("x" * 8_000)
    assert wire.fits_notify("é" * 3_999)  # 7,998 bytes
    assert not wire.fits_notify("é" * 4_000)  # 8,000 bytes


def test_the_maximum_payload_is_enforced_in_bytes() -> None:
    assert wire.encode_message("é" * 4, 10) == '"éééé"'
    with pytest.raises(PayloadTooLargeError):
        wire.encode_message("é" * 5, 11)


def test_pointers_and_malformed_envelopes() -> None:
    assert wire.pointer_id('{"p":12345}') == 12345
    assert wire.pointer_id(make("x")) is None
    for bad in ("[]", '{"c":"x"}', '{"c":1,"s":"a","n":1,"f":0,"m":0}', "not json"):
        with pytest.raises(ValueError):
            wire.parse(bad)


def test_debounce_keys_ignore_dict_order_but_not_content() -> None:
    assert wire.debounce_key({"a": 1, "b": 2}) == wire.debounce_key({"b": 2, "a": 1})
    assert wire.debounce_key({"a": 1}) != wire.debounce_key({"a": 2})
    assert wire.debounce_key(2**62) == wire.debounce_key(2**62)


def test_seen_ids_forget_only_after_the_horizon() -> None:
    seen = SeenIds(horizon=10.0)
    assert seen.add(("a", 1), now=0.0)
    assert not seen.add(("a", 1), now=5.0)
    assert seen.add(("a", 2), now=6.0)
    assert seen.add(("b", 1), now=10.5)  # evicts ("a", 1), seen at 0.0
    assert ("a", 1) not in seen
    assert ("a", 2) in seen
    assert len(seen) == 2
