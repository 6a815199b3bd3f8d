"""The wire format of pub/sub and sync messages (pure, no I/O).

A message travels as a JSON *envelope*, either as the NOTIFY payload itself or, when it does
not fit, as a row of ``message_log`` that the NOTIFY points to:

``{"c": channel, "s": sender, "n": seq, "f": flags, "m": message}``

* ``c`` the user's channel. Postgres channels are hashes of it, so receivers compare it and drop
  envelopes that reached them through a hash collision.
* ``s``/``n`` the sending instance's id and a per-instance sequence number: together a unique
  message id, used to deliver a sync message once although it may arrive both live and through
  the catch-up read, and to make a publish retried after a lost connection harmless.
* ``f`` :data:`SKIP_SELF` / :data:`ONLY_SELF` bits.
* ``m`` the message's JSON text, spliced in verbatim (never encoded twice).

A pointer ``{"p": id}`` names a ``message_log`` row holding the envelope. On the wake channel,
the payload is the committing transaction's xid: its rows are read by ``xid``. Sync messages
always travel as pointers (and so do pub/sub messages under ``pubsub_via_table``): a NOTIFY
anyone may send, a row only pgcoord's roles may write.
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

import orjson

from pgcoord import codec
from pgcoord.errors import InvalidInputError, PayloadTooLargeError

SKIP_SELF = 1
ONLY_SELF = 2

#: NOTIFY refuses payloads of 8000 bytes or more (the default server build's BLCKSZ limit).
NOTIFY_LIMIT = 8000


class Envelope(NamedTuple):
    """A decoded envelope."""

    channel: str
    sender: str
    seq: int
    flags: int
    message: Any

    @property
    def key(self) -> tuple[str, int]:
        """The message's unique id across the cluster."""
        return (self.sender, self.seq)

    def wanted_by(self, instance_id: str) -> bool:
        """Whether ``instance_id`` should deliver it, given ``skip_self``/``only_self``."""
        if self.flags & SKIP_SELF and self.sender == instance_id:
            return False
        return not (self.flags & ONLY_SELF and self.sender != instance_id)


def flags_for(skip_self: object, only_self: object) -> int:
    """The flag bits; refuses asking for both (that would deliver nowhere)."""
    if skip_self and only_self:
        raise InvalidInputError("skip_self and only_self exclude each other; pass one of them")
    return (SKIP_SELF if skip_self else 0) | (ONLY_SELF if only_self else 0)


def byte_size(text: str) -> int:
    """UTF-8 size of ``text`` (cheap for ASCII, the common case)."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def encode_message(message: object, max_bytes: int) -> str:
    """Validate ``message`` as JSON data and return its text, refusing more than ``max_bytes``."""
    text = codec.encode(message, "message")
    size = byte_size(text)
    if size > max_bytes:
        raise PayloadTooLargeError(
            f"message is {size:,} bytes of JSON; the maximum is {max_bytes:,} "
            "(Coordinator option pubsub_max_payload)"
        )
    return text


def build(channel_json: str, sender_json: str, seq: int, flags: int, message_text: str) -> str:
    """An envelope's JSON text from already-encoded parts."""
    return f'{{"c":{channel_json},"s":{sender_json},"n":{seq},"f":{flags},"m":{message_text}}}'


def fits_notify(envelope: str) -> bool:
    """Whether ``envelope`` can be the NOTIFY payload itself."""
    # Checking the character count first skips encoding for the common small message.
    return len(envelope) * 4 < NOTIFY_LIMIT or byte_size(envelope) < NOTIFY_LIMIT


#: The largest row id (``bigint``): a larger "pointer" can only be forged.
_ID_MAX = 2**63 - 1


def pointer_id(payload: str) -> int | None:
    """The row id if ``payload`` is a ``{"p": id}`` pointer, else None (an envelope).

    Raises ``ValueError`` for a payload that starts like a pointer but is not one: anyone
    with CONNECT may NOTIFY any channel, so the id is checked here rather than at the server.
    """
    if not payload.startswith('{"p":'):
        return None
    body = payload[5:-1]
    # str.isdigit() also accepts non-ASCII digits, which int() would read.
    if not (payload.endswith("}") and 0 < len(body) <= 19 and body.isascii() and body.isdigit()):
        raise ValueError(f"malformed pointer {payload[:40]!r}")
    row_id = int(body)
    if row_id > _ID_MAX:
        raise ValueError(f"pointer {row_id} is out of range")
    return row_id


def wake_xid(payload: str) -> int:
    """The transaction id a wake-up carries; raises ``ValueError`` for anything else."""
    if not (0 < len(payload) <= 19 and payload.isascii() and payload.isdigit()):
        raise ValueError(f"malformed wake-up {payload[:40]!r}")
    xid = int(payload)
    if xid > _ID_MAX:
        raise ValueError(f"wake-up xid {xid} is out of range")
    return xid


def parse(text: str) -> Envelope:
    """Decode an envelope; raises ``ValueError`` for anything malformed."""
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        # Nesting past orjson's depth limit (1024) is never an envelope pgcoord wrote: refused
        # here rather than handed to the standard library's decoder, which would recurse into
        # a RecursionError (anyone may NOTIFY thousands of brackets).
        if "depth limit" in str(exc):
            raise ValueError("envelope nests too deeply") from None
        try:
            # Lone surrogates, written as \uXXXX escapes, which orjson refuses.
            data = codec.decode(text)
        except RecursionError:
            raise ValueError("envelope nests too deeply") from None
    if not isinstance(data, dict):
        raise ValueError("envelope is not a JSON object")
    try:
        channel, sender, seq, flags = data["c"], data["s"], data["n"], data["f"]
        message = data["m"]
    except KeyError as exc:
        raise ValueError(f"envelope lacks {exc}") from None
    if not (isinstance(channel, str) and isinstance(sender, str)):
        raise ValueError("envelope channel/sender are not strings")
    if not (isinstance(seq, int) and isinstance(flags, int)):
        raise ValueError("envelope seq/flags are not integers")
    return Envelope(channel, sender, seq, flags, message)


def debounce_key(message: object) -> str:
    """A key equal for identical messages (dict key order does not matter)."""
    try:
        return orjson.dumps(message, option=orjson.OPT_SORT_KEYS).decode()
    except orjson.JSONEncodeError:
        return json.dumps(message, sort_keys=True, ensure_ascii=True)
