"""Properties of ``Coordinator(...)`` over generated app and schema names and option values.

Construction does no I/O: it either raises a typed error (InvalidInputError / InvalidTypeError)
naming the bad argument, or builds a Coordinator. Whatever it accepts must then start, serve a
cache round trip and stop within a generous bound: an option value that passes construction
and breaks the instance later (a timer that overflows, a statement the server refuses) is the
failure this looks for.
"""

from __future__ import annotations

import asyncio
import math
import warnings
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import pgcoord
from tests.properties import strategies as gen
from tests.properties.strategies import BOUND, assert_same, outcome

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(900)]

_DEFAULTS = pgcoord.Coordinator.option_defaults()
_OPTION_NAMES = sorted(_DEFAULTS)
_identifiers = st.from_regex(r"[a-z][a-z0-9_]{0,40}", fullmatch=True)

_option_value = st.one_of(
    gen.numbers_or_junk,
    st.sampled_from(["off", "on", "local", "bogus", "", "\x00"]),
)

options = st.dictionaries(
    st.one_of(st.sampled_from(_OPTION_NAMES), st.sampled_from(_OPTION_NAMES), gen.text),
    _option_value,
    max_size=3,
)

#: The constructor's own numeric keywords, with their defaults.
_CORE = {"max_connections": 10, "connect_timeout": 10.0, "heartbeat": 5.0, "command_timeout": 30.0}


#: Options a user could plausibly mean: positive numbers of the option's own type, extremes
#: included (these pass construction more often, so the start property gets to run them).
def _plausible(name: str) -> st.SearchStrategy[Any]:
    default = {**_DEFAULTS, **_CORE}[name]
    if isinstance(default, bool):
        return st.booleans()
    if isinstance(default, int) or default is None:
        return st.sampled_from([1, 2, 1000, 2**31 - 1, 2**31, 2**63, 10**400])
    if isinstance(default, float):
        return st.sampled_from([1e-300, 0.001, 0.5, 1e9, 1e9 + 1, math.inf, 10**400, 1, True])
    return st.sampled_from(["off", "on", "local", "remote_write", "remote_apply"])


plausible_options = st.sampled_from(sorted([*_OPTION_NAMES, *_CORE])).flatmap(
    lambda name: st.fixed_dictionaries({name: _plausible(name)})
)

_KNOWN = set(_OPTION_NAMES) | {"app", "schema", "max_connections", "connect_timeout", "heartbeat"}


async def _construct(dsn: str, kwargs: dict[str, Any]) -> pgcoord.Coordinator:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return pgcoord.Coordinator(dsn, **kwargs)


def _core() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {},
        optional={
            "app": gen.sometimes("main", st.one_of(_identifiers, gen.names)),
            "schema": gen.sometimes(
                "pgcoord", st.one_of(_identifiers, st.just("pg_x"), st.just("pg_"), gen.names)
            ),
            "max_connections": gen.sometimes(10, gen.numbers_or_junk),
            "connect_timeout": gen.sometimes(5.0, gen.numbers_or_junk),
            "heartbeat": gen.sometimes(1.0, gen.numbers_or_junk),
            "command_timeout": gen.sometimes(30.0, gen.numbers_or_junk),
        },
    )


@gen.PURE_SETTINGS
@given(core=_core(), extra=options)
async def test_construction_refuses_with_a_typed_error_or_builds(
    module_dsn: str, core: dict[str, Any], extra: dict[str, Any]
) -> None:
    kwargs = {**extra, **core}
    done, made = await outcome(_construct(module_dsn, kwargs))
    gen.tally(f"construction {'accepted' if done else 'refused'}")
    if not done:
        return
    assert isinstance(made, pgcoord.Coordinator)
    assert set(kwargs) <= _KNOWN | {"command_timeout"}, "an unknown option was accepted"
    assert made.app == kwargs.get("app", "main")
    assert made.schema == kwargs.get("schema", "pgcoord")
    assert not made.running


async def check_start(dsn: str, app: str, kwargs: dict[str, Any]) -> None:
    """Accepted options start an instance that serves a cache round trip and stops."""
    done, made = await outcome(_construct(dsn, {"app": app, **kwargs}))
    gen.tally(f"construction {'accepted' if done else 'refused'}")
    if not done:
        return
    coord: pgcoord.Coordinator = made
    # A timeout too short for any round trip may fail start(), with pgcoord's own error.
    hurried = any(
        isinstance(kwargs.get(name), float) and kwargs[name] < 0.01
        for name in ("connect_timeout", "command_timeout")
    )
    try:
        try:
            await asyncio.wait_for(coord.start(), BOUND)
        except pgcoord.ConnectionFailedError:
            if hurried:
                return
            raise
        value = {"ok": [True, 1.5, "\x00"]}
        try:
            stored, error = await outcome(coord.cache.set("k", value))
            if stored:
                assert_same(await asyncio.wait_for(coord.cache.get("k"), BOUND), value)
            elif not (hurried and isinstance(error, pgcoord.ConnectionFailedError)):
                assert isinstance(error, pgcoord.PayloadTooLargeError), error
        except pgcoord.ConnectionFailedError:
            # Under 10 ms a round trip after start() may time out too (CI: a get at 1 ms).
            if not hurried:
                raise
    finally:
        await asyncio.wait_for(coord.stop(), BOUND)
    assert not coord.running


@gen.PURE_SETTINGS  # a start costs milliseconds on a warm server, and there are ~300 pairs
@given(app=gen.sometimes("main", _identifiers), kwargs=plausible_options)
async def test_accepted_options_start_serve_and_stop(
    module_dsn: str, app: str, kwargs: dict[str, Any]
) -> None:
    await check_start(module_dsn, app, kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"heartbeat": math.inf}, id="inf-heartbeat"),
        pytest.param({"heartbeat": 1e9}, id="huge-heartbeat"),
        pytest.param({"command_timeout": math.inf}, id="inf-command-timeout"),
        pytest.param({"cache_sweep_interval": math.inf}, id="inf-cache-sweep-interval"),
        pytest.param({"lock_recheck": math.inf}, id="inf-lock-recheck"),
        pytest.param({"lock_idle_timeout": math.inf}, id="inf-lock-idle-timeout"),
        pytest.param({"queue_idle_poll": math.inf}, id="inf-queue-idle-poll"),
        pytest.param({"queue_lease": math.inf}, id="inf-queue-lease"),
        pytest.param({"queue_grace": math.inf}, id="inf-queue-grace"),
        pytest.param({"queue_idempotency_window": math.inf}, id="inf-idempotency-window"),
        pytest.param({"pubsub_spill_retention": math.inf}, id="inf-spill-retention"),
        pytest.param({"sync_log_retention": math.inf}, id="inf-sync-log-retention"),
        pytest.param({"cache_wrap_timeout": math.inf}, id="inf-wrap-timeout"),
        pytest.param({"queue_notify_gap": math.inf}, id="inf-notify-gap"),
        pytest.param({"max_connections": 10**400}, id="huge-max-connections"),
        pytest.param({"queue_batch": 2**63}, id="queue-batch-past-int64"),
        pytest.param({"cache_sweep_batch": 2**63}, id="sweep-batch-past-int64"),
        pytest.param({"pubsub_backlog": 10**400}, id="huge-backlog"),
        pytest.param({"queue_vacuum_every": 0}, id="vacuum-never"),
    ],
)
async def test_start_examples(module_dsn: str, kwargs: dict[str, Any]) -> None:
    await check_start(module_dsn, "main", kwargs)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        pytest.param({"app": "Main"}, ValueError, id="uppercase-app"),
        pytest.param({"app": "a" * 33}, ValueError, id="33-char-app"),
        pytest.param({"app": "a\x00"}, ValueError, id="nul-app"),
        pytest.param({"app": 1}, TypeError, id="int-app"),
        pytest.param({"schema": "pg_x"}, ValueError, id="reserved-schema"),
        pytest.param({"schema": "\ud800"}, ValueError, id="surrogate-schema"),
        pytest.param({"heartbeat": math.nan}, ValueError, id="nan-heartbeat"),
        pytest.param({"heartbeat": True}, TypeError, id="bool-heartbeat"),
        pytest.param({"max_connections": 1.5}, TypeError, id="float-max-connections"),
        pytest.param({"nope": 1}, TypeError, id="unknown-option"),
        # libpq takes whole seconds: an infinite wait for a connection is refused up front.
        pytest.param({"connect_timeout": math.inf}, ValueError, id="inf-connect-timeout"),
    ],
)
async def test_construction_refusal_examples(
    module_dsn: str, kwargs: dict[str, Any], error: type[Exception]
) -> None:
    with pytest.raises(error) as raised:
        await _construct(module_dsn, kwargs)
    assert isinstance(raised.value, pgcoord.InvalidInputError | pgcoord.InvalidTypeError)
