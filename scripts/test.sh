#!/usr/bin/env bash
# The test command: lint, type-check, the offline test suite and the package's docstring
# examples (pyproject.toml's pytest settings). Arguments go to pytest, except --fast: leave out
# the tests marked slow, the lane to run while working (the full command before a commit).
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
args=()
for arg in "$@"; do
    if [[ $arg == --fast ]]; then
        args+=(-m "not slow")
    else
        args+=("$arg")
    fi
done
$py -m ruff check src tests benchmarks
$py -m mypy
$py -m pytest -q ${args[@]+"${args[@]}"}
