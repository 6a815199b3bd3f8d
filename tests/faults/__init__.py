"""Fault tests: servers that crash, fail over or stop answering, with real processes."""
