"""The LockManager service (being built)."""

from __future__ import annotations

from pgcoord.runtime import Service


class LockManager(Service):
    """LockManager: see DESIGN.md for its API."""


__all__ = ["LockManager"]
