#!/usr/bin/env bash
# The test command: lint, type-check and the offline test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
$py -m ruff check src tests benchmarks
$py -m mypy
$py -m pytest -q "$@"
