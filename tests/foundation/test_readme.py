"""The README's first example runs as written, against the server under test."""

from __future__ import annotations

import asyncio
import re
import textwrap
from typing import Any

import pytest

from tests.support import ROOT


def _first_python_block() -> str:
    text = (ROOT / "README.md").read_text()
    found = re.search(r"```python\n(.*?)```", text, re.DOTALL)
    assert found, "README.md has no python example"
    return found.group(1)


async def test_the_readme_example_subscribes_publishes_locks_and_enqueues(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The example takes its server from $PGCOORD_DSN, as a user's app would.
    monkeypatch.setenv("PGCOORD_DSN", dsn)
    sent: list[Any] = []
    done = asyncio.Event()

    async def send_email(message: Any, ctx: Any) -> None:
        sent.append(message)
        done.set()

    printed: list[Any] = []
    source = "async def example():\n" + textwrap.indent(_first_python_block(), "    ")
    # Wait inside the example's `async with` for the job and the message to be handled.
    source += "        await asyncio.wait_for(done.wait(), 30)\n"
    source += "        while not printed:\n            await asyncio.sleep(0.05)\n"
    source += "    return coord\n"
    scope: dict[str, Any] = {
        "asyncio": asyncio,
        "send_email": send_email,
        "done": done,
        "print": printed.append,
        "printed": printed,
    }
    exec(compile(source, "README.md", "exec"), scope)
    coord = await scope["example"]()
    # Every line did what it says: the job was processed, the message was delivered.
    assert sent == [{"to": "a@example.com"}]
    assert printed == [{"id": 1}]
    assert coord.dsn == dsn
