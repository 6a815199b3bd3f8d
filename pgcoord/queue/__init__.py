"""The EventQueue service (being built)."""

from __future__ import annotations

from pgcoord.runtime import Service


class EventQueue(Service):
    """EventQueue: see DESIGN.md for its API."""


__all__ = ["EventQueue"]
