"""Generated user data for the property tests (odd text, odd numbers, nested JSON, non-JSON),
and how a property judges what a call did with it (:func:`outcome`, :func:`same`).

Every strategy leans on the inputs that broke pgcoord before (issue 11): NUL, lone surrogates,
a surrogate pair written as two code units, 255/256-character names, combining marks; NaN,
infinities, ``-0.0``, integers past 64 bits, bools where numbers are expected.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Awaitable
from typing import Any

import psycopg
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from pgcoord.errors import InvalidInputError, InvalidTypeError, PgcoordError

#: One profile for every property: reproducible (no example database, derandomized), no
#: per-example deadline (the server is shared by loaded cores), fixtures shared on purpose.
DB_SETTINGS = settings(
    max_examples=100,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
#: For properties that do real work per example (a job processed, a Coordinator started).
SLOW_SETTINGS = settings(DB_SETTINGS, max_examples=30)
#: For pure properties (no I/O): many more examples cost nothing.
PURE_SETTINGS = settings(DB_SETTINGS, max_examples=300)

# -- text ----------------------------------------------------------------------------------

#: Every code point, surrogates (category Cs) and NUL included.
ANY_CHAR = st.characters(exclude_categories=())
SURROGATE = st.characters(categories=["Cs"])
COMBINING = st.characters(categories=["Mn", "Me"])

#: Hand-picked strings each of which has broken (or nearly broke) a service.
SPECIAL_TEXT = [
    "\x00",
    "a\x00b",
    "\ud800",
    "\udfff",
    "x\udc80y",
    "\ud83d\ude00",  # a surrogate pair written as two code units
    "\U0001f600",  # the character that pair encodes
    "e\u0301",  # e + combining acute
    "\u0301",  # a lone combining mark
    "a" * 255,
    "a" * 256,
    "\U0001f600" * 255,  # 255 characters, 1020 UTF-8 bytes
    "\U0001f600" * 64,  # more than Postgres's 63-byte identifier limit in few characters
    "é" * 256,
    " ",
    "\n\t",
    "*",
    "?",
    "%",
    "_",
    "\\",
    "'",
    '"',
    "\u202e",  # right-to-left override
    "\ufeff",
    "\uffff",
    "ǅ",  # titlecase: case folding must not merge names
    "İ",
    "ß",
    "Ω",
    "Ω",  # ohm sign vs omega: must stay distinct
]


@st.composite
def _padded(draw: st.DrawFn) -> str:
    # A special string inside ordinary text, at the 255/256 boundary sometimes.
    core = draw(st.sampled_from(SPECIAL_TEXT))
    length = draw(st.sampled_from([0, 1, 254, 255]))
    fill = draw(st.sampled_from(["k", "é", "\U0001f600"]))
    pad = fill * max(length - len(core), 0)
    return pad + core if draw(st.booleans()) else core + pad


#: Arbitrary Unicode text, biased towards the dangerous cases.
text = st.one_of(
    st.sampled_from(SPECIAL_TEXT),
    st.text(ANY_CHAR, max_size=20),
    st.text(st.one_of(SURROGATE, COMBINING, st.just("\x00"), ANY_CHAR), min_size=1, max_size=8),
    st.lists(st.sampled_from(SPECIAL_TEXT), min_size=1, max_size=3).map("".join),
    _padded(),
    st.text(ANY_CHAR, min_size=250, max_size=260),
)

#: Things that are not a str at all, where a str is expected (a fixed few: Hypothesis does not
#: repeat a test case, so an open-ended strategy here would crowd out the text cases).
NOT_STR = st.sampled_from(
    [None, 0, 1, -1, True, False, 1.5, math.nan, b"", b"k", b"\x00", ["k"], ("k",), object()]
)

#: Short plain names, so that the other arguments of a call get tested on their own too.
plain_names = st.one_of(st.just("k"), st.text("abcxyz_:-.é", min_size=1, max_size=8))

#: A key, channel, prefix or queue name as a user may pass it: mostly text, sometimes not.
names = st.one_of(plain_names, text, text, text, NOT_STR)

# -- numbers -------------------------------------------------------------------------------

SPECIAL_NUMBERS: list[Any] = [
    math.nan,
    -math.nan,
    math.inf,
    -math.inf,
    -0.0,
    0.0,
    0,
    -1,
    1,
    True,
    False,
    1e-300,
    5e-324,
    1e300,
    -1e300,
    1e9,
    1e9 + 1,
    1e9 - 1,
    (2**31 - 1) / 1000.0,
    (2**31) / 1000.0,
    2**31 - 1,
    2**31,
    -(2**31),
    -(2**31) - 1,
    2**53 + 1,
    2**63 - 1,
    2**63,
    -(2**63),
    -(2**63) - 1,
    2**64,
    10**400,
    -(10**400),
    0.001,
    0.5,
]

#: A number of seconds, a count or a priority as a user may pass it.
numbers = st.one_of(
    st.sampled_from(SPECIAL_NUMBERS),
    st.floats(),
    st.integers(),
    st.floats(min_value=0.001, max_value=60.0),
    st.integers(min_value=-3, max_value=100),
)

#: Numbers, and things that are not numbers at all (str, None, containers).
numbers_or_junk = st.one_of(
    st.sampled_from(SPECIAL_NUMBERS),
    numbers,
    numbers,
    st.sampled_from(["1", "", None, b"1", [1], 1j, {}]),
)

# -- JSON ------------------------------------------------------------------------------------

_json_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1, 10**400]),
    st.floats(),
    st.sampled_from([-0.0, 0.0, 1e300, -1e300, 5e-324, math.nan, math.inf, -math.inf]),
    text,
)

#: Nested JSON-like data: lists and dicts (keys odd Unicode) of the leaves above. May hold
#: values JSON cannot carry exactly (NaN, huge ints, split surrogate pairs): pgcoord must refuse
#: those with a typed error, never store something else.
json_data = st.recursive(
    _json_leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(text, inner, max_size=4),
    ),
    max_leaves=12,
)

#: Values that are not JSON data at all: pgcoord must raise TypeError before any write.
_not_json_leaves = st.one_of(
    st.just(("tuple",)),
    st.just({1, 2}),
    st.just(b"bytes"),
    st.just(object()),
    st.just(1j),
    st.just(frozenset()),
    st.dictionaries(st.integers(), st.integers(), min_size=1, max_size=2),
    st.dictionaries(st.sampled_from([None, 1.5, True, ("k",)]), st.none(), min_size=1, max_size=1),
)


@st.composite
def _with_bad_leaf(draw: st.DrawFn) -> Any:
    bad = draw(_not_json_leaves)
    wrap = draw(st.sampled_from(["plain", "list", "dict"]))
    if wrap == "list":
        return [draw(json_data), bad]
    if wrap == "dict":
        return {draw(text): bad}
    return bad


#: Mostly JSON-like data, sometimes containing something that is not JSON.
values = st.one_of(st.just(1), json_data, json_data, json_data, _with_bad_leaf())


def deeply_nested(depth: int) -> Any:
    """``[[[...]]]`` nested ``depth`` levels."""
    value: Any = []
    for _ in range(depth):
        value = [value]
    return value


# -- judging outcomes ----------------------------------------------------------------------

#: The only errors bad input may raise: typed, and ValueError/TypeError as the contract says.
TYPED = (InvalidInputError, InvalidTypeError)
#: Generous bound on one call: a call still running after it is stuck, whatever the machine.
BOUND = 60.0


async def outcome(call: Awaitable[Any]) -> tuple[bool, Any]:
    """Run ``call`` within :data:`BOUND`: ``(True, result)`` on success, ``(False, error)`` on a
    typed refusal. Any other error propagates (the property fails), and so does a hang."""
    try:
        return True, await asyncio.wait_for(call, BOUND)
    except TYPED as exc:
        assert isinstance(exc, ValueError | TypeError)
        return False, exc
    except TimeoutError as exc:
        if isinstance(exc, PgcoordError):
            raise  # LockAcquireError and CommandTimeoutError are TimeoutErrors of pgcoord's own
        raise AssertionError(f"stuck: the call did not return within {BOUND} s") from exc


def same(a: Any, b: Any) -> bool:
    """Exact JSON equality: equal values of the same types all the way down (``True`` is not
    ``1``, ``1.0`` is not ``1``, ``-0.0`` is not ``0.0``)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return bool(a == b)


def assert_same(got: Any, want: Any, what: str = "value") -> None:
    """Fail with both values (as ASCII, so surrogates show) unless :func:`same`."""
    assert same(got, want), f"{what} came back changed: wrote {want!a}, read {got!a}"


async def table(conn: psycopg.AsyncConnection[Any], query: str) -> list[tuple[Any, ...]]:
    """Every row ``query`` returns: the test's own fixed SQL (no user data), to compare a
    table's content before and after a call."""
    cur = await conn.execute(query.encode())
    return await cur.fetchall()


def tally(label: str) -> None:
    """Count ``label`` in Hypothesis's statistics (``--hypothesis-show-statistics``), when
    called from a property; a no-op from an explicit example."""
    with contextlib.suppress(InvalidArgument):
        event(label)


def sometimes(plain: Any, odd: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``plain`` two times in three, else a value of ``odd``: a call with many arguments then
    often has only one odd argument, so each argument's checks get exercised on their own."""
    return st.one_of(st.just(plain), st.just(plain), odd)
