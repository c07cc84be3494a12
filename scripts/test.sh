#!/usr/bin/env bash
# The test command: lint, type-check, the offline test suite and the package's docstring
# examples (pyproject.toml's pytest settings).
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
$py -m ruff check src tests benchmarks
$py -m mypy
$py -m pytest -q "$@"
