"""``pgcoord jobs failed|retry|purge`` against a real database."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

import pytest

import pgcoord
from pgcoord.queue import cli
from tests.support import CoordFactory


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="pgcoord")
    cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


async def test_cli_lists_retries_and_purges_dead_letters(
    make_coord: CoordFactory, dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    coord = await make_coord(app="shop")
    eq = coord.event_queue

    async def broken(message: Any, ctx: pgcoord.JobContext) -> None:
        raise KeyError(message)

    await eq.subscribe("mail", process=broken, concurrency=0, interval=0.05)
    ids = await eq.publish_many("mail", ["a", "b", "c"])
    deadline = time.monotonic() + 15
    while len(await eq.failed_jobs()) < 3:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    await eq.unsubscribe("mail")

    common = ["--dsn", dsn, "--app", "shop"]
    assert await asyncio.to_thread(_run, ["jobs", "failed", *common]) == 0
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sorted(j["id"] for j in listed) == ids
    assert listed[0]["error"].startswith("KeyError") and "traceback" not in listed[0]

    # Another app sees nothing of shop's dead letters.
    assert await asyncio.to_thread(_run, ["jobs", "failed", "--dsn", dsn, "--app", "other"]) == 0
    assert capsys.readouterr().out == ""

    assert await asyncio.to_thread(_run, ["jobs", "retry", *common, str(ids[0])]) == 0
    assert f"requeued 1 job(s): {ids[0]}" in capsys.readouterr().out
    assert (await eq.stats("mail"))["ready"] == 1

    with pytest.raises(SystemExit):
        await asyncio.to_thread(_run, ["jobs", "purge", *common])  # needs ids, --channel or --all
    assert await asyncio.to_thread(_run, ["jobs", "purge", *common, "--all"]) == 0
    assert "purged 2 failed job(s)" in capsys.readouterr().out
    assert await eq.failed_jobs() == []
