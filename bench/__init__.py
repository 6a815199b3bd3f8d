"""pgcoord benchmarks: ``python -m bench NAME`` (never run as tests)."""
