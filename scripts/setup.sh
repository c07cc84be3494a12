#!/usr/bin/env bash
# One-command set-up: a virtual environment in .venv with qualiclip (editable) and its extras.
# Usage: bash scripts/setup.sh [EXTRAS]   (default extras: dev,eval,serve,ray,onnx,metric)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-dev,eval,serve,ray,onnx,metric}"
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt -e ".[${extras}]"
echo "qualiclip set up in .venv: activate with 'source .venv/bin/activate'"
